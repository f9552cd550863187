"""Public ops: the same schemas whichever backend runs them.

With the compiled extension, the kernels and their autograd are C++ (csrc/). Without it, this
module defines the same ops with the pure-torch kernels of reference.py and registers their
autograd here. Fake (meta) kernels are registered for both, so torch.compile traces either.
Everything above this module calls these ops and never asks which backend runs.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _ext, reference

__all__ = [
    "linear_relu",
    "linear_relu_backward",
    "sgd_step",
    "sgd_step_",
    "maml_mlp_loss",
    "mlp_loss_grad",
    "optimizer_step_",
    "mlp_train_epoch_",
    "maml_mlp_meta_step_",
    "maml_mlp_meta_steps_",
    "reptile_mlp_step_",
    "backend_info",
    "SCHEMAS",
]

# The schemas of csrc/ops.cpp; the tests check that the two agree.
SCHEMAS = {
    "linear_relu": "linear_relu(Tensor x, Tensor weight, Tensor bias) -> Tensor",
    "linear_relu_backward": (
        "linear_relu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, bool[3] output_mask)"
        " -> (Tensor?, Tensor?, Tensor?)"
    ),
    "sgd_step": "sgd_step(Tensor[] params, Tensor[] grads, Tensor[] lr) -> Tensor[]",
    "sgd_step_": "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] lr) -> ()",
    "maml_mlp_meta_grad": (
        "maml_mlp_meta_grad(Tensor[] params, Tensor[] lr, Tensor x_support, Tensor y_support, Tensor x_query,"
        " Tensor y_query, int inner_steps, bool first_order, str loss, int first_adapted_layer, bool compute_grad,"
        " bool compute_lr_grad, bool per_step_lr=False, float[] step_weights=[]) -> (Tensor, Tensor[], Tensor[])"
    ),
    "maml_mlp_loss": (
        "maml_mlp_loss(Tensor[] params, Tensor[] lr, Tensor x_support, Tensor y_support, Tensor x_query,"
        " Tensor y_query, int inner_steps, bool first_order, str loss, int first_adapted_layer,"
        " bool per_step_lr=False, float[] step_weights=[]) -> Tensor"
    ),
    "mlp_loss_grad": "mlp_loss_grad(Tensor[] params, Tensor x, Tensor y, str loss) -> Tensor[]",
    "mlp_loss_hessian_times": (
        "mlp_loss_hessian_times(Tensor[] params, Tensor x, Tensor y, str loss, Tensor?[] direction) -> Tensor[]"
    ),
    "optimizer_step_": (
        "optimizer_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state, str optimizer, float[] settings) -> ()"
    ),
    "mlp_train_epoch_": (
        "mlp_train_epoch_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state, Tensor x, Tensor y,"
        " Tensor? order, int batch_size, str loss, str optimizer, float[] settings) -> Tensor"
    ),
    "maml_mlp_meta_step_": (
        "maml_mlp_meta_step_(Tensor(a!)[] params, Tensor(b!)[] lr, Tensor(c!)[] grads, Tensor(d!)[] state,"
        " Tensor x_support, Tensor y_support, Tensor x_query, Tensor y_query, int inner_steps, bool first_order,"
        " str loss, int first_adapted_layer, bool learn_lr, str optimizer, float[] settings,"
        " bool per_step_lr=False, float[] step_weights=[]) -> Tensor"
    ),
    "maml_mlp_meta_steps_": (
        "maml_mlp_meta_steps_(Tensor(a!)[] params, Tensor(b!)[] lr, Tensor(c!)[] grads, Tensor(d!)[] state,"
        " Tensor x_support, Tensor y_support, Tensor x_query, Tensor y_query, int inner_steps, bool first_order,"
        " str loss, int first_adapted_layer, bool learn_lr, str optimizer, float[] settings,"
        " bool per_step_lr=False, float[] step_weights=[]) -> Tensor"
    ),
    "reptile_mlp_step_": (
        "reptile_mlp_step_(Tensor(a!)[] params, Tensor x_support, Tensor y_support, int inner_steps, float inner_lr,"
        " float outer_lr, str loss) -> Tensor"
    ),
}

_extension = _ext.load()


@contextlib.contextmanager
def reused_cpu_blocks():
    """Within it, torch's CPU allocator takes large blocks (64 KiB or more) from the extension's block cache, which
    keeps each freed block for the next request of its size or of at least half of it: a hot path that makes the same
    large tensors at every call then faults in no fresh pages (glibc hands freed large blocks back to the system;
    conv4's meta-step: 7 600-10 400 page faults and 15-20% of its time). A no-op without the extension, and where
    another allocator than torch's default was installed with a priority. empty_cpu_cache() frees the blocks."""
    if _extension is None:
        yield
        return
    _extension.block_cache_enter()
    try:
        yield
    finally:
        _extension.block_cache_exit()


def empty_cpu_cache() -> int:
    """Frees the large CPU blocks that the block cache keeps for reuse (reused_cpu_blocks) and no tensor holds;
    returns the bytes freed (0 without the extension)."""
    return _extension.block_cache_release() if _extension is not None else 0


# Ops with one kernel per device; the MAML ops are composites of ATen ops (any device); the training
# ops update parameters and optimizer state in place, outside autograd (as torch.optim does).
DEVICE_OPS = ("linear_relu", "linear_relu_backward", "sgd_step", "sgd_step_")
MAML_OPS = ("maml_mlp_meta_grad", "maml_mlp_loss", "mlp_loss_grad", "mlp_loss_hessian_times")
TRAINING_OPS = ("optimizer_step_", "mlp_train_epoch_", "maml_mlp_meta_step_", "maml_mlp_meta_steps_",
                "reptile_mlp_step_")


def _register_fallback() -> torch.library.Library:
    lib = torch.library.Library("metalearn_fast", "DEF")
    for name in DEVICE_OPS:
        lib.define(SCHEMAS[name])
        lib.impl(name, getattr(reference, name), "CompositeExplicitAutograd")
    # The reference MAML and training ops differentiate by autograd inside, so they run above the autograd key.
    for name in MAML_OPS + TRAINING_OPS:
        lib.define(SCHEMAS[name])
        lib.impl(name, getattr(reference, name), "CompositeImplicitAutograd")

    def linear_relu_setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output)

    def linear_relu_bwd(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        return torch.ops.metalearn_fast.linear_relu_backward(grad_out, x, weight, out, list(ctx.needs_input_grad))

    def linear_relu_backward_setup(ctx, inputs, output):
        grad_out, x, weight, out, _ = inputs
        ctx.save_for_backward(grad_out, x, weight, out)

    def linear_relu_backward_bwd(ctx, ggx, ggw, ggb):
        d_grad_out, d_x, d_weight = reference.linear_relu_backward_backward(*ctx.saved_tensors, ggx, ggw, ggb)
        return d_grad_out, d_x, d_weight, None, None

    def sgd_step_setup(ctx, inputs, output):
        params, grads, lr = inputs
        ctx.count = len(params)
        ctx.save_for_backward(*grads, *lr)

    def sgd_step_bwd(ctx, grad_outputs):
        saved = ctx.saved_tensors
        grads, lr = saved[: ctx.count], saved[ctx.count :]
        d_params, d_grads = [], []
        d_lr: list[Optional[Tensor]] = [None] * len(lr)
        for i, (go, g) in enumerate(zip(grad_outputs, grads)):
            slot = 0 if len(lr) == 1 else i
            d_params.append(go)
            d_grads.append(None if go is None else -(lr[slot] * go))
            if go is not None:
                term = -(go * g).sum_to_size(lr[slot].shape)
                d_lr[slot] = term if d_lr[slot] is None else d_lr[slot] + term
        return d_params, d_grads, d_lr

    torch.library.register_autograd("metalearn_fast::linear_relu", linear_relu_bwd, setup_context=linear_relu_setup)
    torch.library.register_autograd(
        "metalearn_fast::linear_relu_backward", linear_relu_backward_bwd, setup_context=linear_relu_backward_setup
    )
    torch.library.register_autograd("metalearn_fast::sgd_step", sgd_step_bwd, setup_context=sgd_step_setup)
    return lib


if _extension is None:
    _fallback_library = _register_fallback()


@torch.library.register_fake("metalearn_fast::linear_relu")
def _linear_relu_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[-2]))


@torch.library.register_fake("metalearn_fast::linear_relu_backward")
def _linear_relu_backward_fake(grad_out, x, weight, out, output_mask):
    return (
        torch.empty_like(x) if output_mask[0] else None,
        torch.empty_like(weight) if output_mask[1] else None,
        grad_out.new_empty(weight.shape[:-1]) if output_mask[2] else None,
    )


@torch.library.register_fake("metalearn_fast::sgd_step")
def _sgd_step_fake(params, grads, lr):
    return [torch.empty_like(p) for p in params]


@torch.library.register_fake("metalearn_fast::sgd_step_")
def _sgd_step_inplace_fake(params, grads, lr):
    return None


def _maml_mlp_meta_grad_fake(params, lr, x_support, y_support, x_query, y_query, inner_steps, first_order, loss,
                             first_adapted_layer, compute_grad, compute_lr_grad, per_step_lr=False, step_weights=()):
    grads = [torch.empty_like(p) for p in params] if compute_grad else []
    lr_grads = [torch.empty_like(r) for r in lr] if compute_lr_grad else []
    return x_query.new_empty(()), grads, lr_grads


def _maml_mlp_loss_fake(params, lr, x_support, y_support, x_query, y_query, inner_steps, first_order, loss,
                        first_adapted_layer, per_step_lr=False, step_weights=()):
    return x_query.new_empty(())


def _like_params_fake(params, *_):
    return [torch.empty_like(p) for p in params]


if _extension is not None:  # the fallback's composites trace themselves
    torch.library.register_fake("metalearn_fast::maml_mlp_meta_grad")(_maml_mlp_meta_grad_fake)
    torch.library.register_fake("metalearn_fast::maml_mlp_loss")(_maml_mlp_loss_fake)
    torch.library.register_fake("metalearn_fast::mlp_loss_grad")(_like_params_fake)
    torch.library.register_fake("metalearn_fast::mlp_loss_hessian_times")(_like_params_fake)


def _optimizer_step_fake(params, grads, state, optimizer, settings):
    return None


def _mlp_train_epoch_fake(params, grads, state, x, y, order, batch_size, loss, optimizer, settings):
    return params[0].new_empty(((x.shape[0] + batch_size - 1) // batch_size,))


def _reptile_mlp_step_fake(params, x_support, y_support, inner_steps, inner_lr, outer_lr, loss):
    return x_support.new_empty(())


def _maml_mlp_meta_step_fake(params, lr, grads, state, x_support, y_support, x_query, y_query, inner_steps,
                             first_order, loss, first_adapted_layer, learn_lr, optimizer, settings, per_step_lr=False,
                             step_weights=()):
    return x_query.new_empty(())


def _maml_mlp_meta_steps_fake(params, lr, grads, state, x_support, y_support, x_query, y_query, inner_steps,
                              first_order, loss, first_adapted_layer, learn_lr, optimizer, settings, per_step_lr=False,
                              step_weights=()):
    return x_query.new_empty((x_query.shape[0],))


if _extension is not None:  # the fallback's composites trace themselves
    for _name, _fake in (("optimizer_step_", _optimizer_step_fake), ("mlp_train_epoch_", _mlp_train_epoch_fake),
                         ("reptile_mlp_step_", _reptile_mlp_step_fake),
                         ("maml_mlp_meta_step_", _maml_mlp_meta_step_fake),
                         ("maml_mlp_meta_steps_", _maml_mlp_meta_steps_fake)):
        torch.library.register_fake(f"metalearn_fast::{_name}")(_fake)


_maml_mlp_meta_grad = torch.ops.metalearn_fast.maml_mlp_meta_grad.default
_maml_mlp_loss = torch.ops.metalearn_fast.maml_mlp_loss.default
_mlp_loss_grad = torch.ops.metalearn_fast.mlp_loss_grad.default
_linear_relu = torch.ops.metalearn_fast.linear_relu.default
_linear_relu_backward = torch.ops.metalearn_fast.linear_relu_backward.default
_sgd_step = torch.ops.metalearn_fast.sgd_step.default
_sgd_step_inplace = torch.ops.metalearn_fast.sgd_step_.default
optimizer_step_ = torch.ops.metalearn_fast.optimizer_step_.default
mlp_train_epoch_ = torch.ops.metalearn_fast.mlp_train_epoch_.default
_maml_mlp_meta_step = torch.ops.metalearn_fast.maml_mlp_meta_step_.default
_maml_mlp_meta_steps = torch.ops.metalearn_fast.maml_mlp_meta_steps_.default
reptile_mlp_step_ = torch.ops.metalearn_fast.reptile_mlp_step_.default


# Eager calls take the extension's unboxed entry points; torch.compile traces the registered op.
_linear_relu_eager = _extension.linear_relu if _extension is not None else _linear_relu
_maml_mlp_meta_step_eager = _extension.maml_mlp_meta_step_ if _extension is not None else _maml_mlp_meta_step
_maml_mlp_meta_steps_eager = _extension.maml_mlp_meta_steps_ if _extension is not None else _maml_mlp_meta_steps
_is_compiling = torch.compiler.is_compiling


def maml_mlp_meta_step_(params, lr, grads, state, x_support, y_support, x_query, y_query, inner_steps: int,
                        first_order: bool, loss: str, first_adapted_layer: int, learn_lr: bool, optimizer: str,
                        settings: Sequence[float], per_step_lr: bool = False,
                        step_weights: Sequence[float] = ()) -> Tensor:
    """The op maml_mlp_meta_step_ (see SCHEMAS and csrc/ops.cpp): a whole MAML meta-step of an MLP, the
    meta-gradient into ``grads`` and the optimizer's update on params (and lr when learn_lr) and state."""
    call = _maml_mlp_meta_step if _is_compiling() else _maml_mlp_meta_step_eager
    return call(params, lr, grads, state, x_support, y_support, x_query, y_query, inner_steps, first_order, loss,
                first_adapted_layer, learn_lr, optimizer, settings, per_step_lr, list(step_weights))


def maml_mlp_meta_steps_(params, lr, grads, state, x_support, y_support, x_query, y_query, inner_steps: int,
                         first_order: bool, loss: str, first_adapted_layer: int, learn_lr: bool, optimizer: str,
                         settings: Sequence[float], per_step_lr: bool = False,
                         step_weights: Sequence[float] = ()) -> Tensor:
    """The op maml_mlp_meta_steps_: maml_mlp_meta_step_ on each of S meta-batches stacked on a first dimension
    (x_support [S, T, K, I], ...), in turn, in one call. Returns the S meta-losses."""
    call = _maml_mlp_meta_steps if _is_compiling() else _maml_mlp_meta_steps_eager
    return call(params, lr, grads, state, x_support, y_support, x_query, y_query, inner_steps, first_order, loss,
                first_adapted_layer, learn_lr, optimizer, settings, per_step_lr, list(step_weights))


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """relu(x @ weight^T + bias) in one pass, differentiable twice.

    x: [T, N, I] or [N, I]; weight: [T, O, I] or [O, I]; bias: [T, O] or [O] -> [T, N, O] or [N, O].
    """
    if _is_compiling():
        return _linear_relu(x, weight, bias)
    return _linear_relu_eager(x, weight, bias)


def linear_relu_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, out: Tensor, output_mask: Sequence[bool] = (True, True, True)
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_x, grad_weight, grad_bias) of linear_relu given its output ``out``; None where masked off."""
    return _linear_relu_backward(grad_out, x, weight, out, list(output_mask))


LearningRate = Union[float, Tensor, Sequence[Tensor]]
"""The inner-loop learning rate every op takes, with one meaning everywhere:

- a number, or a 0-dim tensor (which can be learned): one rate for every parameter;
- a list with one tensor per parameter, each 0-dim or broadcast against its parameter from the right
  (Meta-SGD: one learned rate per element);
- ops on per-task parameters [T, ...] (``sgd_step``, ``sgd_step_``) also take a [T] tensor: one rate per task.
"""


def _number_as_rate(lr: float, like: Tensor) -> Tensor:
    """A learning rate given as a number, as the 0-dim tensor the ops take (like's dtype and device)."""
    return torch.tensor(float(lr), dtype=like.dtype, device=like.device)


def _rates(params: Sequence[Tensor], lr: LearningRate, op: str = "sgd_step") -> list[Tensor]:
    """lr (a LearningRate) in the ops' form: one tensor shared by all params, or one per param. A [T] tensor is
    taken only by the ops on per-task parameters (op "sgd_step")."""
    if len(params) == 0:
        raise ValueError(f"{op}: params is empty")
    if isinstance(lr, numbers.Real):
        return [_number_as_rate(lr, params[0])]
    if isinstance(lr, Tensor):
        if lr.dim() == 0:
            return [lr]
        if lr.dim() == 1 and op == "sgd_step":
            for i, p in enumerate(params):
                if p.dim() == 0 or p.shape[0] != lr.shape[0]:
                    raise ValueError(
                        f"sgd_step: a 1-dim lr of length {lr.shape[0]} is one rate per task, but params[{i}] "
                        f"has shape {list(p.shape)}; pass a list for one rate tensor per param"
                    )
            return [lr.view(lr.shape[0], *([1] * (p.dim() - 1))) for p in params]
        per_task = ", a [T] tensor" if op == "sgd_step" else ""
        raise ValueError(f"{op}: lr must be a number, a 0-dim tensor{per_task} or a list of tensors, got shape "
                         f"{list(lr.shape)}")
    if isinstance(lr, (list, tuple)):
        return list(lr)
    raise TypeError(f"{op}: lr must be a number, a tensor or a list of tensors, got {type(lr).__name__}")


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], lr: LearningRate) -> list[Tensor]:
    """[p - lr * g for every param] in one call: the batched inner-loop step of MAML.

    Differentiable in params, grads and lr (a LearningRate: one rate, one per task, or one per param)."""
    params = list(params)
    return _sgd_step(params, list(grads), _rates(params, lr))


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], lr: LearningRate) -> None:
    """In place: p -= lr * g for every param, outside autograd (first-order MAML, Reptile, fine-tuning)."""
    params = list(params)
    _sgd_step_inplace(params, list(grads), _rates(params, lr))


def maml_mlp_loss(
    params: Sequence[Tensor],
    lr: LearningRate,
    x_support: Tensor,
    y_support: Tensor,
    x_query: Tensor,
    y_query: Tensor,
    *,
    inner_steps: int = 1,
    first_order: bool = False,
    loss: str = "mse",
    first_adapted_layer: int = 0,
    per_step_lr: bool = False,
    step_weights: Sequence[float] = (),
) -> Tensor:
    """MAML meta-loss of an MLP (ReLU between layers) over a meta-batch, differentiable w.r.t. params and lr.

    params: [W0 [O,I], b0 [O], W1, b1, ...] shared by the tasks; lr: a LearningRate (one rate, or one tensor
    per param for Meta-SGD); x_*: [T, K, I]; y_*: [T, K, D] for
    "mse" or [T, K] int64 labels for "cross_entropy". The mean over tasks of the query loss after
    inner_steps SGD steps on each task's support loss; layers before first_adapted_layer stay fixed
    in the inner loop (ANIL). MAML++: with per_step_lr, lr is a list of [inner_steps] tensors (one rate per
    inner step: LSLR); step_weights (one per inner step) make the loss the weighted sum of the query losses
    after every inner step (the multi-step loss). Differentiable once: with the extension, its gradient comes
    from the op's analytic reverse sweep (one autograd node, in C++); on the fallback, from autograd."""
    params = list(params)
    rates = ([lr] if isinstance(lr, Tensor) else list(lr)) if per_step_lr else _rates(params, lr, "maml_mlp_loss")
    return _maml_mlp_loss(params, rates, x_support, y_support, x_query, y_query, int(inner_steps), bool(first_order),
                          str(loss), int(first_adapted_layer), bool(per_step_lr), [float(w) for w in step_weights])


def mlp_loss_grad(params: Sequence[Tensor], x: Tensor, y: Tensor, loss: str = "mse") -> list[Tensor]:
    """The gradient of the mean loss of an MLP on one task w.r.t. its params, differentiable again.

    params: [W0 [O,I], b0 [O], W1, b1, ...] (ReLU between layers); x: [N, I]; y: [N, O] for "mse" or [N]
    int64 labels for "cross_entropy". Returns one gradient per param. With the extension it is one op and
    one autograd node whose backward is the loss's analytic Hessian-vector product (any order); on the
    fallback, autograd.grad with create_graph. x and y must not require grad."""
    return _mlp_loss_grad(list(params), x, y, str(loss))


def _has_kernel(dispatch_key: str) -> bool:
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"metalearn_fast::{name}", dispatch_key) for name in DEVICE_OPS
    )


def backend_info() -> dict:
    """What was compiled, what runs, and why the extension is not active when it is not."""
    module = _extension
    info = {
        "active": "extension" if module is not None else "torch",
        "reason": _ext.reason(),
        "compiled_cpu": module is not None and _has_kernel("CPU"),
        "compiled_cuda": module is not None and bool(module.WITH_CUDA) and _has_kernel("CUDA"),
        "cuda_arch_list": module.CUDA_ARCH_LIST if module is not None else "",
        "built_against_torch": module.TORCH_VERSION if module is not None else "",
        "built_against_cuda": module.CUDA_VERSION if module is not None else "",
        "why_no_cuda_kernels": module.NO_CUDA_REASON if module is not None else "",
        # the MAML op on the CPU: a per-task kernel for MLPs up to this weight size (AVX2 CPUs)
        "cpu_maml_task_kernel": bool(module.CPU_TASK_KERNEL) if module is not None else False,
        "cpu_maml_task_kernel_max_layer": module.CPU_TASK_KERNEL_MAX_LAYER if module is not None else 0,
        # the hand-written CPU kernels' instruction set: what runs ("none", "avx2", "avx512"; lowered by
        # METALEARN_FAST_CPU_SIMD) and the best this CPU has
        "cpu_simd": module.cpu_simd() if module is not None else "none",
        "cpu_simd_available": module.CPU_SIMD_AVAILABLE if module is not None else "none",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "",
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
    }
    return info
