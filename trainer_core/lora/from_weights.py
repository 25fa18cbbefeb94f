"""kohya's ``dim_from_weights``: LoRA Config's shape read from an existing LoRA/LyCORIS file, so training can start
from it (``network_weights``) without restating its rank, alpha, conv rank or algorithm.

Kiln gives one rank to the linear/1×1 layers and one to the 3×3 convs; a file whose modules of one kind differ in
rank (kohya's per-module dims) is refused by name. 3×3 convs are told by their 4-D kernel (LoRA, DoRA, full LoKr
w2) or, where LyCORIS flattens the kernel (LoHa, low-rank LoKr), by the kohya names of the conv layers Kiln targets.
"""
from __future__ import annotations

from collections import Counter

import torch

from ..errors import KilnError
from .network import file_algorithm

_CONV3X3_NAMES = ("_conv1", "_conv2", "_downsamplers_0_conv", "_upsamplers_0_conv", "_in_layers_2", "_out_layers_3",
                  "_op", "_1_conv")


def _module_rank(sd: dict[str, torch.Tensor], name: str, algo: str) -> tuple[int | None, bool]:
    """(rank, is 3x3 conv); rank None for a LoKr module whose w2 is full."""
    if algo in ("lora", "dora"):
        down = sd[f"{name}.lora_down.weight"]
        return down.shape[0], down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
    conv = name.endswith(_CONV3X3_NAMES)
    if algo == "loha":
        return sd[f"{name}.hada_w1_b"].shape[0], conv
    if f"{name}.lokr_w2" in sd:
        w2 = sd[f"{name}.lokr_w2"]
        return None, w2.dim() == 4 and tuple(w2.shape[2:]) != (1, 1)
    return sd[f"{name}.lokr_w2_b"].shape[0], conv


def config_from_weights(sd: dict[str, torch.Tensor], path: str) -> dict:
    """LoRA Config inputs (algorithm, rank, alpha, conv_rank, conv_alpha, LoKr factor/full_matrix) of a file."""
    names = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".alpha")})
    if not names:
        raise KilnError(f"{path}: dim_from_weights: no LoRA modules (no '<name>.alpha' keys) in the file.")
    algos = {n: file_algorithm(sd, n) for n in names}
    kinds = set(algos.values())
    if len(kinds) != 1 or None in kinds:
        raise KilnError(f"{path}: dim_from_weights: the file mixes algorithms ({sorted(map(str, kinds))}); Kiln "
                        f"trains one per run.")
    algo = kinds.pop()
    linear, conv = Counter(), Counter()
    for n in names:
        rank, is_conv = _module_rank(sd, n, algo)
        (conv if is_conv else linear)[(rank, float(sd[f"{n}.alpha"]))] += 1
    out: dict = {"algorithm": algo}
    for kind, counts, keys in (("linear", linear, ("rank", "alpha")), ("3x3 conv", conv, ("conv_rank", "conv_alpha"))):
        if len({r for r, _ in counts}) > 1:
            raise KilnError(f"{path}: dim_from_weights: the {kind} modules have different ranks "
                            f"({sorted({r for r, _ in counts}, key=str)}); Kiln trains one rank per kind.")
        if counts:
            (rank, alpha), _ = counts.most_common(1)[0]
            if rank is not None:
                out[keys[0]], out[keys[1]] = rank, alpha
    if algo == "lokr":
        full = all(f"{n}.lokr_w2" in sd for n in names)
        out["full_matrix"] = full
        out["factor"] = Counter(max(sd[f"{n}.lokr_w1"].shape) for n in names).most_common(1)[0][0]
    return out
