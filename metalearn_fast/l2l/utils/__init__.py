"""learn2learn's utilities (``l2l.utils``): clone, update and detach a module's parameters, differentiably.

The semantics are learn2learn 0.2's, which user code relies on:

- ``clone_module`` gives a new module tree whose parameters are ``clone()``s of the original's, so
  gradients flow back to the original; buffers that do not require grad (BatchNorm's running
  statistics) are the original's own tensors, shared, not copied; a parameter held by two modules
  (tied weights) is cloned once and stays tied.
- ``update_module`` replaces each parameter ``p`` by ``p + update`` in place in the tree (the same
  module objects), keeping tied parameters tied.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "accuracy",
    "clone_module",
    "clone_named_parameters",
    "clone_parameters",
    "detach_module",
    "magic_box",
    "update_module",
]


def magic_box(x):
    """The DiCE operator: evaluates to 1, with the gradient of ``x``: ``exp(x - x.detach())``.

    Used for higher-order derivatives of stochastic graphs (Foerster et al. 2018). A non-tensor is
    returned as it is.
    """
    if isinstance(x, Tensor):
        return torch.exp(x - x.detach())
    return x


def clone_parameters(param_list: Sequence[Tensor]) -> list[Tensor]:
    """``[p.clone() for p in param_list]``: differentiable copies."""
    return [p.clone() for p in param_list]


def clone_named_parameters(param_dict: dict) -> dict:
    """``{name: p.clone()}``: differentiable copies of a dict of tensors."""
    return {name: p.clone() for name, p in param_dict.items()}


def _rebuild_rnn(module: nn.Module) -> nn.Module:
    """An RNN keeps a flat view of its weights for cuDNN: ``_apply`` rebuilds it from the module's new tensors."""
    return module._apply(lambda t: t) if isinstance(module, nn.RNNBase) else module


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module of the same class sharing everything but the three tensor/child dicts.

    The hook dicts stay shared with the original, and the training flag is copied, as learn2learn does."""
    copy = module.__new__(type(module))
    state = module.__dict__.copy()
    state["_parameters"] = state["_parameters"].copy()
    state["_buffers"] = state["_buffers"].copy()
    state["_modules"] = state["_modules"].copy()
    object.__setattr__(copy, "__dict__", state)  # past nn.Module.__setattr__, which has nothing to do here
    return copy


def _clone_tensors(tensors: dict, memo: dict, every: bool) -> None:
    """Replaces the dict's tensors (every one, or only those requiring grad) by clones, once per tensor (memo)."""
    for key, tensor in tensors.items():
        if tensor is not None and (every or tensor.requires_grad):
            copied = memo.get(id(tensor))
            if copied is None:
                copied = memo[id(tensor)] = tensor.clone()
            tensors[key] = copied


def _attach(module: nn.Module, values: Sequence, attribute: str, caller: str, what: str, transform=None) -> None:
    """Sets ``attribute`` on each parameter of module to its value (transformed; None values are skipped),
    warning as learn2learn does when the two lists differ in length (zip pairs what it can)."""
    params = list(module.parameters())
    if len(values) != len(params):
        print(f"WARNING:{caller}(): Parameters and {what} have different length. ({len(params)} vs {len(values)})")
    for param, value in zip(params, values):
        if value is not None or transform is None:
            setattr(param, attribute, value if transform is None else transform(value))


def clone_module(module, memo: Optional[dict] = None):
    """A copy of ``module`` whose parameters are ``clone()``s of the original's: differentiable back to it.

    Arguments:
        module: the nn.Module to clone (anything else is returned as it is).
        memo: tensor -> its clone, shared across calls to keep tensors tied; made when None.

    Buffers are cloned only when they require grad; BatchNorm's running statistics are therefore
    the original's tensors, and updating them in the clone updates the original.

    Example::

        clone = clone_module(net)
        loss_fn(clone(x), y).backward()  # the gradient reaches net's parameters
    """
    if not isinstance(module, nn.Module):
        return module
    if memo is None:
        memo = {}
    clone = _shallow_copy(module)
    _clone_tensors(clone._parameters, memo, every=True)
    _clone_tensors(clone._buffers, memo, every=False)
    children = clone._modules
    for key, child in children.items():
        children[key] = clone_module(child, memo)
    return _rebuild_rnn(clone)


def _replace_tensors(tensors: dict, memo: dict, updated_of) -> None:
    """Replaces each tensor t of the dict by ``updated_of(t)`` (None: t stays), once per tensor: a tensor met again
    (tied) gets the memo's result."""
    for key, tensor in tensors.items():
        if tensor is None:
            continue
        updated = memo.get(id(tensor))
        if updated is None:
            updated = updated_of(tensor)
            if updated is None:
                continue
            memo[id(tensor)] = updated
        tensors[key] = updated


def _plus_update(tensor: Tensor) -> Optional[Tensor]:
    """``t + t.update`` (clearing ``t.update``), or None when t carries no update."""
    update = getattr(tensor, "update", None)
    if update is None:
        return None
    tensor.update = None
    return tensor + update


def update_module(module: nn.Module, updates: Optional[Sequence[Optional[Tensor]]] = None,
                  memo: Optional[dict] = None) -> nn.Module:
    """Replaces each parameter ``p`` of ``module`` by ``p + u``, in place in the module tree; returns ``module``.

    Arguments:
        module: the module to update (its submodules are kept; their tensors are replaced).
        updates: one update per parameter, in ``module.parameters()`` order (None leaves that parameter);
            when omitted, each tensor's ``.update`` attribute (set by ``maml_update``) is used.
        memo: tensor -> its updated tensor, shared across submodules so tied parameters stay tied.
    """
    if memo is None:
        memo = {}
    if updates is not None:
        _attach(module, updates, "update", "update_module", "updates")
    _replace_tensors(module._parameters, memo, _plus_update)
    _replace_tensors(module._buffers, memo, _plus_update)
    children = module._modules
    for key, child in children.items():
        children[key] = update_module(child, None, memo)
    return _rebuild_rnn(module)


def detach_module(module, keep_requires_grad: bool = False) -> None:
    """Detaches the parameters and buffers of a (cloned) module from their graph, in place.

    Parameters no longer require grad unless ``keep_requires_grad`` keeps the flag they had.
    """
    if not isinstance(module, nn.Module):
        return
    for param in module._parameters.values():
        if param is not None:
            requires_grad = param.requires_grad
            param.detach_()
            if keep_requires_grad and requires_grad:
                param.requires_grad_()
    for key, buffer in module._buffers.items():
        if buffer is not None and buffer.requires_grad:
            buffer.detach_()
            if keep_requires_grad:
                buffer.requires_grad_()
    for child in module._modules.values():
        detach_module(child, keep_requires_grad=keep_requires_grad)


def accuracy(preds: Tensor, targets: Tensor) -> Tensor:
    """The fraction of rows whose argmax equals the target: preds [N, C], targets [N] -> 0-dim float."""
    correct = (preds.argmax(dim=1).long() == targets.long()).sum().float()
    return correct / preds.size(0)
