"""Whether a model is an MLP chain, and the task loss a learner's last forward pass fed: what lets ``adapt``
take a small MLP's loss gradient as one fused op (``ops.mlp_loss_grad``) instead of autograd's graph.

learn2learn's ``adapt(loss)`` differentiates whatever graph the loss has; for a second-order step of a small
MLP that graph is some thirty tiny ops, and the meta-loss's backward walks it again: most of the loop's time.
Where the model is a chain ``Linear -> ReLU -> ... -> Linear`` (checked once, by tracing it with torch.fx)
and the loss is ``F.mse_loss`` or ``F.cross_entropy`` (mean, no weights) of the learner's last output, the
gradient is that of the fused op, the same number, as one autograd node whose backward is the analytic
Hessian-vector product. Anything else (another loss expression, hooks, a frozen parameter, data requiring
grad) takes autograd's way, as learn2learn does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_RELUS = (F.relu, torch.relu)
_MEAN = 1  # the reduction a loss node saves for "mean"
_IGNORE_INDEX = (-100, 2**64 - 100)  # cross_entropy's default, as a node saves it (signed or not)


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class MlpChain:
    """A model's Linear layers in call order: their positions in ``list(module.modules())`` (the same in every
    clone) and their parameters' indices in ``module.parameters()`` ([W0, b0, W1, b1, ...]); and the hook
    tables to look at before running the chain in place of the model's forward (shared with every clone)."""

    def __init__(self, positions: list[int], order: list[int], hook_tables: list[dict], kinds: tuple) -> None:
        self.positions = positions
        self.order = order
        self.hook_tables = hook_tables
        self.kinds = kinds  # the classes of the traced tree's modules, in modules() order

    def fits(self, tree: list[nn.Module]) -> bool:
        """Whether a (cloned) module tree still has the traced one's modules: a layer swapped for another kind or
        a module added since the trace sends the forward pass back to the model's own."""
        return len(tree) == len(self.kinds) and all(type(m) is kind for m, kind in zip(tree, self.kinds))

    def hooked(self) -> bool:
        hooks = nn.modules.module
        return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                    or hooks._global_backward_pre_hooks or any(self.hook_tables))

    def forward(self, tree: list[nn.Module], x: Tensor) -> Tensor:
        """The model's forward pass, computed as its traced graph does: the same ops, without the module calls."""
        last = len(self.positions) - 1
        for k, position in enumerate(self.positions):
            params = tree[position]._parameters
            x = F.linear(x, params["weight"], params["bias"])
            if k < last:
                x = torch.relu(x)
        return x

    @classmethod
    def of(cls, module: nn.Module) -> Optional["MlpChain"]:
        """The chain of ``module``, or None when it is not one (or cannot be traced)."""
        modules = list(module.modules())
        if not all(isinstance(m, (nn.Linear, nn.ReLU, nn.Sequential)) for m in modules[1:]):
            return None
        if any(isinstance(m, nn.Linear) and m.bias is None for m in modules):
            return None
        try:
            graph = torch.fx.symbolic_trace(module).graph
        except Exception:  # any model torch.fx cannot trace is simply not a chain
            return None
        names = _linear_names(module, list(graph.nodes))
        if names is None:
            return None
        index = {id(p): i for i, p in enumerate(module.parameters())}
        position = {id(m): i for i, m in enumerate(modules)}
        positions, order = [], []
        for name in names:
            linear = module.get_submodule(name)
            positions.append(position[id(linear)])
            order += [index[id(linear.weight)], index[id(linear.bias)]]
        if sorted(order) != list(range(len(index))):  # parameters outside the chain, or a layer used twice
            return None
        return cls(positions, order, [getattr(m, attr) for m in modules for attr in _HOOK_TABLES],
                   tuple(type(m) for m in modules))


def _linear_names(module: nn.Module, nodes) -> Optional[list[str]]:
    """The Linear submodules a traced graph calls, when it is exactly x -> Linear (-> relu -> Linear)* -> out."""
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    current, names, relu_due = nodes[0], [], False
    for node in nodes[1:-1]:
        others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if not node.args or node.args[0] is not current or others:
            return None
        is_linear = node.op == "call_module" and isinstance(module.get_submodule(node.target), nn.Linear)
        is_relu = ((node.op == "call_module" and isinstance(module.get_submodule(node.target), nn.ReLU))
                   or (node.op == "call_function" and node.target in _RELUS)
                   or (node.op == "call_method" and node.target == "relu"))
        if is_linear and not relu_due:
            names.append(node.target)
            relu_due = True
        elif is_relu and relu_due and names:
            relu_due = False
        else:
            return None
        current = node
    if nodes[-1].args[0] is not current or not relu_due:  # the last layer is a Linear, without ReLU
        return None
    return names


def task_loss(loss: Tensor, out: Tensor) -> Optional[tuple[Tensor, str]]:
    """(target, "mse" | "cross_entropy") when ``loss`` is exactly that mean loss of ``out`` against a target
    that needs no gradient, else None."""
    node = loss.grad_fn
    if node is None or out.grad_fn is None or loss.dim() != 0:
        return None
    kind = type(node).__name__
    if kind == "MseLossBackward0":
        if node._saved_reduction != _MEAN or node.next_functions[0][0] is not out.grad_fn:
            return None
        if node.next_functions[1][0] is not None:  # the target requires grad
            return None
        return node._saved_target, "mse"
    if kind == "NllLossBackward0" and out.dim() == 2:
        if node._saved_reduction != _MEAN or node._saved_weight is not None \
                or node._saved_ignore_index not in _IGNORE_INDEX:
            return None
        log_softmax = node.next_functions[0][0]
        if type(log_softmax).__name__ != "LogSoftmaxBackward0" or log_softmax._saved_dim not in (1, -1) \
                or log_softmax.next_functions[0][0] is not out.grad_fn:
            return None
        return node._saved_target, "cross_entropy"
    return None
