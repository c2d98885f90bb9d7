"""The CoMiGS expert layout of one device: how many experts of each kind, LoRA shape, routing."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what to use instead."""


@dataclasses.dataclass(frozen=True)
class CoMiGSConfig:
    """Per-device expert layout (DESIGN.md §1).

    Devices of one federation may differ in `n_specialists` (system heterogeneity) but must
    agree on `n_generalists`, `rank` and `attention_lora`: those decide the shapes of the
    tensors that travel.
    """

    n_generalists: int = 1
    n_specialists: int = 1
    rank: int = 8
    alpha: float = 16.0
    top_k: int | None = None  # None: min(2, E)
    lb_weight: float = 0.01
    generalist_share: float = 0.5
    attention_lora: bool = False
    # Recompute the per-expert hidden activations in backward instead of saving them:
    # this is what lets an 8-expert device train in the memory of a 1-expert one. Applies to
    # the dense mixing (k = E); the grouped mixing (k < E) always recomputes.
    recompute_experts: bool = True

    def __post_init__(self) -> None:
        for field in ("n_generalists", "n_specialists", "rank"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{field} must be an integer, got {value!r}.")
        if self.n_generalists < 0 or self.n_specialists < 0:
            raise ConfigError(
                f"expert counts must be >= 0, got n_generalists={self.n_generalists}, "
                f"n_specialists={self.n_specialists}."
            )
        if self.n_experts == 0:
            raise ConfigError(
                "n_generalists + n_specialists is 0: a device needs at least one expert "
                "(e.g. --experts 1,0 for a pure generalist device, 1,1 for CoMiGS-1G1S)."
            )
        if self.rank <= 0:
            raise ConfigError(f"rank must be a positive integer (the paper uses 8), got {self.rank}.")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be a positive number (the paper uses 16), got {self.alpha}.")
        if self.top_k is not None and not (1 <= self.top_k <= self.n_experts):
            raise ConfigError(f"top_k must be between 1 and the number of experts ({self.n_experts}), "
                              f"got {self.top_k}; leave it unset for min(2, E).")
        if not (0.0 < self.generalist_share < 1.0):
            raise ConfigError(f"generalist_share must be in (0, 1), got {self.generalist_share}.")
        if not (math.isfinite(self.lb_weight) and self.lb_weight >= 0):
            raise ConfigError(f"lb_weight must be >= 0, got {self.lb_weight}.")

    @property
    def n_experts(self) -> int:
        return self.n_generalists + self.n_specialists

    @property
    def k(self) -> int:
        """Experts evaluated per token."""
        return self.top_k if self.top_k is not None else min(2, self.n_experts)

    @property
    def has_router(self) -> bool:
        return self.n_experts > 1

    @property
    def scale(self) -> float:
        """rsLoRA-style scale alpha / sqrt(r), as in the reference code."""
        return self.alpha / math.sqrt(self.rank)

    def target_shares(self) -> list[float]:
        """Load-balancing target share per expert: generalists get `generalist_share` together."""
        g, s = self.n_generalists, self.n_specialists
        if g == 0:
            return [1.0 / s] * s
        if s == 0:
            return [1.0 / g] * g
        return [self.generalist_share / g] * g + [(1.0 - self.generalist_share) / s] * s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoMiGSConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown CoMiGS config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def parse_experts(cls, spec: str, **kwargs: Any) -> CoMiGSConfig:
        """`"G,S"` as given on the command line, e.g. `--experts 1,1`."""
        try:
            g_text, s_text = spec.split(",")
            g, s = int(g_text), int(s_text)
        except ValueError:
            raise ConfigError(
                f"--experts must look like G,S (generalists,specialists), e.g. 1,1 or 1,7; got {spec!r}."
            ) from None
        return cls(n_generalists=g, n_specialists=s, **kwargs)
