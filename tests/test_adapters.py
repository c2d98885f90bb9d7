"""Adapters on disk round-trip bit-exactly and refuse what does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_runtime import roles
from edge_runtime.model.adapters import (
    CONFIG_FILE,
    ROLE_FILES,
    load_adapters,
    read_adapter_config,
    save_adapters,
)

from tests.builders import randomize_experts, tiny_comigs


@pytest.mark.parametrize(("g", "s"), [(1, 1), (1, 0), (2, 6), (0, 1)])
def test_adapters_round_trip_bit_exactly(tmp_path, g, s):
    model = tiny_comigs("llama", n_generalists=g, n_specialists=s, attention_lora=True)
    randomize_experts(model, seed=3)
    with torch.no_grad():
        for _, p in roles.named_parameters_by_role(model, roles.Role.ROUTER):
            p.add_(torch.randn_like(p))
    save_adapters(model, tmp_path, metadata={"round": 3})
    fresh = tiny_comigs("llama", seed=9, n_generalists=g, n_specialists=s, attention_lora=True)
    config = load_adapters(fresh, tmp_path)
    assert config["metadata"] == {"round": 3}
    trained = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        if roles.role_of(name) is not roles.Role.FROZEN:
            assert torch.equal(p, trained[name]), name
    expected_files = {ROLE_FILES[r] for r in roles.TRAINABLE_ROLES if any(roles.named_parameters_by_role(model, r))}
    assert {p.name for p in tmp_path.glob("*.safetensors")} == expected_files


def test_each_role_file_holds_only_its_role(tmp_path):
    model = tiny_comigs("gpt2", n_generalists=1, n_specialists=2)
    save_adapters(model, tmp_path)
    for role, filename in ROLE_FILES.items():
        names = load_file(tmp_path / filename).keys()
        assert names and all(roles.role_of(n) is role for n in names)


def test_generalists_load_into_a_device_with_other_specialist_count(tmp_path):
    source = tiny_comigs("llama", n_generalists=1, n_specialists=7)
    randomize_experts(source)
    save_adapters(source, tmp_path)
    target = tiny_comigs("llama", n_generalists=1, n_specialists=1)
    load_adapters(target, tmp_path, which=(roles.Role.GENERALIST,))
    for name, t in roles.generalist_state(target).items():
        assert torch.equal(t, dict(source.named_parameters())[name])


def test_wrong_layout_is_explained(tmp_path):
    save_adapters(tiny_comigs("llama", n_generalists=1, n_specialists=3), tmp_path)
    with pytest.raises(roles.AdapterMismatchError, match="n_specialists=3"):
        load_adapters(tiny_comigs("llama", n_generalists=1, n_specialists=1), tmp_path)
    with pytest.raises(roles.AdapterMismatchError, match="rank=8"):
        load_adapters(tiny_comigs("llama", n_generalists=1, n_specialists=3, rank=4), tmp_path)


def test_wrong_shapes_leave_the_model_untouched(tmp_path):
    model = tiny_comigs("llama", n_generalists=1, n_specialists=1)
    save_adapters(model, tmp_path)
    path = tmp_path / ROLE_FILES[roles.Role.GENERALIST]
    tensors = load_file(path)
    first = sorted(tensors)[0]
    tensors[first] = torch.zeros(3, 3)
    save_file(tensors, path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    import hashlib

    config["files"]["generalist"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    target = tiny_comigs("llama", n_generalists=1, n_specialists=1)
    randomize_experts(target, seed=4)
    before = {n: p.clone() for n, p in target.named_parameters()}
    with pytest.raises(roles.AdapterMismatchError, match=r"shape \(3, 3\)"):
        load_adapters(target, tmp_path)
    for name, p in target.named_parameters():
        assert torch.equal(p, before[name]), name


def test_corrupted_file_and_missing_config_are_explained(tmp_path):
    model = tiny_comigs("llama", n_generalists=1, n_specialists=1)
    save_adapters(model, tmp_path)
    path = tmp_path / ROLE_FILES[roles.Role.SPECIALIST]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(roles.AdapterMismatchError, match="sha256"):
        load_adapters(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        read_adapter_config(tmp_path / "elsewhere")


def test_nan_tensors_are_refused():
    model = tiny_comigs("llama", n_generalists=1, n_specialists=1)
    state = roles.generalist_state(model)
    state[next(iter(state))][0].fill_(float("nan"))
    with pytest.raises(roles.AdapterMismatchError, match="NaN"):
        roles.load_generalist(model, state)
