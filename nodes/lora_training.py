"""The LoRA Trainable of the run skeleton (training_run.py): adapters on the frozen MODEL (and CLIP) as LoRA Config
and the family's target rules say, resumed from and saved as kohya LoRA files, and the LoRA nodes' outputs."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from comfy_api.latest import io, ui

from ..trainer_core.options import registry
from ..trainer_core.errors import KilnError
from ..trainer_core.lora.blocks import NETWORK_ARGS as BLOCK_ARGS, BlockPlan, block_index, block_name, block_plan, \
    loraplus_ratios, total_blocks
from ..trainer_core.lora.config import LoraConfig
from ..trainer_core.lora.io import TrainedLora, load_lora_file, save_lora_file
from ..trainer_core.lora.network import LoRANetwork
from ..trainer_core.lora.network_args import bool_arg, check_keys, parse_network_args
from ..trainer_core.lora.text_encoders import te_namer, te_rules
from ..trainer_core.files.resume import load_state, save_state
from .comfy import model as cmodel
from .comfy.text import last_layer_reached
from .training_run import FamilyPlan, Run, loss_image, run_metadata, run_summary

log = logging.getLogger("kiln")

VERBOSE = {"verbose": "list every module and its rank in the node's output text (True/False)"}
LORAPLUS_ARGS = {k: v for k, v in BLOCK_ARGS.items() if k.startswith("loraplus")}
LABELS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


def unet_blocks(lc: LoraConfig, is_sdxl: bool) -> BlockPlan | None:
    return block_plan(parse_network_args(lc.args), is_sdxl, lc.rank, lc.alpha, lc.conv_rank, lc.conv_alpha)


def unet_conv_rank(lc: LoraConfig, blocks: BlockPlan | None) -> int:
    """conv_block_dims alone also puts adapters on the 3x3 convs (kohya)."""
    return lc.conv_rank or (blocks.max_conv_dim if blocks else 0)


def block_lr_of(name: str, blocks: BlockPlan, is_sdxl: bool) -> tuple[str, float]:
    i = block_index(name, is_sdxl)
    return ("unet", 1.0) if i < 0 else (f"unet_block{i}", blocks.lr_weights[i])


def block_table(network: LoRANetwork, blocks: BlockPlan, is_sdxl: bool, lr: float) -> str:
    """kohya's block-wise settings as they landed: per block, its modules, ranks, alphas and learning rate."""
    rows: dict[int, list] = {}
    for name, a in network.adapters.items():
        if network.groups[name] == "unet":
            rows.setdefault(block_index(name, is_sdxl), []).append(a)
    lines = [f"{'block':>5}  {'where':<16} {'modules':>7}  {'rank':<8} {'alpha':<10} lr"]
    for i in range(total_blocks(is_sdxl)):
        adapters = rows.get(i, [])
        weight = blocks.lr_weights[i] if blocks.lr_weights else 1.0
        ranks = "/".join(str(r) for r in sorted({a.rank for a in adapters})) or "-"
        alphas = "/".join(f"{x:g}" for x in sorted({a.alpha for a in adapters})) or "-"
        lines.append(f"{i:>5}  {block_name(i, is_sdxl):<16} {len(adapters):>7}  {ranks:<8} {alphas:<10} "
                     f"{lr * weight:.3g} (×{weight:g})")
    return "\n".join(lines)


def describe_modules(network: LoRANetwork) -> str:
    """Which layer got which rank (kohya's verbose listing), for the node's output text."""
    rows = [(name, a.algorithm, a.rank, a.alpha) for name, a in network.adapters.items()]
    width = max(len(n) for n, *_ in rows)
    return "\n".join(f"{n:{width}}  rank {r}, alpha {a:g}" + ("" if algo == "lora" else f" ({algo})")
                     for n, algo, r, a in rows)


@dataclass
class LoraTrainable:
    """Adapters (LoRA, LoHa, LoKr, DoRA) on the family's target layers and, where they train, text encoders."""
    lora_config: LoraConfig
    plan: FamilyPlan
    kind: str = "loras"
    default_save_name: str = registry.widget("save_name", "sd1").default
    forward_dtype: object = None

    def __post_init__(self):
        self.args = parse_network_args(self.lora_config.args)
        check_keys(self.args, self.plan.network_args, self.plan.node)
        self.state_dict = None

    def build(self, run: Run) -> LoRANetwork:
        plan, lc, net_host = self.plan, self.lora_config, run.target.network
        blocks = plan.blocks
        rank_of = (lambda name, conv, r, a: blocks.rank_of(name, plan.is_sdxl, conv, r, a)) if blocks else None
        network = LoRANetwork(net_host, plan.rules(net_host), plan.namer(net_host), seed=run.tcfg.seed, rank_of=rank_of,
                              **lc.check(plan.node).network_kwargs())
        if blocks and blocks.lr_weights:
            network.block_lr = lambda name: block_lr_of(name, blocks, plan.is_sdxl)
        plus_unet, plus_te = loraplus_ratios(self.args)
        network.plus = {k: v for k, v in (("unet", plus_unet), ("text_encoder", plus_te)) if v}
        if network.plus and lc.algorithm in ("loha", "lokr"):
            run.notes.append(f"LoRA+ ratios act on lora_up matrices; {lc.algorithm} has none, so they change "
                             f"nothing (as in kohya with LyCORIS)")
        for e in run.te_train:
            last = last_layer_reached(run.clip, e) if e in plan.hidden_only else None
            network.add(run.te_target.network, te_rules([e], lc.rank, lc.alpha, None if last is None else {e: last}),
                        te_namer(plan.te_prefixes), e)
        if not len(network):
            raise KilnError(f"{plan.node}: no layer got a LoRA; check rank and network_args "
                            f"({lc.args or 'none'}).")
        return network

    def holding(self, network: LoRANetwork):
        return network.attached()

    def signature(self, network: LoRANetwork) -> dict:
        return {"modules": len(network), "algorithm": self.lora_config.algorithm}

    def resume(self, run: Run, network: LoRANetwork, path: str, signature: dict) -> dict | None:
        sd, _ = load_lora_file(path)
        name = (run.opts.get("resume_from") or "").strip()
        try:
            network.load_kohya_state_dict(sd)
        except (KeyError, RuntimeError, ValueError) as e:
            raise KilnError(f"{self.plan.node}: {name} does not fit this LoRA ({e}); resume with the same rank, "
                            f"targets, network_args and text-encoder settings it was trained with.") from None
        state, note = load_state(path, signature)
        run.notes.append(f"resume_from {name}: {note}")
        return state

    def file_bytes(self, network: LoRANetwork) -> int:
        return sum(p.numel() * 4 for p in network.parameters())  # fp32, the largest Save LoRA writes

    def save_bytes(self, network: LoRANetwork) -> int:
        return 4 * self.file_bytes(network)  # a LoRA + its state: about 4x the weights

    def write(self, run: Run, network: LoRANetwork, path: str, meta: dict, state: dict, signature: dict) -> str:
        save_lora_file(path, network.kohya_state_dict(), meta)
        save_state(path, state, signature)
        return path

    def finish(self, run: Run, network: LoRANetwork) -> None:
        self.state_dict = network.kohya_state_dict()

    def outputs(self, run: Run, family: str) -> io.NodeOutput:
        """The LoRA nodes' outputs: MODEL and CLIP with the LoRA applied as Load LoRA would, the LoRA, samples,
        the loss plot, and the summary text."""
        plan, lc, tcfg, cond, network = self.plan, self.lora_config, run.tcfg, self.plan.conditioning, run.network
        meta = run_metadata(run, lc)
        meta["kiln_distinct_captions"] = str(len(run.seen))
        meta["kiln_text_encoder_calls"] = str(cond.encodes)
        meta["kiln_text_encoder_outputs_from_disk"] = str(cond.from_disk)
        groups = {g: sum(1 for n in network.groups.values() if n == g) for g in dict.fromkeys(network.groups.values())}
        unmapped = cmodel.unmapped_lora_keys(run.model, self.state_dict, run.clip)
        if unmapped:  # a bug if it ever happens: say so rather than ship a file ComfyUI half-applies
            log.warning("kiln: %d LoRA modules do not map onto this model in ComfyUI, e.g. %s", len(unmapped),
                        unmapped[0])
            run.notes.append(f"{len(unmapped)} modules do not map in ComfyUI, e.g. {unmapped[0]}")
        epochs = run.epochs
        text = run_summary(f"{len(network)} {LABELS[lc.algorithm]} modules "
                           f"({', '.join(f'{g} {k}' for g, k in groups.items())})",
                           f"{len(run.seen)} distinct captions trained, {cond.encodes} text-encoder calls; {epochs} "
                           f"epoch{'s' if epochs != 1 else ''} of {run.per_epoch} steps", run.result, tcfg, run.notes)
        if bool_arg(self.args, "verbose"):
            if plan.blocks:
                text += "\n" + block_table(network, plan.blocks, plan.is_sdxl, tcfg.learning_rate)
            text += "\n" + describe_modules(network)
        lora = TrainedLora(self.state_dict, meta, family)
        model_out, clip_out = cmodel.apply_lora(run.model, run.clip, self.state_dict)
        return io.NodeOutput(model_out, lora, run.samples, loss_image(run.result), clip_out, ui=ui.PreviewText(text))
