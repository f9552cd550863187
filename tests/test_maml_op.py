"""maml_mlp_loss (the fused meta-step) against an explicit per-task loop with torch.autograd.grad."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import metalearn_fast as mf
from metalearn_fast import reference
from metalearn_fast.ops import maml_mlp_loss

from conftest import forced_cpu_simd

SIZES = [3, 8, 7, 4]


# The op's CPU kernels: the per-task kernel in AVX2 and in AVX-512 (each forced with set_cpu_simd: a CPU with
# AVX-512 would run only that one), and the batched composite (which CUDA always runs).
KERNELS = ["per-task", "per-task-avx512", "batched"]


@pytest.fixture(autouse=True)
def _cpu_simd(request):
    """Forces the per-task kernel's instruction set for a test parametrized by ``kernel``: AVX2 for
    "per-task", AVX-512 for "per-task-avx512" (each skipped on a CPU without it)."""
    kernel = request.node.callspec.params.get("kernel") if hasattr(request.node, "callspec") else None
    if kernel not in ("per-task", "per-task-avx512"):
        yield
        return
    with forced_cpu_simd("avx512" if kernel == "per-task-avx512" else "avx2"):
        yield


def kernel_shape(kernel):
    """make_problem's sizes for each of the op's CPU kernels: small layers take the per-task kernel, and a
    weight over its limit with more than 8 rows a task sends the MLP to the batched composite."""
    if kernel.startswith("per-task"):
        return dict(sizes=SIZES)
    width = math.isqrt(mf.backend_info()["cpu_maml_task_kernel_max_layer"] or 128 * 128) + 1
    return dict(sizes=[3, width, width, 4], support=9, query=10)


def make_problem(loss, device, tasks=4, support=5, query=6, seed=0, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params += [torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64) / fan_in**0.5,
                   torch.randn(fan_out, generator=g, dtype=torch.float64) * 0.1]
    params = [p.to(device).requires_grad_() for p in params]
    xs = torch.randn(tasks, support, sizes[0], generator=g, dtype=torch.float64).to(device)
    xq = torch.randn(tasks, query, sizes[0], generator=g, dtype=torch.float64).to(device)
    if loss == "mse":
        ys = torch.randn(tasks, support, sizes[-1], generator=g, dtype=torch.float64).to(device)
        yq = torch.randn(tasks, query, sizes[-1], generator=g, dtype=torch.float64).to(device)
    else:
        ys = torch.randint(0, sizes[-1], (tasks, support), generator=g).to(device)
        yq = torch.randint(0, sizes[-1], (tasks, query), generator=g).to(device)
    return params, xs, ys, xq, yq


def forward(x, params):
    h = x
    for layer in range(len(params) // 2):
        h = F.linear(h, params[2 * layer], params[2 * layer + 1])
        if layer + 1 < len(params) // 2:
            h = torch.relu(h)
    return h


def task_loss(pred, target, loss):
    return F.mse_loss(pred, target) if loss == "mse" else F.cross_entropy(pred, target)


def per_task_loop(params, rates, xs, ys, xq, yq, steps, first_order, loss, first_adapted, per_step=False,
                  weights=None):
    """The oracle: one task at a time, each adapted with torch.autograd.grad. MAML++: with per_step, inner step s
    takes element s of each rate; with weights, the loss is their weighted sum of the query losses after every
    inner step."""
    weights = weights or [0.0] * (steps - 1) + [1.0]
    total = 0
    for t in range(xs.shape[0]):
        fast = list(params)
        for step in range(steps):
            inner = task_loss(forward(xs[t], fast), ys[t], loss)
            adapted = list(range(2 * first_adapted, len(params)))
            grads = torch.autograd.grad(inner, [fast[i] for i in adapted], create_graph=not first_order)
            for i, g in zip(adapted, grads):
                rate = rates[0] if len(rates) == 1 else rates[i]
                fast[i] = fast[i] - (rate[step] if per_step else rate) * g
            if weights[step]:
                total = total + weights[step] * task_loss(forward(xq[t], fast), yq[t], loss)
    return total / xs.shape[0]


VARIANTS = [
    # name, first_order, meta_sgd, anil
    ("maml", False, False, False),
    ("fomaml", True, False, False),
    ("meta-sgd", False, True, False),
    ("anil", False, False, True),
    ("anil-first-order", True, False, True),
    ("meta-sgd-first-order", True, True, False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_meta_loss_and_gradient_equal_the_per_task_loop(variant, steps, loss, kernel, device):
    _, first_order, meta_sgd, anil = variant
    params, xs, ys, xq, yq = make_problem(loss, device, **kernel_shape(kernel))
    g = torch.Generator().manual_seed(1)
    if meta_sgd:
        rates = [(0.05 + 0.1 * torch.rand(p.shape, generator=g, dtype=torch.float64)).to(device).requires_grad_()
                 for p in params]
    else:
        rates = [torch.tensor(0.1, dtype=torch.float64, device=device, requires_grad=True)]
    first_adapted = len(params) // 2 - 1 if anil else 0
    kwargs = dict(inner_steps=steps, first_order=first_order, loss=loss, first_adapted_layer=first_adapted)

    ours = maml_mlp_loss(params, rates if meta_sgd else rates[0], xs, ys, xq, yq, **kwargs)
    ours_grads = torch.autograd.grad(ours, params + rates)
    expected = per_task_loop(params, rates, xs, ys, xq, yq, steps, first_order, loss, first_adapted)
    expected_grads = torch.autograd.grad(expected, params + rates, allow_unused=True)

    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    for got, want, t in zip(ours_grads, expected_grads, params + rates):
        want = torch.zeros_like(t) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # the lr gradient is real (not zero), and second order differs from first order
    assert rates[0].grad is None and ours_grads[len(params)].abs().sum() > 0


def loop_meta_grad(params, lr, xs, ys, xq, yq, steps, first_order, loss, first_adapted, **plus):
    """From the per-task loop: the meta-loss, its gradients w.r.t. params and w.r.t. lr."""
    params = [p.detach().requires_grad_() for p in params]
    lr = [r.detach().requires_grad_() for r in lr]
    value = per_task_loop(params, lr, xs, ys, xq, yq, steps, first_order, loss, first_adapted, **plus)
    grads = torch.autograd.grad(value, params + lr, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, params + lr)]
    return value.detach(), grads[: len(params)], grads[len(params):]


@pytest.mark.parametrize("sizes", [[3, 4], [3, 9, 17, 6, 4], [1, 40, 40, 1], [5, 100, 70, 3], [605, 22, 5]],
                         ids=["one-layer", "four-layer", "sinusoid", "wide", "long-rows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("impl, kernel", [("op", "per-task"), ("op", "per-task-avx512"), ("reference", None)])
def test_the_op_equals_the_loop_across_depths_dtypes_and_requests(impl, kernel, sizes, dtype, device):
    """One and four layers and the sinusoid's, widths on and off the vector widths (whole and half registers,
    8x8 transpose tiles and their edges), a layer whose long rows the kernel reads as they are (605 inputs: dot
    products along W's rows, with blocks and lanes left over), both dtypes, every variant and every combination
    of requested gradients: the op (its per-task kernel in AVX2 and in AVX-512 on the CPU; and
    reference.maml_mlp_meta_grad, its fallback) against the loop."""
    fn = mf.ops._maml_mlp_meta_grad if impl == "op" else reference.maml_mlp_meta_grad
    g = torch.Generator().manual_seed(3)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params += [torch.randn(fan_out, fan_in, generator=g, dtype=dtype) / fan_in**0.5,
                   torch.randn(fan_out, generator=g, dtype=dtype) * 0.1]
    params = [p.to(device) for p in params]
    tolerance = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for loss in ("mse", "cross_entropy"):
        xs, xq = (torch.randn(3, rows, sizes[0], generator=g, dtype=dtype).to(device) for rows in (4, 7))
        if loss == "mse":
            ys, yq = (torch.randn(3, rows, sizes[-1], generator=g, dtype=dtype).to(device) for rows in (4, 7))
        else:
            ys, yq = (torch.randint(0, sizes[-1], (3, rows), generator=g).to(device) for rows in (4, 7))
        for steps, first_order, first_adapted, meta_sgd in itertools.product((1, 3), (False, True),
                                                                             (0, len(sizes) - 2), (False, True)):
            if meta_sgd:
                lr = [(0.1 + 0.05 * torch.rand(p.shape, generator=g, dtype=dtype)).to(device) for p in params]
            else:
                lr = [torch.tensor(0.1, dtype=dtype, device=device)]
            args = (params, lr, xs, ys, xq, yq, steps, first_order, loss, first_adapted)
            loop_loss, loop_grads, loop_lr_grads = loop_meta_grad(*args)
            for wanted in ((True, True), (True, False), (False, True)):
                loss_value, grads, lr_grads = fn(*args, *wanted)
                want_loss = loop_loss
                want_grads, want_lr_grads = (loop_grads if wanted[0] else []), (loop_lr_grads if wanted[1] else [])
                assert len(grads) == len(want_grads) and len(lr_grads) == len(want_lr_grads)
                for got, want in zip([loss_value, *grads, *lr_grads], [want_loss, *want_grads, *want_lr_grads]):
                    torch.testing.assert_close(got, want, **tolerance)


# MAML++'s options of the op: name, per-step rates (one [steps] tensor per param, or one for all), step weights
MAML_PLUS = [
    ("lslr", "per-param", ()),
    ("lslr-shared", "shared", ()),
    ("multi-step", None, (0.2, 0.3, 0.5)),
    ("multi-step-skipping", None, (0.5, 0.0, 0.5)),
    ("both", "per-param", (0.2, 0.3, 0.5)),
]


@pytest.mark.parametrize("case", MAML_PLUS, ids=[c[0] for c in MAML_PLUS])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("anil", [False, True], ids=["all", "anil"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_per_step_rates_and_the_multi_step_loss_equal_the_per_task_loop(case, first_order, anil, loss, kernel,
                                                                        device):
    """MAML++ in the op (per_step_lr: LSLR; step_weights: the multi-step loss), every combination of requested
    gradients, against the loop with each step's own rates and the weighted query losses."""
    _, rates_kind, weights = case
    steps = 3
    params, xs, ys, xq, yq = make_problem(loss, device, **kernel_shape(kernel))
    params = [p.detach() for p in params]
    g = torch.Generator().manual_seed(2)
    per_step = rates_kind is not None
    if per_step:  # distinct rates per step: a rate used at the wrong step shows
        lr = [(0.05 + 0.1 * torch.rand(steps, generator=g, dtype=torch.float64)).to(device)
              for _ in (params if rates_kind == "per-param" else params[:1])]
    else:
        lr = [torch.tensor(0.1, dtype=torch.float64, device=device)]
    args = (params, lr, xs, ys, xq, yq, steps, first_order, loss, len(params) // 2 - 1 if anil else 0)
    want_loss, want_grads, want_lr_grads = loop_meta_grad(*args, per_step=per_step, weights=list(weights))
    for wanted in ((True, True), (True, False), (False, True), (False, False)):
        got_loss, grads, lr_grads = mf.ops._maml_mlp_meta_grad(*args, *wanted, per_step, list(weights))
        expected = [want_loss, *(want_grads if wanted[0] else []), *(want_lr_grads if wanted[1] else [])]
        got = [got_loss, *grads, *lr_grads]
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the options change the answer: dropping them would not pass the comparisons above
    plain = mf.ops._maml_mlp_meta_grad(params, [torch.tensor(0.1, dtype=torch.float64, device=device)],
                                       *args[2:], True, False)
    assert not torch.allclose(plain[0], want_loss)


@pytest.mark.parametrize("layout", ["sliced", "shared", "transposed"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_inputs_of_any_layout_give_the_loops_meta_gradient(layout, loss, kernel, device):
    """Support and query sets that are not contiguous tensors: slices of one tensor per task, the per-task
    kernel reads them in place (a task's block contiguous, the tasks apart); one task's set shared by every task
    (stride 0 across tasks); a transposed copy (copied first). Against the per-task loop on the same values."""
    params, xs, ys, xq, yq = make_problem(loss, device, **kernel_shape(kernel))
    tasks, support = xs.shape[:2]
    if layout == "sliced":  # as SinusoidTasks.sample_many draws them: [T, K + Q, ...] split along the points
        xs, xq = torch.cat([xs, xq], 1).split_with_sizes([support, xq.shape[1]], 1)
        ys, yq = torch.cat([ys, yq], 1).split_with_sizes([support, yq.shape[1]], 1)
    elif layout == "shared":
        xs, ys = xs[:1].expand_as(xs), ys[:1].expand_as(ys)
    else:
        xs = xs.transpose(0, 1).contiguous().transpose(0, 1)
        xq = xq.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xs.is_contiguous() and (layout != "sliced" or not yq.is_contiguous())
    rate = torch.tensor(0.1, dtype=torch.float64, device=device)
    ours = maml_mlp_loss(params, rate, xs, ys, xq, yq, inner_steps=2, loss=loss)
    ours_grads = torch.autograd.grad(ours, params)
    value, grads, _ = loop_meta_grad(params, [rate], *(t.contiguous() for t in (xs, ys, xq, yq)), 2, False, loss, 0)
    torch.testing.assert_close(ours, value, rtol=1e-9, atol=1e-12)
    for got, want in zip(ours_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("anil", [False, True])
def test_first_order_gradient_differs_from_second_order(anil, device):
    params, xs, ys, xq, yq = make_problem("mse", device)
    first = len(params) // 2 - 1 if anil else 0
    second_order = torch.autograd.grad(maml_mlp_loss(params, 0.2, xs, ys, xq, yq, first_adapted_layer=first), params)
    first_order = torch.autograd.grad(
        maml_mlp_loss(params, 0.2, xs, ys, xq, yq, first_order=True, first_adapted_layer=first), params
    )
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(second_order, first_order))


def test_no_grad_returns_the_loss_only(device):
    params, xs, ys, xq, yq = make_problem("mse", device)
    with torch.no_grad():
        loss = maml_mlp_loss(params, 0.1, xs, ys, xq, yq, inner_steps=2)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, per_task_loop(params, [torch.tensor(0.1, dtype=torch.float64)], xs, ys, xq, yq,
                                                   2, False, "mse", 0).detach())


def test_opcheck_maml_ops(device):
    params, xs, ys, xq, yq = make_problem("mse", device)
    params = [p.detach() for p in params]
    rate = [torch.tensor(0.1, dtype=torch.float64, device=device)]
    args = (params, rate, xs, ys, xq, yq, 2, False, "mse", 0)
    torch.library.opcheck(torch.ops.metalearn_fast.maml_mlp_meta_grad.default, (*args, True, True))
    torch.library.opcheck(torch.ops.metalearn_fast.maml_mlp_loss.default, args)
    # and with the inputs requiring grad, so that the autograd registration is exercised
    torch.library.opcheck(torch.ops.metalearn_fast.maml_mlp_loss.default,
                          ([p.requires_grad_() for p in params], [rate[0].requires_grad_()], *args[2:]))
    # MAML++'s per-step rates and step weights
    per_step = [torch.tensor([0.1, 0.2], dtype=torch.float64, device=device) for _ in params]
    plus = ([p.detach() for p in params], per_step, *args[2:])
    torch.library.opcheck(torch.ops.metalearn_fast.maml_mlp_meta_grad.default, (*plus, True, True, True, [0.3, 0.7]))
    torch.library.opcheck(torch.ops.metalearn_fast.maml_mlp_loss.default,
                          ([p.requires_grad_() for p in plus[0]], [r.requires_grad_() for r in per_step], *args[2:],
                           True, [0.3, 0.7]))


def test_data_requiring_grad_is_refused(device):
    params, xs, ys, xq, yq = make_problem("mse", device)
    with pytest.raises(ValueError, match="x_query requires grad"):
        maml_mlp_loss(params, 0.1, xs, ys, xq.requires_grad_(), yq)


def test_the_meta_gradient_is_differentiable_once_with_the_extension(device):
    params, xs, ys, xq, yq = make_problem("mse", device)
    loss = maml_mlp_loss(params, 0.1, xs, ys, xq, yq)
    if mf.backend_info()["active"] != "extension":
        # the fallback's loss is a plain autograd graph: its gradient is differentiable again
        grads = torch.autograd.grad(loss, params, create_graph=True)
        assert grads[0].requires_grad
        return
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, params, create_graph=True)


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_bad_arguments_are_named(impl, device):
    params, xs, ys, xq, yq = make_problem("mse", device)
    params = [p.detach() for p in params]
    rate = [torch.tensor(0.1, dtype=torch.float64, device=device)]
    # "op" is what the engine calls: the compiled op, or the reference on the fallback
    fn = mf.ops._maml_mlp_meta_grad if impl == "op" else reference.maml_mlp_meta_grad
    good = (params, rate, xs, ys, xq, yq, 1, False, "mse", 0, True, True, False, [])
    cases = [
        ({6: 0}, ValueError, "inner_steps"),
        ({8: "hinge"}, ValueError, "loss must be"),
        ({9: 3}, ValueError, "first_adapted_layer"),
        ({2: xs[:, :, :2]}, ValueError, "x_support"),
        ({4: xq[:2]}, ValueError, "x_query"),
        ({3: ys[:, :, :1]}, ValueError, "y_support"),
        ({5: yq.float()}, TypeError, "y_query"),
        ({0: params[:3]}, ValueError, "params"),
        ({1: [torch.ones(2, dtype=torch.float64, device=device)]}, ValueError, r"lr\[0\]"),
        ({2: xs[:0], 3: ys[:0], 4: xq[:0], 5: yq[:0]}, ValueError, "empty"),
        ({12: True}, ValueError, r"lr\[0\] must hold one rate per inner step, \[1\]"),
        ({6: 2, 12: True, 1: [torch.ones(3, dtype=torch.float64, device=device)]}, ValueError, "one rate per inner"),
        ({13: [0.5, 0.5]}, ValueError, r"step_weights must hold one weight per inner step \(1\)"),
        ({13: [float("nan")]}, ValueError, "step_weights must be finite"),
    ]
    for change, error, message in cases:
        args = list(good)
        for index, value in change.items():
            args[index] = value
        with pytest.raises(error, match=message):
            fn(*args)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_class_labels_out_of_range_are_named(impl, kernel, device):
    params, xs, ys, xq, yq = make_problem("cross_entropy", device, **kernel_shape(kernel))
    params = [p.detach() for p in params]
    rate = [torch.tensor(0.1, dtype=torch.float64, device=device)]
    fn = mf.ops._maml_mlp_meta_grad if impl == "op" else reference.maml_mlp_meta_grad
    too_high, negative = yq.clone(), ys.clone()
    too_high[1, 2] = 4
    negative[0, 0] = -1
    with pytest.raises(ValueError, match=r"y_query must hold class labels in \[0, 4\), got labels from 0 to 4"):
        fn(params, rate, xs, ys, xq, too_high, 1, False, "cross_entropy", 0, True, True)
    with pytest.raises(ValueError, match=r"y_support must hold class labels in \[0, 4\), got labels from -1"):
        fn(params, rate, xs, negative, xq, yq, 1, False, "cross_entropy", 0, True, True)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("wanted", ["params", "lr"])
def test_each_gradient_alone_equals_the_loop(first_order, wanted, device):
    """Asking for one gradient only takes shorter routes through the op; they must agree too."""
    params, xs, ys, xq, yq = make_problem("mse", device)
    rate = torch.tensor(0.15, dtype=torch.float64, device=device, requires_grad=wanted == "lr")
    if wanted == "lr":
        params = [p.detach() for p in params]
    targets = params if wanted == "params" else [rate]
    ours = torch.autograd.grad(maml_mlp_loss(params, rate, xs, ys, xq, yq, inner_steps=2, first_order=first_order),
                               targets)
    loop_params = [p.detach().requires_grad_() for p in params]  # the loop's inner gradients need them
    expected = per_task_loop(loop_params, [rate], xs, ys, xq, yq, 2, first_order, "mse", 0)
    expected_grads = torch.autograd.grad(expected, loop_params if wanted == "params" else [rate])
    for got, want in zip(ours, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("first_order", [False, True])
def test_gradcheck_maml_mlp_loss(loss, first_order, device):
    """float64 finite differences of the meta-loss against its analytic gradient (params and rates)."""
    params, xs, ys, xq, yq = make_problem(loss, device, tasks=2, support=3, query=3)
    rates = [torch.full(p.shape, 0.1, dtype=torch.float64, device=device, requires_grad=True) for p in params]
    count = len(params)

    # FOMAML's gradient is not the meta-loss's gradient, except w.r.t. the rates with one inner step
    steps = 1 if first_order else 2

    def fn(*tensors):
        return maml_mlp_loss(list(tensors[:count]), list(tensors[count:]), xs, ys, xq, yq, inner_steps=steps,
                             first_order=first_order, loss=loss)

    if first_order:
        params = [p.detach() for p in params]
        assert gradcheck(lambda *r: fn(*params, *r), tuple(rates), eps=1e-6, atol=1e-6)
    else:
        assert gradcheck(fn, (*params, *rates), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_gradcheck_per_step_rates_and_the_multi_step_loss(loss, device):
    """float64 finite differences of the MAML++ meta-loss (per-step rates, weighted query losses) against its
    analytic gradient, params and rates."""
    params, xs, ys, xq, yq = make_problem(loss, device, tasks=2, support=3, query=3)
    rates = [torch.tensor([0.1, 0.15], dtype=torch.float64, device=device, requires_grad=True) for _ in params]
    count = len(params)

    def fn(*tensors):
        return maml_mlp_loss(list(tensors[:count]), list(tensors[count:]), xs, ys, xq, yq, inner_steps=2, loss=loss,
                             per_step_lr=True, step_weights=[0.4, 0.6])

    assert gradcheck(fn, (*params, *rates), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("first_order", [False, True])
def test_large_layers_run_in_task_chunks_with_the_same_result(first_order, device):
    """Per-task weights over the CPU chunk budget (1 MiB) split the meta-batch; the shares must add up."""
    g = torch.Generator().manual_seed(5)
    sizes = [6, 256, 300, 3]  # ~0.7 MiB of float64 weights per task: one task per chunk on the CPU
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params += [(torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64) / fan_in**0.5).to(device),
                   (torch.randn(fan_out, generator=g, dtype=torch.float64) * 0.1).to(device)]
    params = [p.requires_grad_() for p in params]
    xs, xq = (torch.randn(3, 4, 6, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    ys, yq = (torch.randn(3, 4, 3, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    rate = torch.tensor(0.05, dtype=torch.float64, device=device, requires_grad=True)
    ours = maml_mlp_loss(params, rate, xs, ys, xq, yq, inner_steps=2, first_order=first_order)
    got = torch.autograd.grad(ours, params + [rate])
    expected = per_task_loop(params, [rate], xs, ys, xq, yq, 2, first_order, "mse", 0)
    want = torch.autograd.grad(expected, params + [rate])
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
