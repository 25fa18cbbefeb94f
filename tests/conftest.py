"""Shared fixtures: the provisioned ComfyUI in process (`comfy`) and as a real server (`comfy_server`),
plus generated tiny checkpoints and datasets (no downloads; see tests/fixtures/).

`scripts/provision.sh` writes `.kiln/env` (KILN_PYTHON, KILN_COMFYUI); environment variables of the same
name win. ComfyUI is imported lazily, only by tests that ask for it, so unit tests of trainer_core stay
ComfyUI-free. Set KILN_TEST_GPU=1 to let ComfyUI pick its own device instead of being forced to the CPU.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # `import fixtures` must work whatever pytest's rootdir/import mode is
    sys.path.insert(0, str(TESTS))
# trainer_core is importable standalone (unit/ and system/ import it directly); appended (not prepended) so
# ComfyUI's own top-level modules (`nodes`, `utils`) win over this repo's folders when a session also imports ComfyUI.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from fixtures.datasets import make_dataset  # noqa: E402
from fixtures import tiny_models  # noqa: E402

sys.path.insert(1, str(REPO / "scripts"))
from comfy_server import ComfyServer, ComfyServerError  # noqa: E402,F401

PACK_NAME = "comfyui-kiln"  # the folder name ComfyUI sees for this pack (as provision.sh links it)
FORCE_CPU = os.environ.get("KILN_TEST_GPU", "") not in ("1", "true", "yes")


# --- provisioned environment ---------------------------------------------------------------------------

def read_kiln_env() -> dict:
    """KILN_PYTHON / KILN_COMFYUI from the environment, else from .kiln/env."""
    env = {}
    env_file = REPO / ".kiln" / "env"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                env[key] = value
    for key in ("KILN_PYTHON", "KILN_COMFYUI"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


@pytest.fixture(scope="session")
def kiln_env() -> SimpleNamespace:
    """`.python` (str) and `.comfyui` (Path) of the provisioned setup; fails clearly when there is none."""
    env = read_kiln_env()
    comfyui = env.get("KILN_COMFYUI")
    if not comfyui or not (Path(comfyui) / "main.py").is_file():
        pytest.fail("ComfyUI is not provisioned (KILN_COMFYUI unset or has no main.py): "
                    "run 'bash scripts/provision.sh' and use 'bash scripts/test.sh'", pytrace=False)
    return SimpleNamespace(python=env.get("KILN_PYTHON") or sys.executable, comfyui=Path(comfyui))


def _import_comfy_core(comfyui: Path) -> None:
    """Make `comfy` importable and CPU-bound before comfy.model_management reads its args at import."""
    tiny_models.ensure_comfy_importable(str(comfyui))
    shadow = sys.modules.get("nodes")
    if shadow is not None and not str(getattr(shadow, "__file__", "")).startswith(str(comfyui)):
        pytest.fail(f"'nodes' is already imported from {shadow.__file__}, not from ComfyUI: this repo's nodes/ "
                    "package shadows ComfyUI's nodes.py. Import Kiln's nodes as part of the pack instead.")
    import comfy.options  # noqa: F401  (args parsing stays off: pytest's argv must not reach ComfyUI's parser)
    from comfy.cli_args import args
    if FORCE_CPU:
        mm = sys.modules.get("comfy.model_management")
        if mm is not None and mm.cpu_state != mm.CPUState.CPU:
            pytest.fail("comfy.model_management was imported before the test fixtures could force the CPU")
        args.cpu = True


@pytest.fixture(scope="session")
def fixture_cache() -> Path:
    """Persistent cache for generated models (names carry FORMAT_VERSION); KILN_FIXTURE_CACHE overrides."""
    path = Path(os.environ.get("KILN_FIXTURE_CACHE") or REPO / ".kiln" / "fixtures")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_sd1_path(kiln_env, fixture_cache) -> Path:
    """The tiny SD1 checkpoint file in the cache (built on first use: 2-5 s, 325 MiB)."""
    _import_comfy_core(kiln_env.comfyui)
    path = fixture_cache / tiny_models.default_name("sd1")
    return Path(tiny_models.build_sd1_checkpoint(str(path)))


@pytest.fixture(scope="session")
def tiny_sd3_path(kiln_env, fixture_cache) -> Path:
    """The tiny SD3 checkpoint (MMDiT depth 2 + CLIP-L + 16-channel TAESD) in the cache (built on first use:
    4-7 s, 245 MiB). No SDXL twin: see tiny_models' docstring."""
    _import_comfy_core(kiln_env.comfyui)
    path = fixture_cache / tiny_models.default_name("sd3")
    return Path(tiny_models.build_sd3_checkpoint(str(path)))


@pytest.fixture(scope="session")
def tiny_sd3_split(kiln_env, fixture_cache) -> dict[str, Path]:
    """SD3 in separate files, as kohya's --clip_l/--clip_g load it: {"model", "clip_l", "clip_g"} paths in the
    cache (built on first use: ~15 s, 1.6 GB, most of it ComfyUI's fixed-size CLIP-G)."""
    _import_comfy_core(kiln_env.comfyui)
    return {k: Path(v) for k, v in tiny_models.build_sd3_split_files(str(fixture_cache)).items()}


@pytest.fixture(scope="session")
def tiny_sdxl_path(kiln_env, fixture_cache) -> Path:
    """The SDXL-family checkpoint (KOALA_700M-shaped UNet + full-size CLIP-L/G + TAESD) in the cache (built on
    first use: ~25 s, 1.8 GB; the size is ComfyUI's fixed CLIP-G)."""
    _import_comfy_core(kiln_env.comfyui)
    path = fixture_cache / tiny_models.default_name("sdxl")
    return Path(tiny_models.build_sdxl_checkpoint(str(path)))


@pytest.fixture(scope="session")
def tiny_flux_paths(kiln_env, fixture_cache):
    """A factory: variant ("flux-dev", "flux-schnell", "chroma") -> the tiny diffusion-model file in the cache, built
    on first use (256 wide in 4 MiB where this ComfyUI derives heads from the width, else 3072 wide: ~1 GiB and
    ~40 s; Chroma is 3072 wide everywhere: ~1.2 GiB; see tiny_models.FLUX_VARIANTS)."""
    _import_comfy_core(kiln_env.comfyui)

    def path(variant: str) -> Path:
        return Path(tiny_models.build_flux_model(str(fixture_cache / tiny_models.flux_model_name(variant)), variant))
    return path


@pytest.fixture(scope="session")
def tiny_pixart_path(kiln_env, fixture_cache) -> Path:
    """The tiny PixArt-Sigma diffusion model in the cache (Train LoRA (any model)'s family without a preset; built on
    first use: ~2 s, ~115 MB)."""
    _import_comfy_core(kiln_env.comfyui)
    return Path(tiny_models.build_pixart_model(str(fixture_cache / tiny_models.default_name("pixart-sigma"))))


@pytest.fixture(scope="session")
def tiny_flux_side_files(kiln_env, fixture_cache) -> dict[str, Path]:
    """kohya's --clip_l and --ae for the tiny Flux: {"clip_l", "ae"} paths in the cache (built on first use: a few
    seconds, 250 MiB, nearly all of it ComfyUI's fixed-size CLIP-L)."""
    _import_comfy_core(kiln_env.comfyui)
    return {k: Path(v) for k, v in tiny_models.build_flux_side_files(str(fixture_cache)).items()}


def _link_pack(custom_nodes: Path) -> None:
    """Expose only this repo to ComfyUI's custom-node loader, under the name users install it as."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    (custom_nodes / PACK_NAME).symlink_to(REPO, target_is_directory=True)


# --- ComfyUI in process ----------------------------------------------------------------------------------

def comfy_compat():
    """Kiln's nodes/comfy/compat.py (what differs between ComfyUI versions), loaded by cli.py's own loader."""
    import importlib.util
    if "kiln_cli" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kiln_cli", REPO / "cli.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["kiln_cli"] = module
    return sys.modules["kiln_cli"].load_compat()


class _UiRecorder:
    """Stands in for server.PromptServer.instance in process: records what nodes send to the frontend."""

    def __init__(self):
        from aiohttp import web
        self.routes = web.RouteTableDef()  # packs may register HTTP routes at import time
        self.client_id = None
        self.last_node_id = None
        self.events: list[tuple[str, object]] = []    # (event, data) from send_sync / send_progress_text
        self.progress: list[tuple[int, int, object]] = []  # (value, total, preview) from comfy.utils.ProgressBar
        self.node_replace_manager = comfy_compat().node_replace_manager()  # ComfyUI ≥ 0.33: packs register with it

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.events.append(("progress_text", {"text": text, "node": node_id}))

    def progress_hook(self, value, total, preview=None, prompt_id=None, node_id=None):
        self.progress.append((value, total, preview))


class NodeResult(tuple):
    """A node's outputs as a tuple (one value per output, a list where OUTPUT_IS_LIST); `.ui` holds its UI dict."""
    ui: dict


class ComfyInProcess:
    """ComfyUI imported in this process with Kiln loaded by ComfyUI's own custom-node loader.

    Attributes: nodes, folder_paths, execution (ComfyUI modules); root, checkpoints_dir, loras_dir,
    input_dir, output_dir, temp_dir (Paths); startup_log (str: log lines from node loading);
    events / progress (lists, what the last run_node sent to the UI, see _UiRecorder).
    """

    def __init__(self, root: Path, comfyui: Path):
        _import_comfy_core(comfyui)
        # main.py's order: ComfyUI's `utils` package must be imported before nodes.py, which puts comfy/
        # (holding a utils.py) at the front of sys.path.
        import utils.extra_config  # noqa: F401
        import comfy.utils
        import folder_paths
        import server
        import execution
        import nodes

        self.nodes, self.folder_paths, self.execution = nodes, folder_paths, execution
        self.root = root
        self.checkpoints_dir, self.loras_dir = root / "models" / "checkpoints", root / "models" / "loras"
        self.input_dir, self.output_dir, self.temp_dir = root / "input", root / "output", root / "temp"
        for d in (self.checkpoints_dir, self.loras_dir, self.input_dir, self.output_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        exts = folder_paths.supported_pt_extensions
        folder_paths.folder_names_and_paths["checkpoints"] = ([str(self.checkpoints_dir)], exts)
        folder_paths.folder_names_and_paths["loras"] = ([str(self.loras_dir)], exts)
        folder_paths.folder_names_and_paths["diffusion_models"] = ([str(root / "models" / "diffusion_models")], exts)
        folder_paths.set_input_directory(str(self.input_dir))
        folder_paths.set_output_directory(str(self.output_dir))
        folder_paths.set_temp_directory(str(self.temp_dir))
        folder_paths.set_user_directory(str(root / "user"))  # caches and settings stay in the session's tmp dir
        _link_pack(root / "custom_nodes")
        folder_paths.folder_names_and_paths["custom_nodes"] = ([str(root / "custom_nodes")], set())

        if getattr(server.PromptServer, "instance", None) is None:
            server.PromptServer.instance = _UiRecorder()
        self.ui = server.PromptServer.instance
        if isinstance(self.ui, _UiRecorder):
            comfy.utils.set_progress_bar_global_hook(self.ui.progress_hook)

        self.startup_log = self._capture_log(
            lambda: asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)))
        self._ids = itertools.count(1)

    @staticmethod
    def _capture_log(fn) -> str:
        """Run fn with INFO logging captured (the loader reports import failures only in the log)."""
        lines: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: lines.append(record.getMessage())
        root_logger = logging.getLogger()
        old_level = root_logger.level
        root_logger.addHandler(handler)
        root_logger.setLevel(logging.INFO)
        try:
            fn()
        finally:
            root_logger.removeHandler(handler)
            root_logger.setLevel(old_level)
        return "\n".join(lines)

    @property
    def events(self):
        return getattr(self.ui, "events", [])

    @property
    def progress(self):
        return getattr(self.ui, "progress", [])

    def install_checkpoint(self, src: Path, folder: str = "checkpoints") -> str:
        """Link a model file into models/<folder> (checkpoints, diffusion_models); returns the name nodes refer
        to it by."""
        target = Path(self.folder_paths.get_folder_paths(folder)[0])
        target.mkdir(parents=True, exist_ok=True)
        link = target / Path(src).name
        if not link.exists():
            link.symlink_to(Path(src).resolve())
        return link.name

    def node_class_mappings(self) -> dict:
        """All registered node classes (core, comfy_extras and custom packs) by class_type."""
        return self.nodes.NODE_CLASS_MAPPINGS

    def node_class(self, class_type: str):
        try:
            return self.nodes.NODE_CLASS_MAPPINGS[class_type]
        except KeyError:
            raise KeyError(f"unknown class_type {class_type!r}; node loading said:\n{self.startup_log[-3000:]}") from None

    def pack_module(self, name: str):
        """A module of the loaded Kiln pack by its path inside the pack, e.g. ``nodes.comfy.model`` (ComfyUI
        imports the pack under a name of its own choosing)."""
        import importlib
        root = self.node_class("KilnTrainSD1").__module__.rsplit(".nodes.", 1)[0]
        return importlib.import_module(f"{root}.{name}")

    def run_node(self, class_type: str, /, **inputs) -> NodeResult:
        """Execute one node as ComfyUI's executor does: inputs resolved by execution.get_input_data
        (hidden inputs included), a fresh node object, execution.get_output_data (V1 FUNCTION and V3
        io.ComfyNode alike), all under torch.inference_mode(). Validation (VALIDATE_INPUTS, combo
        values) and graph expansion are the server's business: use comfy_server for those.
        """
        import torch

        cls = self.node_class(class_type)
        unique_id = str(next(self._ids))
        self.events.clear()
        self.progress.clear()
        ex = self.execution

        async def run():
            input_data, _missing, hidden = ex.get_input_data(inputs, cls, unique_id)
            unknown = set(inputs) - set(input_data)
            if unknown:
                raise TypeError(f"{class_type} has no inputs named {sorted(unknown)}")
            obj = cls()
            # positional: the keyword was hidden_inputs= in 0.3.x and is v3_data= in 0.33; the position is the same
            output, ui, expanded, pending = await ex.get_output_data("kiln-test", unique_id, obj, input_data,
                                                                     None, None, hidden)
            if pending:
                results = await ex.resolve_map_node_over_list_results(output)
                output, ui, expanded = ex.get_output_from_returns(results, obj)
            if expanded:
                raise NotImplementedError(f"{class_type} expanded into a subgraph; run it through comfy_server")
            return output, ui

        with torch.inference_mode():
            output, ui = asyncio.run(run())
        is_list = getattr(cls, "OUTPUT_IS_LIST", None) or [False] * len(output)
        result = NodeResult(values if listed else values[0] for values, listed in zip(output, is_list))
        result.ui = ui
        return result


@pytest.fixture(scope="session")
def comfy(kiln_env, tmp_path_factory) -> ComfyInProcess:
    """ComfyUI in this process (CPU), with its models/input/output/temp dirs in a session tmp dir."""
    return ComfyInProcess(tmp_path_factory.mktemp("comfy"), kiln_env.comfyui)


@pytest.fixture(scope="session")
def sd1_checkpoint(comfy, tiny_sd1_path) -> str:
    """File name (for ckpt_name) of the tiny SD1 checkpoint, linked into comfy's models/checkpoints."""
    return comfy.install_checkpoint(tiny_sd1_path)


@pytest.fixture(scope="session")
def sd3_checkpoint(comfy, tiny_sd3_path) -> str:
    """File name (for ckpt_name) of the tiny SD3 checkpoint, linked into comfy's models/checkpoints."""
    return comfy.install_checkpoint(tiny_sd3_path)


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfy, tiny_sdxl_path) -> str:
    """File name of the SDXL-family checkpoint, linked into comfy's models/checkpoints."""
    return comfy.install_checkpoint(tiny_sdxl_path)


@pytest.fixture(scope="session")
def flux_model_name(comfy, tiny_flux_paths):
    """A factory: variant -> the file name (for Load Diffusion Model's unet_name) of the tiny Flux/Chroma model,
    linked into comfy's models/diffusion_models."""
    return lambda variant: comfy.install_checkpoint(tiny_flux_paths(variant), "diffusion_models")


@pytest.fixture(scope="session")
def pixart_model_name(comfy, tiny_pixart_path) -> str:
    """File name (for Load Diffusion Model's unet_name) of the tiny PixArt-Sigma model."""
    return comfy.install_checkpoint(tiny_pixart_path, "diffusion_models")


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> dict:
    """The generated dataset: make_dataset's dict (root, image_dir, mask_dir, images, masks, ...)."""
    return make_dataset(tmp_path_factory.mktemp("dataset"))


# --- a real ComfyUI server -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def comfy_server(kiln_env, tmp_path_factory):
    """A real ComfyUI server for the session (see ComfyServer); stopped at session end."""
    base = tmp_path_factory.mktemp("server")
    _link_pack(base / "custom_nodes")  # only this pack, under the name users install it as
    srv = ComfyServer(kiln_env.python, kiln_env.comfyui, base, cpu=FORCE_CPU)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def new_comfy_server(kiln_env):
    """A factory of extra real servers, each over its own base directory with only this pack in custom_nodes
    (e.g. to restart a killed one); the caller stops them."""
    def start(base: Path) -> ComfyServer:
        if not (base / "custom_nodes" / PACK_NAME).exists():
            _link_pack(base / "custom_nodes")
        return ComfyServer(kiln_env.python, kiln_env.comfyui, base, cpu=FORCE_CPU)
    return start


@pytest.fixture(scope="session")
def server_sd1_checkpoint(comfy_server, tiny_sd1_path) -> str:
    """File name of the tiny SD1 checkpoint in comfy_server's models/checkpoints."""
    return comfy_server.install(tiny_sd1_path, "checkpoints")


@pytest.fixture(scope="session")
def server_sdxl_checkpoint(comfy_server, tiny_sdxl_path) -> str:
    """File name of the SDXL-family checkpoint in comfy_server's models/checkpoints."""
    return comfy_server.install(tiny_sdxl_path, "checkpoints")


@pytest.fixture(scope="session")
def server_sd3_checkpoint(comfy_server, tiny_sd3_path) -> str:
    """File name of the tiny SD3 checkpoint in comfy_server's models/checkpoints."""
    return comfy_server.install(tiny_sd3_path, "checkpoints")


@pytest.fixture(scope="session")
def server_sd3_split(comfy_server, tiny_sd3_split) -> str:
    """The SD3 split files in comfy_server: the MMDiT + VAE checkpoint in models/checkpoints (its name is
    returned), CLIP-L and CLIP-G in models/text_encoders, where DualCLIPLoader lists them."""
    for part in ("clip_l", "clip_g"):
        comfy_server.install(tiny_sd3_split[part], "text_encoders")
    return comfy_server.install(tiny_sd3_split["model"], "checkpoints")


# --- lanes (tests/README.md) -----------------------------------------------------------------------------

@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    """Tests that start a ComfyUI server (tests/e2e/, marker e2e) or drive a browser (tests/browser/, marker
    browser) are slow by nature: they join the `slow` lane here instead of carrying the marker themselves."""
    for item in items:
        folder = item.path.parent.name
        if folder in ("e2e", "browser") or item.get_closest_marker("e2e") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)
