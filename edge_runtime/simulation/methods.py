"""The methods of the paper's table, as expert layouts plus what is shared.

Every method is the same model family with a different layout: how many generalist and
specialist experts each device holds, whether generalists are averaged across devices, and
how the router is trained. Keeping them declarative makes the table's rows comparable: same
trainer, same data, same aggregation code as the coordinator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from edge_runtime.model.config import CoMiGSConfig, ConfigError


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    n_generalists: int
    n_specialists: int
    shares_generalists: bool  # generalists are averaged by the coordinator each round
    router_mode: str = "bilevel"  # "joint" = router trained on train batches (pFedMoE)
    pooled: bool = False  # one model trained on every device's data (centralized upper bound)
    heterogeneous: bool = False  # --experts E_i applies: G generalists + (E_i - G) specialists
    summary: str = ""

    def layout(self, device_experts: int | None) -> tuple[int, int]:
        """(G, S) for a device that holds `device_experts` experts (None: the method's default)."""
        if not self.heterogeneous or device_experts is None:
            return self.n_generalists, self.n_specialists
        if device_experts < 1:
            raise ConfigError(f"{self.name}: a device needs at least 1 expert, got {device_experts}.")
        g = min(self.n_generalists, device_experts)
        return g, device_experts - g

    def config(self, device_experts: int | None = None, **kwargs) -> CoMiGSConfig:
        g, s = self.layout(device_experts)
        return CoMiGSConfig(n_generalists=g, n_specialists=s, **kwargs)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("local", 0, 1, False, summary="one private LoRA per device, nothing exchanged"),
    Method("fedavg", 1, 0, True, summary="one LoRA shared by all devices, averaged every round"),
    Method("comigs-1g1s", 1, 1, True, heterogeneous=True,
           summary="1 shared generalist + private specialists, router on the validation split"),
    Method("comigs-2g", 2, 0, True, summary="2 shared generalists, private router"),
    Method("comigs-2s", 0, 2, False, summary="2 private specialists, private router"),
    Method("pfedmoe", 1, 1, True, router_mode="joint",
           summary="1G1S with the router trained jointly on train data (ablation)"),
    Method("centralized", 1, 0, False, pooled=True,
           summary="one LoRA on the pooled data of all devices (upper bound)"),
)}


def resolve_methods(names: Sequence[str]) -> list[Method]:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}.")
    return [METHODS[n] for n in names]
