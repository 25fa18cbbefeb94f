"""kohya's long captions (``max_token_length`` 75 / 150 / 225) for SD1/SD2/SDXL's CLIP encoders.

kohya (library/strategy_base.py ``_get_input_ids``, strategy_sd.py / strategy_sdxl.py ``encode_tokens``) tokenizes
a caption to 75·n + 2 ids (BOS, the caption cut to 75·n tokens, EOS, padding), encodes it as n windows of 77
(BOS + 75 ids + the sequence's last id, which is EOS or padding) and joins their hidden states back into
75·n + 2 states: the first window's BOS state, each window's 75 middle states, the last window's last state.
Every caption therefore has the same length, short ones padded, whatever n is. Pooled outputs (SDXL's CLIP-G)
come from the first window.

Encoders whose padding is not EOS (SD2's OpenCLIP-H, SDXL's CLIP-G) get kohya's two fixes per window: a window
whose 75th id is a caption token ends in EOS instead of padding, and a window with no caption token starts
BOS, EOS, padding...

ComfyUI's own long-prompt encoding differs: it makes as many 77-token chunks as the prompt needs (no limit, no
padding to a fixed count), keeps every chunk's BOS and EOS states in the output (77·k states), and moves a short
weighted group such as ``(red hair:1.2)`` whole into the next chunk rather than splitting it at token 75. Kiln
trains with kohya's windows (from ComfyUI's tokens of the caption as plain text, or with weighted_captions of the
caption read as a ComfyUI prompt, weights kept) and previews with ComfyUI's own encoding, as a prompt is encoded
when the LoRA is used.
"""
from __future__ import annotations

WINDOW = 75  # caption tokens per window (CLIP's 77 less BOS and EOS)
LENGTHS = (75, 150, 225)


def _token(pair) -> object:
    return pair[0]


def _is(pair, token: int) -> bool:
    t = _token(pair)
    return isinstance(t, int) and t == token


def caption_tokens(chunks: list[list[tuple]], start: int | None, end: int) -> list[tuple]:
    """The caption's own tokens from a tokenizer's 77-token chunks: each chunk without its BOS, up to its first
    EOS (what follows is padding). Embedding vectors count as tokens."""
    out = []
    for chunk in chunks:
        body = chunk[1:] if start is not None and chunk and _is(chunk[0], start) else chunk
        for pair in body:
            if _is(pair, end):
                break
            out.append(tuple(pair))
    return out


def windows_of(tokens: list[tuple], n: int, start: int, end: int, pad: int) -> list[list[tuple]]:
    """kohya's n windows of 77 (token, weight) pairs from a caption's tokens (already cut to 75·n)."""
    length = WINDOW * n + 2
    seq = [(start, 1.0)] + list(tokens[:WINDOW * n]) + [(end, 1.0)]
    seq += [(pad, 1.0)] * (length - len(seq))
    out = []
    for k in range(n):
        window = [seq[0]] + seq[1 + WINDOW * k:1 + WINDOW * (k + 1)] + [seq[-1]]
        if pad != end:  # kohya's fixes for encoders padded with another token than EOS
            if not (_is(window[-2], end) or _is(window[-2], pad)):
                window[-1] = (end, 1.0)
            if _is(window[1], pad):
                window[1] = (end, 1.0)
        out.append(window)
    return out


def kohya_windows(chunks: list[list[tuple]], n: int, start: int, end: int, pad: int) -> tuple[list[list[tuple]], int]:
    """(n windows of 77 pairs, the caption's length in tokens) for one encoder's tokenization; tokens beyond 75·n
    are dropped."""
    tokens = caption_tokens(chunks, start, end)
    return windows_of(tokens, n, start, end, pad), len(tokens)


def joined_positions(n: int) -> list[int]:
    """Which of the n·77 encoded positions make kohya's 75·n + 2 states: BOS of the first window, the 75 middle
    positions of every window, the last position of the last window."""
    size = WINDOW + 2
    return [0] + [size * k + i for k in range(n) for i in range(1, WINDOW + 1)] + [size * n - 1]


def windows_for(max_token_length: int | None) -> int:
    """kohya's max_token_length (None = 75) as a number of windows."""
    if max_token_length is None:
        return 1
    if max_token_length not in LENGTHS:
        raise ValueError(f"max_token_length must be one of {LENGTHS}, got {max_token_length}")
    return max_token_length // WINDOW
