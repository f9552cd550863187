"""MAML's meta-gradient of a conv/BatchNorm/ReLU network, derived by hand: no autograd graph, no vmap.

The model: blocks of [Conv2d, BatchNorm2d with batch statistics, ReLU], then AdaptiveAvgPool2d(1), Flatten and
a Linear head (the MAML paper's conv4 and its relatives, ``nn.conv4``). Every task of a meta-batch runs at once:
the T tasks' feature maps sit side by side in the channels of one tensor [N, T*C, H, W], so that each conv is
one grouped convolution (groups=T, task t's weights on task t's channels) and each task's BatchNorm statistics
are the per-channel statistics of that tensor. On the CPU the extension's kernels run them where they pay (the
BatchNorm/ReLU passes; the convolutions of small maps and of a first block's few input channels: see _direct),
oneDNN's grouped convolution the rest; elsewhere torch's ops.

The meta-gradient of K inner SGD steps, second order, is the query gradient v carried back through every step:
v <- v - lr * H_k v, with H_k the Hessian of the support loss at the step's weights. H_k v is the directional
derivative of the support gradient along v (forward-over-reverse, written out layer by layer below): about
three convolutions' work per conv, and nothing stored but one step's activations. First order skips it.
The numbers are the per-task loop's with torch.autograd.grad (tests/test_convnet.py, float64, 1e-10).

Notation, per layer: a_prev -> z = conv(a_prev, W) + b -> xhat = (z - mean) * invstd -> y = gamma xhat + beta
-> a = relu(y); g_* is the gradient of the loss and d* the derivative along v; M the values a channel's
statistics average (N * H * W).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import _extension, reused_cpu_blocks

__all__ = ["ConvNetPlan", "conv_net_plan"]

aten = torch.ops.aten


@dataclass(frozen=True)
class _Conv:
    kernel: tuple
    stride: tuple
    padding: tuple
    has_bias: bool
    eps: float
    channels: int  # out

    def out_size(self, size: Sequence[int]) -> list[int]:
        return [(side + 2 * pad - k) // step + 1 for side, pad, k, step in zip(size, self.padding, self.kernel,
                                                                               self.stride)]


@dataclass(frozen=True)
class ConvNetPlan:
    """The structure ``conv_net_plan`` found: one _Conv per block; parameters come in model.parameters() order
    (conv weight, [conv bias], norm weight, norm bias per block; head weight, head bias)."""
    blocks: tuple

    @functools.cached_property
    def first(self) -> tuple[int, ...]:
        """Where each block's parameters start in model.parameters() order (and, last, the head's)."""
        return tuple(itertools.accumulate([3 + block.has_bias for block in self.blocks], initial=0))


def conv_net_plan(model: nn.Module) -> Optional[ConvNetPlan]:
    """The plan of a model this module computes exactly, None for any other model: nn.Sequential of blocks
    [Conv2d (zero padding, no dilation or groups), BatchNorm2d (affine, batch statistics), ReLU], then
    AdaptiveAvgPool2d(1), Flatten, Linear with a bias; no parameter shared."""
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return None
    layers = list(model)
    if len(layers) < 6 or (len(layers) - 3) % 3:
        return None
    blocks = []
    for conv, norm, relu in zip(layers[:-3:3], layers[1:-3:3], layers[2:-3:3]):
        if not (type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and type(relu) is nn.ReLU):
            return None
        if (conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
                or not norm.affine or norm.track_running_stats or norm.num_features != conv.out_channels):
            return None
        blocks.append(_Conv(conv.kernel_size, conv.stride, conv.padding, conv.bias is not None, norm.eps,
                            conv.out_channels))
    pool, flatten, head = layers[-3:]
    if not (type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1)) and type(flatten) is nn.Flatten
            and (flatten.start_dim, flatten.end_dim) == (1, -1) and type(head) is nn.Linear and head.bias is not None
            and head.in_features == layers[-6].out_channels):
        return None
    parameters = list(model.parameters())
    if len({id(p) for p in parameters}) != sum(3 + b.has_bias for b in blocks) + 2:
        return None
    return ConvNetPlan(tuple(blocks))


# ---- per-task weights: [T, ...] tensors in model.parameters() order, split into blocks and the head ----


def _block(plan: ConvNetPlan, params: Sequence[Tensor], i: int) -> tuple:
    """Block i's (weight, bias or None, gamma, beta); the conv's weight [T, C, ...] as the grouped convolution's
    [T*C, ...] (channels-last: oneDNN's faster input gradient), made here (a copy where params[i] is not already
    in that layout: the meta weights expanded over the tasks)."""
    first, has_bias = plan.first[i], plan.blocks[i].has_bias
    return (_Grouped.of(params[first]), params[first + 1] if has_bias else None, params[first + 1 + has_bias],
            params[first + 2 + has_bias])


def _split(plan: ConvNetPlan, params: Sequence[Tensor]) -> tuple[list[tuple], tuple]:
    """(every block's _block, (head weight, head bias))."""
    return [_block(plan, params, i) for i in range(len(plan.blocks))], (params[-2], params[-1])


def _join(blocks: list[tuple], head: tuple) -> list[Tensor]:
    """_split's inverse (a block without a conv bias gives None there, dropped)."""
    found = [t for block in blocks for t in block if t is not None] + list(head)
    return [t.per_task if isinstance(t, _Grouped) else t for t in found]


@dataclass
class _Grouped:
    """A conv weight per task: per_task [T, C, Cin, k, k] and flat, the grouped convolution's [T*C, Cin, k, k] in
    channels-last, one memory: per_task is a view of flat, so that what is computed from it (the inner step's
    update, the meta-gradient's) comes out in flat's layout and needs no copy in the next _split."""
    per_task: Tensor
    flat: Tensor

    @staticmethod
    def of(t: Tensor) -> "_Grouped":
        flat = t.flatten(0, 1) if t.stride(0) == t.shape[1] * t.stride(1) else None  # a view, else None
        if flat is None or not flat.is_contiguous(memory_format=torch.channels_last):
            flat = torch.empty((t.shape[0] * t.shape[1], *t.shape[2:]), dtype=t.dtype, device=t.device,
                               memory_format=torch.channels_last)
            flat.unflatten(0, t.shape[:2]).copy_(t)  # one copy (the meta weights expanded over the tasks)
        return _Grouped(flat.unflatten(0, t.shape[:2]), flat)


# The extension's direct convolution (cpu/grouped_conv_cpu.cpp) runs a block's backward pass where a task's
# input channels are a multiple of 16 (any register's lanes), and its forward pass where the output also has at
# most this many pixels an example: measured on conv4's blocks (8 tasks of 5 examples, 64 channels, 2 threads,
# Zen 4), the forward 81 against oneDNN's 156 us at 2x2 outputs, 270 against 253 at 4x4, 832 against 683 at 7x7;
# the input and weight gradients together 126 against 446, 423 against 712, 1460 against 3172. A first block's
# few input channels (the output's a multiple of 16) take its forward pass and weight gradient at any size: in a
# conv4 meta-step 148 and 145 us a call against oneDNN's 203 and 375 (the whole step 6% faster). Its threads
# take a task each: with fewer tasks than threads (a chunk of one task, as large maps make) oneDNN's run instead
# (mini-ImageNet's conv4, 84x84, chunks of one task: 0.6x oneDNN's step on 2 threads).
DIRECT_FORWARD_PIXELS = 16


def _direct(block: _Conv, a: Tensor, weight: _Grouped, forward: bool, need_input: bool = False):
    """The extension where its direct kernels take this convolution of a (forward, or its backward pass, with the
    gradient at a if need_input), else None (then ATen's, oneDNN's on the CPU)."""
    ext = _kernels(a)
    tasks, c_out, c_in = weight.per_task.shape[:3]
    if ext is None or not (c_in % 16 == 0 or (c_out % 16 == 0 and not need_input)):
        return None
    if tasks < torch.get_num_threads():  # (its threads take a task each: oneDNN's split one task's pixels)
        return None
    if forward and math.prod(block.out_size(a.shape[2:])) > DIRECT_FORWARD_PIXELS and c_in % 16 == 0:
        return None
    return ext


def _conv(block: _Conv, a: Tensor, weight: _Grouped, bias: Optional[Tensor]) -> Tensor:
    groups, bias = weight.per_task.shape[0], None if bias is None else bias.reshape(-1)
    ext = _direct(block, a, weight, forward=True)
    if ext is not None:
        return ext.grouped_conv(a, weight.flat, bias, list(block.stride), list(block.padding), groups)
    return F.conv2d(a, weight.flat, bias, block.stride, block.padding, groups=groups)


def _conv_grads(block: _Conv, g: Tensor, a: Tensor, weight: _Grouped, need_input: bool, need_params: bool = True):
    """(gradient w.r.t. a, w.r.t. the weight [T, ...], w.r.t. the bias [T, C]) of sum(g * conv(a, weight, bias)),
    None where not needed (a's unless need_input; the weight's and bias's unless need_params; the bias's where
    the conv has none)."""
    shape = weight.per_task.shape
    need_bias = need_params and block.has_bias
    ext = _direct(block, a, weight, forward=False, need_input=need_input)
    if ext is not None:
        g_a, g_w, g_b = ext.grouped_conv_backward(g, a, weight.flat, list(block.stride), list(block.padding), shape[0],
                                                  need_input, need_params, need_bias)
    else:
        g_a, g_w, g_b = aten.convolution_backward(
            g, a, weight.flat, [shape[0] * shape[1]] if block.has_bias else None, list(block.stride),
            list(block.padding), [1, 1], False, [0, 0], shape[0], [need_input, need_params, need_bias])
    return g_a, None if g_w is None else g_w.reshape(shape), None if g_b is None else g_b.view(shape[:2])


def _per_channel(t: Tensor) -> Tensor:
    """[T, C] -> [1, T*C, 1, 1], to broadcast over [N, T*C, H, W]."""
    return t.reshape(1, -1, 1, 1)


def _channel_sum(t: Tensor) -> Tensor:
    """[N, T*C, H, W] -> [T*C]."""
    return t.sum((0, 2, 3))


@dataclass
class _Forward:
    """One pass of the model on per-task weights: what the backward pass and the derivative along v read."""
    inputs: list  # a_prev of every block, then the last block's output
    xhat: list
    invstd: list
    pooled: Tensor  # [N, T, C]
    out: Tensor  # [N, T, O]


def _norm_relu(z: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm with z's own per-channel statistics, then ReLU: (xhat, a = relu(gamma xhat + beta), invstd)."""
    ext = _kernels(z)
    if ext is not None:
        return ext.norm_relu(z, gamma, beta, eps)
    y, mean, invstd = torch.native_batch_norm(z, gamma, beta, None, None, True, 0.0, eps)
    return (z - _per_channel(mean)) * _per_channel(invstd), torch.relu(y), invstd


def _norm_relu_backward(g_a: Tensor, a: Tensor, xhat: Tensor, invstd: Tensor, gamma: Tensor, with_g_y: bool
                        ) -> tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """_norm_relu's backward pass from g_a, the gradient at a: (g_y, the gradient at y = gamma xhat + beta, if
    with_g_y, else None; the gradient at z, gamma * _unit(...); the gradients of gamma and beta). g_a is used up
    (the kernel writes the gradient at z over it: one map less at the peak memory)."""
    ext = _kernels(g_a)
    if ext is not None:
        return ext.norm_relu_backward(g_a, a, xhat, invstd, gamma, with_g_y)
    g_y = aten.threshold_backward(g_a, a, 0)
    g_gamma, g_beta = _channel_sum(g_y * xhat), _channel_sum(g_y)
    return g_y if with_g_y else None, _unit(g_y, xhat, invstd, g_gamma, g_beta) * _per_channel(gamma), g_gamma, g_beta


def _unit(g_y: Tensor, xhat: Tensor, invstd: Tensor, g_gamma: Tensor, g_beta: Tensor) -> Tensor:
    """BatchNorm's input gradient with gamma = 1, from the gradient g_y at its output and g_gamma = sum(g_y xhat),
    g_beta = sum(g_y): invstd (g_y - mean(g_y) - xhat mean(g_y xhat))."""
    count = g_y.numel() // g_y.shape[1]
    return (g_y - _per_channel(g_beta / count) - xhat * _per_channel(g_gamma / count)) * _per_channel(invstd)


def _pool_backward(g_pooled: Tensor, maps: Tensor) -> Tensor:
    """The gradient at the last maps [N, T*C, H, W] of their mean over H and W, from its gradient [N, T, C]."""
    return (g_pooled.reshape(maps.shape[0], -1, 1, 1) / (maps.shape[2] * maps.shape[3])).expand(maps.shape)


def _forward(plan: ConvNetPlan, blocks: list[tuple], head: tuple, x: Tensor) -> _Forward:
    """x: [N, T*Cin, H, W]."""
    f = _Forward([], [], [], None, None)
    a = x
    for block, (weight, bias, gamma, beta) in zip(plan.blocks, blocks):
        xhat, a_next, invstd = _norm_relu(_conv(block, a, weight, bias), gamma.reshape(-1), beta.reshape(-1),
                                          block.eps)
        f.inputs.append(a)
        f.xhat.append(xhat)
        f.invstd.append(invstd)
        a = a_next
    f.inputs.append(a)
    tasks = head[0].shape[0]
    f.pooled = a.mean((2, 3)).view(a.shape[0], tasks, -1)
    f.out = torch.einsum("ntc,toc->nto", f.pooled, head[0]) + head[1]
    return f


def _loss(kind: str, out: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(per-task losses [T], their gradient w.r.t. out [N, T, O], softmax or None) for out [N, T, O] and the
    task-major target [T, N] (labels) or [T, N, O]."""
    examples = out.shape[0]
    if kind == "cross_entropy":
        log_p = torch.log_softmax(out, -1)
        labels = target.t().unsqueeze(-1)  # [N, T, 1]
        losses = -log_p.gather(-1, labels).squeeze(-1).mean(0)
        p = log_p.exp()
        grad = p.scatter_add(-1, labels, torch.full_like(p[..., :1], -1.0)) / examples
        return losses, grad, p
    diff = out - target.transpose(0, 1)
    return diff.pow(2).mean((0, 2)), diff * (2.0 / (examples * out.shape[2])), None


def _loss_tangent(kind: str, d_out: Tensor, p: Optional[Tensor]) -> Tensor:
    """The derivative of _loss's gradient along d_out."""
    examples = d_out.shape[0]
    if kind == "cross_entropy":
        return p * (d_out - (p * d_out).sum(-1, keepdim=True)) / examples
    return d_out * (2.0 / (examples * d_out.shape[2]))


@dataclass
class _Backward:
    """What the Hessian-vector product reads of a backward pass (per block)."""
    g_y: list  # the gradient at y (after the ReLU's mask)
    g_gamma: list
    g_beta: list
    g_head_out: Tensor


def _backward(plan: ConvNetPlan, blocks: list[tuple], head: tuple, f: _Forward, g_out: Tensor, keep: bool
              ) -> tuple[list[Tensor], Optional[_Backward]]:
    """The per-task gradients (model.parameters() order, [T, ...]) given g_out = dloss/dout, and (keep) what
    _step_back reads; without keep, f and blocks are used up: each block's maps and weights are let go once read
    (the peak memory)."""
    b = _Backward(*([None] * len(blocks) for _ in range(3)), g_out) if keep else None
    tasks = head[0].shape[0]
    g_head = (torch.einsum("nto,ntc->toc", g_out, f.pooled), g_out.sum(0))
    g_a = _pool_backward(torch.einsum("nto,toc->ntc", g_out, head[0]), f.inputs[-1])
    grads = [None] * len(blocks)
    for i in reversed(range(len(blocks))):
        block, (weight, _, gamma, _) = plan.blocks[i], blocks[i]
        g_y, g_z, g_gamma, g_beta = _norm_relu_backward(g_a, f.inputs[i + 1], f.xhat[i], f.invstd[i],
                                                        gamma.reshape(-1), keep)
        g_a = None
        if keep:
            # (copies: the returned sums become the next weights, in place)
            b.g_y[i], b.g_gamma[i], b.g_beta[i] = g_y, g_gamma.clone(), g_beta.clone()
        else:
            f.inputs[i + 1] = f.xhat[i] = None
        g_a, g_w, g_b = _conv_grads(block, g_z, f.inputs[i], weight, i > 0)
        if not keep:
            blocks[i] = weight = None
        del g_y, g_z
        grads[i] = (g_w, g_b, g_gamma.view(tasks, -1), g_beta.view(tasks, -1))
    return _join(grads, g_head), b


def _kernels(t: Tensor):
    """The extension when its CPU kernels take t (a CPU float32/float64 tensor, hand-written kernels on), else None
    (then the torch formulas, which are also the kernels' oracle in tests/test_convnet.py)."""
    ext = _extension
    if ext is None or t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    return ext if ext.cpu_simd() != "none" else None


def _norm_relu_tangent(dz: Tensor, xhat: Tensor, a: Tensor, invstd: Tensor, gamma: Tensor, d_gamma: Tensor,
                       d_beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Along a direction through xhat = BatchNorm(z) (batch statistics), y = gamma xhat + beta, a = relu(y), from
    dz: (d_xhat, d_a, d_scale = d(std) / std). Maps [N, C, H, W], per-channel vectors [C]."""
    ext = _kernels(dz)
    if ext is not None:
        return ext.norm_relu_tangent(dz, xhat, a, invstd, gamma, d_gamma, d_beta)
    count = dz.numel() // dz.shape[1]
    d_mean = dz.mean((0, 2, 3), keepdim=True)
    d_std = _channel_sum(xhat * dz) / count  # mean(xhat dz)
    d_xhat = (dz - d_mean - xhat * _per_channel(d_std)) * _per_channel(invstd)
    dy = xhat * _per_channel(d_gamma) + d_xhat * _per_channel(gamma) + _per_channel(d_beta)
    return d_xhat, aten.threshold_backward(dy, a, 0), d_std * invstd


def _norm_relu_tangent_backward(dg_a: Tensor, a: Tensor, xhat: Tensor, d_xhat: Tensor, g_y: Tensor, invstd: Tensor,
                                gamma: Tensor, d_gamma: Tensor, d_scale: Tensor, g_gamma: Tensor, g_beta: Tensor,
                                with_g_z: bool) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """The derivative of the gradient at z, g_z = gamma * unit (unit = _unit(g_y, xhat, invstd, g_gamma, g_beta),
    g_y the gradient at y), along the direction of _norm_relu_tangent (d_xhat, d_scale), given dg_a, the
    derivative of the gradient at a: (dg_z, g_z if with_g_z else None, dg_gamma, dg_beta)."""
    ext = _kernels(dg_a)
    if ext is not None:
        return ext.norm_relu_tangent_backward(dg_a, a, xhat, d_xhat, g_y, invstd, gamma, d_gamma, d_scale, g_gamma,
                                              g_beta, with_g_z)
    count = dg_a.numel() // dg_a.shape[1]
    unit = _unit(g_y, xhat, invstd, g_gamma, g_beta)
    dg_y = aten.threshold_backward(dg_a, a, 0)
    dg_beta, dg_gamma = _channel_sum(dg_y), _channel_sum(dg_y * xhat) + _channel_sum(g_y * d_xhat)
    scale = gamma * invstd
    dg_z = (_per_channel(scale) * (dg_y - _per_channel(dg_beta / count) - xhat * _per_channel(dg_gamma / count))
            + unit * _per_channel(d_gamma - gamma * d_scale) - d_xhat * _per_channel(scale * g_gamma / count))
    return dg_z, unit * _per_channel(gamma) if with_g_z else None, dg_gamma, dg_beta


def _step_back(plan: ConvNetPlan, weights: list[Tensor], f: _Forward, b: _Backward, p: Optional[Tensor], kind: str,
               v: list[Tensor], lr: float) -> None:
    """v <- v - lr H v in place, H v each task's Hessian of its loss at ``weights`` (the inner step's, whose pass
    gave f and b) times that task's v (model.parameters() order, [T, ...]): the derivative of _backward's
    gradients along v. For the peak memory, f and b are used up (each block's maps let go once read), a block's
    grouped weight is made when it is read (a copy for the first step), and each block's part of v is updated as
    soon as its derivative is done."""
    dblocks, dhead = _split(plan, v)  # read before v is updated
    head, tasks = weights[-2:], weights[-2].shape[0]
    # along v through the forward pass
    d_xhat, d_scale, d_a = [], [], []
    for i, (block, (d_w, d_b, d_gamma, d_beta)) in enumerate(zip(plan.blocks, dblocks)):
        weight, _, gamma, _ = _block(plan, weights, i)
        dz = _conv(block, f.inputs[i], d_w, d_b)
        if i > 0:
            dz += _conv(block, d_a[-1], weight, None)
        dxh, da, scale = _norm_relu_tangent(dz, f.xhat[i], f.inputs[i + 1], f.invstd[i], gamma.reshape(-1),
                                            d_gamma.reshape(-1), d_beta.reshape(-1))
        d_xhat.append(dxh)
        d_scale.append(scale)
        d_a.append(da)
    del weight, dz, dxh, da
    d_pooled = d_a.pop().mean((2, 3)).view(f.out.shape[0], tasks, -1)
    d_out = (torch.einsum("ntc,toc->nto", d_pooled, head[0]) + torch.einsum("ntc,toc->nto", f.pooled, dhead[0])
             + dhead[1])
    dg_out = _loss_tangent(kind, d_out, p)
    g_out = b.g_head_out
    dg_a = _pool_backward(torch.einsum("nto,toc->ntc", dg_out, head[0]) + torch.einsum("nto,toc->ntc", g_out, dhead[0]),
                          f.inputs[-1])
    v[-2].sub_(torch.einsum("nto,ntc->toc", dg_out, f.pooled) + torch.einsum("nto,ntc->toc", g_out, d_pooled),
               alpha=lr)
    v[-1].sub_(dg_out.sum(0), alpha=lr)
    # back along v through the backward pass:
    # dg_w = grad_w(a_prev, dg_z) + grad_w(da_prev, g_z); dg_a_prev = grad_a(W, dg_z) + grad_a(dW, g_z)
    first = plan.first
    for i in reversed(range(len(plan.blocks))):
        block, (d_w, _, d_gamma, _) = plan.blocks[i], dblocks[i]
        weight, _, gamma, _ = _block(plan, weights, i)
        dg_z, g_z, dg_gamma, dg_beta = _norm_relu_tangent_backward(
            dg_a, f.inputs[i + 1], f.xhat[i], d_xhat[i], b.g_y[i], f.invstd[i], gamma.reshape(-1),
            d_gamma.reshape(-1), d_scale[i], b.g_gamma[i], b.g_beta[i], i > 0)
        dg_a = f.inputs[i + 1] = f.xhat[i] = d_xhat[i] = b.g_y[i] = None
        if i > 0:  # the g_z terms first, to let go of d_a[i - 1] early (d_w, v's, is read before v changes)
            dg_a = _conv_grads(block, g_z, f.inputs[i], d_w, True, need_params=False)[0]
            v[first[i]].sub_(_conv_grads(block, g_z, d_a[i - 1], weight, False)[1], alpha=lr)
            d_a[i - 1] = g_z = None
        dg_a_prev, dg_w, dg_b = _conv_grads(block, dg_z, f.inputs[i], weight, i > 0)
        del dg_z
        if i > 0:
            dg_a += dg_a_prev
        del dg_a_prev
        derivatives = [dg_w, *([dg_b] if dg_b is not None else []), dg_gamma.view(tasks, -1),
                       dg_beta.view(tasks, -1)]
        for vi, derivative in zip(v[first[i]:first[i + 1]], derivatives):
            vi.sub_(derivative, alpha=lr)
        del dg_w, dg_b, derivatives
        dblocks[i] = d_w = d_gamma = weight = None


def _task_major(x: Tensor) -> Tensor:
    """[T, N, C, H, W] -> [N, T*C, H, W]."""
    tasks, examples = x.shape[:2]
    return x.transpose(0, 1).reshape(examples, tasks * x.shape[2], *x.shape[3:]).contiguous(
        memory_format=torch.channels_last)


# a chunk's largest feature map (every task's first-block output, float32) at most this many bytes. Measured with
# the direct convolutions (conv4, 28x28, 16 tasks, second order, 2 threads, Zen 4), 2 / 4 / 8 MiB: 5-way 5-shot
# 283 / 251 / 211 ms, 20-way 1-shot 247 / 195 / 180 ms (a chunk of one or two tasks leaves a thread idle or
# oneDNN's kernels to run), 5-way 1-shot within 2% at 16 and at 32 tasks. The memory grows with it (5-way
# 1-shot, 32 tasks: 25 -> 97 MiB): max_tasks_per_chunk bounds it.
CHUNK_BYTES = 8 << 20


def _task_map_bytes(plan: ConvNetPlan, x_support: Tensor, x_query: Tensor) -> int:
    """The bytes of one task's first-block output (float32), the largest of its support and query set."""
    first = plan.blocks[0]
    examples = max(x_support.shape[1], x_query.shape[1])
    return examples * first.channels * math.prod(first.out_size(x_support.shape[3:])) * 4


def meta_loss_and_gradient(plan: ConvNetPlan, parameters: Sequence[Tensor], x_support: Tensor, y_support: Tensor,
                           x_query: Tensor, y_query: Tensor, inner_lr: float, inner_steps: int, first_order: bool,
                           loss: str, max_tasks_per_chunk: Optional[int] = None) -> tuple[Tensor, list[Tensor]]:
    """MAML's meta-loss (mean over tasks of the query loss after inner_steps SGD steps of rate inner_lr on each
    task's support loss) and its gradient w.r.t. the meta ``parameters`` (model.parameters() order), in chunks
    of tasks (CHUNK_BYTES, and at most max_tasks_per_chunk)."""
    tasks = x_support.shape[0]
    chunk = max(1, CHUNK_BYTES // _task_map_bytes(plan, x_support, x_query))
    if max_tasks_per_chunk is not None:
        chunk = min(chunk, max_tasks_per_chunk)
    total, sums = 0.0, None
    # the feature maps, the same sizes at every meta-step, from blocks kept for reuse (no fresh pages faulted in)
    with reused_cpu_blocks() if x_support.device.type == "cpu" else contextlib.nullcontext():
        for start in range(0, tasks, chunk):
            part = slice(start, start + chunk)
            losses, grads = _chunk_meta_loss(plan, parameters, x_support[part], y_support[part], x_query[part],
                                             y_query[part], inner_lr, inner_steps, first_order, loss)
            total = total + losses.sum()
            if sums is None:
                sums = grads
            else:
                for s, g in zip(sums, grads):
                    s.add_(g)
        return total / tasks, [s.div_(tasks).contiguous() for s in sums]  # (sums: tensors of _task_sum's making)


def _chunk_meta_loss(plan: ConvNetPlan, parameters: Sequence[Tensor], x_support: Tensor, y_support: Tensor,
                     x_query: Tensor, y_query: Tensor, inner_lr: float, inner_steps: int, first_order: bool,
                     loss: str) -> tuple[Tensor, list[Tensor]]:
    """Every task's query loss [T] and the sum over tasks of its gradient w.r.t. the meta parameters."""
    tasks = x_support.shape[0]
    # the meta weights for every task: a conv's as a view (_block copies it into a grouped weight when read), the
    # small ones copied once (so that reading them flat copies nothing)
    weights = [p.detach().expand(tasks, *p.shape) for p in parameters]
    weights = [w if w.dim() == 5 else w.contiguous() for w in weights]
    support, query = _task_major(x_support), _task_major(x_query)
    steps = []  # second order: what each inner step's Hessian-vector product reads (one step's activations)
    for _ in range(inner_steps):
        blocks, head = _split(plan, weights)
        f = _forward(plan, blocks, head, support)
        _, g_out, p = _loss(loss, f.out, y_support)
        grads, b = _backward(plan, blocks, head, f, g_out, keep=not first_order)
        del blocks, head  # (the first step's is a copy of the meta weights: _step_back makes it again)
        if not first_order:
            steps.append((weights, f, b, p))
        weights = [g.mul_(-inner_lr).add_(w) for w, g in zip(weights, grads)]  # w - lr g, in the gradient's memory
        del f, b, p, grads  # (the peak memory: nothing of this step kept past here but steps')
    blocks, head = _split(plan, weights)
    del weights
    f = _forward(plan, blocks, head, query)
    losses, g_out, _ = _loss(loss, f.out, y_query)
    v, _ = _backward(plan, blocks, head, f, g_out, keep=False)
    del blocks, head, f
    while steps:
        _step_back(plan, *steps.pop(), loss, v, inner_lr)
    return losses, [_task_sum(vi) for vi in v]


def _task_sum(t: Tensor) -> Tensor:
    """t [T, ...] summed over the tasks. A conv weight's (a view of a _Grouped's channels-last flat, in memory
    [T, C, k, k, Cin]) is summed over that memory as [T, C*k*k*Cin] rows, and comes out channels-last: torch's
    reduction over the view's own strides is seven times slower (111 against 15 us on conv4's [8, 64, 64, 3, 3])."""
    if t.dim() == 5:
        rows = t.permute(0, 1, 3, 4, 2)  # [T, C, k, k, Cin]
        if rows.is_contiguous():
            return rows.reshape(t.shape[0], -1).sum(0).view(rows.shape[1:]).permute(0, 3, 1, 2)
    return t.sum(0)


class _MetaLoss(torch.autograd.Function):
    """meta_loss_and_gradient as a differentiable scalar: its backward hands out the gradient computed with it
    (the meta-loss cannot be differentiated twice)."""

    @staticmethod
    def forward(ctx, settings, x_support, y_support, x_query, y_query, *parameters):
        with torch.no_grad():
            loss, grads = meta_loss_and_gradient(settings[0], parameters, x_support, y_support, x_query, y_query,
                                                 *settings[1:])
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None,) * 5 + tuple(grad * g for g in ctx.saved_tensors)


def meta_loss(plan: ConvNetPlan, parameters: Sequence[Tensor], x_support: Tensor, y_support: Tensor,
              x_query: Tensor, y_query: Tensor, inner_lr: float, inner_steps: int, first_order: bool,
              loss: str, max_tasks_per_chunk: Optional[int] = None) -> Tensor:
    """meta_loss_and_gradient's meta-loss, differentiable w.r.t. ``parameters`` (its gradient comes with it)."""
    in_channels = parameters[0].shape[1]
    for name, x in (("x_support", x_support), ("x_query", x_query)):
        if x.dim() != 5 or x.shape[2] != in_channels:
            raise ValueError(f"{name} must be [T, N, {in_channels}, H, W] images for this model, got shape "
                             f"{list(x.shape)}")
    settings = (plan, inner_lr, inner_steps, first_order, loss, max_tasks_per_chunk)
    return _MetaLoss.apply(settings, x_support, y_support, x_query, y_query, *parameters)
