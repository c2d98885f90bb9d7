"""The bi-level local trainer: phase isolation, determinism, accumulation, learning."""

from __future__ import annotations

import copy

import pytest
import torch

from edge_runtime import roles
from edge_runtime.data.tokens import TokenSplit
from edge_runtime.evaluation import perplexity
from edge_runtime.model.config import ConfigError
from edge_runtime.training.trainer import LocalTrainer, TrainerConfig

from tests.builders import randomize_experts, synthetic_language, tiny_comigs


def splits(seed: int = 0):
    return TokenSplit(synthetic_language(4000, seed)), TokenSplit(synthetic_language(1500, seed + 100))


def small_config(**overrides) -> TrainerConfig:
    base = dict(batch_size=4, seq_len=16, router_every=3, router_steps=2, total_steps=20, lr=5e-3)
    return TrainerConfig(**(base | overrides))


def snapshot(model, *wanted):
    return {n: p.detach().clone() for n, p in roles.named_parameters_by_role(model, *wanted)}


def optimizer_snapshot(optimizer):
    return copy.deepcopy(optimizer.state_dict()["state"])


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for field in a[key]:
            assert torch.equal(torch.as_tensor(a[key][field]), torch.as_tensor(b[key][field])), (key, field)


def test_router_phase_never_touches_experts_and_expert_phase_never_touches_router():
    model = tiny_comigs("llama", n_generalists=1, n_specialists=3)
    randomize_experts(model)
    trainer = LocalTrainer(model, small_config(), *splits())
    trainer.train(3)  # 3 expert steps; the router phase is due after step 3 and has run
    assert trainer.router_updates == 2
    experts_before = snapshot(model, roles.Role.GENERALIST, roles.Role.SPECIALIST)
    expert_opt_before = optimizer_snapshot(trainer.expert_opt)
    router_before = snapshot(model, roles.Role.ROUTER)
    trainer.router_phase()
    for name, value in snapshot(model, roles.Role.GENERALIST, roles.Role.SPECIALIST).items():
        assert torch.equal(value, experts_before[name]), name
    assert_same_state(optimizer_snapshot(trainer.expert_opt), expert_opt_before)
    assert any(not torch.equal(v, router_before[n]) for n, v in snapshot(model, roles.Role.ROUTER).items())

    router_before = snapshot(model, roles.Role.ROUTER)
    router_opt_before = optimizer_snapshot(trainer.router_opt)
    trainer.expert_step()
    for name, value in snapshot(model, roles.Role.ROUTER).items():
        assert torch.equal(value, router_before[name]), name
    assert_same_state(optimizer_snapshot(trainer.router_opt), router_opt_before)
    assert all(p.grad is None for p in model.parameters())


def test_router_phases_follow_the_cadence():
    model = tiny_comigs("llama", n_generalists=1, n_specialists=1)
    trainer = LocalTrainer(model, small_config(router_every=4, router_steps=3), *splits())
    history = trainer.train(9)
    phases = "".join("e" if m.phase == "experts" else "r" for m in history)
    assert phases == "eeee" "rrr" "eeee" "rrr" "e"


def test_joint_mode_trains_router_on_train_batches_without_router_phase():
    model = tiny_comigs("llama", n_generalists=1, n_specialists=1)
    router_before = snapshot(model, roles.Role.ROUTER)
    trainer = LocalTrainer(model, small_config(router_mode="joint"), splits()[0], None)
    history = trainer.train(4)
    assert {m.phase for m in history} == {"experts"}
    assert any(not torch.equal(v, router_before[n]) for n, v in snapshot(model, roles.Role.ROUTER).items())


def test_single_expert_model_has_no_router_and_no_router_phase():
    model = tiny_comigs("gpt2", n_generalists=1, n_specialists=0)
    trainer = LocalTrainer(model, small_config(), *splits())
    assert trainer.router_opt is None
    assert {m.phase for m in trainer.train(4)} == {"experts"}


def _train(seed_model=0, lb_weight=0.01, **overrides):
    model = tiny_comigs("llama", seed=seed_model, n_generalists=1, n_specialists=2, lb_weight=lb_weight)
    trainer = LocalTrainer(model, small_config(**overrides), *splits())
    trainer.train(4)
    return model


def test_training_is_deterministic_for_a_seed():
    a, b = _train(seed=7), _train(seed=7)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    c = _train(seed=8)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_gradient_accumulation_matches_one_large_batch():
    # The balance loss is a batch statistic, computed per micro-batch (as Switch does per
    # device batch), so exact equality only holds for the cross-entropy part.
    full = _train(batch_size=4, lb_weight=0.0)
    accumulated = _train(batch_size=4, micro_batch_size=2, lb_weight=0.0)
    for (name, pa), (_, pb) in zip(full.named_parameters(), accumulated.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_state_resumes_exactly():
    train, valid = splits()
    model = tiny_comigs("llama", n_generalists=1, n_specialists=2)
    trainer = LocalTrainer(model, small_config(), train, valid)
    trainer.train(2)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(trainer.state_dict())
    trainer.train(4)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed = tiny_comigs("llama", n_generalists=1, n_specialists=2)
    resumed.load_state_dict(saved_model)
    again = LocalTrainer(resumed, small_config(), train, valid)
    again.load_state_dict(saved_state)
    again.train(4)
    for name, p in resumed.named_parameters():
        assert torch.equal(p, expected[name]), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_lowers_validation_perplexity_on_a_learnable_language(arch):
    train, valid = TokenSplit(synthetic_language(20000, 0)), TokenSplit(synthetic_language(3000, 1))
    model = tiny_comigs(arch, n_generalists=1, n_specialists=1)
    before = perplexity(model, valid, seq_len=32).perplexity
    config = TrainerConfig(batch_size=8, seq_len=32, total_steps=120, router_every=10, router_steps=3, seed=0)
    LocalTrainer(model, config, train, valid).train(120)
    after = perplexity(model, valid, seq_len=32).perplexity
    assert after < 0.5 * before, (before, after)


def test_bilevel_without_validation_split_is_refused():
    model = tiny_comigs("llama", n_generalists=1, n_specialists=1)
    with pytest.raises(ConfigError, match="validation split"):
        LocalTrainer(model, small_config(), splits()[0], None)


@pytest.mark.parametrize("bad", [dict(batch_size=6, micro_batch_size=4), dict(seq_len=0),
                                 dict(router_mode="sometimes"), dict(lr=0.0), dict(router_every=0)])
def test_bad_trainer_config_is_explained(bad):
    with pytest.raises(ConfigError):
        small_config(**bad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memory_savers_do_not_change_the_result(arch):
    """Layer checkpointing and the chunked LM-head loss trade compute for memory, nothing else."""
    results = []
    for savers in ({}, {"activation_checkpointing": True, "loss_chunk_tokens": 7}):
        model = tiny_comigs(arch, n_generalists=1, n_specialists=3)
        randomize_experts(model)
        trainer = LocalTrainer(model, small_config(**savers), *splits())
        history = trainer.train(4)
        results.append(([m.loss for m in history], {n: p.detach().clone() for n, p in model.named_parameters()}))
    (losses_a, params_a), (losses_b, params_b) = results
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-4, atol=1e-6, msg=name)
