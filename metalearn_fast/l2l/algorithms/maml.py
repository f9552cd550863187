"""``l2l.algorithms.maml``: MAML as learn2learn writes it, ``clone()`` then ``adapt(loss)`` per task.

The same numbers as learn2learn 0.2; the update of all parameters is one ``metalearn_fast.ops.sgd_step``
(one multi-tensor kernel and one autograd node) instead of three ATen ops and a tree walk per parameter.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...ops import sgd_step
from ..utils import _attach, _rebuild_rnn, clone_module, update_module
from .base_learner import BaseLearner

__all__ = ["MAML", "maml_update"]


def maml_update(model: nn.Module, lr, grads=None) -> nn.Module:
    """``p <- p - lr * g`` for every parameter of ``model`` with a gradient, in place in the tree; returns model.

    Arguments:
        model: the module to update (usually a clone).
        lr: the step size (a number or a tensor, differentiable).
        grads: one gradient per parameter in ``model.parameters()`` order, None to leave one as it is;
            when omitted, each parameter's ``.update`` attribute is applied as it is.
    """
    if grads is not None:
        _attach(model, grads, "update", "maml_update", "gradients", transform=lambda grad: -lr * grad)
    return update_module(model)


class _Slots:
    """A module tree's parameters, each once, in ``module.parameters()`` order (``params``); every place holding
    one (``places``: the ``_parameters`` dict, its key, the parameter's index); and the RNNs to rebuild."""

    def __init__(self, module: nn.Module) -> None:
        self.params: list[Tensor] = []
        self.places: list[tuple[dict, str, int]] = []
        self.rnns: list[nn.Module] = []
        index: dict[int, int] = {}
        for sub in module.modules():
            if isinstance(sub, nn.RNNBase):
                self.rnns.append(sub)
            table = sub._parameters
            for key, param in table.items():
                if param is None:
                    continue
                i = index.get(id(param))
                if i is None:
                    i = index[id(param)] = len(self.params)
                    self.params.append(param)
                self.places.append((table, key, i))

    def step(self, grads: list, lr) -> None:
        """Puts ``p - lr * g`` (one sgd_step for all) in every place of a parameter with a gradient.

        lr: one rate for all parameters (a number or a 0-dim tensor), or a list with one per parameter."""
        params = self.params
        moving = [i for i, g in enumerate(grads) if g is not None]
        if not moving:
            return
        rates = [lr[i] for i in moving] if isinstance(lr, list) else lr
        first = params[moving[0]]
        if all(params[i].dtype == first.dtype and params[i].device == first.device for i in moving) and (
                isinstance(rates, list) or not isinstance(rates, Tensor) or rates.dim() == 0):
            updated = sgd_step([params[i] for i in moving], [grads[i] for i in moving], rates)
        else:  # mixed dtypes or devices, or a rate of another shape: the formula, tensor by tensor
            updated = [params[i] - (rates[k] if isinstance(rates, list) else rates) * grads[i]
                       for k, i in enumerate(moving)]
        new = dict(zip(moving, updated))
        for table, key, i in self.places:
            if i in new:
                table[key] = new[i]
        for rnn in self.rnns:
            _rebuild_rnn(rnn)


def _gradients(loss: Tensor, params: list[Tensor], second_order: bool, allow_unused: bool = False,
               allow_nograd: bool = False, owner: str = "MAML") -> list:
    """d loss / d p for each param (None for a frozen param under allow_nograd, or an unused one under allow_unused)."""
    wanted = [p for p in params if p.requires_grad] if allow_nograd else params
    try:
        grads = torch.autograd.grad(loss, wanted, retain_graph=second_order, create_graph=second_order,
                                    allow_unused=allow_unused)
    except RuntimeError as error:
        text = str(error)
        if "does not require grad" in text or "not have been used in the graph" in text:
            hint = ("every parameter must take part in the loss and require grad" if owner == "MetaSGD" else
                    "pass allow_unused=True to leave parameters the loss does not use as they are, and "
                    "allow_nograd=True to leave parameters with requires_grad=False as they are (to MAML(...), "
                    "clone(...) or adapt(...))")
            raise RuntimeError(f"{owner}.adapt: {text.splitlines()[0]} ({hint})") from error
        raise
    if not allow_nograd:
        return list(grads)
    found = iter(grads)
    return [next(found) if p.requires_grad else None for p in params]


class MAML(BaseLearner):
    """Model-Agnostic Meta-Learning, learn2learn's API: wrap a model, then ``clone()`` and ``adapt(loss)`` per task.

    Description:
        ``clone()`` returns a MAML-wrapped copy whose parameters are differentiable functions of this
        one's; ``adapt(loss)`` takes one SGD step on the clone, in place. The query loss of the adapted
        clone then backpropagates to the original parameters (through the inner steps for second
        order, past them for ``first_order=True``).

    Arguments:
        model: the nn.Module to meta-learn (``self.module``).
        lr: the inner (fast-adaptation) step size.
        first_order: differentiate the inner steps to first order only (FOMAML).
        allow_unused: allow parameters the loss does not use (they keep their values); defaults to
            ``allow_nograd``.
        allow_nograd: leave parameters with ``requires_grad=False`` out of adaptation.

    Example::

        maml = MAML(model, lr=0.01)
        opt = torch.optim.Adam(maml.parameters(), 1e-3)
        for task in tasks:
            learner = maml.clone()
            learner.adapt(loss_fn(learner(x_support), y_support))
            loss_fn(learner(x_query), y_query).backward()
        opt.step()

    For a meta-batch of small networks, ``metalearn_fast.MAML(model, inner_lr).meta_step(batch, opt)``
    runs every task at once (README, "Coming from learn2learn").

    References:
        Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017.
    """

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused=None,
                 allow_nograd: bool = False):
        super().__init__()
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def adapt(self, loss: Tensor, first_order=None, allow_unused=None, allow_nograd=None) -> None:
        """One SGD step of the wrapped module on ``loss``, in place (``p <- p - lr * dloss/dp``); returns None.

        The flags default to this learner's; see the class. Second order keeps the graph of the step so
        that a later loss differentiates through it."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        slots = _Slots(self.module)
        grads = _gradients(loss, slots.params, not first_order, allow_unused, allow_nograd, type(self).__name__)
        slots.step(grads, self.lr)

    def clone(self, first_order=None, allow_unused=None, allow_nograd=None) -> "MAML":
        """A MAML-wrapped ``clone_module`` of the module: same lr, flags inherited unless given.

        Differentiable back to this learner's parameters; BatchNorm running statistics are shared."""
        return MAML(clone_module(self.module), lr=self.lr,
                    first_order=self.first_order if first_order is None else first_order,
                    allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                    allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd)
