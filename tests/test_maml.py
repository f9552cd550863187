"""MAML (and FOMAML, Meta-SGD, ANIL) and Reptile against an explicit per-task loop, on both paths.

The oracle is the textbook definition: for each task, SGD steps with torch.autograd.grad on that
task's own support loss, then the query loss; everything in plain torch, float64.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metalearn_fast as mf
from metalearn_fast import MAML, MLP, Reptile, SimpleNet, TaskBatch

T, K, Q = 4, 5, 6
SIZES = [2, 8, 8, 3]
INNER_LR = 0.1
CLOSE = dict(rtol=1e-9, atol=1e-12)


# ---- models: the same function on the fast path and on the generic path ----

class PlainMLP(nn.Module):
    """MLP(SIZES) as a module the fast path does not recognise, so MAML takes the generic path."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=torch.float64) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


class WrappedMLP(nn.Module):
    """An MLP (FusedLinearReLU layers, so the custom op) inside a module: the generic path runs it under vmap."""

    def __init__(self, sizes):
        super().__init__()
        self.mlp = MLP(sizes, dtype=torch.float64)

    def forward(self, x):
        return self.mlp(x)


class NotVmappable(PlainMLP):
    """The same function, but .item() in forward makes torch.func.vmap fail: the generic path loops over tasks."""

    def forward(self, x):
        scale = 1.0 if x.abs().max().item() >= 0 else 0.0
        return super().forward(x) * scale


def make_model(path, seed=0):
    torch.manual_seed(seed)
    if path == "fast":
        return MLP(SIZES, dtype=torch.float64)
    return {"generic": PlainMLP, "wrapped": WrappedMLP, "loop": NotVmappable}[path](SIZES)


def make_batch(loss, seed=0, classes=SIZES[-1]):
    g = torch.Generator().manual_seed(seed)
    x_support = torch.randn(T, K, SIZES[0], generator=g, dtype=torch.float64)
    x_query = torch.randn(T, Q, SIZES[0], generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y_support = torch.randint(0, classes, (T, K), generator=g)
        y_query = torch.randint(0, classes, (T, Q), generator=g)
    else:
        y_support = torch.randn(T, K, SIZES[-1], generator=g, dtype=torch.float64)
        y_query = torch.randn(T, Q, SIZES[-1], generator=g, dtype=torch.float64)
    return TaskBatch(x_support, y_support, x_query, y_query)


# ---- the oracle ----

def plain_forward(params, x, relu_after=None):
    """The stack in plain torch: params [W0, b0, W1, b1, ...] (no task dim), x [N, I] -> [N, out]."""
    layers = len(params) // 2
    relu_after = relu_after or [True] * (layers - 1) + [False]
    for i, relu in enumerate(relu_after):
        x = x @ params[2 * i].T + params[2 * i + 1]
        if relu:
            x = torch.relu(x)
    return x


def task_loss(loss, pred, target):
    """One task's mean loss: pred [K, out]."""
    if loss == "mse":
        return F.mse_loss(pred, target)
    if loss == "cross_entropy":
        return F.cross_entropy(pred, target)
    return loss(pred.unsqueeze(0), target.unsqueeze(0))[0]


def loop_adapt(meta, x_support, y_support, *, loss, steps, first_order, rates, adapted_indices, relu_after=None):
    """One task's inner loop: ``steps`` SGD steps on its own support loss. rates: one per adapted parameter."""
    params = list(meta)
    for _ in range(steps):
        support_loss = task_loss(loss, plain_forward(params, x_support, relu_after), y_support)
        grads = torch.autograd.grad(
            support_loss, [params[i] for i in adapted_indices], create_graph=not first_order
        )
        for i, grad, rate in zip(adapted_indices, grads, rates):
            params[i] = params[i] - rate * grad
    return params


def loop_meta_loss(model, batch, *, loss, steps, first_order=False, inner_lrs=None, head_only=False, relu_after=None):
    """Mean over tasks of the query loss after each task's own inner loop, one task at a time."""
    meta = list(model.parameters())
    adapted_indices = [len(meta) - 2, len(meta) - 1] if head_only else list(range(len(meta)))
    rates = list(inner_lrs) if inner_lrs is not None else [INNER_LR] * len(adapted_indices)
    query_losses = []
    for t in range(batch.num_tasks):
        params = loop_adapt(meta, batch.x_support[t], batch.y_support[t], loss=loss, steps=steps,
                            first_order=first_order, rates=rates, adapted_indices=adapted_indices,
                            relu_after=relu_after)
        query_losses.append(task_loss(loss, plain_forward(params, batch.x_query[t], relu_after), batch.y_query[t]))
    return torch.stack(query_losses).mean()


VARIANTS = {
    "maml": {},
    "fomaml": {"first_order": True},
    "meta_sgd": {"learn_inner_lr": True},
    "anil": {"adapt_head_only": True},
    "anil_meta_sgd_first_order": {"adapt_head_only": True, "learn_inner_lr": True, "first_order": True},
}


def make_maml(model, variant, loss, steps):
    options = VARIANTS[variant]
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=steps, loss=loss, **options)
    if maml.inner_lrs is not None:
        # distinct rates per element, so a rate applied to the wrong element would show
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for rate in maml.inner_lrs:
                rate.copy_(0.05 + 0.1 * torch.rand(rate.shape, generator=g, dtype=rate.dtype))
    return maml


def loop_for(maml, model, batch, loss):
    return loop_meta_loss(model, batch, loss=loss, steps=maml.inner_steps, first_order=maml.first_order,
                          inner_lrs=maml.inner_lrs, head_only=maml.adapt_head_only)


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **CLOSE)


# ---- meta-loss and meta-gradient equal the loop ----

@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_loss_and_gradient_match_the_loop(variant, steps, loss, path):
    model = make_model(path)
    batch = make_batch(loss)
    maml = make_maml(model, variant, loss, steps)
    assert maml.uses_fast_path == (path == "fast")
    wrt = list(model.parameters()) + (list(maml.inner_lrs) if maml.inner_lrs is not None else [])

    ours = maml.meta_loss(batch)
    expected = loop_for(maml, model, batch, loss)
    assert ours.shape == ()
    torch.testing.assert_close(ours, expected, **CLOSE)
    grads = torch.autograd.grad(ours, wrt)
    expected_grads = torch.autograd.grad(expected, wrt)
    assert_all_close(grads, expected_grads)
    assert all(g.abs().sum() > 0 for g in expected_grads)  # every checked gradient carries information


@pytest.mark.parametrize("path", ["wrapped", "loop"])
@pytest.mark.parametrize("variant", ["maml", "anil"])
def test_generic_path_variants_match_the_loop(path, variant):
    """The custom op under vmap (wrapped) and a model vmap cannot run (loop) give the loop's numbers."""
    model = make_model(path)
    batch = make_batch("mse")
    maml = make_maml(model, variant, "mse", steps=2)
    assert not maml.uses_fast_path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = maml.meta_loss(batch)
        maml.meta_loss(batch)  # the switch to the loop is made (and announced) once
    vmap_warnings = [w for w in caught if "torch.func.vmap" in str(w.message)]
    assert len(vmap_warnings) == (1 if path == "loop" else 0)
    # the meta-loss ran under torch.func.grad where the model allows it (MAML), else on per-task weights
    assert maml.plan.uses_func_grad == (path == "wrapped")
    expected = loop_for(maml, model, batch, "mse")
    torch.testing.assert_close(ours, expected, **CLOSE)
    assert_all_close(torch.autograd.grad(ours, list(model.parameters())),
                     torch.autograd.grad(expected, list(model.parameters())))


def test_fast_and_generic_paths_agree_on_the_same_weights():
    fast_model, generic_model = make_model("fast"), make_model("generic")
    with torch.no_grad():
        for mine, theirs in zip(generic_model.parameters(), fast_model.parameters()):
            mine.copy_(theirs)
    batch = make_batch("cross_entropy")
    fast = MAML(fast_model, inner_lr=INNER_LR, inner_steps=3, loss="cross_entropy")
    generic = MAML(generic_model, inner_lr=INNER_LR, inner_steps=3, loss="cross_entropy")
    fast_loss, generic_loss = fast.meta_loss(batch), generic.meta_loss(batch)
    torch.testing.assert_close(fast_loss, generic_loss, **CLOSE)
    assert_all_close(torch.autograd.grad(fast_loss, list(fast_model.parameters())),
                     torch.autograd.grad(generic_loss, list(generic_model.parameters())))


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_callable_loss_matches_the_loop(path, variant):
    """A callable loss keeps an MLP off the fused op: the batched fast path, every variant, against the loop."""
    def l1_per_task(pred, target):  # [T, K, out] -> [T]
        return (pred - target).abs().flatten(1).mean(1)

    model = make_model(path)
    batch = make_batch("mse")
    maml = make_maml(model, variant, l1_per_task, steps=2)
    assert maml.meta_step_path(torch.optim.SGD(maml.parameters(), lr=0.1)).startswith("python")
    wrt = list(maml.parameters())
    ours = maml.meta_loss(batch)
    expected = loop_for(maml, model, batch, l1_per_task)
    torch.testing.assert_close(ours, expected, **CLOSE)
    expected_grads = torch.autograd.grad(expected, wrt)
    assert_all_close(torch.autograd.grad(ours, wrt), expected_grads)
    assert all(g.abs().sum() > 0 for g in expected_grads)


@pytest.mark.parametrize(
    "model, relu_after",
    [
        (lambda: SimpleNet(2, 3, hidden_size=8).double(), [True, False]),
        (lambda: nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3)).double(),
         [True, False, False]),
        (lambda: mf.fuse(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))).double(), [True, False]),
        (lambda: nn.Sequential(nn.Linear(2, 3)).double(), [False]),
    ],
    ids=["SimpleNet", "Sequential-linear-between", "fused-Sequential", "one-layer"],
)
def test_other_fast_path_models_match_the_loop(model, relu_after):
    torch.manual_seed(0)
    model = model()
    batch = make_batch("mse")
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=2)
    assert maml.uses_fast_path
    ours = maml.meta_loss(batch)
    expected = loop_meta_loss(model, batch, loss="mse", steps=2, relu_after=relu_after)
    torch.testing.assert_close(ours, expected, **CLOSE)
    assert_all_close(torch.autograd.grad(ours, list(model.parameters())),
                     torch.autograd.grad(expected, list(model.parameters())))


@pytest.mark.parametrize(
    "model",
    [
        lambda: nn.Sequential(nn.Linear(2, 8), nn.ReLU()),  # ReLU after the last layer
        lambda: nn.Sequential(nn.ReLU(), nn.Linear(2, 3)),  # ReLU before the first layer
        lambda: nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)),
        lambda: nn.Sequential(nn.Linear(2, 8, bias=False), nn.ReLU(), nn.Linear(8, 3)),
        lambda: nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.ReLU(), nn.Linear(2, 3)),
        lambda: nn.Sequential(nn.Sequential(nn.Linear(2, 8), nn.ReLU()), nn.Linear(8, 3)),
        lambda: PlainMLP(SIZES),
    ],
    ids=["relu-last", "relu-first", "tanh", "no-bias", "two-relus", "nested", "module-list"],
)
def test_models_outside_the_fast_path_take_the_generic_path(model):
    assert not MAML(model()).uses_fast_path


def test_shared_layer_takes_the_generic_path_and_matches_the_loop():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3, dtype=torch.float64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=2)
    assert not maml.uses_fast_path
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(*(torch.randn(T, n, 3, generator=g, dtype=torch.float64) for n in (K, K, Q, Q)))
    weight, bias = shared.weight, shared.bias
    losses = []
    for t in range(T):
        w, b = weight, bias
        for _ in range(2):
            loss = F.mse_loss(plain_forward([w, b, w, b], batch.x_support[t]), batch.y_support[t])
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
            w, b = w - INNER_LR * gw, b - INNER_LR * gb
        losses.append(F.mse_loss(plain_forward([w, b, w, b], batch.x_query[t]), batch.y_query[t]))
    expected = torch.stack(losses).mean()
    ours = maml.meta_loss(batch)
    torch.testing.assert_close(ours, expected, **CLOSE)
    assert_all_close(torch.autograd.grad(ours, [weight, bias]), torch.autograd.grad(expected, [weight, bias]))


# ---- properties of the variants ----

@pytest.mark.parametrize("path", ["fast", "generic"])
def test_first_order_gradient_differs_from_second_order(path):
    model = make_model(path)
    batch = make_batch("mse")
    second = MAML(model, inner_lr=INNER_LR, inner_steps=2)
    first = MAML(model, inner_lr=INNER_LR, inner_steps=2, first_order=True)
    second_loss, first_loss = second.meta_loss(batch), first.meta_loss(batch)
    # the same adapted weights, so the same loss; only the gradient drops the second-order terms
    torch.testing.assert_close(first_loss, second_loss, **CLOSE)
    second_grads = torch.autograd.grad(second_loss, list(model.parameters()))
    first_grads = torch.autograd.grad(first_loss, list(model.parameters()))
    assert not all(torch.allclose(f, s, rtol=1e-3, atol=1e-6) for f, s in zip(first_grads, second_grads))


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_meta_sgd_rates_are_parameters_and_learn(path):
    model = make_model(path)
    maml = MAML(model, inner_lr=0.05, inner_steps=2, learn_inner_lr=True)
    params = list(model.parameters())
    assert len(maml.inner_lrs) == len(params)
    for rate, p in zip(maml.inner_lrs, params):
        assert rate.shape == p.shape and rate.dtype == p.dtype
        assert torch.all(rate == 0.05)
    in_optimizer = {id(p) for p in maml.parameters()}
    assert all(id(p) in in_optimizer for p in [*params, *maml.inner_lrs])
    optimizer = torch.optim.SGD(maml.parameters(), lr=0.01)
    batch = make_batch("mse")
    expected = loop_for(maml, model, batch, "mse")
    expected_rate_grads = torch.autograd.grad(expected, list(maml.inner_lrs))
    before = [rate.detach().clone() for rate in maml.inner_lrs]
    maml.meta_step(batch, optimizer)
    for rate, old, grad in zip(maml.inner_lrs, before, expected_rate_grads):
        torch.testing.assert_close(rate.detach(), old - 0.01 * grad, **CLOSE)
        assert not torch.equal(rate.detach(), old)


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_anil_adapts_only_the_head(path):
    model = make_model(path)
    batch = make_batch("mse")
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=3, adapt_head_only=True, learn_inner_lr=True)
    params = list(model.parameters())
    assert [rate.shape for rate in maml.inner_lrs] == [p.shape for p in params[-2:]]  # rates for the head only
    adapted = maml.adapt(batch.x_support, batch.y_support)
    for a, p in zip(adapted[:-2], params[:-2]):
        assert torch.equal(a, p.detach().expand_as(a))
    for a, p in zip(adapted[-2:], params[-2:]):
        assert not torch.allclose(a, p.detach().expand_as(a))
    # and the adapted head is the loop's
    for t in range(T):
        expected = loop_adapt(params, batch.x_support[t], batch.y_support[t], loss="mse", steps=3, first_order=True,
                              rates=list(maml.inner_lrs), adapted_indices=[4, 5])
        assert_all_close([a[t] for a in adapted], [e.detach() for e in expected])


# ---- adapt / predict ----

@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("steps", [None, 3])
def test_adapt_and_predict_match_the_loop(path, loss, steps):
    model = make_model(path)
    batch = make_batch(loss)
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=2, loss=loss)
    with torch.no_grad():  # adapting needs no graph from the caller
        adapted = maml.adapt(batch.x_support, batch.y_support, steps=steps)
        predictions = maml.predict(adapted, batch.x_query)
    params = list(model.parameters())
    assert [a.shape for a in adapted] == [(T, *p.shape) for p in params]
    assert not any(a.requires_grad for a in adapted)
    assert predictions.shape == (T, Q, SIZES[-1])
    for t in range(T):
        expected = loop_adapt(params, batch.x_support[t], batch.y_support[t], loss=loss, steps=steps or 2,
                              first_order=True, rates=[INNER_LR] * len(params), adapted_indices=range(len(params)))
        assert_all_close([a[t] for a in adapted], [e.detach() for e in expected])
        torch.testing.assert_close(predictions[t], plain_forward(expected, batch.x_query[t]).detach(), **CLOSE)


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_adapt_with_zero_steps_returns_the_meta_parameters(path):
    model = make_model(path)
    batch = make_batch("mse")
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=2)
    adapted = maml.adapt(batch.x_support, batch.y_support, steps=0)
    for a, p in zip(adapted, model.parameters()):
        assert torch.equal(a, p.detach().expand_as(a))
    with torch.no_grad():
        torch.testing.assert_close(maml.predict(adapted, batch.x_query), model(batch.x_query), **CLOSE)


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_meta_step_applies_the_loop_gradient(path):
    model = make_model(path)
    batch = make_batch("cross_entropy")
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=2, loss="cross_entropy")
    expected_loss = loop_for(maml, model, batch, "cross_entropy")
    expected_grads = torch.autograd.grad(expected_loss, list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(maml.parameters(), lr=0.5)
    returned = maml.meta_step(batch, optimizer)
    assert isinstance(returned, torch.Tensor) and returned.dim() == 0 and not returned.requires_grad
    assert float(returned) == pytest.approx(float(expected_loss.detach()), rel=1e-9)
    for p, old, grad in zip(model.parameters(), before, expected_grads):
        torch.testing.assert_close(p.detach(), old - 0.5 * grad, **CLOSE)


def test_meta_training_reduces_the_meta_loss():
    model = make_model("fast")
    batch = make_batch("mse")
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=1)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    losses = [maml.meta_step(batch, optimizer) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0]


# ---- Reptile ----

@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_reptile_update_matches_the_loop(path, loss):
    model = make_model(path)
    batch = make_batch(loss)
    inner_lr, steps, outer_lr = 0.1, 3, 0.5
    meta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    adapted_per_task, first_losses = [], []
    for t in range(T):
        params = list(meta)
        for step in range(steps):
            support_loss = task_loss(loss, plain_forward(params, batch.x_support[t]), batch.y_support[t])
            if step == 0:
                first_losses.append(float(support_loss.detach()))
            grads = torch.autograd.grad(support_loss, params)
            params = [p - inner_lr * g for p, g in zip(params, grads)]
        adapted_per_task.append(params)
    expected = [
        m + outer_lr * (torch.stack([task[i] for task in adapted_per_task]).mean(0) - m)
        for i, m in enumerate(meta)
    ]

    reptile = Reptile(model, inner_lr=inner_lr, inner_steps=steps, outer_lr=outer_lr, loss=loss)
    assert reptile.uses_fast_path == (path == "fast")
    returned = reptile.meta_step(batch)
    assert float(returned) == pytest.approx(float(sum(first_losses) / T), rel=1e-9)
    assert_all_close([p.detach() for p in model.parameters()], [e.detach() for e in expected])
    assert not any(torch.equal(p.detach(), m.detach()) for p, m in zip(model.parameters(), meta))


# ---- errors: each names the argument ----

def test_constructor_errors():
    model = make_model("fast")
    for steps in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="inner_steps"):
            MAML(model, inner_steps=steps)
    for rate in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="inner_lr"):
            MAML(model, inner_lr=rate)
    with pytest.raises(TypeError, match="inner_lr"):
        MAML(model, inner_lr="0.1")
    with pytest.raises(ValueError, match="loss"):
        MAML(model, loss="hinge")
    with pytest.raises(TypeError, match="loss"):
        MAML(model, loss=3)
    with pytest.raises(TypeError, match="model"):
        MAML(lambda x: x)
    with pytest.raises(ValueError, match="model"):
        MAML(nn.ReLU())
    with pytest.raises(ValueError, match="outer_lr"):
        Reptile(model, inner_lr=0.1, inner_steps=1, outer_lr=0)
    with pytest.raises(ValueError, match="inner_steps"):
        Reptile(model, inner_lr=0.1, inner_steps=0, outer_lr=0.5)
    with pytest.raises(ValueError, match="inner_lr"):
        Reptile(model, inner_lr=-1.0, inner_steps=1, outer_lr=0.5)


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_labels_out_of_range_name_the_set(path):
    maml = MAML(make_model(path), loss="cross_entropy")
    reptile = Reptile(make_model(path), inner_lr=0.1, inner_steps=1, outer_lr=0.5, loss="cross_entropy")
    batch = make_batch("cross_entropy")
    support = batch.y_support.clone()
    support[1, 2] = SIZES[-1]
    query = batch.y_query.clone()
    query[3, 0] = SIZES[-1] + 4
    bad_support = TaskBatch(batch.x_support, support, batch.x_query, batch.y_query)
    bad_query = TaskBatch(batch.x_support, batch.y_support, batch.x_query, query)
    with pytest.raises(ValueError, match="y_support holds class label 3 but the model has 3 outputs"):
        maml.meta_loss(bad_support)
    with pytest.raises(ValueError, match="y_query holds class label 7"):
        maml.meta_loss(bad_query)
    with pytest.raises(ValueError, match="y_support"):
        maml.adapt(bad_support.x_support, bad_support.y_support)
    with pytest.raises(ValueError, match="y_support"):
        reptile.meta_step(bad_support)


def test_empty_and_mismatched_batches_name_the_argument():
    maml = MAML(make_model("fast"))
    batch = make_batch("mse")
    with pytest.raises(ValueError, match="x_support.*T = 0"):
        maml.meta_loss(TaskBatch(batch.x_support[:0], batch.y_support[:0], batch.x_query[:0], batch.y_query[:0]))
    with pytest.raises(ValueError, match="x_query has T = 3"):
        maml.meta_loss(TaskBatch(batch.x_support, batch.y_support, batch.x_query[:3], batch.y_query[:3]))
    with pytest.raises(ValueError, match="x_support.*T = 0"):
        maml.adapt(batch.x_support[:0], batch.y_support[:0])
    with pytest.raises(ValueError, match="y_support.*T = 4"):
        maml.adapt(batch.x_support, batch.y_support[:2])
    with pytest.raises(TypeError, match="batch"):
        maml.meta_loss((batch.x_support, batch.y_support, batch.x_query, batch.y_query))


def test_input_errors_name_the_argument():
    model = make_model("fast")
    maml = MAML(model)
    batch = make_batch("mse")
    labels = make_batch("cross_entropy")
    with pytest.raises(ValueError, match="loss='mse' needs floating-point targets but y_support"):
        maml.meta_loss(labels)
    with pytest.raises(ValueError, match="cross_entropy.*y_support"):
        MAML(model, loss="cross_entropy").meta_loss(batch)
    with pytest.raises(TypeError, match="x_support must have the model's dtype"):
        maml.meta_loss(TaskBatch(*(t.float() for t in (batch.x_support, batch.y_support, batch.x_query,
                                                        batch.y_query))))
    wide = torch.randn(T, K, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="x_support must be \\[T, N, 2\\]"):
        maml.meta_loss(TaskBatch(wide, batch.y_support, wide, batch.y_support))
    narrow_targets = TaskBatch(batch.x_support, batch.y_support[..., :2], batch.x_query, batch.y_query[..., :2])
    with pytest.raises(ValueError, match="y_support must have the shape of the model's output"):
        maml.meta_loss(narrow_targets)
    with pytest.raises(ValueError, match="loss must return one loss per task"):
        MAML(model, loss=F.mse_loss).meta_loss(batch)
    with pytest.raises(ValueError, match="steps"):
        maml.adapt(batch.x_support, batch.y_support, steps=-1)
    adapted = maml.adapt(batch.x_support, batch.y_support)
    with pytest.raises(ValueError, match="adapted"):
        maml.predict(adapted[:-1], batch.x_query)
    with pytest.raises(ValueError, match="x must be"):
        maml.predict(adapted, batch.x_query[:2])
    with pytest.raises(TypeError, match="optimizer"):
        maml.meta_step(batch, optimizer=None)


def test_model_that_cannot_run_per_task_is_named():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 3, dtype=torch.float64)

        def forward(self, x):
            raise RuntimeError("this model cannot run")

    maml = MAML(Broken())
    batch = make_batch("mse")
    with pytest.raises(TypeError, match="model could not run.*this model cannot run"):
        maml.meta_loss(batch)
    assert maml.plan._uses_vmap  # a model that fails everywhere does not demote vmap for later calls
    assert maml.plan.uses_func_grad  # nor the torch.func.grad meta-loss


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_meta_loss_on_each_device_matches_the_cpu_loop(path, device):
    model = make_model(path)
    batch = make_batch("cross_entropy")
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=2, loss="cross_entropy", learn_inner_lr=True)
    expected = loop_for(maml, model, batch, "cross_entropy")
    expected_grads = torch.autograd.grad(expected, list(maml.parameters()))
    maml.to(device)
    ours = maml.meta_loss(batch.to(device))
    assert ours.device.type == device.type
    torch.testing.assert_close(ours.cpu(), expected, **CLOSE)
    assert_all_close([g.cpu() for g in torch.autograd.grad(ours, list(maml.parameters()))], expected_grads)
