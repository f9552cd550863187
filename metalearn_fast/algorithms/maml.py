"""The MAML engine: MAML and its family (FOMAML, Meta-SGD, ANIL) in class MAML, and Reptile.

Both run a whole meta-batch of T tasks at once on per-task parameters ``[T, ...]`` (the meta
parameters expanded along a new leading task dimension, then updated per task), the way the model's
``ModelPlan`` (metalearn_fast/plan.py) says, chosen once in ``__init__``:

- "fused": an MLP with a built-in loss: the whole meta-step is one op (``ops.maml_mlp_loss``, and with
  torch.optim's Adam/AdamW/SGD ``ops.maml_mlp_meta_step_``, the optimizer's update included);
- "batched": any other stack of Linear(+ReLU) layers (``MLP``, ``SimpleNet``, ``nn.Sequential`` of
  ``nn.Linear``/``nn.ReLU``/``FusedLinearReLU``/``nn.Identity``), or an MLP with a callable loss: batched
  matrix products, ``ops.linear_relu`` per hidden layer, one ``ops.sgd_step`` per inner step;
- "module": any other ``nn.Module``, through ``torch.func.functional_call`` under ``torch.func.vmap`` over
  tasks: ``meta_loss`` as an inner loop of ``torch.func.grad`` on the meta weights all tasks share
  (``_func_grad_meta_loss``), ``adapt`` on per-task parameters (or a loop over tasks when the model cannot
  run under vmap).

Every plan gives the numbers of a per-task loop with ``torch.autograd.grad``. ``max_tasks_per_chunk`` bounds
the tasks any of them holds at once.

Names: ANIL's ``adapt_head_only=True`` is, in the fused ops (``ops.maml_mlp_loss``, ``maml_mlp_meta_step_``)
and their C++, ``first_adapted_layer`` = the index of the last layer: the inner loop adapts layers
first_adapted_layer.. only. A learning rate means what ``ops.LearningRate`` says, in every op.

Under an initialised torch.distributed process group of more than one process, ``meta_step`` splits the
meta-batch across ranks: each rank passes its own shard (``metalearn_fast.distributed.shard``) and the
update equals that of one process on the whole batch (see metalearn_fast/distributed.py).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from ._checks import check_int, check_positive
from .ops import _number_as_rate, maml_mlp_loss, maml_mlp_meta_step_, reptile_mlp_step_, sgd_step, sgd_step_
from .optim import FusedUpdate, UpdateCache
from .plan import ModelPlan
from .tasks import TaskBatch, check_task_set

__all__ = ["MAML", "Reptile"]

LossArg = Union[str, Callable[[Tensor, Tensor], Tensor]]


def _mse_per_task(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each task: pred, target [T, K, ...] -> [T]."""
    return (pred - target).pow(2).flatten(1).mean(1)


def _cross_entropy_per_task(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each task: logits [T, K, C], labels [T, K] int64 -> [T]."""
    tasks, examples, classes = logits.shape
    losses = F.cross_entropy(logits.reshape(tasks * examples, classes), labels.reshape(-1), reduction="none")
    return losses.view(tasks, examples).mean(1)


BUILTIN_LOSSES = {"mse": _mse_per_task, "cross_entropy": _cross_entropy_per_task}


def _head_indices(model: nn.Module, parameters: Sequence[Tensor]) -> list[int]:
    """Indices in ``parameters`` of the head: the parameters of the last submodule that owns any."""
    owners = [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]
    head = {id(p) for p in owners[-1].parameters(recurse=False)}
    return [i for i, p in enumerate(parameters) if id(p) in head]


def _check_normalization(model: nn.Module) -> None:
    """Batch statistics must be each task's own: running statistics, which one buffer keeps for the whole model,
    would mix the tasks of a meta-batch (and under vmap cannot be updated per task), so they are refused."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            raise ValueError(
                f"model.{name} ({type(module).__name__}) keeps running statistics, which would mix the tasks of a "
                "meta-batch; build it with track_running_stats=False: every forward pass then normalises with its "
                "own task's batch statistics, in the inner and the outer loop, as the MAML paper's models do")


class _TaskBatchedLearner(nn.Module):
    """What MAML and Reptile share: the model, the loss, its plan (metalearn_fast/plan.py) and the checks."""

    def __init__(self, model: nn.Module, loss: LossArg, max_tasks_per_chunk: Optional[int]) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError("model has no parameters to meta-learn")
        if isinstance(loss, str):
            if loss not in BUILTIN_LOSSES:
                names = ", ".join(map(repr, BUILTIN_LOSSES))
                raise ValueError(f"loss must be one of {names} or a callable, got {loss!r}")
            self._loss_fn = BUILTIN_LOSSES[loss]
        elif callable(loss):
            self._loss_fn = loss
        else:
            raise TypeError(f"loss must be 'mse', 'cross_entropy' or a callable, got {type(loss).__name__}")
        _check_normalization(model)
        self.model = model
        self.loss = loss
        # the structure is fixed here; the weights are read from the model on every call
        self.plan = ModelPlan(model, builtin_loss=isinstance(loss, str))
        self.max_tasks_per_chunk = (None if max_tasks_per_chunk is None
                                    else check_int("max_tasks_per_chunk", max_tasks_per_chunk, minimum=1))
        # under torch.distributed, the first meta_step gives every rank rank 0's weights
        self._weights_broadcast = False

    @property
    def uses_fast_path(self) -> bool:
        """True when the model is a Linear(+ReLU) stack that runs on the batched fast path (or the fused op)."""
        return self.plan.is_stack

    def _meta_parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def _fits_one_chunk(self, batch: TaskBatch) -> bool:
        """Whether max_tasks_per_chunk lets the whole batch run at once (then the fused ops may take it)."""
        return self.max_tasks_per_chunk is None or batch.num_tasks <= self.max_tasks_per_chunk

    def _broadcast_once(self) -> None:
        """Rank 0's parameters and buffers on every rank, before the first distributed update."""
        if not self._weights_broadcast:
            distributed.broadcast_parameters(self)
            self._weights_broadcast = True

    # ---- checks ----

    def _check_batch(self, batch: TaskBatch, first: Optional[Tensor] = None) -> None:
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch must be a metalearn_fast.TaskBatch, got {type(batch).__name__}")
        first = next(self.model.parameters()) if first is None else first
        self.plan.check_input(batch.x_support, "x_support", first)
        self.plan.check_input(batch.x_query, "x_query", first)

    def _check_labels(self, batch: TaskBatch, outputs: int, sets: int = 2) -> None:
        """Class labels of the first ``sets`` sets (support, query) must index the model's outputs: cross_entropy
        would index out of bounds (a device-side assert on CUDA)."""
        if self._loss_fn is _cross_entropy_per_task:
            for name, largest in list(zip(("y_support", "y_query"), batch.largest_labels))[:sets]:
                if largest >= outputs:
                    raise ValueError(f"{name} holds class label {largest} but the model has {outputs} outputs")

    def _task_losses(self, pred: Tensor, target: Tensor, target_name: str, largest_label: int) -> Tensor:
        """The loss of each task: pred [T, K, out], target [T, K, ...] -> [T]. largest_label: the largest class
        label in target (-1 for regression), known from where the data was checked."""
        self._check_target(pred.shape, target, target_name, largest_label)
        losses = self._loss_fn(pred, target)
        if not isinstance(losses, Tensor) or losses.shape != (pred.shape[0],):
            got = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"loss must return one loss per task, shape [{pred.shape[0]}], got {got}")
        return losses

    def _check_target(self, pred_shape: Sequence[int], target: Tensor, target_name: str, largest_label: int) -> None:
        """The built-in losses' demands on a target, for model outputs of shape pred_shape [T, K, out]."""
        pred_shape = list(pred_shape)
        if self._loss_fn is _mse_per_task:
            if not target.is_floating_point():
                raise ValueError(
                    f"loss='mse' needs floating-point targets but {target_name} holds class labels; "
                    "use loss='cross_entropy'"
                )
            if list(target.shape) != pred_shape:
                raise ValueError(
                    f"{target_name} must have the shape of the model's output {pred_shape}, got {list(target.shape)}"
                )
        elif self._loss_fn is _cross_entropy_per_task:
            if target.is_floating_point():
                raise ValueError(f"loss='cross_entropy' needs int64 class labels in {target_name}, got {target.dtype}")
            if len(pred_shape) != 3:
                raise ValueError(f"loss='cross_entropy' needs model outputs [T, K, classes], got {pred_shape}")
            if largest_label >= pred_shape[-1]:
                raise ValueError(
                    f"{target_name} holds class label {largest_label} but the model has {pred_shape[-1]} outputs")


class MAML(_TaskBatchedLearner):
    """Model-agnostic meta-learning on a meta-batch of tasks, and its variants:

    - ``first_order=True``: FOMAML (inner gradients taken without create_graph);
    - ``learn_inner_lr=True``: Meta-SGD (one learned rate per element of every adapted parameter,
      in ``inner_lrs``, initialised to ``inner_lr``);
    - ``adapt_head_only=True``: ANIL (the inner loop adapts only the head: the parameters of the
      model's last submodule that owns parameters, i.e. the last Linear of a stack).

    ``loss`` is "mse", "cross_entropy" or a callable ``loss(pred [T, K, out], target [T, K, ...])``
    returning the loss of each task, shape [T]. The inner loop minimises each task's own mean support
    loss; the meta-loss is the mean over tasks of the query losses after adaptation.

    MAML is an nn.Module wrapping the model, so ``torch.optim.Adam(maml.parameters())`` trains the
    meta parameters and, under Meta-SGD, the learned rates.

    ``max_tasks_per_chunk``: None runs every task at once; an integer N makes ``meta_step`` run the meta-batch in
    chunks of at most N tasks, accumulating the meta-gradient chunk by chunk: the same update, with the peak
    memory of one chunk. ``meta_loss`` always takes the whole batch (its graph holds every task).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        adapt_head_only: bool = False,
        loss: LossArg = "mse",
        max_tasks_per_chunk: Optional[int] = None,
    ) -> None:
        super().__init__(model, loss, max_tasks_per_chunk)
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.inner_steps = check_int("inner_steps", inner_steps, minimum=1)
        self.first_order = bool(first_order)
        self.learn_inner_lr = bool(learn_inner_lr)
        self.adapt_head_only = bool(adapt_head_only)
        parameters = self._meta_parameters()
        # indices (in model.parameters() order) of the parameters the inner loop updates
        self._adapted_indices = _head_indices(model, parameters) if adapt_head_only else list(range(len(parameters)))
        # the first layer the inner loop adapts, in the fused ops' terms (ANIL: the last)
        self._first_adapted_layer = self.plan.head_layer() if self.plan.is_stack and adapt_head_only else 0
        self.inner_lrs: Optional[nn.ParameterList] = None
        if learn_inner_lr:
            self.inner_lrs = nn.ParameterList([nn.Parameter(torch.full_like(parameters[i].detach(), self.inner_lr))
                                               for i in self._adapted_indices])
        self._updates = UpdateCache()

    def extra_repr(self) -> str:
        return (f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, first_order={self.first_order}, learn_inner_"
                f"lr={self.learn_inner_lr}, adapt_head_only={self.adapt_head_only}, plan={self.plan.kind}")

    def meta_loss(self, batch: TaskBatch) -> Tensor:
        """Mean over tasks of the query loss after adapting on the support set: a scalar, differentiable
        w.r.t. the model's parameters (and ``inner_lrs`` under Meta-SGD)."""
        self._check_batch(batch)
        if self.plan.kind == "fused":
            return self._fused_meta_loss(batch)
        if self.plan.uses_func_grad and not self.first_order:
            return _func_grad_meta_loss(self, batch)
        start = [p.expand(batch.num_tasks, *p.shape) for p in self._meta_parameters()]  # views: gradients flow back
        adapted = self._adapt(start, batch.x_support, batch.y_support, self.inner_steps, not self.first_order,
                              batch.largest_labels[0])
        query = self.plan.forward(adapted, batch.x_query)
        return self._task_losses(query, batch.y_query, "y_query", batch.largest_labels[1]).mean()

    def meta_step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> Tensor:
        """One meta-update: zero_grad, backward of ``meta_loss(batch)``, optimizer.step(). Returns the meta-loss,
        detached, as a 0-dim tensor on the model's device: reading it (``float(loss)``) is the only host sync.
        Under a torch.distributed process group of more than one process, ``batch`` is this rank's shard and the
        step that of one process on the whole batch (distributed.step_on_mean_gradients)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if distributed.is_distributed():
            self._broadcast_once()
            return distributed.step_on_mean_gradients(optimizer, lambda: self._backward(batch), batch.num_tasks,
                                                      "MAML.meta_step")
        update = self._fused_update(optimizer)
        if not isinstance(update, str) and self._fits_one_chunk(batch):
            return self._fused_meta_step(batch, update)
        optimizer.zero_grad()
        loss = self._backward(batch)
        optimizer.step()
        return loss

    def _backward(self, batch: TaskBatch) -> Tensor:
        """meta_loss(batch).backward(), in chunks of at most max_tasks_per_chunk tasks (each chunk's loss weighted
        by its share of the tasks, so that the gradients add up to the batch's): peak memory is one chunk's.
        Returns the meta-loss, detached."""
        total = None
        for chunk in batch.chunks(self.max_tasks_per_chunk):
            loss = self.meta_loss(chunk)
            if chunk is not batch:
                loss = loss * (chunk.num_tasks / batch.num_tasks)
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def meta_step_path(self, optimizer: torch.optim.Optimizer) -> str:
        """How ``meta_step(batch, optimizer)`` runs: "fused" (one C++ call: the meta-gradient and the optimizer's
        update on its own state; a batch of more than max_tasks_per_chunk tasks runs in chunks, meta_loss and
        backward each, then optimizer.step) or "python: <why not>" (meta_loss, backward, optimizer.step)."""
        if distributed.is_distributed():
            return "python: the meta-gradients are averaged over the ranks before the step"
        update = self._fused_update(optimizer)
        return update if isinstance(update, str) else "fused"

    def adapt(self, x_support: Tensor, y_support: Tensor, steps: Optional[int] = None) -> list[Tensor]:
        """Adapt to each task's support set: ``steps`` (default inner_steps) SGD steps from the meta parameters.

        x_support: [T, K, ...], y_support: [T, K, ...] or [T, K] labels. Returns the adapted parameters of
        every task, detached: one [T, *p.shape] tensor per p in model.parameters() (under ANIL the body's
        entries are the meta parameters). Works under torch.no_grad().
        """
        steps = self.inner_steps if steps is None else check_int("steps", steps, minimum=0)
        largest = check_task_set(x_support, y_support, "x_support", "y_support")
        parameters = self._meta_parameters()
        self.plan.check_input(x_support, "x_support", parameters[0])
        with torch.enable_grad():
            # leaves of their own: adapting needs no graph into the meta parameters
            start = [p.detach().expand(x_support.shape[0], *p.shape).requires_grad_() for p in parameters]
            adapted = self._adapt(start, x_support, y_support, steps, False, largest)
        return [p.detach() for p in adapted]

    def predict(self, adapted: Sequence[Tensor], x: Tensor) -> Tensor:
        """The model with each task's adapted parameters (from ``adapt``) on that task's inputs.

        x: [T, Q, ...] -> [T, Q, out]."""
        adapted = list(adapted)
        self.plan.check_adapted(adapted, x, self._meta_parameters())
        return self.plan.forward(adapted, x)

    def _adapt(self, start: list[Tensor], x_support: Tensor, y_support: Tensor, steps: int, create_graph: bool,
               largest_label: int) -> list[Tensor]:
        """``steps`` SGD steps on each task's support loss from ``start`` (per-task [T, ...] tensors in
        model.parameters() order), updating the adapted parameters only. Returns the new list.

        On a stack under ANIL the body's features are the same at every inner step, so they are computed
        once, on the meta weights all tasks share, and only the head runs per step."""
        params, indices, inputs, first_layer = list(start), self._adapted_indices, x_support, 0
        if self.plan.is_stack and self.adapt_head_only:
            first_layer = self.plan.head_layer()
            inputs = self.plan.shared_body(start, x_support)
        rates = list(self.inner_lrs) if self.inner_lrs is not None else self.inner_lr
        for _ in range(steps):
            pred = self.plan.forward(params[2 * first_layer:], inputs, first_layer)
            losses = self._task_losses(pred, y_support, "y_support", largest_label)
            adapted = [params[i] for i in indices]
            # the sum, not the mean: task t's parameters then get the gradient of task t's own loss
            grads = torch.autograd.grad(losses.sum(), adapted, create_graph=create_graph)
            for i, new in zip(indices, sgd_step(adapted, grads, rates)):
                params[i] = new
        return params

    def _inner_lr_tensor(self, like: Tensor) -> Tensor:
        """inner_lr as a 0-dim tensor of like's dtype and device, made once rather than every step."""
        if getattr(self, "_rate_key", None) != (self.inner_lr, like.dtype, like.device):
            self._rate_key, self._rate = (self.inner_lr, like.dtype, like.device), _number_as_rate(self.inner_lr, like)
        return self._rate

    def _fused_update(self, optimizer: torch.optim.Optimizer) -> Union[FusedUpdate, str]:
        """The optimizer's update as the fused meta-step applies it, or why it cannot (a 'python: ...' sentence)."""
        if self.plan.kind != "fused":
            return "python: the model is not an MLP with a built-in loss"
        if self.learn_inner_lr and self.adapt_head_only:
            return "python: Meta-SGD with ANIL learns rates for the head only"
        return self._updates.get(optimizer, self._meta_parameters() + list(self.inner_lrs or []))

    def _fused_meta_loss(self, batch: TaskBatch) -> Tensor:
        """The whole meta-loss as one op (ops.maml_mlp_loss): inner loop and analytic meta-gradient."""
        parameters = self._meta_parameters()
        if self.inner_lrs is None:
            rates: Union[Tensor, list[Tensor]] = self._inner_lr_tensor(parameters[0])
        else:  # one rate tensor per parameter; the body's are unused under ANIL
            rates = [torch.zeros((), dtype=p.dtype, device=p.device) for p in parameters]
            for i, rate in zip(self._adapted_indices, self.inner_lrs):
                rates[i] = rate
        outputs = parameters[-2].shape[0]
        for x, y, name, largest in ((batch.x_support, batch.y_support, "y_support", batch.largest_labels[0]),
                                    (batch.x_query, batch.y_query, "y_query", batch.largest_labels[1])):
            self._check_target((*x.shape[:2], outputs), y, name, largest)
        return maml_mlp_loss(parameters, rates, batch.x_support, batch.y_support, batch.x_query, batch.y_query,
                             inner_steps=self.inner_steps, first_order=self.first_order, loss=self.loss,
                             first_adapted_layer=self._first_adapted_layer)

    def _fused_meta_step(self, batch: TaskBatch, update: FusedUpdate) -> Tensor:
        """meta_step as one op: ops.maml_mlp_meta_step_ (meta-loss, meta-gradient into .grad, optimizer update)."""
        params = update.tensors[: len(update.tensors) - (len(self.inner_lrs) if self.learn_inner_lr else 0)]
        self._check_batch(batch, params[0])
        self._check_labels(batch, params[-2].shape[0])
        rates = list(self.inner_lrs) if self.learn_inner_lr else [self._inner_lr_tensor(params[0])]
        grads, state, settings = update.arguments()
        with torch.no_grad():
            loss = maml_mlp_meta_step_(
                params, rates, grads, state, batch.x_support, batch.y_support, batch.x_query, batch.y_query,
                self.inner_steps, self.first_order, self.loss, self._first_adapted_layer, self.learn_inner_lr,
                update.kind, settings)
        update.finish(state)
        return loss


def _func_grad_meta_loss(maml: MAML, batch: TaskBatch) -> Tensor:
    """MAML.meta_loss on the module path, second order, as torch.func writes it: vmap over tasks of an inner
    loop of torch.func.grad, the meta weights shared by all tasks (in_dims None). Shared weights let the first
    inner step run as one convolution or matrix product over every task's examples and sum the meta-gradient
    in one op, where per-task copies need grouped ones (BENCHMARKS.md, conv4 second order: 0.88x -> 1.12x a
    hand-written torch.func vmap). First order keeps the per-task copies, whose inner gradient needs no graph (faster there). Models
    that cannot run so fall back, once and for all, to MAML._adapt's per-task parameters (the same numbers)."""
    names, parameters = maml.plan.parameter_names, maml._meta_parameters()
    buffers = dict(maml.model.named_buffers())
    rates = list(maml.inner_lrs) if maml.inner_lrs is not None else [maml.inner_lr] * len(maml._adapted_indices)
    support_label, query_label = batch.largest_labels

    def loss_of(weights, x, y, name, largest, model=maml.model):
        pred = torch.func.functional_call(model, {**buffers, **dict(zip(names, weights))}, (x,))
        return maml._task_losses(pred.unsqueeze(0), y.unsqueeze(0), name, largest)[0]

    def query_loss(weights, x_support, y_support, x_query, y_query):
        for _ in range(maml.inner_steps):
            def support_loss(adapted):
                merged = list(weights)
                for i, p in zip(maml._adapted_indices, adapted):
                    merged[i] = p
                # differentiated twice: through the model with BatchNorm in plain ops
                return loss_of(merged, x_support, y_support, "y_support", support_label, maml.plan.func_model())

            adapted = [weights[i] for i in maml._adapted_indices]
            grads = torch.func.grad(support_loss)(adapted)
            weights = list(weights)
            for i, p, g, rate in zip(maml._adapted_indices, adapted, grads, rates):
                weights[i] = p - rate * g
        return loss_of(weights, x_query, y_query, "y_query", query_label)

    try:
        losses = torch.func.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(
            parameters, batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    except Exception:
        maml.plan.uses_func_grad = False
        try:
            return maml.meta_loss(batch)
        except Exception:  # the batch's or the loss's fault, not the model's: its error, and the path stays
            maml.plan.uses_func_grad = True
            raise
    return losses.mean()


class Reptile(_TaskBatchedLearner):
    """Reptile: adapt a copy of the weights to each task with plain SGD, then move the model toward
    their mean: theta <- theta + outer_lr * (mean_t theta_t - theta).

    Uses only the support sets of a TaskBatch. ``loss`` is as for MAML.
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int, outer_lr: float, loss: LossArg = "mse",
                 max_tasks_per_chunk: Optional[int] = None) -> None:
        super().__init__(model, loss, max_tasks_per_chunk)
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.inner_steps = check_int("inner_steps", inner_steps, minimum=1)
        self.outer_lr = check_positive("outer_lr", outer_lr)

    def extra_repr(self) -> str:
        return f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, outer_lr={self.outer_lr}, plan={self.plan.kind}"

    def meta_step(self, batch: TaskBatch) -> Tensor:
        """One Reptile update of the model's weights, in place. Returns the mean over tasks of the support
        loss at the weights before the update (that is, at the first inner step), a detached 0-dim tensor.

        Under a torch.distributed process group of more than one process, ``batch`` is this rank's shard
        of the meta-batch: the mean of the adapted weights is taken over all ranks' tasks (each rank weighted
        by its task count), so every rank makes the update of one process on the whole batch, and the
        returned loss is the mean over all tasks. The first call broadcasts rank 0's parameters and buffers.
        If this step raises on any rank, it raises a RuntimeError naming that rank on every rank, and no
        rank's weights change.
        """
        if distributed.is_distributed():
            return self._distributed_meta_step(batch)
        if self.plan.kind == "fused" and self._fits_one_chunk(batch):
            return self._fused_meta_step(batch)
        support_loss, means = self._mean_adapted(batch)
        with torch.no_grad():
            for p, mean in zip(self._meta_parameters(), means):
                p.add_(self.outer_lr * (mean - p))
        return support_loss

    def meta_step_path(self) -> str:
        """How ``meta_step`` runs: "fused" (one C++ call, ops.reptile_mlp_step_) or "python: <why not>"."""
        if distributed.is_distributed():
            return "python: the adapted weights are averaged over the ranks before the update"
        if self.plan.kind != "fused":
            return "python: the model is not an MLP with a built-in loss"
        if self.max_tasks_per_chunk is None:
            return "fused"
        return f"fused for meta-batches of up to {self.max_tasks_per_chunk} tasks, else in chunks of that many"

    def _fused_meta_step(self, batch: TaskBatch) -> Tensor:
        """meta_step as one op: every task's inner loop and the update, ops.reptile_mlp_step_."""
        params = self._meta_parameters()
        self._check_batch(batch, params[0])
        self._check_labels(batch, params[-2].shape[0], sets=1)
        with torch.no_grad():
            loss = reptile_mlp_step_(params, batch.x_support, batch.y_support, self.inner_steps, self.inner_lr,
                                     self.outer_lr, self.loss)
        return loss

    def _mean_adapted(self, batch: TaskBatch) -> tuple[Tensor, list[Tensor]]:
        """The mean support loss at the first inner step (0-dim) and each parameter's mean over the tasks of its
        adapted copies, in chunks of at most max_tasks_per_chunk tasks (peak memory: one chunk's copies)."""
        loss, means = None, None
        for chunk in batch.chunks(self.max_tasks_per_chunk):
            task_params, chunk_loss = self._adapt_copies(chunk)
            share = chunk.num_tasks / batch.num_tasks
            parts = [adapted.mean(0) * share for adapted in task_params]
            loss = chunk_loss * share if loss is None else loss + chunk_loss * share
            means = parts if means is None else [m + part for m, part in zip(means, parts)]
        return loss, means

    def _adapt_copies(self, batch: TaskBatch) -> tuple[list[Tensor], Tensor]:
        """Each task's adapted copy of the weights ([T, ...] per parameter) and the mean support loss at the
        first inner step (0-dim)."""
        self._check_batch(batch)
        tasks = batch.num_tasks
        # each task's own copy of the weights, updated in place by sgd_step_
        task_params = [p.detach().expand(tasks, *p.shape).clone().requires_grad_() for p in self._meta_parameters()]
        support_loss = None
        for step in range(self.inner_steps):
            with torch.enable_grad():
                losses = self._task_losses(self.plan.forward(task_params, batch.x_support), batch.y_support,
                                           "y_support", batch.largest_labels[0])
                # the sum, not the mean: each task's copy gets the gradient of its own loss
                grads = torch.autograd.grad(losses.sum(), task_params)
            if step == 0:
                support_loss = losses.detach().mean()
            with torch.no_grad():
                sgd_step_(task_params, grads, self.inner_lr)
        return task_params, support_loss

    def _distributed_meta_step(self, batch: TaskBatch) -> Tensor:
        """meta_step on this rank's shard, moving toward the mean adapted weights over all ranks' tasks."""
        self._broadcast_once()
        meta = self._meta_parameters()

        def local_mean_weights():
            return batch.num_tasks, *self._mean_adapted(batch)

        loss, means = distributed._weighted_mean_over_ranks(local_mean_weights, meta, "Reptile.meta_step")
        with torch.no_grad():
            for p, mean in zip(meta, means):
                p.add_(self.outer_lr * (mean - p))
        return loss
