"""MAML's MAML++ options (LSLR, multi-step loss, per-step BatchNorm, derivative-order annealing), each alone and
all together, on the MLP path and the any-module path, against a per-task float64 loop written here with
torch.func.functional_call and torch.autograd.grad: explicit inner steps, each with its own rates and norms."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn_fast import MAML, MLP, TaskBatch

T, K, Q, STEPS = 3, 5, 4, 3
INNER_LR = 0.1
CLOSE = dict(rtol=1e-10, atol=1e-12)


def make_model(path):
    torch.manual_seed(0)
    if path == "mlp":
        return MLP([2, 8, 8, 3], dtype=torch.float64)
    return nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(),
                         nn.Linear(8, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(),
                         nn.Linear(8, 3)).double()


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(T, K, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, K), generator=g),
                     torch.randn(T, Q, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (T, Q), generator=g))


def make_maml(model, steps=STEPS, **options):
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=steps, loss="cross_entropy", **options)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # distinct values per step, so that a value used at the wrong step shows
        for p in maml.plus.parameters() if maml.plus is not None else []:
            p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
    return maml


def oracle_meta_loss(maml, batch, first_order):
    """One task at a time: the model through functional_call, inner step k with its own rates and BatchNorm copy,
    the weighted query losses."""
    model, plus, steps = maml.model, maml.plus, maml.inner_steps
    names = [name for name, _ in model.named_parameters()]
    meta = list(model.parameters())
    adapted = maml._adapted_indices
    weights = plus.loss_weights() if plus is not None and plus.multi_step else [0.0] * (steps - 1) + [1.0]
    norms = dict(zip(plus.norm_indices, plus.step_norms)) if plus is not None and plus.step_norms is not None else {}
    step_lrs = plus.step_inner_lrs if plus is not None else None

    def run(params, x):
        return functional_call(model, dict(zip(names, params)), (x,))

    total = 0
    for t in range(batch.num_tasks):
        params = list(meta)
        for step in range(steps):
            for i, copies in norms.items():
                params[i] = copies[step]
            support = F.cross_entropy(run(params, batch.x_support[t]), batch.y_support[t])
            grads = torch.autograd.grad(support, [params[i] for i in adapted], create_graph=not first_order)
            for j, (i, grad) in enumerate(zip(adapted, grads)):
                rate = step_lrs[j][step] if step_lrs is not None else INNER_LR
                params[i] = params[i] - rate * grad
            if weights[step]:
                total = total + weights[step] * F.cross_entropy(run(params, batch.x_query[t]), batch.y_query[t])
    return total / batch.num_tasks


def assert_matches_oracle(maml, batch, first_order):
    leaves = list(maml.parameters())
    loss = maml.meta_loss(batch)
    expected = oracle_meta_loss(maml, batch, first_order)
    torch.testing.assert_close(loss, expected, **CLOSE)
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    want = torch.autograd.grad(expected, leaves, allow_unused=True)
    for name, g, w, leaf in zip([n for n, _ in maml.named_parameters()], got, want, leaves):
        g = torch.zeros_like(leaf) if g is None else g
        w = torch.zeros_like(leaf) if w is None else w
        torch.testing.assert_close(g, w, **CLOSE, msg=lambda m, name=name: f"gradient of {name}: {m}")


OPTIONS = {
    "lslr": dict(per_step_inner_lr=True),
    "multi_step_annealed": dict(multi_step_loss=10),
    "multi_step_fixed": dict(multi_step_loss=[0.2, 0.3, 0.5]),
    "per_step_bn": dict(per_step_bn=True),
    "all": dict(per_step_inner_lr=True, multi_step_loss=10, per_step_bn=True, first_order_meta_steps=2),
}


# an MLP has no BatchNorm: per_step_bn is refused there (test_bad_values_get_named_errors), left out of "all"
CASES = [(option, path) for option in OPTIONS for path in ("mlp", "module") if (option, path) != ("per_step_bn", "mlp")]


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("option, path", CASES)
def test_each_option_and_all_together_match_the_per_task_loop(option, path, first_order):
    options = dict(OPTIONS[option])
    if path == "mlp":
        options.pop("per_step_bn", None)
    maml = make_maml(make_model(path), first_order=first_order, **options)
    if maml.plus.anneal_steps:
        maml.plus.taken = 4  # mid-annealing: unequal weights, none zero
    if maml.plus.first_order_meta_steps:
        maml.plus.taken = 4  # annealing over: the order is first_order's
    assert_matches_oracle(maml, make_batch(), first_order)


@pytest.mark.parametrize("steps", [1, STEPS])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_lslr_and_the_multi_step_loss_run_the_fused_meta_step_as_torch_optim_would(steps, first_order):
    """On an MLP the fused meta-step takes the per-step rates and the multi-step loss: its update (Adam on the
    weights and the rates) equals torch's Adam on the per-task loop's meta-gradient, step after step."""
    options = dict(steps=steps, first_order=first_order, per_step_inner_lr=True, multi_step_loss=10)
    maml, twin = make_maml(make_model("mlp"), **options), make_maml(make_model("mlp"), **options)
    optimizer = torch.optim.Adam(maml.parameters(), lr=0.01)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=0.01)
    assert maml.meta_step_path(optimizer) == "fused"
    before = [r.detach().clone() for r in maml.plus.step_inner_lrs]
    for seed in range(3):  # the annealed weights change with every step
        batch = make_batch(seed)
        loss = maml.meta_step(batch, optimizer)
        twin_optimizer.zero_grad()
        expected = oracle_meta_loss(twin, batch, first_order)
        expected.backward()
        twin_optimizer.step()
        twin.plus.advance()
        torch.testing.assert_close(loss, expected.detach(), **CLOSE)
        for (name, got), want in zip(maml.named_parameters(), twin.parameters()):
            torch.testing.assert_close(got, want, **CLOSE, msg=lambda m, name=name: f"{name}: {m}")
    assert all(not torch.equal(b, r) for b, r in zip(before, maml.plus.step_inner_lrs))  # the rates learn


@pytest.mark.parametrize("path", ["mlp", "module"])
def test_derivative_order_annealing_is_first_order_then_second(path):
    maml = make_maml(make_model(path), first_order_meta_steps=2)
    optimizer = torch.optim.SGD(maml.parameters(), lr=0.0)  # counts the meta-steps, leaves the weights
    batch = make_batch()
    for taken in range(4):
        assert maml.plus.taken == taken
        assert_matches_oracle(maml, batch, first_order=taken < 2)
        maml.meta_step(batch, optimizer)
    if path == "mlp":  # the derivative order alone keeps the fused op
        assert maml.meta_step_path(optimizer) == "fused"


def test_annealed_weights_follow_the_papers_schedule_by_hand():
    def weights(anneal, taken):
        maml = MAML(make_model("mlp"), inner_lr=INNER_LR, inner_steps=4, loss="cross_entropy", multi_step_loss=anneal)
        maml.plus.taken = taken
        return maml.plus.loss_weights()

    assert weights(10, 0) == pytest.approx([0.25] * 4, abs=1e-15)  # equal at the start
    assert weights(10, 5) == pytest.approx([0.125, 0.125, 0.125, 0.625], abs=1e-15)  # 1/4 - 5/40, the rest last
    assert weights(10, 9) == pytest.approx([0.025, 0.025, 0.025, 0.925], abs=1e-15)
    # 1/4 - 99/400 is below the floor 0.03/4; the last is capped at 1 - 3 * 0.0075
    assert weights(100, 99) == pytest.approx([0.0075, 0.0075, 0.0075, 0.9775], abs=1e-15)
    for taken in (10, 50):  # annealing over: the last step's loss only
        assert weights(10, taken) == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("path", ["mlp", "module"])
def test_adapt_uses_each_steps_rates_and_norms_then_inner_lr_and_the_last_norms(path):
    options = dict(per_step_inner_lr=True, **({"per_step_bn": True} if path == "module" else {}))
    maml = make_maml(make_model(path), **options)
    batch = make_batch()
    model, plus = maml.model, maml.plus
    names = [name for name, _ in model.named_parameters()]
    norms = dict(zip(plus.norm_indices, plus.step_norms or []))
    for steps in (0, 2, STEPS + 2):
        adapted = maml.adapt(batch.x_support, batch.y_support, steps=steps)
        for t in range(T):
            params = [p.detach() for p in model.parameters()]
            for i, copies in norms.items():
                params[i] = copies[0].detach()
            for step in range(steps):
                last = min(step, STEPS - 1)
                for i, copies in norms.items():
                    params[i] = copies[last].detach()
                leaves = [p.requires_grad_() if i in maml._adapted_indices else p
                          for i, p in enumerate(p.detach() for p in params)]
                out = functional_call(model, dict(zip(names, leaves)), (batch.x_support[t],))
                grads = torch.autograd.grad(F.cross_entropy(out, batch.y_support[t]),
                                            [leaves[i] for i in maml._adapted_indices])
                params = list(leaves)
                for j, (i, grad) in enumerate(zip(maml._adapted_indices, grads)):
                    rate = plus.step_inner_lrs[j][step] if step < STEPS else INNER_LR  # learned for its own step
                    params[i] = (leaves[i] - rate * grad).detach()
            for a, e in zip(adapted, params):
                torch.testing.assert_close(a[t], e.detach(), **CLOSE)


def test_state_dict_carries_the_learned_values_and_the_count():
    maml = make_maml(make_model("module"), per_step_inner_lr=True, per_step_bn=True, multi_step_loss=10,
                     first_order_meta_steps=3)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    batch = make_batch()
    for _ in range(2):
        maml.meta_step(batch, optimizer)
    state = maml.state_dict()
    assert {"plus.step_inner_lrs.0", "plus.step_norms.0", "plus._extra_state"} <= set(state)
    fresh = MAML(make_model("module"), inner_lr=INNER_LR, inner_steps=STEPS, loss="cross_entropy",
                 per_step_inner_lr=True, per_step_bn=True, multi_step_loss=10, first_order_meta_steps=3)
    fresh.load_state_dict(state)
    assert fresh.plus.taken == 2
    torch.testing.assert_close(fresh.meta_loss(batch), maml.meta_loss(batch), rtol=0, atol=0)
    # the learned values moved: the meta-optimizer trains them
    assert not torch.equal(state["plus.step_inner_lrs.0"], make_maml(make_model("module"), per_step_inner_lr=True,
                           per_step_bn=True, multi_step_loss=10).state_dict()["plus.step_inner_lrs.0"])


@pytest.mark.parametrize("options, words", [
    (dict(per_step_bn=True), "per_step_bn=True needs a model with BatchNorm"),
    (dict(multi_step_loss=[0.5, 0.6, 0.1]), "must be non-negative and sum to 1"),
    (dict(multi_step_loss=[0.5, 0.5]), "2 weights for 3 inner steps"),
    (dict(multi_step_loss=[1.2, -0.1, -0.1]), "must be non-negative and sum to 1"),
    (dict(multi_step_loss=0), "multi_step_loss"),
    (dict(multi_step_loss=True), "multi_step_loss must be None, a number of meta-steps or a list"),
    (dict(first_order_meta_steps=-1), "first_order_meta_steps"),
    (dict(per_step_inner_lr=True, learn_inner_lr=True), "choose one"),
])
def test_bad_values_get_named_errors(options, words):
    with pytest.raises((ValueError, TypeError), match=words.replace("(", r"\(")):
        MAML(make_model("mlp"), inner_lr=INNER_LR, inner_steps=STEPS, loss="cross_entropy", **options)
