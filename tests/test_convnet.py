"""MAML on conv/BatchNorm/ReLU networks (conv4's kind) through the hand-derived meta-gradient of
metalearn_fast/algorithms/convnet.py, against the textbook oracle: a per-task loop of torch.autograd.grad
(create_graph for second order) on the model itself, float64.
"""
import contextlib

import pytest
import torch
from torch import nn
from torch.func import functional_call

import metalearn_fast as mf
from metalearn_fast import MAML, TaskBatch
from metalearn_fast.algorithms import convnet
from metalearn_fast.experiments.runs import threads

from conftest import forced_cpu_simd

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def conv_net(channels=(1, 6, 5), stride=2, padding=1, bias=True, kernel=3, ways=4):
    torch.manual_seed(0)
    blocks = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        blocks += [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias),
                   nn.BatchNorm2d(c_out, eps=1e-3, track_running_stats=False), nn.ReLU()]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], ways))


def randomised(model, dtype=torch.float64, device="cpu"):
    """BatchNorm's weight and bias away from 1 and 0, so that their derivatives are all exercised."""
    torch.manual_seed(1)
    model = model.to(device, dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def make_batch(loss, tasks=3, support=5, query=4, shape=(1, 9, 7), ways=4, dtype=torch.float64, device="cpu",
               seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(tasks, support, *shape, generator=g, dtype=dtype)
    xq = torch.rand(tasks, query, *shape, generator=g, dtype=dtype)
    if loss == "cross_entropy":
        ys, yq = (torch.randint(0, ways, (tasks, n), generator=g) for n in (support, query))
    else:
        ys, yq = (torch.randn(tasks, n, ways, generator=g, dtype=dtype) for n in (support, query))
    return TaskBatch(*(t.to(device) for t in (xs, ys, xq, yq)))


def loop_meta_loss(model, batch, lr, steps, first_order, loss):
    """The oracle: one task at a time, the model's own forward, autograd.grad."""
    names = [n for n, _ in model.named_parameters()]
    criterion = nn.functional.cross_entropy if loss == "cross_entropy" else nn.functional.mse_loss
    losses = []
    for t in range(batch.num_tasks):
        params = list(model.parameters())
        for _ in range(steps):
            inner = criterion(functional_call(model, dict(zip(names, params)), (batch.x_support[t],)),
                              batch.y_support[t])
            grads = torch.autograd.grad(inner, params, create_graph=not first_order)
            params = [p - lr * g for p, g in zip(params, grads)]
        losses.append(criterion(functional_call(model, dict(zip(names, params)), (batch.x_query[t],)),
                                batch.y_query[t]))
    return torch.stack(losses).mean()


def assert_matches_loop(model, batch, steps, first_order, loss, lr=0.3, tol=1e-10):
    maml = MAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, loss=loss)
    assert maml._conv_net is not None
    ours = maml.meta_loss(batch)
    expected = loop_meta_loss(model, batch, lr, steps, first_order, loss)
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol)
    params = list(model.parameters())
    for name, got, want in zip([n for n, _ in model.named_parameters()], torch.autograd.grad(ours, params),
                               torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def require_kernels():
    """The extension, where its CPU kernels (norm_relu_cpu.cpp) run; skips elsewhere (no compiled extension,
    or the hand-written CPU kernels off: then convnet uses its torch formulas)."""
    ext = mf.ops._extension
    if ext is None or ext.cpu_simd() == "none":
        pytest.skip("the CPU kernels are not built or not used on this machine")
    return ext


# second order with the CPU kernels for the Hessian-vector product's BatchNorm/ReLU parts (where they run: on
# the CPU, built), with the torch formulas (the hand-written kernels off), and first order (no such product)
VARIANTS = {"second-order": (False, None), "second-order-formulas": (False, "none"), "first-order": (True, None)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_gradient_equals_the_per_task_loop(device, loss, steps, variant):
    first_order, level = VARIANTS[variant]
    model = randomised(conv_net(), device=device)
    with forced_cpu_simd(level) if level else contextlib.nullcontext():
        assert_matches_loop(model, make_batch(loss, device=device), steps, first_order, loss)


def tangent_inputs(dtype, shape=(3, 7, 5, 4), seed=0, layout=torch.channels_last):
    """Random inputs of the two kernels: maps [N, C, H, W] (a: a ReLU's output, a third of it 0) and vectors [C]."""
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=layout) for _ in range(6)]
    maps[1] = maps[1].relu()  # a
    vectors = [torch.rand(shape[1], generator=g, dtype=dtype) + 0.5 for _ in range(7)]
    return maps, vectors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, layout", [
    ((3, 7, 5, 4), torch.channels_last), ((5, 130, 14, 14), torch.channels_last), ((2, 3, 1, 1), torch.channels_last),
    ((3, 7, 5, 4), torch.contiguous_format)], ids=["small", "several-blocks", "1x1", "nchw"])
def test_the_cpu_kernels_compute_the_formulas(dtype, shape, layout):
    """norm_relu, norm_relu_backward, norm_relu_tangent and norm_relu_tangent_backward against convnet's torch
    formulas (their fallback): odd channel counts, more rows than a block of the sums (128), 1x1 maps, maps in
    NCHW (made channels-last)."""
    ext = require_kernels()
    maps, vectors = tangent_inputs(dtype, shape, layout=layout)
    dz, a, xhat, d_xhat, g_y, dg_a = maps
    invstd, gamma, d_gamma, d_beta, d_scale, g_gamma, g_beta = vectors
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)

    def assert_same(got, want):
        assert [t is None for t in got] == [t is None for t in want]
        for x, y in zip(got, want):
            if y is not None:
                torch.testing.assert_close(x, y, **tol)

    with forced_cpu_simd("none"):
        assert_same(ext.norm_relu(dz, gamma, d_beta, 1e-3), convnet._norm_relu(dz, gamma, d_beta, 1e-3))
        assert_same(ext.norm_relu_tangent(dz, xhat, a, invstd, gamma, d_gamma, d_beta),
                    convnet._norm_relu_tangent(dz, xhat, a, invstd, gamma, d_gamma, d_beta))
        for with_g in (True, False):
            used_up = dg_a.clone()  # the kernel writes g_z over it where it is channels-last
            got = ext.norm_relu_backward(used_up, a, xhat, invstd, gamma, with_g)
            assert_same(got, convnet._norm_relu_backward(dg_a, a, xhat, invstd, gamma, with_g))
            assert (got[1].data_ptr() == used_up.data_ptr()) == (layout == torch.channels_last)
            assert_same(ext.norm_relu_tangent_backward(dg_a, a, xhat, d_xhat, g_y, invstd, gamma, d_gamma, d_scale,
                                                       g_gamma, g_beta, with_g),
                        convnet._norm_relu_tangent_backward(dg_a, a, xhat, d_xhat, g_y, invstd, gamma, d_gamma,
                                                            d_scale, g_gamma, g_beta, with_g))
        # the tangent pass's g_z, made from the backward pass's g_y and sums, is the backward pass's own
        g_y, g_z, g_gamma, g_beta = ext.norm_relu_backward(dg_a.clone(), a, xhat, invstd, gamma, True)
        again = ext.norm_relu_tangent_backward(dz, a, xhat, d_xhat, g_y, invstd, gamma, d_gamma, d_scale, g_gamma,
                                               g_beta, True)[1]
        torch.testing.assert_close(again, g_z, **tol)


def test_the_cpu_kernels_give_the_same_numbers_on_any_number_of_threads():
    ext = require_kernels()
    maps, vectors = tangent_inputs(torch.float32, (5, 66, 14, 14))
    dz, a, xhat, d_xhat, g_y, dg_a = maps
    invstd, gamma, d_gamma, d_beta, d_scale, g_gamma, g_beta = vectors
    results = []
    for n in (1, 2, 3):
        with threads(n):
            results.append([*ext.norm_relu(dz, gamma, d_beta, 1e-5),
                            *ext.norm_relu_backward(dg_a.clone(), a, xhat, invstd, gamma, True),
                            *ext.norm_relu_tangent(dz, xhat, a, invstd, gamma, d_gamma, d_beta),
                            *ext.norm_relu_tangent_backward(dg_a, a, xhat, d_xhat, g_y, invstd, gamma, d_gamma,
                                                            d_scale, g_gamma, g_beta, True)])
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))


def test_the_forward_kernel_keeps_a_small_variance_under_a_large_mean():
    """Statistics in two passes (the mean, then squares about it): float32 maps of mean 1000 and std 1e-3 are
    normalised no worse than torch's own batch_norm does it, against float64."""
    ext = require_kernels()
    g = torch.Generator().manual_seed(0)
    z = (1000 + 1e-3 * torch.randn(4, 6, 5, 5, generator=g, dtype=torch.float64)).contiguous(
        memory_format=torch.channels_last)
    gamma, beta = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    truth = ext.norm_relu(z, gamma, beta, 0.0)[0]
    ours = ext.norm_relu(z.float(), gamma.float(), beta.float(), 0.0)[0]
    torch_y = torch.native_batch_norm(z.float(), gamma.float(), beta.float(), None, None, True, 0.0, 0.0)[0]
    assert (ours.double() - truth).abs().max() <= max(2 * (torch_y.double() - truth).abs().max(), 1e-3)


def test_the_cpu_kernels_name_a_bad_argument():
    ext = require_kernels()
    maps, vectors = tangent_inputs(torch.float32)
    dz, a, xhat = maps[:3]
    invstd, gamma, d_gamma, d_beta = vectors[:4]
    with pytest.raises(ValueError, match=r"norm_relu_tangent: xhat must have shape \[3, 7, 5, 4\], got \[3, 7, 5\]"):
        ext.norm_relu_tangent(dz, xhat[..., 0], a, invstd, gamma, d_gamma, d_beta)
    with pytest.raises(TypeError, match="norm_relu_tangent: a must have dtype Float, got Double"):
        ext.norm_relu_tangent(dz, xhat, a.double(), invstd, gamma, d_gamma, d_beta)
    with pytest.raises(ValueError, match=r"gamma must be \[7\] \(one value per channel\), got shape \[6\]"):
        ext.norm_relu_tangent(dz, xhat, a, invstd, gamma[:6], d_gamma, d_beta)
    with pytest.raises(TypeError, match="dz must be float32 or float64, got Half"):
        ext.norm_relu_tangent(dz.half(), xhat, a, invstd, gamma, d_gamma, d_beta)
    with pytest.raises(TypeError, match=r"argument 3 \(invstd\) must be a tensor, got float"):
        ext.norm_relu_tangent(dz, xhat, a, 1.0, gamma, d_gamma, d_beta)
    with pytest.raises(TypeError, match=r"norm_relu: argument 3 \(eps\) must be a number, got str"):
        ext.norm_relu(dz, gamma, d_beta, "1e-5")
    with pytest.raises(ValueError, match="norm_relu: eps must be >= 0, got -1"):
        ext.norm_relu(dz, gamma, d_beta, -1.0)
    with pytest.raises(ValueError, match=r"norm_relu_backward: a must have shape \[3, 7, 5, 4\]"):
        ext.norm_relu_backward(dz, a[:2], xhat, invstd, gamma, True)
    with pytest.raises(TypeError, match=r"norm_relu_backward: argument 5 \(with_g_y\) must be a bool, got int"):
        ext.norm_relu_backward(dz, a, xhat, invstd, gamma, 1)
    with pytest.raises(TypeError, match=r"norm_relu_tangent_backward: expected 12 arguments \(11 tensors, with_g_z\), "
                                        "got 7"):
        ext.norm_relu_tangent_backward(dz, xhat, a, invstd, gamma, d_gamma, d_beta)


@pytest.mark.parametrize("variant", [
    dict(stride=1, padding=0), dict(stride=2, padding=0), dict(bias=False), dict(kernel=1, padding=0),
    dict(channels=(2, 4, 3, 5)), dict(channels=(3, 4)), dict(stride=(2, 1), padding=(1, 0)),
])
def test_meta_gradient_across_layer_shapes(variant):
    """Strides, paddings, kernel sizes, depths, input channels, no conv bias, non-square images."""
    channels = variant.get("channels", (1, 6, 5))
    model = randomised(conv_net(**variant))
    batch = make_batch("cross_entropy", shape=(channels[0], 9, 7))
    assert_matches_loop(model, batch, 2, False, "cross_entropy")


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("model, shape", [
    (lambda: conv_net(channels=(1, 16, 32)), (1, 9, 7)),
    (lambda: conv_net(channels=(16, 16, 16), stride=1, bias=False), (16, 4, 3)),
    (lambda: mf.nn.conv4(1, 5, hidden=16), (1, 28, 28))], ids=["16-32", "16-16-16-stride-1", "conv4-16"])
def test_meta_gradient_with_the_direct_convolutions(monkeypatch, model, shape, first_order):
    """Channels per task a multiple of 16: the extension's direct convolutions take the backward passes and the
    forward passes of few pixels (counted here: they must run), the others go to ATen's."""
    require_kernels()
    taken = {True: 0, False: 0}

    def direct(block, a, weight, forward, need_input=False):
        ext = direct_or_none(block, a, weight, forward, need_input)
        taken[forward] += ext is not None
        return ext
    direct_or_none = convnet._direct
    monkeypatch.setattr(convnet, "_direct", direct)
    net = randomised(model())
    batch = make_batch("cross_entropy", tasks=3, shape=shape, ways=4 if shape[1] < 28 else 5)
    with threads(2):  # (the direct kernels take a chunk of at least as many tasks as threads)
        assert_matches_loop(net, batch, 2, first_order, "cross_entropy")
    assert taken[True] > 0 and taken[False] > 0
    taken.update({True: 0, False: 0})
    with threads(4):  # more threads than tasks: oneDNN's convolutions
        assert_matches_loop(net, batch, 1, first_order, "cross_entropy")
    assert taken == {True: 0, False: 0}


def test_the_papers_conv4_on_omniglot_sized_images():
    model = randomised(mf.nn.conv4(1, 5, hidden=8))
    assert_matches_loop(model, make_batch("cross_entropy", tasks=2, shape=(1, 28, 28), ways=5), 1, False,
                        "cross_entropy", lr=0.4)


@pytest.fixture
def chunk_sizes(monkeypatch):
    """The number of tasks of each chunk convnet computes, in order (a list the test may clear)."""
    sizes, chunk_meta_loss = [], convnet._chunk_meta_loss
    monkeypatch.setattr(convnet, "_chunk_meta_loss",
                        lambda *args: sizes.append(args[2].shape[0]) or chunk_meta_loss(*args))
    return sizes


def test_chunks_give_the_batch_update(chunk_sizes):
    """max_tasks_per_chunk splits the meta-batch (inside convnet's one call, which keeps no graph): the same
    meta-gradient, and no chunk larger than asked, in meta_step and in meta_loss alike."""
    batch = make_batch("cross_entropy", tasks=5)
    grads = []
    for chunk, sizes in ((None, [5]), (2, [2, 2, 1])):
        model = randomised(conv_net())
        maml = MAML(model, inner_lr=0.3, loss="cross_entropy", max_tasks_per_chunk=chunk)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        chunk_sizes.clear()
        maml.meta_step(batch, optimizer)
        assert chunk_sizes == sizes
        grads.append([p.grad.clone() for p in model.parameters()])
        chunk_sizes.clear()
        maml.meta_loss(batch)
        assert chunk_sizes == sizes
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_float32_is_as_close_to_the_float64_truth_as_the_loop(level):
    """float32 rounding: the hand-derived meta-gradient no further from float64's than the autograd loop's, with
    each instruction set's kernels (the direct convolutions included: 16 channels, 4 tasks on 2 threads)."""
    truth = None
    errors = {}
    with threads(2), forced_cpu_simd(level):
        for dtype, how in ((torch.float64, "ours"), (torch.float32, "ours"), (torch.float32, "loop")):
            model = randomised(mf.nn.conv4(1, 5, hidden=16), dtype)
            batch = make_batch("cross_entropy", tasks=4, shape=(1, 28, 28), ways=5, dtype=dtype)
            maml = MAML(model, inner_lr=0.4, loss="cross_entropy")
            loss = maml.meta_loss(batch) if how == "ours" else loop_meta_loss(model, batch, 0.4, 1, False,
                                                                              "cross_entropy")
            grads = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
            if truth is None:
                truth = grads.double()
            else:
                errors[how] = (grads.double() - truth).norm() / truth.norm()
    assert errors["ours"] <= 2 * errors["loop"] + 1e-7, errors


def conv_parts():
    return [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()]


TAIL = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]


@pytest.mark.parametrize("model, why", [
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.ReLU(), *TAIL), "no BatchNorm"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False, track_running_stats=False),
                           nn.ReLU(), *TAIL), "BatchNorm without weight and bias"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, groups=1, dilation=2), *conv_parts()[1:], *TAIL), "dilation"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), *conv_parts()[1:], *TAIL), "padding='same'"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), *conv_parts()[1:], *TAIL),
     "reflect padding"),
    (lambda: nn.Sequential(*conv_parts()[:2], nn.Tanh(), *TAIL), "Tanh"),
    (lambda: nn.Sequential(*conv_parts(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)), "pool to 2x2"),
    (lambda: nn.Sequential(*conv_parts(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False)),
     "head without bias"),
    (lambda: nn.Sequential(*conv_parts(), *TAIL, nn.ReLU()), "something after the head"),
])
def test_other_models_take_the_general_path(model, why):
    assert convnet.conv_net_plan(model()) is None, why


def test_shared_layers_and_variants_take_the_general_path():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    norm = nn.BatchNorm2d(4, track_running_stats=False)
    shared = nn.Sequential(*conv_parts(), conv, norm, nn.ReLU(), conv, nn.BatchNorm2d(4, track_running_stats=False),
                           nn.ReLU(), *TAIL)
    assert convnet.conv_net_plan(shared) is None
    assert convnet.conv_net_plan(nn.Sequential(*conv_parts(), *TAIL)) is not None
    model = conv_net()
    for options in (dict(learn_inner_lr=True), dict(adapt_head_only=True), dict(per_step_inner_lr=True),
                    dict(loss=lambda pred, target: (pred - target).pow(2).flatten(1).mean(1))):
        assert MAML(model, **{"loss": "cross_entropy", **options})._conv_net is None, options


def test_bad_images_name_the_argument():
    model = conv_net().double()
    maml = MAML(model, loss="cross_entropy")
    batch = make_batch("cross_entropy", shape=(2, 9, 7))  # the model takes 1 channel
    with pytest.raises(ValueError, match=r"x_support must be \[T, N, 1, H, W\] images for this model, got shape "
                                         r"\[3, 5, 2, 9, 7\]"):
        maml.meta_loss(batch)
    labels = make_batch("cross_entropy", ways=9)  # labels past the model's 4 outputs
    with pytest.raises(ValueError, match="y_support holds class label"):
        maml.meta_loss(labels)


def test_nothing_passed_in_is_modified():
    model = randomised(conv_net())
    batch = make_batch("cross_entropy")
    before = [t.clone() for t in (*model.parameters(), batch.x_support, batch.y_support, batch.x_query,
                                  batch.y_query)]
    MAML(model, inner_lr=0.3, loss="cross_entropy").meta_loss(batch).backward()
    after = [*model.parameters(), batch.x_support, batch.y_support, batch.x_query, batch.y_query]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tasks_per_chunk", [1, 2])
def test_cache_sized_chunks_give_the_batch_numbers(monkeypatch, chunk_sizes, tasks_per_chunk):
    """The meta-gradient runs in chunks of tasks whose feature maps fit convnet.CHUNK_BYTES: chunks of 1 task,
    and of 2 tasks out of 3 (2 + 1), give the per-task loop's numbers."""
    model = randomised(conv_net())
    batch = make_batch("cross_entropy")
    one_task = convnet._task_map_bytes(convnet.conv_net_plan(model), batch.x_support, batch.x_query)
    monkeypatch.setattr(convnet, "CHUNK_BYTES", one_task * tasks_per_chunk)
    assert_matches_loop(model, batch, 2, False, "cross_entropy")
    assert chunk_sizes == ([1, 1, 1] if tasks_per_chunk == 1 else [2, 1])
