"""kohya's max_token_length windows (library/strategy_base.py _get_input_ids, strategy_sd*.py encode_tokens),
values written out by hand from kohya's rules."""
import pytest
import torch

from trainer_core.data.token_windows import caption_tokens, joined_positions, kohya_windows, windows_for

S, E = 49406, 49407      # CLIP's BOS / EOS
PAD_V2 = 0               # OpenCLIP (SD2's CLIP-H, SDXL's CLIP-G) pads with "!" (id 0); CLIP-L pads with EOS


def pairs(ids):
    return [(i, 1.0) for i in ids]


def comfy_chunks(tokens, pad):
    """ComfyUI's tokenization of a plain caption: [BOS, 75 tokens, EOS] chunks, the last padded to 77."""
    chunks = [[S] + tokens[i:i + 75] + [E] for i in range(0, len(tokens), 75)] or [[S, E]]
    chunks[-1] += [pad] * (77 - len(chunks[-1]))
    return [pairs(c) for c in chunks]


def ids(windows):
    return [[p[0] for p in w] for w in windows]


def test_sd1_three_windows_hold_every_token_of_a_180_token_caption():
    t = list(range(1, 181))
    windows, length = kohya_windows(comfy_chunks(t, E), 3, S, E, E)
    assert length == 180
    assert ids(windows) == [[S] + t[:75] + [E], [S] + t[75:150] + [E], [S] + t[150:] + [E] * 46]


def test_sd1_two_windows_cut_at_150():
    t = list(range(1, 181))
    windows, length = kohya_windows(comfy_chunks(t, E), 2, S, E, E)
    assert length == 180
    assert ids(windows) == [[S] + t[:75] + [E], [S] + t[75:150] + [E]]


def test_default_single_window_is_the_first_77_like_kohyas_plain_tokenizer_call():
    t = list(range(1, 101))
    windows, length = kohya_windows(comfy_chunks(t, E), 1, S, E, E)
    assert ids(windows) == [[S] + t[:75] + [E]] and length == 100
    short, two = kohya_windows(comfy_chunks([5, 6], E), 1, S, E, E)
    assert ids(short) == [[S, 5, 6] + [E] * 74] and two == 2


def test_v2_padding_fixes_full_windows_end_in_eos_and_empty_windows_start_with_eos():
    t = list(range(1, 101))
    windows, _ = kohya_windows(comfy_chunks(t, PAD_V2), 3, S, E, PAD_V2)
    assert ids(windows) == [
        [S] + t[:75] + [E],                      # last id was padding; a caption token before it -> EOS
        [S] + t[75:] + [E] + [PAD_V2] * 50,      # ends in padding (49 after EOS, then the sequence's last)
        [S, E] + [PAD_V2] * 75,                  # nothing of the caption: BOS, EOS, padding
    ]


def test_a_group_comfyui_moved_to_the_next_chunk_is_rejoined_at_kohyas_positions():
    t = list(range(1, 81))
    moved = [pairs([S] + t[:70] + [E] + [E] * 6), pairs([S] + t[70:] + [E] + [E] * 66)]
    windows, _ = kohya_windows(moved, 2, S, E, E)
    assert ids(windows)[0] == [S] + t[:75] + [E] and ids(windows)[1][:7] == [S] + t[75:] + [E]


def test_weights_and_embedding_vectors_travel_with_their_tokens():
    emb = torch.ones(768)
    chunk = [(S, 1.0), (7, 1.2), (emb, 1.0), (8, 1.0), (E, 1.0)] + [(E, 1.0)] * 72
    toks = caption_tokens([chunk], S, E)
    assert toks[0] == (7, 1.2) and toks[1][0] is emb and len(toks) == 3
    windows, _ = kohya_windows([chunk], 1, S, E, E)
    assert windows[0][1] == (7, 1.2) and windows[0][2][0] is emb


def test_joined_positions_are_bos_the_middles_and_the_last_eos():
    assert joined_positions(1) == list(range(77))
    three = joined_positions(3)
    assert len(three) == 227 == 75 * 3 + 2
    assert three[:2] == [0, 1] and three[75:77] == [75, 78] and three[150:152] == [152, 155] and three[-2:] == [229, 230]


def test_max_token_length_values():
    assert [windows_for(v) for v in (None, 75, 150, 225)] == [1, 1, 2, 3]
    with pytest.raises(ValueError):
        windows_for(100)
