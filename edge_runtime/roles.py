"""The naming contract: which parameter is generalist, specialist, router or frozen.

CoMiGS's whole privacy and communication story rests on one question asked everywhere
(trainer, exporter, sync client, wire manifest): *does this tensor leave the device?* It is
answered here, and only here, from the parameter's name. The model code names its parameters
with the constants below, so a name is enough: the coordinator and the exporter can decide a
tensor's role from a manifest without ever building the model.

- generalist: shared LoRA experts (and the optional shared attention LoRA). Their deltas travel.
- specialist: private LoRA experts. Never leave the device.
- router: the per-layer token router. Never leaves the device.
- frozen: everything of the base model.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep this module importable without torch (manifests, coordinator tools)
    import torch
    from torch import nn


class Role(enum.StrEnum):
    GENERALIST = "generalist"
    SPECIALIST = "specialist"
    ROUTER = "router"
    FROZEN = "frozen"


# Leaf names the model code must use for its trainable parameters.
GENERALIST_A = "generalist_A"
GENERALIST_B = "generalist_B"
SPECIALIST_A = "specialist_A"
SPECIALIST_B = "specialist_B"
ROUTER_MODULE = "router"  # the router submodule's attribute name; its parameter is `weight`
ROUTER_WEIGHT = "weight"

_ROLE_BY_LEAF: dict[str, Role] = {
    GENERALIST_A: Role.GENERALIST,
    GENERALIST_B: Role.GENERALIST,
    SPECIALIST_A: Role.SPECIALIST,
    SPECIALIST_B: Role.SPECIALIST,
}
TRAINABLE_ROLES = (Role.GENERALIST, Role.SPECIALIST, Role.ROUTER)


class AdapterMismatchError(ValueError):
    """A set of named tensors does not fit the model it is loaded into."""


def role_of(name: str) -> Role:
    """The role of the parameter called `name` (a fully qualified name, any prefix)."""
    parts = name.rsplit(".", 2)
    leaf = parts[-1]
    if leaf in _ROLE_BY_LEAF:
        return _ROLE_BY_LEAF[leaf]
    if leaf == ROUTER_WEIGHT and len(parts) >= 2 and parts[-2] == ROUTER_MODULE:
        return Role.ROUTER
    return Role.FROZEN


def is_shared(name: str) -> bool:
    """True for tensors that may leave the device (only generalists do)."""
    return role_of(name) is Role.GENERALIST


def check_shared(names: Iterable[str]) -> None:
    """Raise ValueError naming the first tensor that must not leave a device. Asked at both ends of the
    wire: by the coordinator of its initial generalist, by the sync client of every payload it sends."""
    for name in names:
        if not is_shared(name):
            raise ValueError(
                f"{name!r} is a {role_of(name).value} tensor by the naming contract (edge_runtime/roles.py), "
                "and only generalists leave a device: use the tensors of roles.generalist_state(model)"
            )


def named_parameters_by_role(model: nn.Module, *roles: Role) -> Iterator[tuple[str, torch.nn.Parameter]]:
    wanted = set(roles)
    for name, param in model.named_parameters():
        if role_of(name) in wanted:
            yield name, param


def state_by_role(model: nn.Module, *roles: Role) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies of the parameters of the given roles, ready for safetensors."""
    return {name: p.detach().clone().contiguous() for name, p in named_parameters_by_role(model, *roles)}


def generalist_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a device sends to (and receives from) the coordinator."""
    return state_by_role(model, Role.GENERALIST)


def load_state_by_role(model: nn.Module, tensors: Mapping[str, torch.Tensor], *roles: Role) -> None:
    """Copy `tensors` into the model's parameters of `roles`; all of them, exactly, or nothing.

    Everything is checked before anything is written, so a bad file never leaves the model
    half-updated.
    """
    import torch

    expected = dict(named_parameters_by_role(model, *roles))
    role_names = "/".join(r.value for r in roles)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"{role_names} tensors do not match the model: "
            + (f"missing {len(missing)} (first: {missing[0]!r}) " if missing else "")
            + (f"unexpected {len(unexpected)} (first: {unexpected[0]!r}) " if unexpected else "")
            + "- the adapters were made for a different expert layout or base model; "
            "check n_generalists/n_specialists/rank and the base model."
        )
    for name, param in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(param.shape):
            raise AdapterMismatchError(
                f"{name}: shape {tuple(t.shape)} does not match the model's {tuple(param.shape)} - "
                "the adapters were made with another rank, expert count or base model."
            )
        if not torch.is_floating_point(t):
            raise AdapterMismatchError(f"{name}: dtype {t.dtype} is not a floating-point type.")
        if not torch.isfinite(t).all():
            raise AdapterMismatchError(f"{name}: contains NaN or Inf; refusing to load it.")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name].to(dtype=param.dtype, device=param.device))


def load_generalist(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Install a generalist state (e.g. the coordinator's published average) into the model."""
    load_state_by_role(model, tensors, Role.GENERALIST)
