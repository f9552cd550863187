"""The ops: linear_relu forward+backward and sgd_step over a meta-batch of parameters.

Groups ("ops: ..."), one per shape, each holding:
- metalearn_fast: the public op (the compiled kernel when the extension is active);
- metalearn_fast fallback: what METALEARN_FAST_BACKEND=torch runs, called directly in this process
  (the backend is chosen once per process): reference.linear_relu under autograd (the fallback's
  registered backward, reference.linear_relu_backward, computes the same products), reference.sgd_step;
- plain torch: the obvious code, ``F.relu(F.linear(x, w, b))``, ``relu(x @ w.mT + b)``, ``p - lr * g``;
- per-task loop (batched shapes): one F.linear per task, as code without a task dimension does it;
- torch._foreach_add (sgd_step): the multi-tensor kernel torch.optim's SGD uses.
learn2learn and higher have no counterpart of these ops; they appear in the MAML groups.

Run: pytest bench/test_ops.py --benchmark-only (see the README's Benchmarks section).
"""
import pytest
import torch
import torch.nn.functional as F

import metalearn_fast as mf
from metalearn_fast import reference
from metalearn_fast.benchmarks.entries import FALLBACK, OURS, PER_TASK_LOOP, PLAIN_TORCH
from metalearn_fast.benchmarks.plugin import assert_same, time_once

# ---- linear_relu forward + backward ----

# (name, id, T, N, I, O, large), T = 0 for the unbatched [N, I] form: the shapes of the fused-op issue
LINEAR_RELU_SHAPES = [
    ("sinusoid hidden layer, T=25 N=10 40->40", "T25-40x40", 25, 10, 40, 40, False),
    ("sinusoid first layer, T=25 N=10 1->40", "T25-1x40", 25, 10, 1, 40, False),
    ("founding example, N=32 10->128", "N32-10x128", 0, 32, 10, 128, False),
    ("large, N=4096 1024->1024", "N4096-1024x1024", 0, 4096, 1024, 1024, True),
]


def plain_linear_relu(x, w, b):
    if x.dim() == 2:
        return F.relu(F.linear(x, w, b))
    return torch.relu(x @ w.transpose(-1, -2) + b.unsqueeze(-2))


def per_task_linear_relu(x, w, b):
    return torch.stack([F.relu(F.linear(x[t], w[t], b[t])) for t in range(x.shape[0])])


LINEAR_RELU = {
    OURS: mf.linear_relu,
    FALLBACK: reference.linear_relu,
    PLAIN_TORCH: plain_linear_relu,
    PER_TASK_LOOP: per_task_linear_relu,
}


def linear_relu_inputs(T, N, I, O, device):
    generator = torch.Generator().manual_seed(0)
    lead = (T,) if T else ()

    def make(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    x, w, b = make(*lead, N, I), make(*lead, O, I) / I**0.5, make(*lead, O)
    grad_out = make(*lead, N, O)
    return [t.requires_grad_() for t in (x, w, b)], grad_out


# the per-task loop only exists for batched shapes
LINEAR_RELU_CASES = [
    pytest.param(impl, shape, id=f"{shape[1]}-{impl}", marks=[pytest.mark.large] if shape[-1] else [])
    for shape in LINEAR_RELU_SHAPES
    for impl in LINEAR_RELU
    if shape[2] or impl != PER_TASK_LOOP
]


@pytest.mark.parametrize("impl, shape", LINEAR_RELU_CASES)
def test_linear_relu_forward_backward(measure, device, impl, shape):
    name, _, T, N, I, O, _ = shape
    inputs, grad_out = linear_relu_inputs(T, N, I, O, device)
    fn = LINEAR_RELU[impl]

    def forward_backward(fn=fn):
        out = fn(*inputs)
        return (out.detach(), *torch.autograd.grad(out, inputs, grad_out))

    seconds, result = time_once(forward_backward, device)
    assert_same(result, forward_backward(plain_linear_relu), f"linear_relu {impl}", rtol=1e-4, atol=1e-4)
    measure(f"ops: linear_relu fwd+bwd, {name}", impl, forward_backward, seconds)


# ---- sgd_step: one inner-loop step of every parameter of every task ----

SGD_STEP_MODELS = [
    pytest.param(("sinusoid MLP 1-40-40-1, T=25", 25, [1, 40, 40, 1]), id="sinusoid-T25"),
    pytest.param(("Omniglot MLP 784-256-128-64-64-5, T=32", 32, [784, 256, 128, 64, 64, 5]), id="omniglot-T32"),
]
INNER_LR = 0.01
FOREACH = "torch._foreach_add"


def plain_sgd_step(params, grads):
    return [p - INNER_LR * g for p, g in zip(params, grads)]


def foreach_sgd_step(params, grads):
    return torch._foreach_add(params, grads, alpha=-INNER_LR)


def fallback_sgd_step(params, grads):
    return reference.sgd_step(params, grads, [torch.tensor(INNER_LR, dtype=params[0].dtype, device=params[0].device)])


SGD_STEP = {
    OURS: lambda params, grads: mf.sgd_step(params, grads, INNER_LR),
    FALLBACK: fallback_sgd_step,
    PLAIN_TORCH: plain_sgd_step,
    FOREACH: foreach_sgd_step,
}


@pytest.mark.parametrize("model", SGD_STEP_MODELS)
@pytest.mark.parametrize("impl", list(SGD_STEP))
def test_sgd_step(measure, device, impl, model):
    """Out of place, on params and grads that require grad, as in a second-order inner loop."""
    name, T, sizes = model
    generator = torch.Generator().manual_seed(0)
    shapes = [s for i, o in zip(sizes[:-1], sizes[1:]) for s in ((T, o, i), (T, o))]
    params = [torch.randn(*s, generator=generator).to(device).requires_grad_() for s in shapes]
    grads = [torch.randn(*s, generator=generator).to(device).requires_grad_() for s in shapes]
    fn = SGD_STEP[impl]

    def step():
        return fn(params, grads)

    seconds, result = time_once(step, device)
    assert_same([t.detach() for t in result], [t.detach() for t in plain_sgd_step(params, grads)],
                f"sgd_step {impl}", rtol=1e-6, atol=1e-6)
    measure(f"ops: sgd_step, {name}", impl, step, seconds)
