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


def _trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two mixture paths must give every trainable parameter the same gradient."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("g", "s", "k"), [(1, 3, None), (2, 6, None), (1, 4, 1), (0, 4, None), (3, 0, None)])
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
        results.append((loss.detach(), _trainable_grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    _assert_same_grads(grads_a, grads_b)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("g", "s", "k"),
                         [(1, 0, None), (0, 1, None), (1, 1, None), (1, 3, None), (2, 6, 2), (1, 4, 1)])
def test_stacked_and_looped_dense_mixtures_agree_in_value_and_gradient(arch, g, s, k, batch):
    """The batched form the ONNX export traces (`stack_experts`) is the same function as the loop."""
    results = []
    for stacked in (False, True):
        model = tiny_comigs(arch, n_generalists=g, n_specialists=s, top_k=k)
        randomize_experts(model)
        for layer in moe_layers(model):
            layer.force_dense, layer.stack_experts = True, stacked
        model.eval()  # no dropout; gradients still flow (the training path's recompute is not involved)
        ids, targets = batch
        logits = model(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        results.append((logits.detach(), _trainable_grads(model)))
    (logits_a, grads_a), (logits_b, grads_b) = results
    assert logits_a.abs().max() > 0
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-5, atol=1e-5)
    _assert_same_grads(grads_a, grads_b)


def test_recompute_changes_nothing_but_memory(batch):
    grads = []
    for recompute in (True, False):
        model = tiny_comigs("llama", n_generalists=1, n_specialists=1, recompute_experts=recompute)
        randomize_experts(model)  # E = k = 2: the dense mixing, where recomputation is optional
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



@pytest.mark.parametrize(("g", "s", "attention_lora"), [(1, 1, False), (2, 6, True)])
def test_generalist_shapes_without_weights_equal_a_built_models(tmp_path, g, s, attention_lora):
    from edge_runtime.model.factory import build_comigs_model, generalist_shapes

    tiny_base("llama").save_pretrained(tmp_path / "base")
    config = CoMiGSConfig(g, s, rank=4, attention_lora=attention_lora)
    built, _ = build_comigs_model(tmp_path / "base", config, with_tokenizer=False)
    expected = {name: tuple(t.shape) for name, t in roles.generalist_state(built).items()}
    assert generalist_shapes(tmp_path / "base", config) == expected
    assert list(generalist_shapes(tmp_path / "base", config)) == list(expected)  # same order too

def test_expert_groups_sort_slots_by_expert_and_skip_empty_experts():
    from edge_runtime.model.grouped_experts import ExpertGroups

    experts = torch.tensor([[3, 0], [1, 3], [0, 2], [3, 1], [2, 0]])
    groups = ExpertGroups.from_experts(experts)
    assert groups.spans == ((0, 0, 3), (1, 3, 5), (2, 5, 7), (3, 7, 10))  # expert 4: no rows
    # blocks of N = 5 sorted rows, pieces relative to the block; expert 3's rows 7..10 -> 2..5
    assert [(b.lo, b.hi, b.pieces) for b in groups.blocks] == [
        (0, 5, ((0, 0, 3), (1, 3, 5))), (5, 10, ((2, 0, 2), (3, 2, 5)))]
    assert groups.tokens.tolist() == [0, 2, 4, 1, 3, 2, 4, 0, 1, 3]
    assert torch.equal(experts.reshape(-1)[groups.order], torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3]))


@pytest.mark.parametrize(("gated", "act"), [(True, torch.nn.SiLU()), (False, torch.nn.GELU(approximate="tanh"))])
@pytest.mark.parametrize("trainable", ["all", "router", "experts"])
def test_grouped_mixture_backward_matches_numerical_gradients(gated, act, trainable):
    """The hand-written backward against finite differences, in float64, per training phase."""
    from edge_runtime.model.grouped_experts import ExpertGroups, grouped_mixture

    gen = torch.Generator().manual_seed(0)
    n, d, d_ff, r, n_experts = 6, 5, 7, 3, 4

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    experts = torch.tensor([[3, 0], [1, 3], [0, 2], [3, 1], [2, 0], [0, 1]])  # expert 1 straddles two blocks
    groups = ExpertGroups.from_experts(experts)
    x = rand(n, d)
    pre = [rand(n, d_ff) for _ in range(2 if gated else 1)]
    weights = torch.softmax(rand(n, 2, grad=False), -1).requires_grad_(trainable != "experts")
    factor_grad = trainable != "router"
    n_gen = 1  # expert 0 is the generalist, 1..3 specialists: both stacks in play

    def bank(d_in, d_out):
        return (rand(n_gen, r, d_in, grad=factor_grad), rand(n_gen, d_out, r, grad=factor_grad),
                rand(n_experts - n_gen, r, d_in, grad=factor_grad), rand(n_experts - n_gen, d_out, r, grad=factor_grad))

    stacks = [*(t for _ in pre for t in bank(d, d_ff)), *bank(d_ff, d)]
    n_in = len(pre)

    def mixture(x, weights, *tensors):
        pre, rest = tensors[:n_in], tensors[n_in:]
        in_stacks = [rest[4 * i:4 * i + 4] for i in range(n_in)]
        return grouped_mixture(x, pre, weights, groups, n_gen, in_stacks, rest[-4:], act, 0.7)

    torch.autograd.gradcheck(mixture, (x, weights, *pre, *stacks))


def test_dense_gates_equal_top_k_of_every_expert_scattered_back():
    """k = E: the router's shortcut (full softmax, no sort or scatter) gives the gates and the
    balance loss of the top-k path, in value and in gradient."""
    from edge_runtime.model.router import Router

    torch.manual_seed(0)
    router = Router(16, 3, 3, [0.5, 0.25, 0.25])
    x = torch.randn(40, 16, requires_grad=True)
    weights, experts, loss = router(x)
    scattered = torch.zeros(40, 3).scatter(1, experts, weights)
    gates, dense_loss = router.dense_gates(x)
    torch.testing.assert_close(gates, scattered, rtol=0, atol=1e-7)
    assert torch.equal(dense_loss, loss)
    grads = [torch.autograd.grad((g * torch.arange(1.0, 4.0)).sum() + lb, (x, router.weight))
             for g, lb in ((scattered, loss), (gates, dense_loss))]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="k = E"):
        Router(16, 3, 2, [0.5, 0.25, 0.25]).dense_gates(x)


def test_every_expert_layers_match_the_recorded_top_k_path():
    """The MLP takes the shortcut unless routing is being recorded (which needs expert indices);
    both give the same logits."""
    from edge_runtime.model.moe_mlp import record_routing

    model = tiny_comigs("llama", n_generalists=1, n_specialists=1)  # k = min(2, E) = E
    randomize_experts(model)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shortcut = model(input_ids=ids).logits
        record_routing(model)
        recorded = model(input_ids=ids).logits
    torch.testing.assert_close(shortcut, recorded, rtol=0, atol=1e-6)
