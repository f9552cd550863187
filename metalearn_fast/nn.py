"""Modules on the fused ops: FusedLinearReLU, MLP, SimpleNet, and fuse() for existing models."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .ops import linear_relu

__all__ = ["FusedLinearReLU", "MLP", "SimpleNet", "fuse"]


class FusedLinearReLU(nn.Linear):
    """``relu(nn.Linear(in_features, out_features)(x))`` in one fused op.

    A subclass of nn.Linear: same parameters, names, initialisation and state_dict, so it loads
    weights saved from a Linear and consumes the random stream exactly as Linear does.
    x: [..., in_features] -> [..., out_features].
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=True, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return linear_relu(x, self.weight, self.bias)
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"FusedLinearReLU: x must be [..., {self.in_features}], got shape {list(x.shape)}")
        flat = x.reshape(-1, self.in_features)
        return linear_relu(flat, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)


class MLP(nn.Sequential):
    """Linear layers of the given sizes with ReLU between them (fused) and none after the last.

    ``MLP([1, 40, 40, 1])`` is FusedLinearReLU(1, 40), FusedLinearReLU(40, 40), Linear(40, 1).
    """

    def __init__(self, sizes: Sequence[int], device=None, dtype=None) -> None:
        sizes = list(sizes)
        if len(sizes) < 2 or any(int(s) != s or s < 1 for s in sizes):
            raise ValueError(f"MLP: sizes must be at least two positive integers, got {sizes}")
        layers: list[nn.Module] = [
            FusedLinearReLU(a, b, device=device, dtype=dtype) for a, b in zip(sizes[:-2], sizes[1:-1])
        ]
        layers.append(nn.Linear(sizes[-2], sizes[-1], device=device, dtype=dtype))
        super().__init__(*layers)
        self.sizes = sizes


class SimpleNet(nn.Module):
    """The founding example's network: Linear(input, hidden) -> ReLU -> Linear(hidden, output).

    Attribute names (fc1, fc2) match the plain-torch SimpleNet, so state_dicts load both ways.
    """

    def __init__(self, input_size: int, output_size: int, hidden_size: int = 128) -> None:
        super().__init__()
        self.fc1 = FusedLinearReLU(input_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x))


def fuse(model: nn.Module) -> nn.Module:
    """Replace each nn.Linear followed by nn.ReLU inside nn.Sequential containers with FusedLinearReLU.

    The Linear's Parameter objects move into the fused layer (an optimizer built on the model keeps
    working) and the ReLU becomes nn.Identity, so state_dict keys stay the same. Returns the model.
    """
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            linear, relu = module._modules[first], module._modules[second]
            if type(linear) is nn.Linear and linear.bias is not None and isinstance(relu, nn.ReLU):
                fused = FusedLinearReLU.__new__(FusedLinearReLU)
                nn.Module.__init__(fused)
                fused.in_features, fused.out_features = linear.in_features, linear.out_features
                fused.weight, fused.bias = linear.weight, linear.bias
                fused.train(linear.training)
                module._modules[first] = fused
                module._modules[second] = nn.Identity()
    return model
