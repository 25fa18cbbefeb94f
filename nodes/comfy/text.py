"""CLIP: captions to conditioning for training batches and sample previews, and text-encoder sessions for
text-encoder LoRA. ComfyUI's own tokenizers and ``encode_from_tokens`` do the encoding (clip skip and upstream
CLIP LoRAs included). Captions are plain text, as kohya trains them unless ``weighted_captions`` is set; sample
prompts are prompts, read with ComfyUI's prompt weighting as Load LoRA + KSampler will read them."""
from __future__ import annotations

import collections
import contextlib
import hashlib
import random

import torch

from ...trainer_core.errors import KilnError
from ...trainer_core.families import sd3, sdxl
from ...trainer_core.data.token_windows import WINDOW, joined_positions, kohya_windows, windows_for
from . import compat
from .model import CONST_COND, TrainingTarget
from .private import private_patcher
from .tensors import autograd_views, fingerprint, fingerprint_patches, norm_input_copies, normal_tensor


def literal(text: str) -> str:
    """``text`` for ComfyUI's tokenizer with its prompt weighting switched off: every bracket escaped (ComfyUI reads
    ``\\(`` as the character), so ``name (series)`` is tokenized as written, brackets included, at weight 1, as
    kohya tokenizes a caption without --weighted_captions. A backslash already before a bracket stays a character."""
    return text.replace("(", "\\(").replace(")", "\\)")


def trainable_clip(clip, node: str) -> tuple[object, str | None]:
    """The CLIP a text-encoder run trains through: ``clip`` itself, or under dynamic VRAM a CLIP over ComfyUI's
    non-dynamic copy of its encoders (see compat.py)."""
    if not compat.is_dynamic(clip.patcher):
        return clip, None
    patcher, note = private_patcher(clip.patcher, "CLIP", node, also="set the text-encoder learning rates to 0, ")
    trained = clip.clone()
    trained.patcher = patcher
    trained.cond_stage_model = patcher.model
    return trained, note


@contextlib.contextmanager
def text_encoder_session(clip, node: str):
    """Load the CLIP (with its own patches) and make its encoders trainable-through, like the MODEL; yields a
    TrainingTarget whose ``patcher`` is the CLIP to encode with while training.

    ComfyUI's CLIP and T5 layers add their residuals in place (``x += attn(norm(x))``), which autograd
    refuses once the norm saved ``x`` for backward; while gradients are on, each norm gets a copy of its
    input instead (a forward pre-hook, removed afterwards)."""
    trained, note = trainable_clip(clip, node)
    trained.load_model()
    encoders = trained.cond_stage_model
    with norm_input_copies(encoders), torch.inference_mode(False), autograd_views(encoders):
        yield TrainingTarget(trained, encoders, note)


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


def _skip_offset(clip) -> int:
    """kohya's SD2 text encoder is built with 23 of OpenCLIP-H's 24 layers, so its clip_skip N is ComfyUI's
    layer -(N + 1); SD1's CLIP-L has all 12 (clip_skip N = layer -N)."""
    return 1 if "clip_h" in text_encoder_names(clip) else 0


def with_clip_skip(clip, clip_skip: int | None, node: str):
    """(the CLIP to train and preview with, kohya's clip_skip it uses or None). kohya's ``clip_skip`` N is CLIP Set
    Last Layer -N (SD2: -(N + 1), see _skip_offset) on a clone, so the input CLIP is unchanged; a CLIP that comes
    through CLIP Set Last Layer already is used as it is, and a clip_skip that contradicts it is refused."""
    offset = _skip_offset(clip)
    if clip_skip is not None:
        layer = -(clip_skip + offset)
        if clip.layer_idx is not None and clip.layer_idx != layer:
            raise KilnError(f"{node}: training_args clip_skip={clip_skip} means CLIP layer {layer}, but the CLIP comes "
                            f"through CLIP Set Last Layer {clip.layer_idx}; remove one of them or make them agree.")
        if clip.layer_idx is None:
            clip = clip.clone()
            clip.clip_layer(layer)
        return clip, clip_skip
    if clip.layer_idx is None:
        return clip, None  # kohya's default (SD1: the last layer; SD2: ComfyUI's and kohya's penultimate)
    skip = -clip.layer_idx - offset
    return clip, skip if skip >= 1 else None


def clip_identity(clip, settings: str) -> str:
    """A stable id of what a CLIP turns a caption into (the text-encoder output cache's key): its encoders'
    weights, the patches applied on top (an upstream LoRA on the CLIP), clip skip and the caller's
    ``settings`` (token lengths, masks)."""
    h = hashlib.sha256()
    sd = clip.cond_stage_model.state_dict()
    for k in sorted(sd):
        fingerprint(h, k, sd[k])
    fingerprint_patches(h, clip.patcher.patches)
    h.update(f"{type(clip.cond_stage_model).__name__}|{clip.layer_idx}|{settings}".encode())
    return h.hexdigest()[:16]


class TextConditioning:
    """Caption -> conditioning tensors for training batches and sample previews; training captions in kohya's
    max_token_length windows (1 by default: 77 states), previews as ComfyUI encodes a prompt. Captions are plain
    text (``literal``) unless ``weighted`` (kohya's weighted_captions, set by the run before it encodes anything):
    then ComfyUI's prompt weighting applies, ``(tag:1.2)`` trains at weight 1.2.

    Frozen text encoders: captions known before training are encoded once and kept (``pin``). Caption
    augmentation makes a new string nearly every draw, so those are encoded on demand, one text-encoder
    call per new string, and only the most recent ``recent`` are kept: memory stays bounded however long
    training runs. ``encodes`` counts the calls.
    Text-encoder LoRA being trained (``live``): every call encodes again through the encoders, with
    gradients when they are enabled, and nothing is cached.
    """

    def __init__(self, clip, max_token_length: int | None = None, recent: int = 256):
        self.clip = clip
        self.windows = windows_for(max_token_length)  # kohya's max_token_length: 1, 2 or 3 windows of 75 tokens
        self.recent_size = recent
        self.live = False
        self.weighted = False  # kohya's weighted_captions: captions read with ComfyUI's prompt weighting
        self.raw: dict[str, tuple] = {}  # prompt -> (tokens, cond, pooled) for the sampler (prompts are few)
        self.pinned: dict[str, dict[str, torch.Tensor]] = {}
        self.recent: collections.OrderedDict[str, dict[str, torch.Tensor]] = collections.OrderedDict()
        self.encodes = 0
        self.store = None      # a DiskStore: encoder outputs kept across runs (cache_text_encoder_outputs_to_disk)
        self.store_id = ""
        self.from_disk = 0

    def settings(self) -> str:
        """What, besides the CLIP itself, decides the outputs (part of the disk cache key)."""
        return f"{type(self).__name__}|kohya-windows|{self.windows}" + ("|weighted" if self.weighted else "")

    def use_disk(self, store) -> None:
        self.store = store
        self.store_id = clip_identity(self.clip, self.settings())

    def _stored(self, text: str) -> tuple[str, dict | None]:
        key = hashlib.sha256(f"kiln-text-v1|{self.store_id}|{text}".encode()).hexdigest()[:32]
        return key, self.store.read(key)

    @property
    def token_limit(self) -> int:
        """kohya's max_token_length in force: caption tokens beyond it are not trained."""
        return WINDOW * self.windows

    def caption_text(self, text: str) -> str:
        """What the tokenizer is given for a training caption: the caption as written, or with weighted_captions
        the caption as a ComfyUI prompt."""
        return text if self.weighted else literal(text)

    def _windowed(self, text: str) -> tuple[dict, int]:
        """(kohya's windows per encoder, the caption's length in tokens) from ComfyUI's tokenization of ``text``."""
        out, length = {}, 0
        for key, chunks in self.clip.tokenize(self.caption_text(text)).items():
            tok = getattr(self.clip.tokenizer, f"clip_{key}", None)
            if getattr(tok, "start_token", None) is None or getattr(tok, "end_token", None) is None:
                raise KilnError(f"this CLIP's '{key}' tokenizer has no start/end tokens, so captions cannot be cut "
                                f"into kohya's 75-token windows; use a CLIP loaded by a core ComfyUI loader.")
            out[key], n = kohya_windows(chunks, self.windows, tok.start_token, tok.end_token, tok.pad_token)
            length = max(length, n)
        return out, length

    def tokens(self, text: str) -> dict:
        """Training tokens: kohya's max_token_length windows (see trainer_core/data/token_windows.py)."""
        return self._windowed(text)[0]

    def token_count(self, text: str) -> int | None:
        """The caption's length in CLIP tokens (the Train node warns when it is above ``token_limit``)."""
        return self._windowed(text)[1]

    def preview_tokens(self, text: str) -> dict:
        """Sample prompts are encoded as ComfyUI encodes a prompt (its own chunking, no length limit)."""
        return self.clip.tokenize(text)

    def _encode(self, text: str, preview: bool = False) -> tuple:
        """One text-encoder call through ComfyUI's own encode (clip skip, weights, upstream CLIP LoRAs
        included): (tokens, cond [1,T,C], pooled)."""
        self.encodes += 1
        tokens = self.preview_tokens(text) if preview else self.tokens(text)
        with contextlib.nullcontext() if self.live else torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return tokens, cond, pooled

    def joined(self, cond: torch.Tensor) -> torch.Tensor:
        """kohya's 75·n + 2 states [T, C] from the n encoded windows [1, 77·n, C]."""
        positions = joined_positions(self.windows)
        if cond.shape[1] != positions[-1] + 1:
            raise KilnError(f"the text encoder returned {cond.shape[1]} states for {self.windows} window(s) of 77 "
                            f"tokens; expected {positions[-1] + 1}.")
        return cond[0, positions]

    def _entry(self, tokens: dict, cond: torch.Tensor, pooled) -> dict[str, torch.Tensor]:
        """What a training batch takes of one caption: the context [75·n + 2, dim], kohya's joined windows."""
        return {"context": self.joined(cond).float()}

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
            entry = {k: normal_tensor(v.cpu()) for k, v in self._entry(*self._encode(text)).items()}  # autograd-safe
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
                _, cond, pooled = self._encode(text, preview=True)
        else:
            if text not in self.raw:
                self.raw[text] = self._encode(text, preview=True)
            _, cond, pooled = self.raw[text]
        return [[cond, {"pooled_output": pooled}]]


class SDXLTextConditioning(TextConditioning):
    """SDXL: context [77, 2048] from CLIP-L + CLIP-G, and y = the model's own ``encode_adm`` of the CLIP-G
    pooled output with each sample's size/crop/target conditioning (from its bucketing)."""

    def __init__(self, clip, model, max_token_length: int | None = None):
        super().__init__(clip, max_token_length)
        self.model = model

    def _entry(self, tokens: dict, cond: torch.Tensor, pooled) -> dict[str, torch.Tensor]:
        return {"context": self.joined(cond).float(), "pooled": pooled[0].float()}  # pooled: the first window's

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
        return self._sd3_tokens(self.caption_text(text))

    def _sd3_tokens(self, text: str) -> dict:
        tok = self.clip.tokenizer
        tokens = self.clip.tokenize(text, tokenizer_options={"t5xxl_min_length": self.t5_tokens})
        for key in ("l", "g"):
            tokens[key] = tokens[key][:1]  # kohya encodes one 77-token chunk per CLIP
        t5 = [p for chunk in tokens["t5xxl"] for p in chunk]
        if len(t5) > self.t5_tokens:  # cut like a max_length tokenizer: keep the end token last
            t5 = t5[:self.t5_tokens - 1] + [(tok.t5xxl.end_token,) + tuple(t5[-1][1:])]
        tokens["t5xxl"] = [t5]
        return tokens

    def token_count(self, text: str) -> int | None:
        return None  # kohya's SD3 cuts CLIP at 77 and T5 at t5xxl_max_token_length; max_token_length is not read

    def preview_tokens(self, text: str) -> dict:
        return self._sd3_tokens(text)  # a prompt: ComfyUI's weighting, as a caption with weighted_captions

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


class FluxTextConditioning(TextConditioning):
    """FLUX.1 / Chroma, as kohya's flux_train_network conditions them: context = the CLIP's hidden states (a Flux
    CLIP's T5-XXL, cut or padded to ``t5_tokens``, kohya's t5xxl_max_token_length; a CLIP-L alone gives its own 77),
    y = CLIP-L's pooled output (``pooled``: Chroma reads none), and guidance = the run's guidance_scale for every
    sample: never the 3.5 ComfyUI puts in a conditioning that has none (flux.py)."""

    def __init__(self, clip, t5_tokens: int, guidance: float, pooled: bool = True):
        super().__init__(clip)
        self.t5_tokens, self.guidance, self.pooled = t5_tokens, guidance, pooled

    def settings(self) -> str:
        return f"{super().settings()}|flux|{self.t5_tokens}"

    def tokens(self, text: str) -> dict:
        tokens = self.clip.tokenize(text, tokenizer_options={"t5xxl_min_length": self.t5_tokens})
        if "l" in tokens:
            tokens["l"] = tokens["l"][:1]  # kohya encodes one 77-token CLIP-L chunk
        if "t5xxl" in tokens:
            t5 = [p for chunk in tokens["t5xxl"] for p in chunk]
            if len(t5) > self.t5_tokens:  # cut like a max_length tokenizer: keep the end token last
                t5 = t5[:self.t5_tokens - 1] + [(self.clip.tokenizer.t5xxl.end_token,) + tuple(t5[-1][1:])]
            tokens["t5xxl"] = [t5]
        return tokens

    def token_count(self, text: str) -> int | None:
        return None  # kohya's Flux cuts CLIP-L at 77 and T5 at t5xxl_max_token_length; max_token_length is not read

    def _entry(self, tokens: dict, cond: torch.Tensor, pooled) -> dict[str, torch.Tensor]:
        entry = {"context": cond[0].float()}
        if self.pooled and pooled is not None:
            entry["y"] = pooled[0].float()
        return entry

    def __call__(self, captions: list[str], train: bool = False, geometries=None) -> dict[str, torch.Tensor]:
        out = super().__call__(captions, train, geometries)
        out["guidance"] = torch.full((len(captions),), float(self.guidance))
        return out


class ModelConditioning(TextConditioning):
    """Train LoRA (any model): a caption encoded as CLIPTextEncode encodes it (ComfyUI's own tokenizer, chunking and
    ``encode_from_tokens`` with every output the CLIP returns: pooled, attention masks, ...), then turned into what the
    network's forward takes by the model's own ``extra_conds``, with each sample's size, as ComfyUI's sampler does
    (``samplers.encode_model_conds``): ``c_crossattn`` becomes the forward's ``context``, every other cond a keyword.
    No kohya windows and no family knowledge: the model says what it needs."""

    SKIP = ("crossattn_controlnet",)  # what ComfyUI hands to ControlNets, not to the model

    def __init__(self, clip, model):
        super().__init__(clip)
        self.model = model

    def settings(self) -> str:
        return f"{super().settings()}|extra_conds"

    def tokens(self, text: str) -> dict:
        return self.clip.tokenize(self.caption_text(text))

    def token_count(self, text: str) -> int | None:
        return None  # ComfyUI's own chunking: no kohya max_token_length

    def _encode(self, text: str, preview: bool = False) -> tuple:
        self.encodes += 1
        tokens = self.preview_tokens(text) if preview else self.tokens(text)
        with contextlib.nullcontext() if self.live else torch.no_grad():
            out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond, pooled = out.pop("cond"), out.pop("pooled_output", None)
        return tokens, cond, pooled, out

    def _entry(self, tokens: dict, cond: torch.Tensor, pooled, extra: dict | None = None) -> dict[str, torch.Tensor]:
        entry = {"context": cond[0].float()}
        if torch.is_tensor(pooled):
            entry["pooled_output"] = pooled[0].float()
        entry.update({k: v[0] for k, v in (extra or {}).items() if torch.is_tensor(v) and v.dim() and v.shape[0] == 1})
        return entry

    def comfy_conditioning(self, text: str):
        if self.live or text not in self.raw:
            with torch.no_grad():
                _, cond, pooled, extra = self._encode(text, preview=True)
            self.raw[text] = (None, cond, pooled, extra)
        _, cond, pooled, extra = self.raw[text]
        return [[cond, {"pooled_output": pooled, **extra}]]

    def model_conds(self, entry: dict, geometry) -> dict[str, torch.Tensor]:
        """One sample's forward keywords from the model's own extra_conds (its size: the bucket it trains at)."""
        base = self.model.model
        width, height = geometry.bucket
        latent = base.latent_format
        noise = torch.zeros((1, latent.latent_channels, height // 8, width // 8))
        kwargs = {k: v[None] for k, v in entry.items() if k != "context"}
        conds = base.extra_conds(cross_attn=entry["context"][None], width=width, height=height, noise=noise,
                                 device=noise.device, prompt_type="positive", **kwargs)
        out = {}
        for key, c in conds.items():
            if key in self.SKIP:
                continue
            value = getattr(c, "cond", None)
            name = "context" if key == "c_crossattn" else key
            if torch.is_tensor(value):
                out[name] = value.float() if value.is_floating_point() else value
            elif isinstance(value, (bool, int, float)):
                out[CONST_COND + name] = torch.tensor(value)
            else:
                raise KilnError(f"Train LoRA (any model): this model's conditioning {key!r} is a "
                                f"{type(c).__name__} Kiln cannot batch (e.g. reference latents of an edit model); "
                                f"this family needs a preset.")
        return out

    def __call__(self, captions: list[str], train: bool = False, geometries=None) -> dict[str, torch.Tensor]:
        rows = [self.model_conds(self.entry(c), g) for c, g in zip(captions, geometries)]
        batch = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if key.startswith(CONST_COND):
                if any(not torch.equal(v, values[0]) for v in values):
                    name = key[len(CONST_COND):]
                    raise KilnError(f"Train LoRA (any model): the model's {name!r} differs between the captions of "
                                    f"one batch (ComfyUI passes it once per batch); set batch_size 1.")
                batch[key] = values[0]
            else:
                batch[key] = torch.cat(values)
        return batch
