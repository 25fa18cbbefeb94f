"""What LoRA Config produces: shape of the adapters, independent of the model family."""
from __future__ import annotations

from dataclasses import dataclass, asdict

from ..errors import KilnError
from .network_args import parse_network_args

ALGORITHMS = ("lora", "loha", "lokr", "dora")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    conv_rank: int = 0          # 0 = no LoRA on 3x3 convolutions (kohya's conv_dim)
    conv_alpha: float = 1.0
    dropout: float = 0.0        # kohya network_dropout (on the down projection's output, the rank activations)
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    args: str = ""              # kohya --network_args text (family-specific keys, read by the Train node)
    algorithm: str = "lora"     # lora (LoCon on convs), loha, lokr, dora (LyCORIS's algo / dora_wd)
    factor: int = -1            # LoKr: Kronecker factor (-1 = as square as the dimension allows)
    full_matrix: bool = False   # LoKr: the large Kronecker half as a full matrix (no low rank)

    def check(self, node: str = "LoRA Config") -> "LoraConfig":
        """Refuse combinations LyCORIS does not train, on the node that set them; import lycoris-lora early."""
        if self.algorithm not in ALGORITHMS:
            raise KilnError(f"{node}: algorithm {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}.")
        if self.algorithm in ("loha", "lokr") and (self.dropout or self.rank_dropout):
            raise KilnError(f"{node}: dropout and rank_dropout are LoRA/DoRA options (LyCORIS has none for "
                            f"{self.algorithm}); set them to 0 or use module_dropout.")
        if self.algorithm != "lokr" and (self.factor != -1 or self.full_matrix):
            raise KilnError(f"{node}: factor and full_matrix shape LoKr only; algorithm is {self.algorithm}. "
                            f"Set factor to -1 and full_matrix off, or pick lokr.")
        if self.factor == 0 or self.factor < -1:
            raise KilnError(f"{node}: factor must be -1 (automatic) or a positive number, got {self.factor}.")
        if self.algorithm != "lora":
            from .lycoris_algos import functional
            functional()
        return self

    @property
    def network_module(self) -> str:
        """kohya's ss_network_module: LyCORIS algorithms are written by ``lycoris.kohya``."""
        return "networks.lora" if self.algorithm == "lora" else "lycoris.kohya"

    def network_args(self) -> dict:
        """kohya's ss_network_args (only the non-default extras), with LyCORIS's keys for its algorithms."""
        args = {}
        if self.algorithm != "lora":
            args["algo"] = {"dora": "locon"}.get(self.algorithm, self.algorithm)
        if self.conv_rank:
            args.update(conv_dim=str(self.conv_rank), conv_alpha=str(self.conv_alpha))
        if self.algorithm == "lokr":
            args["factor"] = str(self.factor)
            if self.full_matrix:
                args["full_matrix"] = "True"
        if self.algorithm == "dora":
            args.update(dora_wd="True", wd_on_output="False")
        if self.dropout and self.algorithm != "lora":
            args["dropout"] = str(self.dropout)
        if self.rank_dropout:
            args["rank_dropout"] = str(self.rank_dropout)
        if self.module_dropout:
            args["module_dropout"] = str(self.module_dropout)
        args.update(parse_network_args(self.args))
        return args

    def network_kwargs(self) -> dict:
        """The LoRANetwork keywords this config sets."""
        return dict(dropout=self.dropout, rank_dropout=self.rank_dropout, module_dropout=self.module_dropout,
                    algorithm=self.algorithm, factor=self.factor, full_matrix=self.full_matrix)

    def as_dict(self) -> dict:
        return asdict(self)
