"""Modules on the fused ops: FusedLinearReLU, MLP, SimpleNet, and fuse() for existing models."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import linear_relu

__all__ = ["FusedLinearReLU", "MLP", "SimpleNet", "Standardize", "batchnorm_mlp", "conv4", "fuse", "linear_stack"]


class FusedLinearReLU(nn.Linear):
    """``relu(nn.Linear(in_features, out_features)(x))``, as one fused op where that is faster.

    A subclass of nn.Linear: same parameters, names, initialisation and state_dict, so it loads
    weights saved from a Linear and consumes the random stream exactly as Linear does.
    x: [..., in_features] -> [..., out_features].

    On CUDA the layer is one op (ops.linear_relu: a GEMM with a bias+ReLU epilogue). On the CPU it is
    ATen's own pair, F.linear then relu: in a training loop the single op measured slower there
    (BENCHMARKS.md, the fuse() groups), and a fused layer must never cost time. The whole-step paths
    (pretrain, adapt, MAML) do not go through this forward at all.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=True, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"FusedLinearReLU: x must be [..., {self.in_features}], got shape {list(x.shape)}")
        if x.device.type == "cpu":
            return torch.relu(F.linear(x, self.weight, self.bias))
        if x.dim() == 2:
            return linear_relu(x, self.weight, self.bias)
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

    def layers(self) -> list[nn.Module]:
        """The modules forward applies, in order."""
        return [self.fc1, self.fc2]


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


def linear_stack(model: nn.Module) -> Optional[list[tuple[Tensor, Tensor, bool]]]:
    """[(weight [O, I], bias [O], relu_after)] per layer when ``model`` computes exactly a stack of Linear
    layers with ReLU only between them, else None.

    The stacks recognised: ``MLP``, ``SimpleNet`` and ``nn.Sequential`` of ``nn.Linear`` (with bias),
    ``FusedLinearReLU``, ``nn.ReLU`` and ``nn.Identity``. Only exact types qualify (a subclass may override
    forward), and each parameter must belong to one layer. The fast paths of MAML, Reptile, pretrain and
    adapt all ask this one function.
    """
    if type(model) is SimpleNet:
        modules = model.layers()
    elif type(model) in (nn.Sequential, MLP):
        modules = list(model)
    else:
        return None
    layers: list[list] = []
    for module in modules:
        if type(module) in (nn.Linear, FusedLinearReLU):
            if module.bias is None:
                return None
            layers.append([module.weight, module.bias, type(module) is FusedLinearReLU])
        elif type(module) is nn.ReLU:
            if not layers or layers[-1][2]:  # a ReLU must follow a layer that has none yet
                return None
            layers[-1][2] = True
        elif type(module) is not nn.Identity:
            return None
    if not layers or layers[-1][2]:  # ReLU only between layers: the last layer is plain linear
        return None
    stacked = [p for weight, bias, _ in layers for p in (weight, bias)]
    parameters = list(model.parameters())
    # a module used twice would be one set of parameters but two layers
    if len(stacked) != len(parameters) or any(a is not b for a, b in zip(stacked, parameters)):
        return None
    return [(weight, bias, relu) for weight, bias, relu in layers]


def conv4(in_channels: int, ways: int, hidden: int = 64, image_size: Optional[Sequence[int]] = None) -> nn.Sequential:
    """The MAML paper's Omniglot network: 4 x [conv 3x3, ``hidden`` channels, stride 2, BatchNorm2d with each
    batch's own statistics, ReLU], mean-pool, Linear(hidden, ways). [N, in_channels, H, W] -> [N, ways].

    With ``image_size`` (H, W), a layer halves a side only while that side is wider than 2 pixels, so the last
    feature maps keep at least 2x2 as the paper's 28x28 Omniglot's do (28 -> 14 -> 7 -> 4 -> 2: unchanged there);
    tiny images (8x8 digits: 8 -> 4 -> 2 -> 2 -> 2) are not pooled to a single pixel by the third layer. Measured
    on scikit-learn's digits, 3-way 1-shot, 7 meta-train classes: MAML after its trained step 51-54% with stride 2
    everywhere, 60-66% with this rule, over three splits."""
    layers, channels = [], in_channels
    size = list(image_size) if image_size is not None else None
    for _ in range(4):
        stride = (2, 2) if size is None else tuple(2 if side > 2 else 1 for side in size)
        layers += [nn.Conv2d(channels, hidden, 3, stride=stride, padding=1),
                   nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU()]
        channels = hidden
        if size is not None:
            size = [(side + 1) // 2 if step == 2 else side for side, step in zip(size, stride)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, ways))


def batchnorm_mlp(sizes: Sequence[int]) -> nn.Sequential:
    """The MAML paper's MLP (there 784-256-128-64-64-ways): Linear -> BatchNorm1d with each batch's own
    statistics -> ReLU between the ``sizes``, a plain Linear last. [N, sizes[0]] -> [N, sizes[-1]]."""
    layers = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(fan_in, fan_out), nn.BatchNorm1d(fan_out, track_running_stats=False), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


class Standardize(nn.Module):
    """(x - mean) / std with fixed statistics (buffers, saved in the state_dict): a model that takes raw
    inputs. mean and std broadcast against one example, e.g. [C, 1, 1] for [N, C, H, W] images."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
