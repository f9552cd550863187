"""The extension's direct grouped convolution (csrc/cpu/grouped_conv_cpu.cpp), which convnet.py's meta-step runs
for the small maps of conv4's late blocks: against ATen's convolution and its backward pass (the oracle) in
float64 and float32 on each instruction set, by finite differences (gradcheck), on any number of threads, and
with bad arguments. The meta-gradients it takes part in are checked against the per-task loop in
test_convnet.py."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import metalearn_fast as mf
from metalearn_fast.experiments.runs import threads

from conftest import forced_cpu_simd

aten = torch.ops.aten

# (examples, groups, in channels, out channels per group, height, width, kernel, stride, padding): conv4's late
# blocks; a stride of 1, 3 and unequal ones; no padding; a 1x1 and a 5x5 kernel; odd output channel counts (tails
# of the register tiles); one task; an image smaller than the kernel's reach where padding fills it; more output
# pixels a task than a block of them (128)
SHAPES = [(5, 8, 64, 64, 4, 4, 3, 2, 1), (5, 8, 64, 64, 7, 7, 3, 2, 1), (5, 3, 16, 24, 9, 7, 3, 1, 1),
          (2, 2, 32, 5, 6, 6, 1, 1, 0), (3, 4, 16, 16, 5, 6, 3, (2, 1), (0, 1)), (1, 1, 64, 64, 14, 14, 3, 2, 1),
          (5, 2, 16, 17, 8, 9, 5, 3, 2), (4, 3, 32, 7, 2, 2, 3, 2, 1), (6, 2, 16, 16, 12, 11, 3, 1, 1)]
# few input channels (conv4's first block, RGB images), the output channels a multiple of 16: the forward pass and
# the weight gradient along the output channels
NARROW = [(5, 8, 1, 64, 28, 28, 3, 2, 1), (3, 4, 3, 32, 11, 9, 3, 1, 1), (2, 3, 5, 16, 9, 8, 5, 2, 2),
          (2, 2, 1, 48, 6, 6, 1, 1, 0), (4, 2, 3, 16, 3, 4, 3, (2, 1), (1, 0))]


def kernels():
    ext = mf.ops._extension
    if ext is None or ext.cpu_simd() == "none":
        pytest.skip("the hand-written CPU kernels are not built or not used on this machine")
    return ext


def pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def inputs(shape, dtype, bias, seed=0):
    n, groups, c_in, c_out, h, w, k, stride, padding = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, groups * c_in, h, w, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(groups * c_out, c_in, k, k, generator=g, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    b = torch.randn(groups * c_out, generator=g, dtype=dtype) if bias else None
    return x, weight, b, pair(stride), pair(padding), groups


@pytest.mark.parametrize("level", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + NARROW, ids=lambda s: "x".join(map(str, itertools.chain(*map(pair, s)))))
def test_the_direct_kernels_equal_atens_convolution(level, dtype, shape):
    ext = kernels()
    masks = [(True, True, True), (True, False, False), (False, True, True)]
    if shape in NARROW:  # (no input gradient: the first block's input is the data)
        masks = [(False, True, True), (False, True, False)]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    with forced_cpu_simd(level):
        for bias in (False, True):
            x, weight, b, stride, padding, groups = inputs(shape, dtype, bias)
            scale = x.abs().max() * weight.abs().max() * weight[0].numel()  # (float32: error ~ the terms' size)
            want = F.conv2d(x, weight, b, stride, padding, groups=groups)
            got = ext.grouped_conv(x, weight, b, stride, padding, groups)
            assert got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got / scale, want / scale, **tol)
            g = torch.randn(want.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
            want = aten.convolution_backward(g, x, weight, [weight.shape[0]] if bias else None, stride, padding,
                                             [1, 1], False, [0, 0], groups, [True, True, bias])
            for mask in masks:
                mask = (mask[0], mask[1], mask[2] and bias)
                got = ext.grouped_conv_backward(g, x, weight, stride, padding, groups, *mask)
                for name, asked, ours, theirs in zip(("input", "weight", "bias"), mask, got, want):
                    if not asked:
                        assert ours is None, name
                        continue
                    theirs_scale = theirs.abs().max()
                    torch.testing.assert_close(ours / theirs_scale, theirs / theirs_scale, **tol,
                                               msg=lambda m: f"{name} gradient, mask {mask}: {m}")


class _DirectConv(torch.autograd.Function):
    """The direct forward with the direct backward, for gradcheck."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups):
        ctx.save_for_backward(x, weight)
        ctx.settings = (stride, padding, groups)
        return mf.ops._extension.grouped_conv(x, weight, bias, stride, padding, groups)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grads = mf.ops._extension.grouped_conv_backward(g, x, weight, *ctx.settings, *ctx.needs_input_grad[:3])
        return (*grads, None, None, None)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[6], NARROW[2]],
                         ids=["conv4-last", "uneven", "5x5-stride-3", "5-input-channels"])
def test_the_direct_kernels_pass_gradcheck(shape):
    kernels()
    x, weight, b, stride, padding, groups = inputs(shape, torch.float64, True)
    x = x[:2].detach().requires_grad_(shape not in NARROW)  # (two examples: fewer evaluations)
    weight = weight.detach().requires_grad_()
    b = b.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: _DirectConv.apply(*t, stride, padding, groups), (x, weight, b),
                                    eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


def test_the_direct_kernels_give_the_same_numbers_on_any_number_of_threads():
    ext = kernels()
    x, weight, b, stride, padding, groups = inputs(SHAPES[1], torch.float32, True)
    g = torch.randn(5, 8 * 64, 4, 4).contiguous(memory_format=torch.channels_last)
    results = []
    for count in (1, 2, 3):
        with threads(count):
            results.append([ext.grouped_conv(x, weight, b, stride, padding, groups),
                            *ext.grouped_conv_backward(g, x, weight, stride, padding, groups, True, True, True)])
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def test_the_direct_kernels_take_maps_in_any_layout_and_modify_nothing():
    ext = kernels()
    x, weight, b, stride, padding, groups = inputs(SHAPES[2], torch.float64, True)
    want = ext.grouped_conv(x, weight, b, stride, padding, groups)
    g = torch.randn(want.shape, dtype=torch.float64)  # NCHW
    x_nchw, weight_nchw = x.contiguous(), weight.contiguous()
    copies = [t.clone() for t in (x_nchw, weight_nchw, b, g)]
    assert torch.equal(ext.grouped_conv(x_nchw, weight_nchw, b, stride, padding, groups), want)
    got = ext.grouped_conv_backward(g, x_nchw, weight_nchw, stride, padding, groups, True, True, True)
    for ours, theirs in zip(got, ext.grouped_conv_backward(g.contiguous(memory_format=torch.channels_last), x, weight,
                                                           stride, padding, groups, True, True, True)):
        assert torch.equal(ours, theirs)
    for before, after in zip(copies, (x_nchw, weight_nchw, b, g)):
        assert torch.equal(before, after)


def test_the_direct_kernels_name_a_bad_argument():
    ext = kernels()
    x, weight, b, stride, padding, groups = inputs(SHAPES[0], torch.float32, True)
    g = torch.randn(5, 8 * 64, 2, 2)
    lanes = 16 if ext.cpu_simd() == "avx512" else 8
    with pytest.raises(ValueError, match=rf"grouped_conv: takes input channels per group that are a multiple of "
                                         rf"{lanes} \(or output channels that are\) with the AVX2 or AVX-512 kernels "
                                         r"on, got 12 in and 20 out"):
        ext.grouped_conv(x[:, :8 * 12], weight[:8 * 20, :12], None, stride, padding, groups)
    with pytest.raises(ValueError, match=rf"grouped_conv_backward: takes input channels per group that are a multiple "
                                         rf"of {lanes} with the AVX2 or AVX-512 kernels on, got 12 in and 64 out"):
        ext.grouped_conv_backward(g, x[:, :8 * 12], weight[:, :12], stride, padding, groups, True, True, False)
    with pytest.raises(TypeError, match="x and weight must both be float32 or both float64, got Float and Double"):
        ext.grouped_conv(x, weight.double(), b, stride, padding, groups)
    with pytest.raises(ValueError, match=r"weight \[G\*C, Cin, KH, KW\] must have a multiple of groups = 3 rows"):
        ext.grouped_conv(x, weight, b, stride, padding, 3)
    with pytest.raises(ValueError, match="stride must be two positive numbers"):
        ext.grouped_conv(x, weight, b, [0, 2], padding, groups)
    with pytest.raises(ValueError, match=r"bias must be a CPU tensor \[512\] of x's dtype, got \[511\]"):
        ext.grouped_conv(x, weight, b[1:], stride, padding, groups)
    with pytest.raises(ValueError, match=r"the output would be empty, from x of shape \[5, 512, 1, 1\] and a 3x3"):
        ext.grouped_conv(x[:, :, :1, :1], weight, b, stride, [0, 0], groups)
    with pytest.raises(ValueError, match=r"grouped_conv_backward: g must have the output's shape \[5, 512, 2, 2\], "
                                         r"got \[5, 512, 2, 1\]"):
        ext.grouped_conv_backward(g[..., :1], x, weight, stride, padding, groups, True, True, True)
    with pytest.raises(TypeError, match=r"grouped_conv_backward: argument 6 \(need_input\) must be a bool, got int"):
        ext.grouped_conv_backward(g, x, weight, stride, padding, groups, 1, True, True)
    with pytest.raises(TypeError, match=r"grouped_conv: argument 3 \(stride\) must be a list of ints"):
        ext.grouped_conv(x, weight, b, [2.0, 2.0], padding, groups)
