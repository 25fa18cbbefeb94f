"""What LoRA Config produces: shape of the adapters, independent of the model family."""
from __future__ import annotations

from dataclasses import dataclass, asdict

from .network_args import parse_network_args


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    conv_rank: int = 0          # 0 = no LoRA on 3x3 convolutions (kohya's conv_dim)
    conv_alpha: float = 1.0
    dropout: float = 0.0        # kohya network_dropout (on the down projection's input)
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    args: str = ""              # kohya --network_args text (family-specific keys, read by the Train node)

    def network_args(self) -> dict:
        """kohya's ss_network_args (only the non-default extras)."""
        args = {}
        if self.conv_rank:
            args.update(conv_dim=str(self.conv_rank), conv_alpha=str(self.conv_alpha))
        if self.rank_dropout:
            args["rank_dropout"] = str(self.rank_dropout)
        if self.module_dropout:
            args["module_dropout"] = str(self.module_dropout)
        args.update(parse_network_args(self.args))
        return args

    def as_dict(self) -> dict:
        return asdict(self)
