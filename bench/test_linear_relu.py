"""Forward+backward of linear_relu against plain torch, at the shapes that matter.

Run: pytest bench/test_linear_relu.py --benchmark-only --benchmark-group-by=group
Each group holds our op and the plain-torch baselines; bench/report.py prints the ratios.
"""
import pytest
import torch
import torch.nn.functional as F

import metalearn_fast as mf
from conftest import synchronize

# (name, T, N, I, O): T = 0 means unbatched [N, I]
SHAPES = [
    ("meta-batch T=25 N=10 40->40", 25, 10, 40, 40),
    ("meta-batch T=25 N=10 1->40", 25, 10, 1, 40),
    ("founding N=32 10->128", 0, 32, 10, 128),
    ("large N=4096 1024->1024", 0, 4096, 1024, 1024),
]


def fused(x, w, b):
    return mf.linear_relu(x, w, b)


def plain(x, w, b):
    if x.dim() == 2:
        return F.relu(F.linear(x, w, b))
    return torch.relu(torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)))


def addmm_activation(x, w, b):
    return torch._addmm_activation(b, x, w.t())


def per_task_loop(x, w, b):
    return torch.stack([F.relu(F.linear(x[t], w[t], b[t])) for t in range(x.shape[0])])


def inputs(T, N, I, O, device):
    g = torch.Generator().manual_seed(0)
    lead = (T,) if T else ()
    make = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_()  # noqa: E731
    x, w, b = make(*lead, N, I), make(*lead, O, I), make(*lead, O)
    grad = torch.randn(*lead, N, O, generator=g).to(device)
    return x, w, b, grad


def forward_backward(fn, x, w, b, grad):
    out = fn(x, w, b)
    return torch.autograd.grad(out, (x, w, b), grad)


IMPLEMENTATIONS = {"fused": fused, "plain torch": plain, "per-task loop": per_task_loop}

# the per-task loop only exists for batched shapes
CASES = [(shape, impl) for shape in SHAPES for impl in IMPLEMENTATIONS if shape[1] or impl != "per-task loop"]


@pytest.mark.parametrize("shape, impl", CASES, ids=[f"{s[0]}-{i}" for s, i in CASES])
def test_linear_relu_forward_backward(benchmark, shape, impl, device):
    name, T, N, I, O = shape
    x, w, b, grad = inputs(T, N, I, O, device)
    fn = IMPLEMENTATIONS[impl]
    # a wrong fast answer must not win: check against the plain composition before timing
    for got, expected in zip(forward_backward(fn, x, w, b, grad), forward_backward(plain, x, w, b, grad)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    benchmark.group = f"linear_relu fwd+bwd: {name}"

    def run():
        result = forward_backward(fn, x, w, b, grad)
        synchronize(device)
        return result

    benchmark(run)


# torch._addmm_activation (GEMM with a ReLU epilogue) has no autograd formula: forward only
FORWARD = {"fused": fused, "plain torch": plain, "_addmm_activation": addmm_activation}
FORWARD_SHAPES = [s for s in SHAPES if not s[1]]


@pytest.mark.parametrize("shape", FORWARD_SHAPES, ids=[s[0] for s in FORWARD_SHAPES])
@pytest.mark.parametrize("impl", list(FORWARD))
def test_linear_relu_forward(benchmark, shape, impl, device):
    name, T, N, I, O = shape
    x, w, b, _ = (t.detach() for t in inputs(T, N, I, O, device))
    fn = FORWARD[impl]
    torch.testing.assert_close(fn(x, w, b), plain(x, w, b), rtol=1e-4, atol=1e-4)
    benchmark.group = f"linear_relu forward: {name}"

    def run():
        result = fn(x, w, b)
        synchronize(device)
        return result

    benchmark(run)
