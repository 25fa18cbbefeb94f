"""kohya's text-encoder options on ComfyUI's real SD1 CLIP: max_token_length windows and clip_skip."""
from __future__ import annotations

import pytest
import torch

from fixtures.datasets import make_dataset
from fixtures.kiln_nodes import DATASET
from test_train_sd1 import TRAIN


def tag_caption(tokenizer, target: int) -> tuple[str, list[int]]:
    """A tag-style caption of about ``target`` CLIP tokens, and its token ids (without BOS/EOS)."""
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "grey"]
    things = ["hair", "eyes", "dress", "ribbon", "shoes", "gloves", "hat", "scarf", "skirt", "bag"]
    tags, ids = [], []
    i = 0
    while len(ids) < target:
        tags.append(f"{colours[i % 10]} {things[(i // 10) % 10]}")
        ids = tokenizer(", ".join(tags))["input_ids"][1:-1]
        i += 1
    return ", ".join(tags), ids


@pytest.fixture(scope="module")
def sd1(comfy, sd1_checkpoint):
    model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)
    return dict(model=model, clip=clip, vae=vae, text=comfy.pack_module("nodes.comfy.text"),
                windows=comfy.pack_module("trainer_core.data.token_windows"))


def test_a_180_token_caption_reaches_the_encoder_whole_at_225(sd1):
    clip, text = sd1["clip"], sd1["text"]
    caption, ids = tag_caption(clip.tokenizer.clip_l.tokenizer, 180)
    assert 180 <= len(ids) < 190
    cond = text.TextConditioning(clip, 225)
    tokens = cond.tokens(caption)["l"]
    assert len(tokens) == 3 and all(len(w) == 77 for w in tokens)
    middles = [p[0] for w in tokens for p in w[1:76]]
    assert middles[:len(ids)] == ids  # every tag's tokens, in order, in kohya's three windows
    assert cond.token_count(caption) == len(ids) and cond.token_limit == 225
    context = cond.encode(caption)
    assert context.shape == (227, 768)
    # ComfyUI chunks a plain caption at the same 75-token boundaries, so kohya's joined states are exactly its
    # states without the inner BOS/EOS of each chunk (ComfyUI keeps them: 231 states)
    native = clip.encode_from_tokens(clip.tokenize(caption))
    assert native.shape[1] == 231
    assert torch.allclose(context, native[0, sd1["windows"].joined_positions(3)].float(), atol=1e-5)
    # at 150 the caption is cut, and the count of what is lost is known; a short caption is padded to 227 too
    assert text.TextConditioning(clip, 150).token_limit == 150
    batch = cond([caption, "red hair"])["context"]
    assert batch.shape == (2, 227, 768)
    # the default is one window: the first 77 states of ComfyUI's first chunk, as before
    one = text.TextConditioning(clip).encode(caption)
    assert one.shape == (77, 768) and torch.allclose(one, native[0, :77].float(), atol=1e-5)


def test_clip_skip_is_clip_set_last_layer_and_an_upstream_one_is_honoured(comfy, sd1):
    clip, text = sd1["clip"], sd1["text"]
    skipped, skip = text.with_clip_skip(clip, 2, "node")
    assert (skipped.layer_idx, skip, clip.layer_idx) == (-2, 2, None)  # a copy: the input CLIP is unchanged
    upstream = comfy.run_node("CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-3)[0]
    same, skip = text.with_clip_skip(upstream, None, "node")
    assert same is upstream and skip == 3
    assert text.with_clip_skip(upstream, 3, "node")[1] == 3
    with pytest.raises(Exception, match="CLIP Set Last Layer -3") as err:
        text.with_clip_skip(upstream, 2, "node")
    assert type(err.value).__name__ == "KilnError"
    # what the encoder returns really is the penultimate layer's output (ComfyUI's own CLIPSetLastLayer -2)
    by_node = comfy.run_node("CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-2)[0]
    a = text.TextConditioning(skipped).encode("red hair")
    b = text.TextConditioning(by_node).encode("red hair")
    assert torch.equal(a, b) and not torch.equal(a, text.TextConditioning(clip).encode("red hair"))


def test_train_sd1_with_clip_skip_and_a_long_caption(comfy, sd1, tmp_path):
    data = make_dataset(tmp_path / "data", count=3)
    long, ids = tag_caption(sd1["clip"].tokenizer.clip_l.tokenizer, 180)
    first = data["images"][0]
    first.with_suffix(".txt").write_text(long, encoding="utf-8")
    ds = comfy.run_node("KilnLoadDataset", folder=str(data["train_dir"]), **DATASET)[0]
    cached = comfy.run_node("KilnCacheLatents", dataset=ds, vae=sd1["vae"], batch_size=4)[0]
    cfg = comfy.run_node("KilnLoraConfig", rank=2, alpha=2.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                         rank_dropout=0.0, module_dropout=0.0)[0]

    def train(args, **extra):
        return comfy.run_node("KilnTrainSD1", model=sd1["model"], clip=sd1["clip"], dataset=cached, lora_config=cfg,
                              **(TRAIN | dict(steps=1, sample_every=0, sample_steps=1) | extra), training_args=args)

    out = train("clip_skip=2\nmax_token_length=150", text_encoder_lr=1e-3)
    meta, sd = out[1].metadata, out[1].state_dict
    assert (meta["ss_clip_skip"], meta["ss_max_token_length"]) == ("2", "150")
    layers = len(sd1["clip"].cond_stage_model.clip_l.transformer.text_model.encoder.layers)
    te = {k.split(".")[0] for k in sd if k.startswith("lora_te_")}
    assert te and not any(f"_layers_{layers - 1}_" in k for k in te)  # the last layer is never reached
    assert out[4].layer_idx == -2 and sd1["clip"].layer_idx is None  # the clip output is the one trained
    text = " ".join(map(str, out.ui["text"]))
    assert f"{first} is {len(ids) - 150} tokens longer than max_token_length (150)" in text
    assert text.count("longer than max_token_length") == 1
    whole = train("max_token_length=225")
    text = " ".join(map(str, whole.ui["text"]))
    assert "longer than" not in text and f"the longest caption has {len(ids)} tokens" in text
    assert (whole[1].metadata["ss_max_token_length"], whole[1].metadata["ss_clip_skip"]) == ("225", "None")


def kohya_plain_ids(tokenizer, caption: str) -> list[int]:
    """kohya's tokenisation of a caption without --weighted_captions (strategy_base._get_input_ids): the CLIP
    tokenizer on the caption as written, padded and cut to 77."""
    return tokenizer(caption, padding="max_length", truncation=True, max_length=77)["input_ids"]


@pytest.mark.parametrize("caption", ["name (series), 1girl", "(red hair:1.2), \\(escaped\\), [blue] eyes"])
def test_captions_are_plain_text_as_kohya_tokenises_them(sd1, caption):
    clip, text = sd1["clip"], sd1["text"]
    cond = text.TextConditioning(clip)
    window = cond.tokens(caption)["l"][0]
    assert [p[0] for p in window] == kohya_plain_ids(clip.tokenizer.clip_l.tokenizer, caption)
    assert {p[1] for p in window} == {1.0}  # no weight anywhere: the brackets are characters
    assert cond.token_count(caption) == len(clip.tokenizer.clip_l.tokenizer(caption)["input_ids"]) - 2


@pytest.mark.slow  # two encodes on the CPU
def test_weighted_captions_read_comfyui_prompt_weights(sd1):
    clip, text = sd1["clip"], sd1["text"]
    tokenizer = clip.tokenizer.clip_l.tokenizer
    cond = text.TextConditioning(clip)
    cond.weighted = True
    window = cond.tokens("1girl, (tag:1.2)")["l"][0]
    tag = tokenizer("tag")["input_ids"][1:-1]
    weighted = [(t, w) for t, w in window if w != 1.0]
    assert weighted == [(t, 1.2) for t in tag]  # the brackets and ":1.2" are syntax, not tokens
    assert cond.settings() != text.TextConditioning(clip).settings()  # the disk cache tells the two apart
    # plain: the same caption trains other tokens (brackets, ":", "1.2") and so another context
    plain = text.TextConditioning(clip)
    assert not torch.equal(plain.encode("1girl, (tag:1.2)"), cond.encode("1girl, (tag:1.2)"))


@pytest.mark.slow
def test_sample_prompts_keep_comfyui_weighting_while_captions_are_plain(sd1):
    clip, text = sd1["clip"], sd1["text"]
    cond = text.TextConditioning(clip)
    assert not cond.weighted
    preview = cond.preview_tokens("a (tag:1.2)")["l"][0]
    assert any(w == 1.2 for _, w in preview)
    native = clip.encode_from_tokens(clip.tokenize("a (tag:1.2)"))
    assert torch.equal(cond.comfy_conditioning("a (tag:1.2)")[0][0], native)


def test_sd3_captions_are_plain_and_previews_weighted(comfy, sd3_checkpoint):
    clip = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd3_checkpoint)[1]
    text = comfy.pack_module("nodes.comfy.text")
    cond = text.SD3TextConditioning(clip)
    caption = "name (series), (tag:1.2)"
    tokens = cond.tokens(caption)
    for key in ("l", "g"):
        ids = kohya_plain_ids(getattr(clip.tokenizer, f"clip_{key}").tokenizer, caption)
        assert [p[0] for p in tokens[key][0]][:ids.index(49407) + 1] == ids[:ids.index(49407) + 1]
        assert {p[1] for p in tokens[key][0]} == {1.0}
    assert {p[1] for p in tokens["t5xxl"][0]} == {1.0}
    assert any(w == 1.2 for _, w in cond.preview_tokens(caption)["l"][0])
    cond.weighted = True
    assert any(w == 1.2 for _, w in cond.tokens(caption)["l"][0])
