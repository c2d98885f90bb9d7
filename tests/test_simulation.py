"""The in-process federation: every method end to end, and what each one shares."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_runtime import roles
from edge_runtime.cli import main
from edge_runtime.data.tokens import DataError, TokenSplit
from edge_runtime.simulation.federation import DeviceData, Federation, SimulationConfig, load_scenario
from edge_runtime.simulation.methods import METHODS
from edge_runtime.training.trainer import TrainerConfig

from tests.builders import VOCAB, tiny_base


def device_language(seed: int, n: int) -> np.ndarray:
    """Each device speaks its own 'language': a different successor table."""
    table = np.random.default_rng(100 + seed).integers(0, VOCAB, size=(VOCAB, 2))
    rng = np.random.default_rng(seed)
    out = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        out[i] = table[out[i - 1], rng.integers(0, 2)]
    return out


def devices(n: int = 4) -> list[DeviceData]:
    return [DeviceData(f"d{i}", TokenSplit(device_language(i, 1500)), TokenSplit(device_language(i, 300)),
                       TokenSplit(device_language(i, 300))) for i in range(n)]


CONFIG = SimulationConfig(rounds=2, local_steps=2, trainer=TrainerConfig(batch_size=4, seq_len=16, router_every=2,
                                                                          router_steps=1))


def params(model, role):
    return dict(roles.named_parameters_by_role(model, role))


def test_local_never_exchanges_anything():
    data = devices()
    torch.manual_seed(0)
    federation = Federation(tiny_base(), METHODS["local"], data, CONFIG)
    assert federation.bytes_up_per_round() == 0
    federation.run_round()
    # device 1 trained alone with the same seed ends in exactly the same place
    torch.manual_seed(0)
    alone = Federation(tiny_base(), METHODS["local"], data, CONFIG)
    alone.trainers[1].train(CONFIG.local_steps)
    for name, p in alone.models[1].named_parameters():
        assert torch.equal(p, dict(federation.models[1].named_parameters())[name]), name


def test_fedavg_makes_every_shared_tensor_identical():
    federation = Federation(tiny_base(), METHODS["fedavg"], devices(), CONFIG)
    before = roles.generalist_state(federation.models[0])
    federation.run_round()
    states = [roles.generalist_state(m) for m in federation.models]
    assert all(not torch.equal(states[0][n], before[n]) for n in before if n.endswith("_B"))
    for state in states[1:]:
        for name, tensor in state.items():
            assert torch.equal(tensor, states[0][name]), name
    trainable = {n for n, p in federation.models[0].named_parameters() if p.requires_grad}
    assert trainable == set(before)  # fedavg shares all of its LoRA


@pytest.mark.parametrize("method", ["comigs-1g1s", "comigs-2g", "pfedmoe"])
def test_comigs_shares_generalists_and_keeps_specialists_and_routers_private(method):
    federation = Federation(tiny_base(), METHODS[method], devices(), CONFIG)
    federation.run_round()
    models = federation.models
    for name, tensor in roles.generalist_state(models[0]).items():
        assert all(torch.equal(tensor, roles.generalist_state(m)[name]) for m in models[1:]), name
    for role in (roles.Role.SPECIALIST, roles.Role.ROUTER):
        for name, p in params(models[0], role).items():
            assert all(not torch.equal(p, params(m, role)[name]) for m in models[1:]), name


def test_heterogeneous_expert_counts_share_one_generalist():
    federation = Federation(tiny_base(), METHODS["comigs-1g1s"], devices(), CONFIG, experts_per_device=[1, 1, 8, 8])
    assert [m.comigs_config.n_experts for m in federation.models] == [1, 1, 8, 8]
    result = federation.run()
    states = [roles.generalist_state(m) for m in federation.models]
    for name, tensor in states[0].items():
        assert all(torch.equal(tensor, s[name]) for s in states[1:]), name
    assert len(result.test_perplexity) == 4 and all(np.isfinite(result.test_perplexity))
    assert result.routing_share[0] == [1.0, 1.0]  # a 1-expert device only has its generalist
    assert all(0.0 < s < 1.0 for s in result.routing_share[2])


def test_frozen_base_is_shared_not_copied():
    base = tiny_base()
    federation = Federation(base, METHODS["comigs-2s"], devices(), CONFIG)
    frozen = [dict(roles.named_parameters_by_role(m, roles.Role.FROZEN)) for m in federation.models]
    for name, p in frozen[0].items():
        assert all(f[name] is p for f in frozen[1:]), name


def test_simulate_cli_runs_every_method_and_reports(tmp_path):
    model_dir = tmp_path / "model"
    tiny_base().save_pretrained(model_dir)
    scenario = tmp_path / "scenario"
    for d in devices():
        (scenario / d.name).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            np.save(scenario / d.name / f"{split}.npy", getattr(d, split).tokens)
    out = tmp_path / "report"
    code = main(["simulate", "--data", str(scenario), "--model", str(model_dir), "--out", str(out),
                 "--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--seq-len", "16",
                 "--router-every", "2", "--router-steps", "1", "--eval-every", "1", "--experts", "1,1,8,8"])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["methods"]) == set(METHODS)
    assert len(payload["pretrained"]["test_perplexity"]) == 4
    for result in payload["methods"].values():
        assert len(result["curve"]) == 3  # rounds 0, 1, 2
    table = (out / "results.md").read_text()
    assert "| pretrained |" in table and "| comigs-1g1s |" in table
    assert (out / "perplexity_vs_round.png").is_file()
    assert payload["methods"]["local"]["bytes_up_per_round"] == 0


def test_bad_simulation_input_is_explained(tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist"):
        load_scenario(tmp_path / "missing")
    with pytest.raises(DataError, match="no device directories"):
        load_scenario(tmp_path)
    assert main(["simulate", "--data", str(tmp_path), "--methods", "fedprox"]) == 2
    assert "unknown method" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lists 2 devices"):
        Federation(tiny_base(), METHODS["comigs-1g1s"], devices(), CONFIG, experts_per_device=[1, 2])
