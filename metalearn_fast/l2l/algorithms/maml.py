"""``l2l.algorithms.maml``: MAML as learn2learn writes it, ``clone()`` then ``adapt(loss)`` per task.

The same numbers as learn2learn 0.2; the update of all parameters is one ``metalearn_fast.ops.sgd_step``
(one multi-tensor kernel and one autograd node) instead of three ATen ops and a tree walk per parameter.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...ops import mlp_loss_grad, sgd_step
from ..utils import _attach, _rebuild_rnn, clone_module, update_module
from ._mlp_chain import MlpChain, task_loss
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

    def __init__(self, modules: list[nn.Module]) -> None:
        self.params: list[Tensor] = []
        self.places: list[tuple[dict, str, int]] = []
        self.rnns: list[nn.Module] = []
        index: dict[int, int] = {}
        for sub in modules:
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


_UNKNOWN = object()  # a learner's chain before it is looked at
_RATES: dict = {}  # (lr, dtype, device) -> the 0-dim tensor sgd_step takes
# what nn.Module.__init__ sets: its containers (hooks, parameters, ...: each learner gets empty copies) and values
_BLANK_CONTAINERS = [(k, v) for k, v in nn.Module().__dict__.items() if isinstance(v, (dict, set))]
_BLANK_VALUES = {k: v for k, v in nn.Module().__dict__.items() if not isinstance(v, (dict, set))}


class _Learner(BaseLearner):
    """What MAML and MetaSGD share: the forward pass, remembered for ``adapt``, and the gradient of a task loss.

    A clone of an MLP chain (see _mlp_chain) remembers its last input and output; when the loss given to
    ``adapt`` is the mean MSE or cross-entropy of that output, its gradient comes from ``ops.mlp_loss_grad``
    (one node, the same number) instead of autograd's graph. The root learner looks at its model once, on its
    first ``clone()``; clones inherit what it found."""

    def forward(self, *args, **kwargs):
        chain = self.__dict__.get("_chain")
        if chain is not None and chain is not _UNKNOWN and len(args) == 1 and not kwargs:
            x = args[0]
            tree = self._tree()
            if isinstance(x, Tensor) and x.dim() == 2 and not chain.hooked() and self._fits(chain, tree):
                out = chain.forward(tree, x)
                self.__dict__["_record"] = (x, out, self._tensors())
                return out
        return self.module(*args, **kwargs)

    def _tree(self) -> list[nn.Module]:
        """``list(self.module.modules())``, kept while ``self.module`` is the same module (adapt replaces tensors
        in the tree, not modules)."""
        state = self.__dict__
        module = state["_modules"]["module"]
        tree = state.get("_tree_cache")
        if tree is None or tree[0] is not module:
            tree = state["_tree_cache"] = list(module.modules())
        return tree

    def _fits(self, chain: MlpChain, tree: list[nn.Module]) -> bool:
        """chain.fits(tree), looked at once per tree."""
        state = self.__dict__
        checked = state.get("_fits_cache")
        if checked is None or checked[0] is not tree:
            checked = state["_fits_cache"] = (tree, chain.fits(tree))
        return checked[1]

    def _tensors(self) -> list:
        """Every parameter slot of the tree, in order: what a forward pass computed with."""
        return [p for sub in self._tree() for p in sub._parameters.values()]

    def _slots(self) -> "_Slots":
        return _Slots(self._tree())

    @staticmethod
    def _rate(lr, like: Tensor):
        """lr as sgd_step takes it: a number becomes a 0-dim tensor of like's dtype and device, made once (sgd_step
        only reads it)."""
        if not isinstance(lr, (int, float)):
            return lr
        key = (float(lr), like.dtype, like.device)
        rate = _RATES.get(key)
        if rate is None:
            if len(_RATES) > 64:
                _RATES.clear()
            rate = _RATES[key] = torch.tensor(key[0], dtype=like.dtype, device=like.device)
        return rate

    def _chain_of(self):
        chain = self.__dict__.get("_chain", _UNKNOWN)
        if chain is _UNKNOWN:
            chain = self.__dict__["_chain"] = MlpChain.of(self.module)
        return chain

    def _new(self, kind: type, module: nn.Module, **attributes) -> "_Learner":
        """A learner of class ``kind`` wrapping module, with these plain attributes and what this one found about
        its model: nn.Module's own state made as its __init__ makes it, without running it (a clone per task)."""
        state = {key: value.copy() for key, value in _BLANK_CONTAINERS}
        state.update(_BLANK_VALUES)
        state["_modules"]["module"] = module
        state.update(attributes)
        state["_chain"] = self._chain_of()
        learner = kind.__new__(kind)
        object.__setattr__(learner, "__dict__", state)
        return learner

    def _task_gradients(self, loss: Tensor, slots: "_Slots", second_order: bool, allow_unused: bool = False,
                        allow_nograd: bool = False) -> list:
        fused = self._fused_gradients(loss, slots.params, second_order)
        if fused is not None:
            return fused
        return _gradients(loss, slots.params, second_order, allow_unused, allow_nograd, type(self).__name__)

    def _fused_gradients(self, loss: Tensor, params: list[Tensor], second_order: bool):
        """The gradients by ops.mlp_loss_grad, in ``params``' order, or None where it does not apply."""
        record = self.__dict__.pop("_record", None)
        if record is None:
            return None
        x, out, used = record
        found = task_loss(loss, out)
        if found is None or len(used) != len(now := self._tensors()) or any(a is not b for a, b in zip(used, now)):
            return None
        target, kind = found
        if x.requires_grad or not all(p.requires_grad for p in params):
            return None
        order = self.__dict__["_chain"].order
        try:
            with torch.set_grad_enabled(second_order and torch.is_grad_enabled()):
                grads = mlp_loss_grad([params[i] for i in order], x, target, kind)
        except (ValueError, TypeError):  # labels out of range, another dtype: autograd's way says it its own way
            return None
        result: list = [None] * len(params)
        for i, grad in zip(order, grads):
            result[i] = grad
        return result


class MAML(_Learner):
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

    def adapt(self, loss: Tensor, first_order=None, allow_unused=None, allow_nograd=None) -> None:
        """One SGD step of the wrapped module on ``loss``, in place (``p <- p - lr * dloss/dp``); returns None.

        The flags default to this learner's; see the class. Second order keeps the graph of the step so
        that a later loss differentiates through it."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        slots = self._slots()
        grads = self._task_gradients(loss, slots, not first_order, allow_unused, allow_nograd)
        if slots.params:
            slots.step(grads, self._rate(self.lr, slots.params[0]))

    def clone(self, first_order=None, allow_unused=None, allow_nograd=None) -> "MAML":
        """A MAML-wrapped ``clone_module`` of the module: same lr, flags inherited unless given.

        Differentiable back to this learner's parameters; BatchNorm running statistics are shared."""
        return self._new(MAML, clone_module(self.module), lr=self.lr,
                         first_order=self.first_order if first_order is None else first_order,
                         allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                         allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd)
