"""Each op against reference.py, gradcheck/gradgradcheck in float64, opcheck, and bad input."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import metalearn_fast as mf
from metalearn_fast import reference
from metalearn_fast.ops import SCHEMAS

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def make_linear(T, N, I, O, dtype, device, requires_grad=False, noncontiguous=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (T,) if T else ()

    def rand(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        if noncontiguous:  # the same values seen through every other element of a wider buffer
            wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
            wide[..., ::2] = t
            t = wide[..., ::2]
        return t.requires_grad_(requires_grad)

    x, w, b = rand(*lead, N, I), rand(*lead, O, I), rand(*lead, O)
    if noncontiguous and I > 1:
        assert not x.is_contiguous() and not w.is_contiguous()
    return x, w, b


SHAPES = [(0, 1, 3, 4), (0, 7, 13, 40), (3, 1, 5, 6), (3, 7, 13, 40), (25, 10, 40, 40), (25, 10, 1, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_linear_relu_matches_reference(shape, dtype, noncontiguous, device):
    x, w, b = make_linear(*shape, dtype, device, noncontiguous=noncontiguous)
    out = mf.linear_relu(x, w, b)
    expected = reference.linear_relu(x, w, b)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, **TOL[dtype])
    assert (out >= 0).all()
    # the op must not be the identity or skip the bias: compare against a hand computation
    manual = torch.relu(x @ w.transpose(-1, -2) + b.unsqueeze(-2))
    torch.testing.assert_close(out, manual, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)])
def test_linear_relu_backward_matches_reference(shape, dtype, mask, device):
    x, w, b = make_linear(*shape, dtype, device)
    out = reference.linear_relu(x, w, b)
    grad_out = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
    got = mf.linear_relu_backward(grad_out, x, w, out, mask)
    expected = reference.linear_relu_backward(grad_out, x, w, out, mask)
    for g, e, wanted in zip(got, expected, mask):
        assert (g is None) == (not wanted)
        if wanted:
            torch.testing.assert_close(g, e, **TOL[dtype])
    # and against autograd of the plain composition
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    torch.relu(xr @ wr.transpose(-1, -2) + br.unsqueeze(-2)).backward(grad_out)
    for g, e, wanted in zip(got, (xr.grad, wr.grad, br.grad), mask):
        if wanted:
            torch.testing.assert_close(g, e, **TOL[dtype])


def test_linear_relu_backward_non_contiguous_grad(device):
    x, w, b = make_linear(3, 5, 4, 6, torch.float64, device)
    out = mf.linear_relu(x, w, b)
    grad_out = torch.randn(1, 1, 6, dtype=torch.float64, device=device).expand_as(out)  # stride 0, like sum()'s
    got = mf.linear_relu_backward(grad_out, x, w, out)
    expected = reference.linear_relu_backward(grad_out.contiguous(), x, w, out, (True, True, True))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def relu_safe_inputs(T, N, I, O, device, seed=0, exact_zero=False):
    """float64 inputs whose pre-activations stay away from 0 (gradcheck's finite differences would
    otherwise straddle the kink), with some rows fully inactive; exact_zero puts x = 0 rows in too."""
    x, w, b = make_linear(T, N, I, O, torch.float64, device, seed=seed)
    with torch.no_grad():
        pre = x @ w.transpose(-1, -2)
        b.copy_(torch.where(pre.mean(-2).abs() < 0.5, torch.full_like(b, 1.0), b))
        z = pre + b.unsqueeze(-2)
        b.sub_(torch.where((z.abs() < 0.3).any(-2), z.sign().sum(-2) * 0 + 2.0, torch.zeros_like(b)))
        if exact_zero:
            x[..., 0, :] = 0  # a row of exact zeros: its pre-activation is the bias alone
        b[..., 0] = -1e3  # an output that is dead for every row
    for t in (x, w, b):
        t.requires_grad_()
    return x, w, b


@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (2, 4, 3, 5), (0, 1, 2, 3)])
@pytest.mark.parametrize("exact_zero", [False, True])
def test_linear_relu_gradcheck(shape, exact_zero, device):
    x, w, b = relu_safe_inputs(*shape, device, exact_zero=exact_zero)
    z = (x @ w.transpose(-1, -2) + b.unsqueeze(-2)).detach()
    assert (z.abs() > 1e-4).all() or exact_zero
    assert gradcheck(mf.linear_relu, (x, w, b), eps=1e-6, atol=1e-7)
    assert gradgradcheck(mf.linear_relu, (x, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (2, 4, 3, 5)])
def test_linear_relu_backward_gradcheck(shape, device):
    x, w, b = relu_safe_inputs(*shape, device)
    out = mf.linear_relu(x, w, b).detach()
    grad_out = torch.randn(out.shape, dtype=torch.float64, device=device, requires_grad=True)

    def fn(grad_out, x, w):
        return mf.linear_relu_backward(grad_out, x, w, out, (True, True, True))

    assert gradcheck(fn, (grad_out, x, w), eps=1e-6, atol=1e-7)
    assert gradgradcheck(fn, (grad_out, x, w), eps=1e-6, atol=1e-7)


def test_second_order_through_linear_relu_matches_plain_torch(device):
    """The MAML pattern: differentiate a gradient taken with create_graph=True."""
    x, w, b = relu_safe_inputs(3, 6, 4, 5, device)
    target = torch.randn(3, 6, 5, dtype=torch.float64, device=device)

    def meta(fn):
        loss = ((fn(x, w, b) - target) ** 2).sum()
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        return torch.autograd.grad(((fn(x, w - 0.1 * gw, b - 0.1 * gb) - target) ** 2).sum(), (x, w, b))

    ours = meta(mf.linear_relu)
    plain = meta(lambda x, w, b: torch.relu(x @ w.transpose(-1, -2) + b.unsqueeze(-2)))
    for a, e in zip(ours, plain):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (2, 4, 3, 5)])
def test_opcheck_linear_relu(shape, device):
    for requires_grad in (False, True):
        x, w, b = make_linear(*shape, torch.float64, device, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.metalearn_fast.linear_relu.default, (x, w, b))
        out = reference.linear_relu(x, w, b).detach()
        g = torch.randn(out.shape, dtype=torch.float64, device=device, requires_grad=requires_grad)
        for mask in ([True, True, True], [False, True, False]):
            torch.library.opcheck(torch.ops.metalearn_fast.linear_relu_backward.default, (g, x, w, out, mask))


def make_params(T, device, dtype=torch.float64, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(T, 5, 3), (T, 5), (T, 2, 5), (T, 2)]
    ps = [torch.randn(s, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad) for s in shapes]
    gs = [torch.randn(s, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad) for s in shapes]
    return ps, gs


def lr_forms(T, params, device, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    return {
        "float": 0.1,
        "scalar": torch.tensor(0.05, dtype=dtype, device=device),
        "per_task": torch.rand(T, generator=g, dtype=dtype).to(device),
        "per_param": [torch.rand(p.shape[1:], generator=g, dtype=dtype).to(device) for p in params],
    }


def expanded(lr, params):
    """lr as one tensor per param, broadcast the way the docs say."""
    if isinstance(lr, float):
        return [torch.tensor(lr, dtype=params[0].dtype, device=params[0].device)] * len(params)
    if isinstance(lr, list):
        return lr
    if lr.dim() == 0:
        return [lr] * len(params)
    return [lr.view(-1, *[1] * (p.dim() - 1)) for p in params]


@pytest.mark.parametrize("form", ["float", "scalar", "per_task", "per_param"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_step_matches_reference(form, dtype, device):
    params, grads = make_params(4, device, dtype)
    lr = lr_forms(4, params, device, dtype)[form]
    rates = expanded(lr, params)
    new = mf.sgd_step(params, grads, lr)
    expected = reference.sgd_step(params, grads, rates)
    for n, e, p, g, r in zip(new, expected, params, grads, rates):
        torch.testing.assert_close(n, e, **TOL[dtype])
        torch.testing.assert_close(n, p - r * g, **TOL[dtype])
    # in place gives the same numbers and modifies only the params
    copies = [p.clone() for p in params]
    grad_copies = [g.clone() for g in grads]
    mf.sgd_step_(copies, grads, lr)
    for c, n in zip(copies, new):
        torch.testing.assert_close(c, n, **TOL[dtype])
    for g, gc in zip(grads, grad_copies):
        assert torch.equal(g, gc)


def test_sgd_step_leaves_inputs_untouched(device):
    params, grads = make_params(3, device)
    before = [p.clone() for p in params]
    mf.sgd_step(params, grads, 0.5)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_sgd_step_inplace_non_contiguous(device):
    base = torch.randn(6, 4, dtype=torch.float64, device=device)
    param = base.t()  # non-contiguous view, [4, 6]
    grad = torch.randn(4, 6, dtype=torch.float64, device=device)
    expected = param - 0.3 * grad
    mf.sgd_step_([param], [grad], 0.3)
    torch.testing.assert_close(param, expected)
    torch.testing.assert_close(base.t(), expected)


def test_sgd_step_inplace_refuses_tracked_params(device):
    params, grads = make_params(2, device, requires_grad=True)
    with pytest.raises(ValueError, match="params\\[0\\]"):
        mf.sgd_step_(params, [g.detach() for g in grads], 0.1)
    with torch.no_grad():
        mf.sgd_step_(params, [g.detach() for g in grads], 0.1)


@pytest.mark.parametrize("form", ["scalar", "per_task", "per_param"])
def test_sgd_step_gradcheck(form, device):
    T = 3
    params, grads = make_params(T, device, requires_grad=True)
    lr = lr_forms(T, params, device)[form]
    lrs = [lr] if isinstance(lr, torch.Tensor) else lr
    for r in lrs:
        r.requires_grad_()
    n = len(params)

    def fn(*flat):
        ps, gs, rs = list(flat[:n]), list(flat[n : 2 * n]), list(flat[2 * n :])
        return tuple(mf.sgd_step(ps, gs, rs if isinstance(lr, list) else rs[0]))

    inputs = (*params, *grads, *lrs)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_opcheck_sgd_step(device):
    for requires_grad in (False, True):
        params, grads = make_params(3, device, requires_grad=requires_grad)
        for lr in (0.1, torch.rand(3, dtype=torch.float64, device=device)):
            rates = mf.ops._rates(params, lr)
            torch.library.opcheck(torch.ops.metalearn_fast.sgd_step.default, (params, grads, rates))
    params, grads = make_params(3, device)
    torch.library.opcheck(
        torch.ops.metalearn_fast.sgd_step_.default, ([p.clone() for p in params], grads, mf.ops._rates(params, 0.1))
    )


def test_schemas_match_the_compiled_library():
    assert set(mf.ops.DEVICE_OPS + mf.ops.MAML_OPS + mf.ops.TRAINING_OPS) == set(SCHEMAS)
    for name in SCHEMAS:
        op = getattr(torch.ops.metalearn_fast, name).default
        assert str(op._schema) == "metalearn_fast::" + SCHEMAS[name], name


# ---- bad input: each names the argument and what was expected, on every backend ----

def bad_linear_cases(device):
    x, w, b = make_linear(2, 3, 4, 5, torch.float32, device)
    return [
        ((x, w[:, :, :3], b), ValueError, "weight must have I"),
        ((x, w[:1], b), ValueError, "T = "),
        ((x, w, b[:, :2]), ValueError, "bias must have shape"),
        ((x[0], w, b), ValueError, "weight must be"),
        ((x.double(), w, b), TypeError, "weight must have x's dtype"),
        ((x, w, b.double()), TypeError, "bias must have x's dtype"),
        ((x.int(), w.int(), b.int()), TypeError, "x must be a floating-point"),
        ((x[:, :0], w, b), ValueError, "x is empty"),
        ((x.unsqueeze(0), w, b), ValueError, "x must be"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_linear_relu_bad_input(case, device):
    args, error, message = bad_linear_cases(device)[case]
    with pytest.raises(error, match=message):
        mf.linear_relu(*args)
    with pytest.raises(error, match=message):
        reference.linear_relu(*args)


def test_linear_relu_wrong_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device (CUDA) to mix devices")
    x, w, b = make_linear(2, 3, 4, 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match="device"):
        mf.linear_relu(x, w.cuda(), b.cuda())


def test_linear_relu_backward_bad_input(device):
    x, w, b = make_linear(2, 3, 4, 5, torch.float32, device)
    out = mf.linear_relu(x, w, b)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        mf.linear_relu_backward(out[:, :2], x, w, out)
    with pytest.raises(TypeError, match="out must have x's dtype"):
        mf.linear_relu_backward(out, x, w, out.double())


def test_sgd_step_bad_input(device):
    params, grads = make_params(3, device)
    cases = [
        (([], [], 0.1), ValueError, "params is empty"),
        ((params, grads[:2], 0.1), ValueError, "grads must hold one tensor per param"),
        ((params, [grads[0][:1]] + grads[1:], 0.1), ValueError, r"grads\[0\] must have shape"),
        ((params, [grads[0].float()] + grads[1:], 0.1), TypeError, r"grads\[0\] must have dtype"),
        ((params, grads, torch.rand(2, dtype=torch.float64, device=device)), ValueError, "one rate per task"),
        ((params, grads, [torch.rand(4, dtype=torch.float64, device=device)] * 4), ValueError, r"lr\[0\]"),
        ((params, grads, [torch.tensor(0.1, dtype=torch.float64, device=device)] * 2), ValueError, "lr must hold"),
        ((params, grads, "fast"), TypeError, "lr must be"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            mf.sgd_step(*args)
    with pytest.raises(ValueError, match=r"lr\[0\]"):
        reference.sgd_step(params, grads, [torch.rand(4, dtype=torch.float64, device=device)] * 4)


def test_backend_info_reports_the_build():
    import importlib.util
    import os

    info = mf.backend_info()
    requested = os.environ.get("METALEARN_FAST_BACKEND", "auto")
    if requested == "torch":
        assert info["active"] == "torch" and "METALEARN_FAST_BACKEND" in info["reason"]
        return
    if importlib.util.find_spec("metalearn_fast._C") is None:
        # installed without its extension (no working compiler at install time): the fallback runs, and says why
        assert info["active"] == "torch" and "installed without it" in info["reason"], info
        assert not info["compiled_cpu"] and not info["compiled_cuda"]
        return
    # an extension that was built must load: a stale or broken build is an error here, not a silent fallback
    assert info["active"] == "extension", info["reason"]
    assert info["compiled_cpu"]
    assert info["built_against_torch"] == torch.__version__
    if torch.version.cuda and not info["why_no_cuda_kernels"]:
        assert info["compiled_cuda"] and info["cuda_arch_list"]
    assert info["compiled_cuda"] or info["why_no_cuda_kernels"]


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(mf.ops._extension is None, reason="the instruction sets of the compiled CPU kernels")
def test_cpu_simd_follows_the_cpu_and_can_be_lowered():
    """The hand-written CPU kernels' instruction set is the best the CPU's flags (/proc/cpuinfo) allow, can be
    lowered (never raised past the CPU) by set_cpu_simd and METALEARN_FAST_CPU_SIMD, and a wrong name is an
    error that lists the right ones."""
    import os
    import platform
    import subprocess
    import sys

    extension = mf.ops._extension
    available = extension.CPU_SIMD_AVAILABLE
    if platform.machine() == "x86_64" and os.path.exists("/proc/cpuinfo"):
        flags = _cpu_flags()
        expected = ("avx512" if {"avx512f", "avx512vl", "avx2", "fma"} <= flags
                    else "avx2" if {"avx2", "fma"} <= flags else "none")
        assert available == expected
    assert mf.backend_info()["cpu_simd_available"] == available
    before = extension.cpu_simd()
    try:
        assert extension.set_cpu_simd("none") == before
        assert mf.backend_info()["cpu_simd"] == "none"
        assert extension.set_cpu_simd("avx512") == "none"
        assert extension.cpu_simd() == available  # capped at what the CPU has
        with pytest.raises(ValueError, match="'none', 'avx2' or 'avx512'"):
            extension.set_cpu_simd("sse2")
    finally:
        extension.set_cpu_simd(before)
    code = "import metalearn_fast as mf; print(mf.backend_info()['cpu_simd'])"
    env = {**os.environ, "METALEARN_FAST_CPU_SIMD": "none"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "none"
    env["METALEARN_FAST_CPU_SIMD"] = "avx9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "METALEARN_FAST_CPU_SIMD must be one of none, avx2, avx512" in out.stderr


SWEEP = [(T, N, width_in, width_out)
         for T in (1, 3, 25) for N in (1, 7, 64) for width_in, width_out in ((1, 13), (13, 40), (40, 128), (128, 1))]


@pytest.mark.parametrize("batched", [True, False])
def test_linear_relu_sweep_float32(batched, device):
    """Forward and backward equal reference.py to 1e-6 over a seeded sweep of shapes."""
    for index, (T, N, I, O) in enumerate(SWEEP):
        x, w, b = make_linear(T if batched else 0, N, I, O, torch.float32, device, seed=index)
        out = mf.linear_relu(x, w, b)
        torch.testing.assert_close(out, reference.linear_relu(x, w, b), rtol=1e-6, atol=1e-6)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(index)).to(device)
        got = mf.linear_relu_backward(grad_out, x, w, out)
        expected = reference.linear_relu_backward(grad_out, x, w, out, (True, True, True))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("batched", [True, False])
def test_exact_zero_pre_activation_follows_relu_convention(batched, device):
    """Where x @ W^T + b is exactly 0 the ReLU passes no gradient, as torch.relu's backward does;
    gradcheck w.r.t. the weight holds there because those pre-activations stay 0 under perturbation."""
    x, w, b = make_linear(3 if batched else 0, 5, 4, 6, torch.float64, device, seed=4)
    with torch.no_grad():
        x[..., 1, :] = 0  # an all-zero row ...
        b[..., ::2] = 0   # ... meets zero biases: exact-zero pre-activations
    out = mf.linear_relu(x, w, b)
    z = x @ w.transpose(-1, -2) + b.unsqueeze(-2)
    assert (z == 0).sum() >= 3 and (out[..., 1, ::2] == 0).all()
    grad_out = torch.ones_like(out)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    torch.relu(xr @ wr.transpose(-1, -2) + br.unsqueeze(-2)).backward(grad_out)
    for got, expected in zip(mf.linear_relu_backward(grad_out, x, w, out), (xr.grad, wr.grad, br.grad)):
        torch.testing.assert_close(got, expected)
    w.requires_grad_()
    assert gradcheck(lambda w: mf.linear_relu(x, w, b), (w,), eps=1e-6, atol=1e-7)
    assert gradgradcheck(lambda w: mf.linear_relu(x, w, b), (w,), eps=1e-6, atol=1e-7)
