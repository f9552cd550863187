"""``l2l.algorithms.meta_sgd``: Meta-SGD as learn2learn writes it, a learned step size per parameter entry."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..utils import _replace_tensors, clone_module, clone_parameters
from .maml import _Learner

__all__ = ["MetaSGD", "meta_sgd_update"]


def _minus_rate_times_grad(tensor: Tensor) -> Optional[Tensor]:
    """``t - t._lr * t.grad`` (clearing both), or None when t holds no gradient and rate."""
    if tensor.grad is None or getattr(tensor, "_lr", None) is None:
        return None
    updated = tensor - tensor._lr * tensor.grad
    tensor.grad = None
    tensor._lr = None
    return updated


def meta_sgd_update(model: nn.Module, lrs=None, grads=None, memo=None) -> nn.Module:
    """``p <- p - lr_p * g_p`` for every parameter of ``model``, in place in the tree; returns model.

    Arguments:
        model: the module to update (usually a clone).
        lrs: one rate tensor per parameter (``MetaSGD.lrs``), in ``model.parameters()`` order.
        grads: one gradient per parameter; when lrs or grads is omitted, each tensor's ``.grad`` and
            ``._lr`` attributes are used, as learn2learn does.
        memo: tensor -> updated tensor, so that a tied parameter is updated once and stays tied.
    """
    if memo is None:
        memo = {}
    if grads is not None and lrs is not None:
        for param, lr, grad in zip(model.parameters(), lrs, grads):
            param.grad = grad
            param._lr = lr
    _replace_tensors(model._parameters, memo, _minus_rate_times_grad)
    _replace_tensors(model._buffers, memo, _minus_rate_times_grad)
    children = model._modules
    for key, child in children.items():
        children[key] = meta_sgd_update(child, memo=memo)
    return model


class MetaSGD(_Learner):
    """Meta-SGD, learn2learn's API: MAML with a learned inner step size for every parameter entry.

    Description:
        ``lrs`` holds one tensor per parameter of the model, initialised to ``lr`` and trained by the
        outer optimizer with the model (``parameters()`` gives the model's, then the rates).
        ``clone()`` copies model and rates differentiably; ``adapt(loss)`` takes ``p <- p - lr_p * g``
        in place. With ``first_order`` the gradient is not differentiated, but the rates still learn.

    Arguments:
        model: the nn.Module to meta-learn (``self.module``).
        lr: the initial value of every rate.
        first_order: do not differentiate through the inner gradients.
        lrs: the rates to use instead of new ones (a list of tensors, one per parameter).

    Example::

        meta = MetaSGD(model, lr=0.01)
        learner = meta.clone()
        learner.adapt(loss_fn(learner(x_support), y_support))
        loss_fn(learner(x_query), y_query).backward()  # model and rates get gradients

    References:
        Li, Zhou, Chen, Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", arXiv 2017.
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False, lrs=None):
        super().__init__()
        self.module = model
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in model.parameters()])
        self.lrs = lrs
        self.first_order = first_order

    def clone(self) -> "MetaSGD":
        """A MetaSGD of a ``clone_module`` of the module and ``clone_parameters`` of the rates."""
        return self._new(MetaSGD, clone_module(self.module), lrs=clone_parameters(self.lrs), first_order=self.first_order)

    def adapt(self, loss: Tensor, first_order=None) -> None:
        """One step ``p <- p - lr_p * dloss/dp`` of every parameter, in place; returns None."""
        first_order = self.first_order if first_order is None else first_order
        slots = self._slots()
        grads = self._task_gradients(loss, slots, not first_order)
        rates = list(self.lrs)
        if len(rates) != len(grads):  # zip's pairing, as learn2learn updates: parameters past the rates stay
            grads = grads[:len(rates)] + [None] * (len(grads) - len(rates))
            rates = rates + [None] * (len(grads) - len(rates))
        slots.step(grads, rates)
