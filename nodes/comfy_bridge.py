"""The one place that touches ComfyUI internals: ModelPatcher, CLIP, VAE, samplers, progress, server.

Everything else in Kiln sees plain torch modules and callables. Facts this relies on are in
DESIGN.md ("Facts the design rests on"); the ones that matter most here:
  * nodes run under torch.inference_mode(): the loaded weights are inference tensors, which autograd
    refuses to save. ``autograd_views`` swaps in ordinary tensors that alias the same storage (no
    copy) for the duration of training and puts the original Parameters back afterwards, so the
    MODEL object other nodes share behaves exactly as before;
  * MODEL is a ModelPatcher; ``load_models_gpu`` applies its patches (e.g. an upstream LoRA) and
    places it; the network is ``model.model.diffusion_model``.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import random

import numpy as np
import torch
from PIL import Image

import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.sd
import comfy.utils

from ..trainer_core.errors import KilnError
from ..trainer_core.families import sd3, sdxl

log = logging.getLogger("kiln")

# ComfyUI model_config class names per Kiln train node
SD1_FAMILIES = ("SD15", "SD15_instructpix2pix", "SD20", "SD21UnclipL", "SD21UnclipH", "SD_X4Upscaler", "LotusD")
SDXL_FAMILIES = ("SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B", "SDXL_instructpix2pix")
SD3_FAMILIES = ("SD3",)
NODE_FOR_FAMILY = {**{f: "Train LoRA (SD1)" for f in SD1_FAMILIES}, **{f: "Train LoRA (SDXL)" for f in SDXL_FAMILIES},
                   **{f: "Train LoRA (SD3)" for f in SD3_FAMILIES}}


# --- model identity -----------------------------------------------------------------------------

def model_family(model) -> str:
    return type(model.model.model_config).__name__


def require_family(model, allowed: tuple[str, ...], node: str) -> str:
    fam = model_family(model)
    if fam not in allowed:
        hint = NODE_FOR_FAMILY.get(fam)
        use = f"use the {hint} node instead" if hint else "Kiln does not train this model family yet"
        raise KilnError(f"{node} got a {fam} model: {use}. ({node} trains {', '.join(allowed[:3])} models.)")
    return fam


def model_sampling(model):
    """The sampling object in effect, including one patched in by ModelSamplingDiscrete (v-prediction, zsnr)."""
    return model.get_model_object("model_sampling")


def prediction_type(model, node: str) -> str:
    """"eps" or "v" for the DDPM families, from the model's sampling type; anything else is refused."""
    ms = model_sampling(model)
    # ComfyUI composes the sampling class from a schedule (an nn.Module) and a prediction mixin (EPS and its
    # subclasses V_PREDICTION, X0, LCM...): the first such mixin in the MRO is what the model predicts
    mixin = next((c for c in type(ms).__mro__ if issubclass(c, comfy.model_sampling.EPS)
                  and not issubclass(c, torch.nn.Module)), None)
    discrete = isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete)
    if discrete and mixin is comfy.model_sampling.V_PREDICTION:
        return "v"
    if discrete and mixin is comfy.model_sampling.EPS:
        return "eps"
    kind = mixin.__name__ if mixin else type(ms).__name__
    raise KilnError(f"{node}: this model samples as {kind}; Kiln trains epsilon or v-prediction "
                    f"models with a discrete schedule. Remove the sampling patch (e.g. ModelSamplingDiscrete set to "
                    f"lcm/x0) before the Train node.")


def alphas_cumprod(model) -> torch.Tensor:
    """ᾱ_t from the model's own discrete schedule (ComfyUI stores σ_t = √((1−ᾱ_t)/ᾱ_t)); follows a patched
    schedule too (zsnr)."""
    sigmas = model_sampling(model).sigmas.detach().double().cpu()
    return 1.0 / (1.0 + sigmas ** 2)


def latent_in(model):
    """Raw VAE latents -> the latent space the network was trained in (scale/shift)."""
    fmt = model.model.latent_format
    return lambda z: fmt.process_in(z)


# --- training on the shared, inference-mode model -------------------------------------------------

def _alias(t: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor over an inference tensor's storage: autograd can save it, nothing is copied."""
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


@contextlib.contextmanager
def autograd_views(module: torch.nn.Module):
    """Swap inference-mode parameters/buffers for aliases; restore the exact originals afterwards."""
    swapped = []
    with torch.inference_mode(False):
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is not None and t.is_inference():
                        alias = _alias(t)
                        store[name] = torch.nn.Parameter(alias, requires_grad=False) if store is m._parameters else alias
                        swapped.append((store, name, t))
        try:
            yield module
        finally:
            for store, name, original in reversed(swapped):
                store[name] = original


@contextlib.contextmanager
def training_session(model):
    """Load MODEL (with its own patches) and make its network trainable-through for the duration."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    unet = model.model.diffusion_model
    with torch.inference_mode(False), autograd_views(unet):
        yield unet


def _clone_input(module, args):
    return (args[0].clone(),) + tuple(args[1:]) if torch.is_grad_enabled() else None


@contextlib.contextmanager
def text_encoder_session(clip):
    """Load the CLIP (with its own patches) and make its encoders trainable-through, like the MODEL.

    ComfyUI's CLIP and T5 layers add their residuals in place (``x += attn(norm(x))``), which autograd
    refuses once the norm saved ``x`` for backward; while gradients are on, each norm gets a copy of its
    input instead (a forward pre-hook, removed afterwards)."""
    clip.load_model()
    encoders = clip.cond_stage_model
    norms = [m for m in encoders.modules() if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("LayerNorm")]
    hooks = [m.register_forward_pre_hook(_clone_input) for m in norms]
    try:
        with torch.inference_mode(False), autograd_views(encoders):
            yield encoders
    finally:
        for h in hooks:
            h.remove()


def text_encoder_names(clip) -> list[str]:
    """The encoders this CLIP really has (``clip_l``, ``clip_g``, ``clip_h``, ``t5xxl``), in ComfyUI's attribute names."""
    model = clip.cond_stage_model
    return [n for n in ("clip_l", "clip_h", "clip_g", "t5xxl") if getattr(model, n, None) is not None]


def last_layer_reached(clip, encoder: str) -> int | None:
    """The index of the last transformer layer of ``encoder`` whose output reaches the hidden states this CLIP
    returns (clip skip: CLIP Set Last Layer, or SD2's penultimate default); None when every layer does. Layers
    after it can only change the pooled output."""
    te = getattr(clip.cond_stage_model, encoder, None)
    n = getattr(te, "num_layers", None)
    default = getattr(te, "options_default", None)
    if not n or default is None:
        return None
    layer, idx = default[0], default[1]
    if clip.layer_idx is not None:  # what CLIP.encode applies before every encode
        layer, idx = ("last", None) if abs(clip.layer_idx) > n else ("hidden", clip.layer_idx)
    if layer != "hidden" or idx is None:
        return None
    k = idx + n if idx < 0 else idx
    return k if k < n - 1 else None


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A non-inference copy of a (small) tensor made inside the node, e.g. conditioning or latents."""
    with torch.inference_mode(False):
        return t.clone() if t.is_inference() else t


def unet_forward(model, unet):
    """fn(x_t, t, cond) for the diffusion network (compvis UNet or MMDiT): the call ComfyUI's _apply_model
    makes, with ``t`` in the model's own timestep units (DDPM index, or σ·1000 for flow models)."""
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()

    def forward(x_t, timesteps, cond):
        extra = {"y": cond["y"].to(dtype)} if "y" in cond else {}
        return unet(x_t.to(dtype), timesteps, context=cond["context"].to(dtype), **extra)
    return forward


@contextlib.contextmanager
def random_pos_embed_crop(mmdit, rate: float, seed: int):
    """SD3.5's pos_emb_random_crop_rate (kohya): while gradients are on (training steps, not the probe or
    previews), the MMDiT's position-embedding crop is taken at a random offset with probability ``rate``
    instead of the centre. Installed as an instance attribute over ComfyUI's method and removed after."""
    if rate <= 0 or getattr(mmdit, "pos_embed", None) is None:
        yield
        return
    rng = random.Random(seed)
    centred = mmdit.cropped_pos_embed
    size = mmdit.pos_embed_max_size

    def cropped(hw, device=None):
        if not torch.is_grad_enabled() or rng.random() >= rate:
            return centred(hw, device=device)
        p = mmdit.x_embedder.patch_size[0]
        h, w = (hw[0] + 1) // p, (hw[1] + 1) // p
        top, left = rng.randint(0, size - h), rng.randint(0, size - w)
        grid = mmdit.pos_embed.reshape(1, size, size, -1)[:, top:top + h, left:left + w, :]
        return grid.reshape(1, h * w, -1).to(device)

    mmdit.cropped_pos_embed = cropped
    try:
        yield
    finally:
        del mmdit.__dict__["cropped_pos_embed"]


def device_of(model) -> torch.device:
    return torch.device(model.load_device)


def default_precision(model) -> str:
    """bf16 autocast where the device supports it, else fp32 (CPU, old GPUs)."""
    dev = device_of(model)
    if dev.type == "cuda" and comfy.model_management.should_use_bf16(dev):
        return "bf16"
    return "fp32"


# --- text and images ----------------------------------------------------------------------------

class TextConditioning:
    """Caption -> conditioning tensors for training batches and sample previews.

    Frozen text encoders: captions known before training are encoded once and kept (``pin``). Caption
    augmentation makes a new string nearly every draw, so those are encoded on demand, one text-encoder
    call per new string, and only the most recent ``recent`` are kept: memory stays bounded however long
    training runs. ``encodes`` counts the calls.
    Text-encoder LoRA being trained (``live``): every call encodes again through the encoders, with
    gradients when they are enabled, and nothing is cached.
    """

    def __init__(self, clip, max_tokens: int = 77, recent: int = 256):
        self.clip = clip
        self.max_tokens = max_tokens
        self.recent_size = recent
        self.live = False
        self.raw: dict[str, tuple] = {}  # prompt -> (tokens, cond, pooled) for the sampler (prompts are few)
        self.pinned: dict[str, dict[str, torch.Tensor]] = {}
        self.recent: collections.OrderedDict[str, dict[str, torch.Tensor]] = collections.OrderedDict()
        self.encodes = 0
        self.store = None      # a DiskStore: encoder outputs kept across runs (cache_text_encoder_outputs_to_disk)
        self.store_id = ""
        self.from_disk = 0

    def settings(self) -> str:
        """What, besides the CLIP itself, decides the outputs (part of the disk cache key)."""
        return f"{type(self).__name__}|{self.max_tokens}"

    def use_disk(self, store) -> None:
        self.store = store
        self.store_id = clip_identity(self.clip, self.settings())

    def _stored(self, text: str) -> tuple[str, dict | None]:
        key = hashlib.sha256(f"kiln-text-v1|{self.store_id}|{text}".encode()).hexdigest()[:32]
        return key, self.store.read(key)

    def tokens(self, text: str) -> dict:
        return self.clip.tokenize(text)

    def _encode(self, text: str) -> tuple:
        """One text-encoder call through ComfyUI's own encode (clip skip, weights, upstream CLIP LoRAs
        included): (tokens, cond [1,T,C], pooled)."""
        self.encodes += 1
        tokens = self.tokens(text)
        with contextlib.nullcontext() if self.live else torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return tokens, cond, pooled

    def _entry(self, tokens: dict, cond: torch.Tensor, pooled) -> dict[str, torch.Tensor]:
        """What a training batch takes of one caption: the context [tokens, dim] (first 77 tokens, like
        kohya's default)."""
        return {"context": cond[0, :self.max_tokens].float()}

    def entry(self, text: str, pin: bool = False) -> dict[str, torch.Tensor]:
        if self.live:
            return self._entry(*self._encode(text))
        if text in self.pinned:
            return self.pinned[text]
        if text in self.recent:
            self.recent.move_to_end(text)
            return self.recent[text]
        key, entry = self._stored(text) if self.store is not None else (None, None)
        if entry is not None:
            self.from_disk += 1
            entry = {k: normal_tensor(v) for k, v in entry.items()}  # read inside the node's inference mode
        else:
            raw = self.raw[text] if text in self.raw else self._encode(text)
            entry = {k: normal_tensor(v.cpu()) for k, v in self._entry(*raw).items()}  # autograd-safe
            if key is not None:
                self.store.write(key, entry, source=text[:200], fmt="kiln-text-v1")
        if pin:
            self.pinned[text] = entry
        else:
            self.recent[text] = entry
            if len(self.recent) > self.recent_size:
                self.recent.popitem(last=False)
        return entry

    def encode(self, text: str, pin: bool = False) -> torch.Tensor:
        return self.entry(text, pin)["context"]

    def batch(self, entries: list[dict], train: bool) -> list[dict]:
        """Per-sample random changes while training (none here; SD3 drops encoders)."""
        return entries

    def __call__(self, captions: list[str], train: bool = False, geometries=None) -> dict[str, torch.Tensor]:
        entries = self.batch([self.entry(c) for c in captions], train)
        return {k: torch.stack([e[k] for e in entries]) for k in entries[0]}

    def comfy_conditioning(self, text: str):
        """The CONDITIONING list ComfyUI's samplers take (re-encoded while text-encoder LoRA trains)."""
        if self.live:
            with torch.no_grad():
                _, cond, pooled = self._encode(text)
        else:
            if text not in self.raw:
                self.raw[text] = self._encode(text)
            _, cond, pooled = self.raw[text]
        return [[cond, {"pooled_output": pooled}]]


class SDXLTextConditioning(TextConditioning):
    """SDXL: context [77, 2048] from CLIP-L + CLIP-G, and y = the model's own ``encode_adm`` of the CLIP-G
    pooled output with each sample's size/crop/target conditioning (from its bucketing)."""

    def __init__(self, clip, model):
        super().__init__(clip)
        self.model = model

    def _entry(self, tokens: dict, cond: torch.Tensor, pooled) -> dict[str, torch.Tensor]:
        return {"context": cond[0, :self.max_tokens].float(), "pooled": pooled[0].float()}

    def __call__(self, captions: list[str], train: bool = False, geometries=None) -> dict[str, torch.Tensor]:
        entries = [self.entry(c) for c in captions]
        ys = []
        for e, g in zip(entries, geometries):
            c = sdxl.size_condition(g)
            ys.append(self.model.model.encode_adm(
                pooled_output=e["pooled"][None], width=c.original_width, height=c.original_height,
                crop_w=c.crop_left, crop_h=c.crop_top, target_width=c.target_width, target_height=c.target_height)[0])
        return {"context": torch.stack([e["context"] for e in entries]), "y": torch.stack(ys).float()}


def _real_length(pairs: list, end_token) -> int:
    """Tokens up to and including the first end token (the rest is padding)."""
    for i, pair in enumerate(pairs):
        if pair[0] == end_token:
            return i + 1
    return len(pairs)


class SD3TextConditioning(TextConditioning):
    """SD3's CLIP-L/G + T5 outputs the kohya way: one 77-token CLIP chunk, T5 padded/cut to
    ``t5_tokens``, optional zeroing of padding outputs, and per-encoder dropout while training."""

    def __init__(self, clip, t5_tokens: int = 256, lg_mask: bool = False, t5_mask: bool = False,
                 dropout: dict[str, float] | None = None, seed: int = 0):
        super().__init__(clip)
        model = clip.cond_stage_model
        has = {n: getattr(model, n, None) is not None for n in ("clip_l", "clip_g", "t5xxl")}
        self.layout = sd3.TextLayout(77 if has["clip_l"] or has["clip_g"] else 0)
        self.t5_tokens, self.lg_mask, self.t5_mask = t5_tokens, lg_mask, t5_mask
        self.dropout = {k: v for k, v in (dropout or {}).items()
                        if v > 0 and has[{"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl"}[k]]}
        self.rng = random.Random(seed)

    def settings(self) -> str:
        return f"{super().settings()}|{self.t5_tokens}|{self.lg_mask}|{self.t5_mask}"

    def tokens(self, text: str) -> dict:
        tok = self.clip.tokenizer
        tokens = self.clip.tokenize(text, tokenizer_options={"t5xxl_min_length": self.t5_tokens})
        for key in ("l", "g"):
            tokens[key] = tokens[key][:1]  # kohya encodes one 77-token chunk per CLIP
        t5 = [p for chunk in tokens["t5xxl"] for p in chunk]
        if len(t5) > self.t5_tokens:  # cut like a max_length tokenizer: keep the end token last
            t5 = t5[:self.t5_tokens - 1] + [(tok.t5xxl.end_token,) + tuple(t5[-1][1:])]
        tokens["t5xxl"] = [t5]
        return tokens

    def _entry(self, tokens: dict, cond: torch.Tensor, pooled) -> dict[str, torch.Tensor]:
        tok = self.clip.tokenizer
        clip_len = _real_length(tokens["l"][0], tok.clip_l.end_token)
        t5_len = _real_length(tokens["t5xxl"][0], tok.t5xxl.end_token)
        context = sd3.mask_padding(cond[0].float(), self.layout, clip_len, t5_len, self.lg_mask, self.t5_mask)
        return {"context": context, "y": pooled[0].float()}

    def batch(self, entries: list[dict], train: bool) -> list[dict]:
        if not (train and self.dropout):
            return entries
        dropped = [sd3.drop_encoders(e["context"], e["y"], self.layout, self.dropout, self.rng) for e in entries]
        return [{"context": c, "y": y} for c, y in dropped]


def vae_encoder(vae):
    """fn(BCHW pixels in [0,1]) -> raw latents, via ComfyUI's VAE (which wants BHWC)."""
    return lambda px: vae.encode(px.permute(0, 2, 3, 1).contiguous())


def _fingerprint(h, name: str, t: torch.Tensor) -> None:
    """Name, shape and a strided sample of the values: a fine-tune of any layer changes it, yet hashing
    costs milliseconds, not a full read of the weights."""
    flat = t.detach().flatten()
    h.update(f"{name}{tuple(t.shape)}".encode())
    h.update(flat[::max(1, flat.numel() // 4096)][:4096].float().cpu().numpy().tobytes())


@contextlib.contextmanager
def vae_in_fp32(vae):
    """The VAE computing in fp32 for a while (kohya's no_half_vae), then exactly as it was: fp16/bf16 -> fp32 ->
    back is lossless, and ComfyUI's VAE reads ``vae_dtype`` for every encode."""
    original = vae.vae_dtype
    if original == torch.float32:
        yield vae
        return
    vae.first_stage_model.to(torch.float32)
    vae.vae_dtype = torch.float32
    try:
        yield vae
    finally:
        vae.first_stage_model.to(original)
        vae.vae_dtype = original


def vae_identity(vae) -> str:
    """A stable id of the VAE (the latent cache's key): every tensor's fingerprint plus the dtype the VAE
    computes in (fp16 and fp32 encodes differ)."""
    h = hashlib.sha256()
    sd = vae.first_stage_model.state_dict()
    for k in sorted(sd):
        _fingerprint(h, k, sd[k])
    h.update(str(getattr(vae, "vae_dtype", "")).encode())
    return h.hexdigest()[:16]


def clip_identity(clip, settings: str) -> str:
    """A stable id of what a CLIP turns a caption into (the text-encoder output cache's key): its encoders'
    weights, the patches applied on top (an upstream LoRA on the CLIP), clip skip and the caller's
    ``settings`` (token lengths, masks)."""
    h = hashlib.sha256()
    sd = clip.cond_stage_model.state_dict()
    for k in sorted(sd):
        _fingerprint(h, k, sd[k])
    for key in sorted(clip.patcher.patches):
        for patch in clip.patcher.patches[key]:
            h.update(f"{key}{patch[0]}{patch[2]}".encode())  # strength_patch, strength_model
            data = patch[1]
            for i, t in enumerate(data if isinstance(data, (list, tuple)) else [data]):
                if isinstance(t, torch.Tensor):
                    _fingerprint(h, f"{key}.{i}", t)
                else:
                    h.update(repr(type(t)).encode())
    h.update(f"{type(clip.cond_stage_model).__name__}|{clip.layer_idx}|{settings}".encode())
    return h.hexdigest()[:16]


def sample_images(model, cond: TextConditioning, vae, prompts: list[str], seed: int, steps: int, cfg: float,
                  width: int, height: int, sampler: str = "euler", scheduler: str = "normal",
                  negative: str = "") -> torch.Tensor:
    """IMAGE [B,H,W,3] from the model as it is right now (LoRA adapters attached or not)."""
    images = []
    neg = cond.comfy_conditioning(negative)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            latent = torch.zeros([1, model.model.latent_format.latent_channels, height // 8, width // 8])
            noise = comfy.sample.prepare_noise(latent, seed + i)
            out = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, cond.comfy_conditioning(prompt),
                                      neg, latent, seed=seed + i, disable_pbar=True)
            images.append(vae.decode(out).float().cpu().clamp(0, 1))
    return torch.cat(images)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def pil_to_image(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]


# --- the trained LoRA back into ComfyUI -----------------------------------------------------------

def apply_lora(model, clip, kohya_sd: dict[str, torch.Tensor], strength: float = 1.0):
    """Clones of MODEL and CLIP with the LoRA patched in exactly as ComfyUI's LoraLoader would."""
    return comfy.sd.load_lora_for_models(model, clip, kohya_sd, strength, strength)


def unmapped_lora_keys(model, kohya_sd: dict[str, torch.Tensor], clip=None) -> list[str]:
    """LoRA module names ComfyUI cannot map onto this model (and CLIP, when given): should be none."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    names = {k.rsplit(".lora_down.weight", 1)[0] for k in kohya_sd if k.endswith(".lora_down.weight")}
    return sorted(n for n in names if n not in key_map)


# --- progress, cancel and live events -------------------------------------------------------------

class Progress:
    """Progress bar + preview image in the graph, Cancel checks, and loss events for the frontend."""

    def __init__(self, total: int, node_id: str | None = None):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total
        self.node_id = node_id

    def update(self, value: int, preview: Image.Image | None = None, total: int | None = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if total is not None:
            self.total = total
        self.bar.update_absolute(value, self.total, ("JPEG", preview, 512) if preview is not None else None)

    def text(self, message: str) -> None:
        """A line of text under the running node (ComfyUI's progress text), e.g. an ETA."""
        server = self._server()
        if server is not None and hasattr(server, "send_progress_text") and self.node_id is not None:
            server.send_progress_text(message, self.node_id, server.client_id)

    @staticmethod
    def _server():
        try:
            from server import PromptServer
        except ImportError:
            return None
        return getattr(PromptServer, "instance", None)

    def send(self, event: str, data: dict) -> None:
        server = self._server()
        if server is not None:
            server.send_sync(event, {"node": self.node_id, **data}, server.client_id)
