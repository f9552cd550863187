"""ops.mlp_loss_grad (an MLP's loss gradient as one autograd node, its backward the analytic Hessian-vector
product) and the learn2learn layer's use of it: a clone of an MLP chain takes it in adapt().

Oracles: the reference op (autograd.grad with create_graph) for the op; torch.func.functional_call with explicit
inner steps p - lr * g, in float64, for the learners; torch.fx-free hand checks for what counts as a chain."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metalearn_fast as mf
import metalearn_fast.l2l as l2l
from metalearn_fast import ops, reference
from metalearn_fast.l2l.algorithms import maml as l2l_maml
from metalearn_fast.l2l.algorithms._mlp_chain import MlpChain

from conftest import forced_cpu_simd

# small layers take the CPU's per-task loops; a 130x130 layer is past their size rule and takes the composite
SIZES = {"small": [3, 16, 8, 2], "past-the-kernel": [4, 130, 130, 3]}


def problem(sizes, loss, dtype, device, rows=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        params += [torch.randn(b, a, generator=g, dtype=dtype) / a ** 0.5, torch.randn(b, generator=g, dtype=dtype)]
    x = torch.randn(rows, sizes[0], generator=g, dtype=dtype)
    y = torch.randn(rows, sizes[-1], generator=g, dtype=dtype) if loss == "mse" else \
        torch.randint(0, sizes[-1], (rows,), generator=g)
    return [p.to(device).requires_grad_() for p in params], x.to(device), y.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("sizes", list(SIZES))
def test_gradient_and_hessian_product_equal_the_reference(sizes, loss, dtype, device):
    params, x, y = problem(SIZES[sizes], loss, dtype, device)
    got, expected = ops.mlp_loss_grad(params, x, y, loss), reference.mlp_loss_grad(params, x, y, loss)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tolerance)
    direction = [torch.randn_like(p) for p in params]
    direction[1] = torch.zeros_like(params[1])  # a zero direction for one tensor, as a missing gradient gives
    got_h = torch.autograd.grad(got, params, direction)
    expected_h = torch.autograd.grad(expected, params, direction)
    for a, b in zip(got_h, expected_h):
        torch.testing.assert_close(a, b, **tolerance)


def test_a_gradient_left_out_counts_as_zero(device):
    params, x, y = problem(SIZES["small"], "mse", torch.float64, device)
    grads = ops.mlp_loss_grad(params, x, y, "mse")
    only_last = torch.autograd.grad(grads[-1].sum(), params)
    expected = torch.autograd.grad(reference.mlp_loss_grad(params, x, y, "mse")[-1].sum(), params)
    for a, b in zip(only_last, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_gradcheck_and_gradgradcheck(loss, device):
    params, x, y = problem([3, 5, 4, 2], loss, torch.float64, device, rows=5)

    def grads(*p):
        return tuple(ops.mlp_loss_grad(list(p), x, y, loss))

    assert torch.autograd.gradcheck(grads, params)
    assert torch.autograd.gradgradcheck(grads, params)


# The compiled op's backward (the Hessian product) reads shapes in C++, so AOT traces it with static shapes only;
# the fallback's reference reads label values in Python and is checked for its schema.
OPCHECK_TESTS = (("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")
                 if mf.backend_info()["active"] == "extension" else ("test_schema",))


@pytest.mark.parametrize("cpu_kernels", ["default", "none"])
def test_opcheck(cpu_kernels, device):
    """opcheck on the device's kernel, and on the CPU also with the hand-written kernels off (METALEARN_FAST_CPU_SIMD
    =none: the ATen composite CUDA runs, whose weight gradients came out as transposed views)."""
    params, x, y = problem(SIZES["small"], "cross_entropy", torch.float64, device)
    op = torch.ops.metalearn_fast.mlp_loss_grad.default
    with forced_cpu_simd("none") if cpu_kernels == "none" else contextlib.nullcontext():
        torch.library.opcheck(op, ([p.detach() for p in params], x, y, "cross_entropy"), test_utils=OPCHECK_TESTS)
        torch.library.opcheck(op, (params, x, y, "cross_entropy"), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("case,error,match", [
    ("x-3d", ValueError, "x must be"),
    ("y-rows", ValueError, "y must be"),
    ("labels-out-of-range", ValueError, "class labels in"),
    ("x-requires-grad", ValueError, "must not require grad"),
    ("loss", ValueError, "loss must be"),
    ("x-dtype", TypeError, "dtype"),
])
def test_bad_arguments_are_named(case, error, match, device):
    params, x, y = problem(SIZES["small"], "cross_entropy", torch.float64, device)
    loss = "cross_entropy"
    if case == "x-3d":
        x = x[None]
    elif case == "y-rows":
        y = y[:-1]
    elif case == "labels-out-of-range":
        y = y.clone().fill_(5)
    elif case == "x-requires-grad":
        x = x.clone().requires_grad_()
    elif case == "loss":
        loss = "hinge"
    else:
        x = x.float()
    with pytest.raises(error, match=match):
        ops.mlp_loss_grad(params, x, y, loss)


# ---- the learn2learn layer: which models are chains, and adapt() through the op ----

class SineModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden1, self.hidden2, self.out = nn.Linear(1, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.relu(self.hidden2(F.relu(self.hidden1(x)))))


class Residual(SineModel):
    def forward(self, x):
        h = F.relu(self.hidden1(x))
        return self.out(F.relu(self.hidden2(h)) + h)


class Reordered(nn.Module):  # defined in another order than called: parameters() order is not the call order
    def __init__(self):
        super().__init__()
        self.last, self.first = nn.Linear(8, 2), nn.Linear(3, 8)

    def forward(self, x):
        return self.last(self.first(x).relu())


@pytest.mark.parametrize("model,is_chain", [
    (lambda: SineModel(), True),
    (lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)), True),
    (lambda: Reordered(), True),
    (lambda: Residual(), False),
    (lambda: nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2)), False),
    (lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2), nn.ReLU()), False),
    (lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)), False),
    (lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)), False),
    (lambda: nn.Sequential(nn.Linear(3, 8, bias=False), nn.ReLU(), nn.Linear(8, 2)), False),
])
def test_which_models_are_mlp_chains(model, is_chain):
    assert (MlpChain.of(model()) is not None) == is_chain


def oracle(model, lr, steps, first_order, loss_fn, x, y, xq, yq, rates=None):
    """The query loss after explicit steps, and its gradient w.r.t. the model's parameters (and rates)."""
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    fast = params
    for _ in range(steps):
        loss = loss_fn(torch.func.functional_call(model, dict(zip(names, fast)), (x,)), y)
        grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
        fast = [p - (lr if rates is None else r) * g for p, g, r in zip(fast, grads, rates or params)]
    query = loss_fn(torch.func.functional_call(model, dict(zip(names, fast)), (xq,)), yq)
    return query, torch.autograd.grad(query, params + list(rates or []))


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return ops.mlp_loss_grad(*args, **kwargs)

    monkeypatch.setattr(l2l_maml, "mlp_loss_grad", counting)
    return calls


CASES = {  # model, loss, labels?
    "sine-mse": (SineModel, F.mse_loss, False),
    "sequential-cross-entropy": (lambda: nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 3)),
                                 F.cross_entropy, True),
    "reordered-mse": (Reordered, F.mse_loss, False),
}


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("case", list(CASES))
def test_adapt_of_a_chain_takes_the_op_and_equals_the_oracle(case, first_order, algorithm, fused_calls):
    make, loss_fn, labels = CASES[case]
    torch.manual_seed(0)
    model = make().double()
    g = torch.Generator().manual_seed(1)
    x, xq = torch.randn(6, 1, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64)
    if case == "reordered-mse":
        x, xq = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    if case == "reordered-mse":
        y, yq = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    elif labels:
        y, yq = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (6,), generator=g)
    else:
        y, yq = torch.randn(6, 1, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64)
    steps = 3
    if algorithm == "maml":
        meta = l2l.algorithms.MAML(model, lr=0.1, first_order=first_order)
        rates = None
    else:
        meta = l2l.algorithms.MetaSGD(model, lr=0.1, first_order=first_order)
        with torch.no_grad():
            for i, r in enumerate(meta.lrs):
                r.mul_(1 + 0.1 * i)  # unequal rates: a rate applied to the wrong tensor shows
        rates = list(meta.lrs)
    learner = meta.clone()
    for _ in range(steps):
        learner.adapt(loss_fn(learner(x), y))
    query = loss_fn(learner(xq), yq)
    query.backward()
    assert len(fused_calls) == steps
    expected, expected_grads = oracle(model, 0.1, steps, first_order, loss_fn, x, y, xq, yq, rates)
    torch.testing.assert_close(query, expected, rtol=1e-12, atol=1e-12)
    for p, e in zip(list(model.parameters()) + (rates or []), expected_grads):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change", ["loss-scaled", "forward-hook", "stale-output", "frozen-parameter", "x-requires-grad",
                                    "layer-swapped"])
def test_what_the_op_does_not_cover_takes_autograd_and_equals_the_oracle(change, fused_calls):
    torch.manual_seed(0)
    model = SineModel().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64)
    # a stale output's loss does not use the adapted weights: learn2learn needs allow_unused for it too
    maml = l2l.algorithms.MAML(model, lr=0.1, allow_nograd=change == "frozen-parameter",
                               allow_unused=change == "stale-output")
    if change == "frozen-parameter":
        model.hidden2.bias.requires_grad_(False)
    learner = maml.clone()
    if change == "layer-swapped":  # after the trace: the model is no chain any more, and computes with tanh
        model.hidden2 = nn.Sequential(nn.Linear(8, 8), nn.Tanh()).double()
        learner = maml.clone()
    if change == "forward-hook":
        handle = model.hidden1.register_forward_hook(lambda module, args, out: out * 2)  # shared with the clone
    data = x.clone().requires_grad_() if change == "x-requires-grad" else x
    out = learner(data)
    torch.testing.assert_close(out, model(data), rtol=0, atol=0)  # the clone computes what the model computes
    loss = F.mse_loss(out, y) * (2 if change == "loss-scaled" else 1)
    if change == "stale-output":
        learner.adapt(F.mse_loss(learner(data), y))  # a newer forward and a step: out is the old weights' output
        expected_params = [p.detach().clone() for p in learner.parameters()]
    learner.adapt(loss)
    if change == "forward-hook":
        handle.remove()
    assert fused_calls == ([1] if change == "stale-output" else [])
    # the oracle: autograd.grad of the same loss, one step
    if change != "stale-output":
        params = list(model.parameters())
        wanted = [p for p in params if p.requires_grad]
        grads = iter(torch.autograd.grad(loss, wanted, retain_graph=True))
        expected_params = [p - 0.1 * next(grads) if p.requires_grad else p for p in params]
    # (stale: the loss is a function of the weights before the step only, so the adapted ones stay as they are)
    for got, expected in zip(learner.parameters(), expected_params):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
