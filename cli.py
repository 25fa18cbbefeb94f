"""Run a Kiln workflow headless: ComfyUI's own validator and executor in this process, no server, no browser.

    python custom_nodes/comfyui-kiln/cli.py --workflow my_lora.json [--set 6.steps=2000 ...] [-- COMFYUI ARGS]
    python custom_nodes/comfyui-kiln/cli.py --config kohya_train.toml [--family auto|sd1|sdxl|sd3|flux] [...]

``--config`` takes kohya's training ``--config_file`` (trainer_core/kohya/config.py maps its keys onto Load
Dataset → Cache Latents → LoRA Config → Train → Save LoRA, or, for a train_db.py config (no network_module),
onto Train DreamBooth → Save Checkpoint (Kiln); every input it does not set keeps the node's default); the
family is read from the checkpoint's keys unless given (a Flux file is the diffusion model alone, with clip_l,
t5xxl and ae beside it, as flux_train_network.py takes them).

The workflow is an API-format file (ComfyUI's "Export (API)", or example_workflows/api/*.json). ``--set``
changes one input before running: ``NODE.INPUT=VALUE`` where NODE is the node id or its class_type (all nodes
of that type), VALUE JSON (``2000``, ``true``, ``"text"``) or else a plain string. Arguments after ``--`` go
to ComfyUI's own parser (``--cpu``, ``--base-directory DIR``, ``--extra-model-paths-config FILE``, ...).
ComfyUI is found from ``--comfyui``, ``COMFYUI_PATH``, or the folder this pack is installed in. Progress, the
loss and errors are printed; the exit code is 0 on success, 1 when validation or a node fails.

Several processes train one LoRA when a launcher starts this file (docs/multi-gpu.md):

    torchrun --nproc_per_node=N cli.py --workflow run.json        (accelerate launch --multi_gpu ... works alike)

Each process binds the GPU numbered LOCAL_RANK (CUDA_VISIBLE_DEVICES, set before ComfyUI touches CUDA), joins the
process group (NCCL on GPUs, gloo with ``-- --cpu``), and runs the same graph; processes other than rank 0 run only
the Train node and what feeds it, print only errors, and write nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid

PACK = os.path.dirname(os.path.abspath(__file__))


def load_compat():
    """nodes/comfy/compat.py, the one module that knows how ComfyUI versions differ (loaded by file: this pack's
    nodes/ package is shadowed by ComfyUI's nodes.py here; the test harness loads it through here too)."""
    import importlib.util

    if "kiln_compat" in sys.modules:
        return sys.modules["kiln_compat"]
    spec = importlib.util.spec_from_file_location("kiln_compat", os.path.join(PACK, "nodes", "comfy", "compat.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before exec: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def find_comfyui(explicit: str | None) -> str:
    for candidate in (explicit, os.environ.get("COMFYUI_PATH"), os.path.dirname(os.path.dirname(PACK))):
        if candidate and os.path.isfile(os.path.join(candidate, "main.py")):
            return os.path.abspath(candidate)
    sys.exit("kiln: ComfyUI not found: pass --comfyui /path/to/ComfyUI (the folder with main.py) or set COMFYUI_PATH.")


def apply_overrides(prompt: dict, overrides: list[str]) -> None:
    for item in overrides:
        target, sep, raw = item.partition("=")
        node, dot, name = target.rpartition(".")
        if not sep or not dot:
            sys.exit(f"kiln: --set {item!r}: write NODE.INPUT=VALUE, e.g. 6.steps=2000 or KilnTrainSD1.steps=2000")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        ids = [k for k, v in prompt.items() if k == node or v.get("class_type") == node]
        if not ids:
            sys.exit(f"kiln: --set {item!r}: no node with id or class_type {node!r} in the workflow")
        for k in ids:
            prompt[k]["inputs"][name] = value


def family_of(checkpoint: str) -> str:
    """sd1 / sdxl / sd3 / flux from the checkpoint's key names (reads the safetensors header only). A .ckpt (pickle)
    is not opened here: finding its family would mean unpickling it, so --family must say it."""
    keys = list(header_shapes(checkpoint))
    if any(k.startswith(FLUX_PREFIXES) for k in keys):
        return "flux"
    if any(".joint_blocks." in k for k in keys):
        return "sd3"
    if any(k.startswith(("conditioner.embedders.1.", "model.diffusion_model.label_emb.")) for k in keys):
        return "sdxl"
    return "sd1"


FLUX_PREFIXES = ("double_blocks.", "model.diffusion_model.double_blocks.")  # BFL's layout, bare or in a checkpoint


def header_shapes(checkpoint: str) -> dict[str, list[int]]:
    """Each tensor's shape from a safetensors header (no weights read)."""
    from safetensors import SafetensorError, safe_open

    if not checkpoint.lower().endswith(".safetensors"):
        sys.exit(f"kiln: {checkpoint} is not a .safetensors file, so its family cannot be read from its header "
                 f"(a .ckpt would have to be unpickled): pass --family sd1, sdxl or sd3 (ComfyUI's loader then loads "
                 f"it), or convert it to .safetensors.")
    try:
        with safe_open(checkpoint, framework="pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        sys.exit(f"kiln: {checkpoint} cannot be read as safetensors ({e}); check the file, or pass --family.")


def check_flux_file(path: str, model: str, flat: dict) -> None:
    """kohya's model_type against the file (Chroma has distilled_guidance_layer), and a run without t5xxl against
    the model's context width (txt_in): only a Flux made for CLIP-L's 768-wide states takes CLIP-L alone."""
    shapes = header_shapes(model)
    prefix = next(p[:-len("double_blocks.")] for p in FLUX_PREFIXES if any(k.startswith(p) for k in shapes))
    chroma = any(k.startswith(prefix + "distilled_guidance_layer.") for k in shapes)
    if chroma != (flat.get("model_type") == "chroma"):
        sys.exit(f"kiln: {path}: {model} is a {'Chroma' if chroma else 'FLUX.1'} model, but model_type is "
                 f"{flat.get('model_type', 'flux (the default)')}: set model_type = \"{'chroma' if chroma else 'flux'}\""
                 f", as kohya's flux_train_network needs.")
    width = shapes.get(prefix + "txt_in.weight", [0, 0])[1]
    if not flat.get("t5xxl") and width != 768:
        sys.exit(f"kiln: {path}: {model} takes a {width}-wide context (T5-XXL's): give t5xxl, as kohya's "
                 f"flux_train_network needs.")


def read_kohya_config(path: str) -> dict:
    """The config's keys, read once (kohya_config.read_config) for the graph and ComfyUI's settings alike."""
    from trainer_core.errors import KilnError
    from trainer_core.kohya.config import read_config
    try:
        return read_config(open(path, encoding="utf-8").read(), path)
    except KilnError as e:
        sys.exit(f"kiln: {e}")


def prompt_from_kohya_config(path: str, flat: dict, config_dir: str, family: str, script: str | None = None) -> dict:
    """kohya's config (its read_kohya_config keys) as a Kiln graph; paths resolved like kohya's (relative to the
    config's folder here, or the working directory for a command line), the checkpoint's and output's folders
    registered with ComfyUI. ``script``: the kohya script of a command line, which fixes the family."""
    import folder_paths
    from trainer_core.errors import KilnError
    from trainer_core.kohya.config import TE_FILES, graph_from_config, node_of
    from trainer_core.kohya.dataset_flags import dataset_document

    def resolve(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(config_dir, p)

    try:
        ckpt = flat.get("pretrained_model_name_or_path", "")
        if ckpt and os.path.isdir(resolve(ckpt)):
            kind = ("a Diffusers-format folder" if os.path.isfile(os.path.join(resolve(ckpt), "model_index.json"))
                    else "a folder")
            sys.exit(f"kiln: {path}: pretrained_model_name_or_path {ckpt!r} is {kind}. Kiln trains the single-file "
                     f"checkpoint ComfyUI's Load Checkpoint reads (.safetensors, or .ckpt with --family); Diffusers "
                     f"folders are not loaded. Convert it to a single file (diffusers' "
                     f"convert_diffusers_to_original_stable_diffusion.py / ..._sdxl.py) and name that file.")
        folders = {"flux": ["diffusion_models"], "auto": ["checkpoints", "diffusion_models"]}.get(family, ["checkpoints"])
        ckpt_file = resolve(ckpt) if ckpt and os.path.isfile(resolve(ckpt)) else next(
            filter(None, (folder_paths.get_full_path(f, ckpt) for f in folders)), None)
        if not ckpt_file:
            sys.exit(f"kiln: {path}: pretrained_model_name_or_path {ckpt!r} is neither a file nor in "
                     f"models/{' or models/'.join(folders)}.")
        fam = family if family != "auto" else family_of(ckpt_file)
        if script and ckpt_file.lower().endswith(".safetensors") and family_of(ckpt_file) != fam:
            from trainer_core.kohya.flags import SCRIPTS
            found = family_of(ckpt_file)
            fits = [s for s, (f, _) in SCRIPTS.items() if f == found and s != "train_db.py"]
            sys.exit(f"kiln: {script} trains {fam} models, but {ckpt} is a {found} checkpoint: run "
                     f"{' or '.join(fits)} instead, as kohya would need.")
        prompt, notes = graph_from_config(flat, path, fam)
        if fam == "flux" and ckpt_file.lower().endswith(".safetensors"):
            check_flux_file(path, ckpt_file, flat)
        dataset_file = resolve(flat.get("dataset_config", ""))
        if os.path.isfile(dataset_file):
            from trainer_core.kohya.config import check_dataset_masks
            check_dataset_masks(flat, open(dataset_file, encoding="utf-8").read(), path)
    except KilnError as e:
        sys.exit(f"kiln: {e}")
    train = node_of(prompt, "train")
    if fam == "flux":  # the diffusion model alone, as Load Diffusion Model lists it
        folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(ckpt_file))
        node_of(prompt, "checkpoint")["inputs"]["unet_name"] = os.path.basename(ckpt_file)
    else:
        folder_paths.add_model_folder_path("checkpoints", os.path.dirname(ckpt_file))
        node_of(prompt, "checkpoint")["inputs"]["ckpt_name"] = os.path.basename(ckpt_file)
    dataset = node_of(prompt, "dataset")["inputs"]
    dataset["folder"] = resolve(dataset["folder"])
    try:
        doc, dataset_notes = dataset_document(flat, resolve, path)
    except KilnError as e:
        sys.exit(f"kiln: {e}")
    notes += dataset_notes
    if doc is not None:  # kohya's dataset flags: the dataset TOML they describe, read by Load Dataset
        dataset["folder"] = write_dataset_toml(doc, flat.get("output_name") or "last")
        notes.append(f"the dataset flags as a kohya dataset config: {dataset['folder']}")
    if flat.get("resume"):
        train["inputs"]["resume_from"] = register_resume(path, resolve(flat["resume"]), train["class_type"])
    if train["inputs"].get("sample_prompts"):  # kohya's prompt file, relative to the config like the rest
        train["inputs"]["sample_prompts"] = resolve(train["inputs"]["sample_prompts"])
    vae_key = "ae" if fam == "flux" else "vae"
    if flat.get(vae_key):  # kohya's --vae (Flux: --ae): a separate VAE file, loaded by ComfyUI's VAELoader
        loader = node_of(prompt, "vae")["inputs"]
        vae = resolve(loader["vae_name"])
        if not os.path.isfile(vae):
            sys.exit(f"kiln: {path}: {vae_key} {flat.get(vae_key)!r} is not a file.")
        folder_paths.add_model_folder_path("vae", os.path.dirname(vae))
        loader["vae_name"] = os.path.basename(vae)
    encoders = node_of(prompt, "text_encoders")["inputs"] if any(flat.get(k) for k in TE_FILES) else {}
    for key, name in list(encoders.items()):  # kohya's clip_l / clip_g / t5xxl files
        if key.startswith("clip_name") and os.path.isfile(resolve(name)):
            folder_paths.add_model_folder_path("text_encoders", os.path.dirname(resolve(name)))
            encoders[key] = os.path.basename(name)
    if flat.get("network_weights"):
        weights = resolve(flat["network_weights"])
        if not os.path.isfile(weights):
            sys.exit(f"kiln: {path}: network_weights {flat['network_weights']!r} is not a file.")
        folder_paths.add_model_folder_path("loras", os.path.dirname(weights))
        train["inputs"]["resume_from"] = os.path.basename(weights)
        if flat.get("dim_from_weights"):
            from trainer_core.lora.from_weights import config_from_weights
            from trainer_core.lora.io import load_lora_file
            try:
                shape = config_from_weights(load_lora_file(weights)[0], weights)
            except KilnError as e:
                sys.exit(f"kiln: {e}")
            node_of(prompt, "lora_config")["inputs"].update(shape)
            print(f"[kiln] dim_from_weights: {shape}", flush=True)
    if flat.get("output_dir"):
        os.makedirs(resolve(flat["output_dir"]), exist_ok=True)
        kind = "checkpoints" if train["class_type"] == "KilnTrainDreamBooth" else "loras"  # train_db.py: a model
        folder_paths.add_model_folder_path(kind, resolve(flat["output_dir"]), is_default=True)
    print(f"[kiln] {path}: a {fam} run of {train['class_type']}", flush=True)
    for note in notes:
        print(f"[kiln] note: {note}", flush=True)
    return prompt


def write_dataset_toml(doc: dict, name: str) -> str:
    """The dataset kohya's flags describe, as a dataset TOML in ComfyUI's temp folder (cleared at its start)."""
    import folder_paths
    from trainer_core.errors import KilnError
    from trainer_core.files.atomic import write_atomically
    from trainer_core.kohya.dataset_flags import toml_text
    target = os.path.join(folder_paths.get_temp_directory(), "kiln-cli", f"{os.path.basename(name)}-dataset.toml")
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(toml_text(doc))

    try:
        return write_atomically(target, write, "the dataset config",
                                "Free space in ComfyUI's temp folder or pass -- --temp-directory DIR.")
    except KilnError as e:
        sys.exit(f"kiln: {e}")


def register_resume(path: str, where: str, train_class: str) -> str:
    """kohya's --resume names a state folder (<name>-000002-state, <name>-step00000500-state); Kiln's state is the
    .kiln-state beside the save of the same name (<name>-000002.safetensors). The save's folder is registered with
    ComfyUI and its name returned for the Train node's resume_from."""
    import folder_paths
    from trainer_core.files.resume import state_path
    save = where
    if not os.path.isfile(save):
        stem = where.rstrip("/\\")
        save = (stem[:-len("-state")] if stem.endswith("-state") else stem) + ".safetensors"
    if not os.path.isfile(save) or not os.path.isfile(state_path(save)):
        what = "has no .kiln-state" if os.path.isfile(save) else "is not a file"
        sys.exit(f"kiln: {path}: resume {where}: Kiln resumes from a save with its .kiln-state beside it (e.g. "
                 f"out/my_lora-000002.safetensors for kohya's out/my_lora-000002-state; save_every_n_epochs or "
                 f"save_every_n_steps write them). {save} {what}; kohya's own state folders are not read.")
    kind = "checkpoints" if train_class == "KilnTrainDreamBooth" else "loras"
    folder_paths.add_model_folder_path(kind, os.path.dirname(os.path.abspath(save)))
    return os.path.basename(save)


def apply_comfyui_settings(path: str, flat: dict) -> None:
    """What the kohya config asks of ComfyUI itself (e.g. fp8_base: load the diffusion model as fp8), set on its
    parsed arguments before any model loads."""
    from comfy.cli_args import args
    from trainer_core.kohya.config import comfyui_settings

    for name, value in comfyui_settings(flat).items():
        setattr(args, name, value)
        print(f"[kiln] {path}: ComfyUI runs with --{name.replace('_unet', '-unet')}", flush=True)


def fill_defaults(prompt: dict, classes: dict) -> None:
    """Every widget input the prompt leaves out gets the node's own default (as the frontend would)."""
    for node in prompt.values():
        cls = classes.get(node["class_type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, info in spec.get(group, {}).items():
                if name in node["inputs"] or not isinstance(info, (list, tuple)) or not info:
                    continue
                kind, extra = info[0], (info[1] if len(info) > 1 and isinstance(info[1], dict) else {})
                if "default" in extra:
                    node["inputs"][name] = extra["default"]
                elif isinstance(kind, list) and kind and group == "required":
                    node["inputs"][name] = kind[0]


class Host:
    """What ComfyUI's executor reports to, in the server's place: node starts, progress, Kiln's loss, errors."""
    client_id = "kiln-cli"
    last_node_id = None

    def __init__(self, prompt: dict, node_replace_manager=None, rank: int = 0):
        self.prompt = prompt
        self.node_replace_manager = node_replace_manager  # ComfyUI ≥ 0.33: node packs register with it at import
        self.rank = rank  # in a multi-process run only rank 0 reports progress; every rank reports its errors
        self.tag = f"[kiln rank {rank}]" if rank else "[kiln]"
        self.ran: list[str] = []  # the nodes this process executed

    def title(self, node_id) -> str:
        node = self.prompt.get(str(node_id), {})
        return f"{node_id} {node.get('_meta', {}).get('title') or node.get('class_type', '')}".strip()

    def send_sync(self, event, data, sid=None) -> None:
        if event == "executing" and data.get("node"):
            self.ran.append(str(data["node"]))
        if self.rank and event not in ("execution_error", "execution_interrupted"):
            return
        if event == "executing" and data.get("node"):
            print(f"[kiln] running node {self.title(data['node'])}", flush=True)
        elif event == "kiln.loss":
            step, total = data["step"], data["total"]
            if step == total or step % max(1, total // 20) == 0:
                epoch = f"epoch {data['epoch']}/{data['epochs']}  " if data.get("epochs", 1) > 1 else ""
                print(f"[kiln]   {epoch}step {step}/{total}  loss {data['loss']:.4f}  lr {data['lr']:.2e}  "
                      f"{data['seconds']:.1f}s", flush=True)
        elif event == "execution_error":
            print(f"{self.tag} error in node {self.title(data.get('node_id'))}: {data.get('exception_message', '').strip()}",
                  file=sys.stderr, flush=True)
        elif event == "execution_interrupted":
            print(f"{self.tag} interrupted in node {self.title(data.get('node_id'))}", file=sys.stderr, flush=True)

    def queue_updated(self) -> None:
        pass


def kohya_command(own: list[str]):
    """(cli.py's own options, the KohyaCommand) when the arguments hold one of kohya's scripts, else (own, None)."""
    from trainer_core.errors import KilnError
    from trainer_core.kohya.command_line import read_command
    from trainer_core.kohya.config import known_keys
    try:
        found = read_command(own, read_kohya_config, known_keys())
    except KilnError as e:
        sys.exit(f"kiln: {e}")
    return found if found else (own, None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    comfy_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    own, command = kohya_command(own)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = ap.add_mutually_exclusive_group(required=command is None)
    source.add_argument("--workflow", help="API-format workflow JSON")
    source.add_argument("--config", help="kohya training config TOML (--config_file)")
    ap.add_argument("--family", choices=("auto", "sd1", "sdxl", "sd3", "flux"), default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE")
    ap.add_argument("--comfyui", default=None, help="the ComfyUI folder (with main.py)")
    opts = ap.parse_args(own)
    opts.kohya = command
    config_dir = os.path.dirname(os.path.abspath(opts.config)) if opts.config else None
    if command is not None:
        if opts.workflow or opts.config or opts.family != "auto":
            sys.exit(f"kiln: {command.script} names the trainer and its flags carry the settings: leave out "
                     f"--workflow, --config and --family (kohya's --config_file goes after the script).")
        config_dir = os.getcwd()  # kohya reads relative paths against the directory it is started in
    if opts.workflow:
        with open(opts.workflow, encoding="utf-8") as f:
            prompt = json.load(f)
        if not isinstance(prompt, dict) or not all(isinstance(v, dict) and "class_type" in v for v in prompt.values()):
            sys.exit(f"kiln: {opts.workflow} is not an API-format workflow (export it with 'Export (API)').")

    comfyui = find_comfyui(opts.comfyui)
    from trainer_core.training import distributed
    if command is not None and command.launcher:
        check_launcher(command, distributed.launched())
    if distributed.launched() and "--cpu" not in comfy_args:  # before ComfyUI's model management touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = distributed.visible_device()
    try:
        return run(opts, prompt if opts.workflow else None, comfyui, comfy_args, config_dir)
    finally:
        distributed.shutdown()


def check_launcher(command, launched: bool) -> None:
    """A pasted ``accelerate launch ...`` prefix: cli.py runs in the process it was started in, so a prefix asking
    for several processes must start cli.py itself."""
    from trainer_core.kohya.command_line import processes_asked
    prefix = " ".join(command.launcher)
    n = processes_asked(command.launcher)
    if n > 1 and not launched:
        sys.exit(f"kiln: '{prefix}' asks for {n} processes, but it comes after cli.py, which runs as one process. "
                 f"Put the launcher before cli.py: {' '.join(command.launcher[:2])} ... cli.py {command.script} ... "
                 f"(docs/multi-gpu.md), or remove it to train in one process.")
    print(f"[kiln] '{prefix}': the launcher's options are not used; cli.py runs {command.script} "
          f"{'in this process group' if launched else 'in this process'}", flush=True)


def prompt_from_kohya_command(command, base: str) -> dict:
    """A pasted kohya command (its script and flags, --config_file merged under them) as a Kiln graph: the script
    chooses the trainer as kohya's scripts do; paths are relative to the directory cli.py was started in."""
    from trainer_core.kohya.config import TRAIN_NODE
    flat, script = command.keys, command.script
    if command.dreambooth and "network_module" in flat:
        sys.exit(f"kiln: {script} fine-tunes the whole model (DreamBooth), but network_module is set (in "
                 f"{command.config_file or 'the command'}): run train_network.py for a LoRA, or remove it.")
    if not command.dreambooth and "network_module" not in flat:
        sys.exit(f"kiln: {script} needs --network_module (networks.lora, networks.lora_sd3, networks.lora_flux or "
                 f"lycoris.kohya), as in kohya, where the script stops without it.")
    if command.family not in TRAIN_NODE:
        sys.exit(f"kiln: {script}: cli.py does not run {command.family} commands yet (train it with its Train node "
                 f"in a workflow, cli.py --workflow); it runs SD 1.x/2.x (train_network.py, train_db.py), SDXL "
                 f"(sdxl_train_network.py), SD3 (sd3_train_network.py) and Flux (flux_train_network.py).")
    return prompt_from_kohya_config(script, flat, base, command.family, script=script)


def join_process_group(prompt: dict):
    """In a process torchrun / accelerate launch started: join the group on ComfyUI's device and return
    (rank, the Train node's id); (0, None) in a plain run."""
    from trainer_core.training import distributed
    if not distributed.launched():
        return 0, None
    trainers = [k for k, v in prompt.items() if v["class_type"] in distributed.TRAINERS]
    if len(trainers) != 1:
        sys.exit(f"kiln: a multi-process run (WORLD_SIZE={os.environ['WORLD_SIZE']}) trains one model: the workflow "
                 f"must hold exactly one of {', '.join(distributed.TRAINERS)} (it has {len(trainers)}).")
    import logging
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    backend = distributed.init(device)
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
    else:
        print(f"[kiln] {distributed.world()} processes ({backend}); each binds one device, rank 0 on {device}; "
              f"node {trainers[0]} trains on a global batch of batch_size x {distributed.world()}", flush=True)
    return distributed.rank(), trainers[0]


def run(opts, prompt: dict | None, comfyui: str, comfy_args: list[str], config_dir: str | None) -> int:
    # ComfyUI's nodes.py must win over this pack's nodes/ package, and ComfyUI parses its own arguments
    sys.path[:] = [comfyui] + [p for p in sys.path if os.path.abspath(p or ".") not in (PACK, comfyui)] + [PACK]
    os.chdir(comfyui)
    sys.argv = [os.path.join(comfyui, "main.py")] + comfy_args
    import comfy.options
    comfy.options.enable_args_parsing()
    import utils.extra_config  # noqa: F401  (main.py's import order: before nodes.py)
    import comfy.utils
    import execution
    import nodes
    import server

    if opts.config:
        flat = read_kohya_config(opts.config)
        prompt = prompt_from_kohya_config(opts.config, flat, config_dir, opts.family)
        apply_comfyui_settings(opts.config, flat)
    elif opts.kohya is not None:
        prompt = prompt_from_kohya_command(opts.kohya, config_dir)
        apply_comfyui_settings(opts.kohya.script, opts.kohya.keys)
    apply_overrides(prompt, opts.set)
    rank, trainer = join_process_group(prompt)
    compat = load_compat()
    host = Host(prompt, compat.node_replace_manager(), rank)
    server.PromptServer.instance = host  # Kiln's live loss events reach the host through it
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: None)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if "KilnTrainSD1" not in nodes.NODE_CLASS_MAPPINGS:  # run from a checkout, not from custom_nodes/
        asyncio.run(nodes.load_custom_node(PACK, module_parent="custom_nodes"))

    compat.apply_node_replacements(host.node_replace_manager, prompt)
    fill_defaults(prompt, nodes.NODE_CLASS_MAPPINGS)
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        print(f"[kiln] the workflow is not valid: {error.get('message')}: {error.get('details', '')}", file=sys.stderr)
        for node_id, info in node_errors.items():
            for e in info.get("errors", []):
                print(f"[kiln]   node {host.title(node_id)}: {e.get('message')}: {e.get('details', '')}", file=sys.stderr)
        return 1
    if rank:  # the other ranks train alongside rank 0; saving, sampling and everything after is rank 0's
        outputs = [trainer]
    from comfy.cli_args import args as comfy_cli
    cache_type, cache_args = compat.executor_cache(comfy_cli)
    executor = execution.PromptExecutor(host, cache_type=cache_type, cache_args=cache_args)
    executor.execute(prompt, prompt_id, {"client_id": host.client_id}, outputs)
    if not executor.success:
        return 1
    if rank:
        print(f"{host.tag} done; ran nodes {', '.join(host.ran)} (saving and sampling are rank 0's)", flush=True)
        return 0
    for node_id, ui in (executor.history_result or {}).get("outputs", {}).items():
        for text in ui.get("text", []):
            print(f"[kiln] {host.title(node_id)}: {text}")
    print("[kiln] done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
