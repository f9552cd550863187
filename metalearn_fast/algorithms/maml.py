"""MAML and its family (FOMAML, Meta-SGD, ANIL, the MAML++ options) in class MAML, on the task-batched engine.

It runs a whole meta-batch of T tasks at once on per-task parameters, the way the model's plan says
(task_batched.py): one fused op for an MLP with a built-in loss, batched matrix products for any other
Linear(+ReLU) stack, a meta-gradient derived by hand for a conv/BatchNorm/ReLU network with a built-in loss
(conv4's kind, plain MAML or FOMAML: convnet.py), torch.func for any other module (``meta_loss`` as an inner
loop of ``torch.func.grad`` on the meta weights all tasks share, ``_func_grad_meta_loss``). Every plan gives
the numbers of a per-task loop with ``torch.autograd.grad``.

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
from torch import Tensor, nn

from .. import distributed
from .._checks import check_int, check_positive
from ..ops import _number_as_rate, maml_mlp_loss, maml_mlp_meta_step_, maml_mlp_meta_steps_, sgd_step
from ..optim import FusedUpdate, UpdateCache
from ..tasks import BatchStack, TaskBatch, check_task_set
from .maml_plus import StepOptions, batchnorm_indices
from . import convnet
from .task_batched import LossArg, _TaskBatchedLearner, _head_indices

__all__ = ["MAML"]


class MAML(_TaskBatchedLearner):
    """Model-agnostic meta-learning on a meta-batch of tasks, its variants and the MAML++ options.

    Description
    -----------
    Learns an initialisation from which a few SGD steps on a task's support set fit its query set. Each
    meta-step adapts every task of the batch at once (each task's own mean support loss) and the meta-loss is
    the mean over tasks of the query losses after adaptation. The MAML++ options (maml_plus.py) each work alone.

    Arguments
    ---------
    model: any nn.Module (an MLP runs as one fused op; see task_batched.py); BatchNorm must use batch statistics.
    inner_lr, inner_steps: the inner SGD's rate and number of steps.
    first_order: FOMAML (inner gradients without create_graph). learn_inner_lr: Meta-SGD (a learned rate per
        element of every adapted parameter, ``inner_lrs``). adapt_head_only: ANIL (the inner loop adapts only
        the parameters of the model's last submodule that owns any).
    loss: "mse", "cross_entropy" or a callable ``loss(pred [T, K, out], target [T, K, ...])`` -> [T].
    max_tasks_per_chunk: None runs every task at once; N makes ``meta_step`` run chunks of at most N tasks,
        accumulating the meta-gradient (the same update, one chunk's peak memory); on a conv/BatchNorm/ReLU
        network (the hand-derived path, no graph) ``meta_loss`` runs in such chunks too.
    per_step_inner_lr: LSLR, a learned rate per adapted parameter tensor and inner step (``plus.step_inner_lrs``).
    multi_step_loss: None; N, the paper's weights annealed over N meta-steps; or one weight per inner step.
    per_step_bn: BatchNorm weights and biases per inner step (``plus.step_norms``), not adapted by the inner loop.
    first_order_meta_steps: derivative-order annealing: first order for this many meta-steps, then second.

    Example
    -------
    >>> maml = MAML(MLP([1, 40, 40, 1]), inner_lr=0.01, inner_steps=5, per_step_inner_lr=True,
    ...             multi_step_loss=1000, first_order_meta_steps=500)
    >>> optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)   # meta weights and learned rates
    >>> loss = maml.meta_step(tasks.sample(25), optimizer)

    References
    ----------
    Finn et al., MAML, ICML 2017. Li et al., Meta-SGD, 2017. Raghu et al., ANIL, ICLR 2020. Antoniou et al.,
    How to Train Your MAML, ICLR 2019.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
                 learn_inner_lr: bool = False, adapt_head_only: bool = False, loss: LossArg = "mse",
                 max_tasks_per_chunk: Optional[int] = None, per_step_inner_lr: bool = False,
                 multi_step_loss: Union[None, int, Sequence[float]] = None, per_step_bn: bool = False,
                 first_order_meta_steps: int = 0) -> None:
        super().__init__(model, loss, max_tasks_per_chunk)
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.inner_steps = check_int("inner_steps", inner_steps, minimum=1)
        self.first_order = bool(first_order)
        self.learn_inner_lr = bool(learn_inner_lr)
        self.adapt_head_only = bool(adapt_head_only)
        if learn_inner_lr and per_step_inner_lr:
            raise ValueError("learn_inner_lr (Meta-SGD: a rate per weight) and per_step_inner_lr (LSLR: a rate per "
                             "parameter tensor and step) are two ways to learn the inner rates; choose one")
        parameters = self._meta_parameters()
        # indices (in model.parameters() order) of the parameters the inner loop updates
        self._adapted_indices = _head_indices(model, parameters) if adapt_head_only else list(range(len(parameters)))
        norms = batchnorm_indices(model, parameters) if per_step_bn else None
        if norms:  # per-step BatchNorm: meta-learned per step instead of adapted
            self._adapted_indices = [i for i in self._adapted_indices if i not in norms]
        # the first layer the inner loop adapts, in the fused ops' terms (ANIL: the last)
        self._first_adapted_layer = self.plan.head_layer() if self.plan.is_stack and adapt_head_only else 0
        self.inner_lrs: Optional[nn.ParameterList] = None
        if learn_inner_lr:
            self.inner_lrs = nn.ParameterList([nn.Parameter(torch.full_like(parameters[i].detach(), self.inner_lr))
                                               for i in self._adapted_indices])
        self.plus: Optional[StepOptions] = None
        if per_step_inner_lr or multi_step_loss is not None or per_step_bn or first_order_meta_steps:
            self.plus = StepOptions(parameters, self._adapted_indices, self.inner_lr, self.inner_steps,
                                    per_step_inner_lr, multi_step_loss, norms, first_order_meta_steps)
        self._updates = UpdateCache()
        # a conv/BatchNorm/ReLU network (conv4) with a built-in loss: the meta-gradient derived by hand (convnet.py)
        self._conv_net = None
        if (self.plan.kind == "module" and isinstance(loss, str) and not learn_inner_lr and not adapt_head_only
                and self.plus is None):
            self._conv_net = convnet.conv_net_plan(model)

    def extra_repr(self) -> str:
        return (f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, first_order={self.first_order}, learn_inner_"
                f"lr={self.learn_inner_lr}, adapt_head_only={self.adapt_head_only}, plan={self.plan.kind}")

    def meta_loss(self, batch: TaskBatch) -> Tensor:
        """Mean over tasks of the query loss after adapting on the support set (with a multi-step loss, the
        weighted sum over inner steps of those means): a scalar, differentiable w.r.t. ``maml.parameters()``."""
        self._check_batch(batch)
        if self.plan.kind == "fused":  # an MLP: no BatchNorm, so no per-step BatchNorm either
            return _fused_meta_loss(self, batch)
        if self._conv_net is not None:
            self._check_targets(batch, self._meta_parameters()[-2].shape[0])
            return convnet.meta_loss(self._conv_net, self._meta_parameters(), batch.x_support, batch.y_support,
                                     batch.x_query, batch.y_query, self.inner_lr, self.inner_steps, self._first_order(),
                                     self.loss, self.max_tasks_per_chunk)
        weights = self.plus.loss_weights() if self.plus is not None and self.plus.multi_step else None
        if self.plan.uses_func_grad and not self._first_order() and self.plus is None:
            return _func_grad_meta_loss(self, batch)
        terms = []

        def query_loss(params):
            pred = self.plan.forward(params, batch.x_query)
            return self._task_losses(pred, batch.y_query, "y_query", batch.largest_labels[1]).mean()

        def score(step, params):  # the multi-step loss: the query loss after every inner step with a weight
            if weights[step] > 0:
                terms.append(weights[step] * query_loss(params))

        start = [p.expand(batch.num_tasks, *p.shape) for p in self._meta_parameters()]  # views: gradients flow back
        adapted = self._adapt(start, batch.x_support, batch.y_support, self.inner_steps, not self._first_order(),
                              batch.largest_labels[0], after_step=score if weights else None)
        return torch.stack(terms).sum() if weights else query_loss(adapted)

    def meta_step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> Tensor:
        """One meta-update: zero_grad, backward of ``meta_loss(batch)``, optimizer.step(). Returns the meta-loss,
        detached, as a 0-dim tensor on the model's device: reading it (``float(loss)``) is the only host sync.
        Under a torch.distributed process group of more than one process, ``batch`` is this rank's shard and the
        step that of one process on the whole batch (distributed.step_on_mean_gradients)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if distributed.is_distributed():
            self._broadcast_once()
            loss = distributed.step_on_mean_gradients(optimizer, lambda: self._backward(batch), batch.num_tasks,
                                                      "MAML.meta_step")
        else:
            update = _fused_update(self, optimizer)
            if not isinstance(update, str) and self._fits_one_chunk(batch):
                loss = _fused_meta_step(self, batch, update)
            else:
                optimizer.zero_grad()
                loss = self._backward(batch)
                optimizer.step()
        if self.plus is not None:
            self.plus.advance()
        return loss

    def meta_steps(self, batches: Sequence[TaskBatch], optimizer: torch.optim.Optimizer) -> Tensor:
        """``meta_step(batch, optimizer)`` for each batch in turn: a training loop's meta-steps in one call. Returns
        their meta-losses, detached, as one tensor [len(batches)] on the model's device. The same numbers as the
        loop; where the fused path takes them all (meta_step_path says "fused", batches of one shape, no MAML++
        schedule, which changes between steps), one C++ call runs them, without a return to Python between steps
        (a BatchStack, as ``SinusoidTasks.sample_many`` draws, is taken as it is; a list is stacked first). The
        optimizer's settings are those of the call (an LR scheduler steps between calls)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(batches, BatchStack):
            batches = list(batches)
            for i, batch in enumerate(batches):
                if not isinstance(batch, TaskBatch):
                    raise TypeError(f"batches[{i}] must be a metalearn_fast.TaskBatch, got {type(batch).__name__}")
        update = None if distributed.is_distributed() or self.plus is not None else _fused_update(self, optimizer)
        stacked = None
        if len(batches) > 0 and isinstance(update, FusedUpdate) and self._fits_one_chunk(batches[0]):
            self._check_batch(batches[0])
            stacked = _stacked_sets(batches)
        if stacked is None:
            losses = [self.meta_step(batch, optimizer) for batch in batches]
            return torch.stack(losses) if losses else self._meta_parameters()[0].new_empty((0,)).detach()
        labelled = batches[:1] if isinstance(batches, BatchStack) else batches  # a stack's labels have one bound
        return _fused_op(self, update, maml_mlp_meta_steps_, stacked, labelled)

    def _backward(self, batch: TaskBatch) -> Tensor:
        """meta_loss(batch).backward() in chunks of at most max_tasks_per_chunk tasks, each weighted by its share
        of the tasks (the batch's gradient, one chunk's peak memory). Returns the meta-loss, detached. (A conv
        net's meta_loss keeps no graph and runs its own chunks of at most max_tasks_per_chunk tasks: one call,
        without the autograd pass per chunk.)"""
        total = None
        for chunk in [batch] if self._conv_net is not None else batch.chunks(self.max_tasks_per_chunk):
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
        update = _fused_update(self, optimizer)
        return update if isinstance(update, str) else "fused"

    def adapt(self, x_support: Tensor, y_support: Tensor, steps: Optional[int] = None) -> list[Tensor]:
        """Adapt to each task's support set: ``steps`` (default inner_steps) SGD steps from the meta parameters.

        x_support: [T, K, ...], y_support: [T, K, ...] or [T, K] labels. Returns every task's adapted parameters,
        detached: one [T, *p.shape] tensor per p in model.parameters() (ANIL: the body's are the meta parameters;
        per-step BatchNorm: the norms' are the last step's copies). Works under torch.no_grad()."""
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

    def _check_targets(self, batch: TaskBatch, outputs: int) -> None:
        """The built-in loss's demands on both target sets, for a model of ``outputs`` outputs."""
        for x, y, name, largest in ((batch.x_support, batch.y_support, "y_support", batch.largest_labels[0]),
                                    (batch.x_query, batch.y_query, "y_query", batch.largest_labels[1])):
            self._check_target((*x.shape[:2], outputs), y, name, largest)

    def _first_order(self) -> bool:  # first_order, or derivative-order annealing not over yet
        return self.plus.first_order_now(self.first_order) if self.plus is not None else self.first_order

    def _adapt(self, start: list[Tensor], x_support: Tensor, y_support: Tensor, steps: int, create_graph: bool,
               largest_label: int, after_step: Optional[Callable[[int, list], None]] = None) -> list[Tensor]:
        """``steps`` SGD steps on each task's support loss from ``start`` (per-task [T, ...] tensors in
        model.parameters() order), updating the adapted parameters only; ``after_step(k, params)`` after step k.
        Returns the new list. Each step takes its own rates and BatchNorm copies under the MAML++ options.

        On a stack under ANIL the body's features are the same at every inner step, so they are computed
        once, on the meta weights all tasks share, and only the head runs per step."""
        params, indices, inputs, first_layer = list(start), self._adapted_indices, x_support, 0
        if self.plan.is_stack and self.adapt_head_only:
            first_layer = self.plan.head_layer()
            inputs = self.plan.shared_body(start, x_support)
        rates = list(self.inner_lrs) if self.inner_lrs is not None else self.inner_lr
        plus, tasks = self.plus, x_support.shape[0]
        if plus is not None:  # step 0's norms, which also serve a model adapted 0 steps
            params = plus.with_norms(params, 0, tasks)
        for step in range(steps):
            if plus is not None and step > 0:
                params = plus.with_norms(params, step, tasks)
            pred = self.plan.forward(params[2 * first_layer:], inputs, first_layer)
            losses = self._task_losses(pred, y_support, "y_support", largest_label)
            adapted = [params[i] for i in indices]
            # the sum, not the mean: task t's parameters then get the gradient of task t's own loss
            grads = torch.autograd.grad(losses.sum(), adapted, create_graph=create_graph)
            step_rates = plus.rates(step, rates) if plus is not None else rates
            for i, new in zip(indices, sgd_step(adapted, grads, step_rates)):
                params[i] = new
            if after_step is not None:
                after_step(step, params)
        return params


def _fused_update(maml: MAML, optimizer: torch.optim.Optimizer) -> Union[FusedUpdate, str]:
    """The optimizer's update as the fused meta-step applies it, or why it cannot (a 'python: ...' sentence)."""
    if maml.plan.kind != "fused":
        return "python: the model is not an MLP with a built-in loss"
    learned = _learned_rates(maml)
    if learned and maml.adapt_head_only:
        return "python: learned rates with ANIL are the head's only"
    return maml._updates.get(optimizer, maml._meta_parameters() + learned)


def _learned_rate_list(maml: MAML) -> Optional[nn.ParameterList]:
    """The learned inner rates, one tensor per adapted parameter: Meta-SGD's or LSLR's ([inner_steps] each)."""
    if maml.inner_lrs is not None:
        return maml.inner_lrs
    return maml.plus.step_inner_lrs if maml.plus is not None else None


def _learned_rates(maml: MAML) -> list[Tensor]:
    """_learned_rate_list's tensors ([] for none)."""
    rates = _learned_rate_list(maml)
    return [] if rates is None else list(rates.parameters(recurse=False))  # (iterating a ParameterList is slower)


def _per_step(maml: MAML) -> tuple[bool, list[float]]:
    """The fused ops' MAML++ arguments: (per_step_lr, step_weights)."""
    if maml.plus is None:
        return False, []
    return maml.plus.step_inner_lrs is not None, maml.plus.loss_weights() if maml.plus.multi_step else []


def _fused_rate(maml: MAML, like: Tensor) -> Tensor:
    """inner_lr as a 0-dim tensor of like's dtype and device, made once."""
    if getattr(maml, "_rate_key", None) != (maml.inner_lr, like.dtype, like.device):
        maml._rate_key, maml._rate = (maml.inner_lr, like.dtype, like.device), _number_as_rate(maml.inner_lr, like)
    return maml._rate


def _fused_meta_loss(maml: MAML, batch: TaskBatch) -> Tensor:
    """MAML.meta_loss as one op (ops.maml_mlp_loss): inner loop and analytic meta-gradient, the MAML++ per-step
    rates and multi-step loss included."""
    parameters = maml._meta_parameters()
    learned = _learned_rates(maml)
    per_step_lr, step_weights = _per_step(maml)
    if not learned:
        rates: Union[Tensor, list[Tensor]] = _fused_rate(maml, parameters[0])
    else:  # one rate tensor per parameter (Meta-SGD's, LSLR's); ANIL leaves the body's unused
        shape = (maml.inner_steps,) if per_step_lr else ()
        rates = [torch.zeros(shape, dtype=p.dtype, device=p.device) for p in parameters]
        for i, rate in zip(maml._adapted_indices, learned):
            rates[i] = rate
    maml._check_targets(batch, parameters[-2].shape[0])
    return maml_mlp_loss(parameters, rates, batch.x_support, batch.y_support, batch.x_query, batch.y_query,
                         inner_steps=maml.inner_steps, first_order=maml._first_order(), loss=maml.loss,
                         first_adapted_layer=maml._first_adapted_layer, per_step_lr=per_step_lr,
                         step_weights=step_weights)


def _fused_meta_step(maml: MAML, batch: TaskBatch, update: FusedUpdate) -> Tensor:
    """MAML.meta_step as one op: ops.maml_mlp_meta_step_ (meta-loss, meta-gradient into .grad, optimizer update)."""
    maml._check_batch(batch, update.tensors[0])
    return _fused_op(maml, update, maml_mlp_meta_step_, (batch.x_support, batch.y_support, batch.x_query,
                                                         batch.y_query), [batch])


def _fused_op(maml: MAML, update: FusedUpdate, op: Callable, sets: Sequence[Tensor],
              labelled: Sequence[TaskBatch]) -> Tensor:
    """``op`` (ops.maml_mlp_meta_step_, or maml_mlp_meta_steps_ on stacked sets) with the model's parameters, the
    learned rates and the optimizer's arguments: the meta-loss(es), the meta-gradient left in .grad, the update done.
    labelled: the batches whose class labels must index the model's outputs."""
    # the update's tensors are the model's parameters, then the learned rates (_fused_update)
    split = len(update.tensors) - len(_learned_rate_list(maml) or ())
    params, learned = update.tensors[:split], update.tensors[split:]
    for batch in labelled:
        maml._check_labels(batch, params[-2].shape[0])
    grads, state, settings = update.arguments()
    per_step_lr, step_weights = _per_step(maml)
    # (no torch.no_grad(): like torch.optim's step, the op updates the parameters outside autograd itself)
    losses = op(params, learned or [_fused_rate(maml, params[0])], grads, state, *sets, maml.inner_steps,
                bool(maml._first_order()), maml.loss, maml._first_adapted_layer, bool(learned), update.kind, settings,
                per_step_lr, step_weights)
    update.finish(state)
    return losses


_SETS = ("x_support", "y_support", "x_query", "y_query")


def _stacked_sets(batches: Sequence[TaskBatch]) -> Optional[list[Tensor]]:
    """The batches' four sets, each stacked [S, T, ...]; None unless each set has the first batch's shape, dtype and
    device in every batch (the checks of the first batch then hold for all)."""
    if isinstance(batches, BatchStack):
        return [batches.stacked(name) for name in _SETS]
    stacked = []
    for name in _SETS:
        sets = [getattr(batch, name) for batch in batches]
        shape, dtype, device = sets[0].shape, sets[0].dtype, sets[0].device
        if not all(t.shape == shape and t.dtype is dtype and t.device == device for t in sets):
            return None
        stacked.append(torch.stack(sets))
    return stacked


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
