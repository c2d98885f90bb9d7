"""The injected CoMiGS model: base equality, trainable set, routing gradients, both MLP paths."""

from __future__ import annotations

import pytest
import torch

from edge_runtime import roles
from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.inject import balance_loss, inject_comigs, language_model_loss, moe_layers

from tests.builders import VOCAB, randomize_experts, tiny_base, tiny_comigs

LAYOUTS = [  # (G, S, top_k)
    (1, 0, None), (0, 1, None), (1, 1, None), (1, 3, None), (2, 6, None), (1, 2, 1),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize(("g", "s", "k"), LAYOUTS)
@pytest.mark.parametrize("attention_lora", [False, True])
def test_injected_model_equals_base_at_init(arch, g, s, k, attention_lora):
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(3))
    base = tiny_base(arch)
    with torch.no_grad():
        expected = base(tokens).logits
    model = inject_comigs(base, CoMiGSConfig(g, s, top_k=k, attention_lora=attention_lora))
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            got = model(tokens).logits
        if g + s == 1 or k == 1:
            # one expert per token with gate exactly 1 and zero LoRA B: bit-identical
            assert torch.equal(got, expected)
        else:
            # k >= 2: the gates sum to 1 up to rounding
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_lora_and_router_are_trainable_and_every_trainable_has_one_role(arch):
    model = tiny_comigs(arch, n_generalists=1, n_specialists=3, attention_lora=True)
    seen = {role: 0 for role in roles.Role}
    for name, param in model.named_parameters():
        role = roles.role_of(name)
        seen[role] += 1
        assert param.requires_grad == (role is not roles.Role.FROZEN), name
    assert all(seen.values()), seen
    # the roles partition the parameters: every name is in exactly one role's listing
    listed = [n for r in roles.Role for n, _ in roles.named_parameters_by_role(model, r)]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    n_routers = sum(1 for _ in roles.named_parameters_by_role(model, roles.Role.ROUTER))
    assert n_routers == model.config.num_hidden_layers  # one router per block


def test_base_mlp_is_never_copied_per_expert():
    base = tiny_base("llama")
    frozen_before = sum(p.numel() for p in base.parameters())
    model = inject_comigs(base, CoMiGSConfig(1, 7))
    frozen_after = sum(p.numel() for n, p in model.named_parameters() if roles.role_of(n) is roles.Role.FROZEN)
    assert frozen_after == frozen_before


@pytest.mark.parametrize(("n_experts", "k"), [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_router_gradients_are_nonzero(arch, n_experts, k, batch):
    model = tiny_comigs(arch, n_generalists=1, n_specialists=n_experts - 1, top_k=k, lb_weight=0.0)
    randomize_experts(model)  # identical experts give a mixture nothing to choose between
    model.train()
    loss, _ = language_model_loss(model, *batch)
    loss.backward()
    for name, p in roles.named_parameters_by_role(model, roles.Role.ROUTER):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("n_experts", "k"), [(4, 2), (3, 1), (8, 2)])
def test_balance_loss_has_gradient_when_k_below_e(n_experts, k, batch):
    model = tiny_comigs("llama", n_generalists=1, n_specialists=n_experts - 1, top_k=k)
    model.train()
    model(batch[0])
    aux = balance_loss(model)
    assert aux is not None and aux.item() > 0
    aux.backward()
    for name, p in roles.named_parameters_by_role(model, roles.Role.ROUTER):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_balance_loss_is_one_at_target_and_penalises_imbalance():
    from edge_runtime.model.router import Router

    router = Router(4, 3, 1, [0.5, 0.25, 0.25])
    probs = torch.tensor([[0.5, 0.25, 0.25]] * 4)
    experts = torch.tensor([[0], [0], [1], [2]])  # dispatch shares 0.5 / 0.25 / 0.25
    assert float(router.balance_loss(probs, experts)) == pytest.approx(1.0)
    skewed = torch.tensor([[0.9, 0.05, 0.05]] * 4)
    assert float(router.balance_loss(skewed, torch.zeros(4, 1, dtype=torch.long))) > 1.5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("g", "s", "k"), [(1, 3, None), (2, 6, None), (1, 4, 1)])
def test_grouped_and_dense_mixtures_agree_in_value_and_gradient(arch, g, s, k, batch):
    results = []
    for dense in (False, True):
        model = tiny_comigs(arch, n_generalists=g, n_specialists=s, top_k=k)
        randomize_experts(model)
        for layer in moe_layers(model):
            layer.force_dense = dense
        model.train()
        loss, _ = language_model_loss(model, *batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_recompute_changes_nothing_but_memory(batch):
    grads = []
    for recompute in (True, False):
        model = tiny_comigs("llama", n_generalists=1, n_specialists=3, recompute_experts=recompute)
        randomize_experts(model)
        model.train()
        language_model_loss(model, *batch)[0].backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("n_specialists", [0, 1, 7])
def test_heterogeneous_devices_share_one_generalist_state(n_specialists):
    reference = tiny_comigs("llama", seed=0, n_generalists=1, n_specialists=1)
    randomize_experts(reference, seed=5)
    state = roles.generalist_state(reference)
    device = tiny_comigs("llama", seed=0, n_generalists=1, n_specialists=n_specialists)
    assert {k: v.shape for k, v in roles.generalist_state(device).items()} == {k: v.shape for k, v in state.items()}
    roles.load_generalist(device, state)
    for name, tensor in roles.generalist_state(device).items():
        assert torch.equal(tensor, state[name])
    assert not any(roles.role_of(n) is not roles.Role.GENERALIST for n in state)


def test_slot_dispatch_and_combine_are_exact_inverses_with_correct_gradients():
    from edge_runtime.model.dispatch import SlotOrder

    experts = torch.tensor([[3, 0], [1, 3], [0, 2], [3, 1], [2, 0]])
    slots = SlotOrder.from_experts(experts, n_experts=5)
    assert slots.counts == [3, 2, 2, 3, 0]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    sorted_rows = slots.dispatch(x)
    assert torch.equal(sorted_rows, x[slots.tokens])
    assert torch.equal(slots.combine(sorted_rows), 2 * x.detach())  # every token has k = 2 slots
    torch.autograd.gradcheck(lambda t: slots.dispatch(t), (x,))
    y = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: slots.combine(t), (y,))
