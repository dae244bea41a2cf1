"""Cost models: a backend's predicted cost for one request, in the server's cost unit."""
from __future__ import annotations

from dataclasses import dataclass

from router.core.config import CostModelConfig

# Prompt tokens are estimated from characters so that routing needs no backend tokenizer; about
# 4 characters a token holds for English BPE vocabularies, and the estimate only has to rank.
CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True)
class CostModel:
    kind: str
    unit: str
    per_request: float = 0.0
    input_per_million_tokens: float = 0.0
    output_per_million_tokens: float = 0.0
    active_parameters: int = 0
    price_per_gflop: float = 1.0
    expected_output_tokens: int = 64

    @classmethod
    def from_config(cls, cfg: CostModelConfig, unit: str, *, active_parameters: int | None = None) -> CostModel:
        return cls(kind=cfg.kind, unit=unit, per_request=cfg.per_request,
                   input_per_million_tokens=cfg.input_per_million_tokens,
                   output_per_million_tokens=cfg.output_per_million_tokens,
                   active_parameters=int(cfg.active_parameters or active_parameters or 0),
                   price_per_gflop=cfg.price_per_gflop, expected_output_tokens=cfg.expected_output_tokens)

    def predict(self, prompt_chars: int, output_tokens: int | None = None) -> float:
        """Cost of one request with a prompt of ``prompt_chars`` characters."""
        tin = prompt_chars / CHARS_PER_TOKEN
        tout = self.expected_output_tokens if output_tokens is None else output_tokens
        if self.kind == "per_request":
            return self.per_request
        if self.kind == "per_token":
            return (tin * self.input_per_million_tokens + tout * self.output_per_million_tokens) / 1e6
        # compute: a forward pass costs ~2 FLOPs per active parameter per token.
        return 2.0 * self.active_parameters * (tin + tout) / 1e9 * self.price_per_gflop

    def summary(self) -> str:
        if self.kind == "per_request":
            return f"{self.per_request:g} {self.unit} per request"
        if self.kind == "per_token":
            return (f"{self.input_per_million_tokens:g} in / {self.output_per_million_tokens:g} out "
                    f"{self.unit} per million tokens, ~{self.expected_output_tokens} output tokens")
        price = "in GFLOP" if self.price_per_gflop == 1 and self.unit == "GFLOP" else \
            f"at {self.price_per_gflop:g} {self.unit}/GFLOP"
        return (f"2 x {self.active_parameters / 1e6:.1f}M active params x tokens {price}, "
                f"~{self.expected_output_tokens} output tokens")
