"""The founding example's functions, with their exact signatures, on metalearn_fast.

Change ``import`` of the example's module to ``from metalearn_fast.compat import ...`` and it runs
on the fused kernels; numpy arrays are accepted where the example passes them.
"""
from __future__ import annotations

import torch
from torch import nn

from .nn import SimpleNet
from .train import adapt, pretrain

__all__ = ["SimpleNet", "get_model", "get_optimizer", "get_loss_fn", "train", "learn_new_task"]


def get_model(input_size: int, output_size: int) -> SimpleNet:
    return SimpleNet(input_size, output_size)


def get_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.001)


def get_loss_fn() -> nn.Module:
    return nn.MSELoss()


def train(model, optimizer, loss_fn, x, y, epochs, batch_size) -> nn.Module:
    """Train in place; returns the model, as the founding example's train does."""
    pretrain(model, x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, loss_fn=loss_fn)
    return model


def learn_new_task(model, optimizer, loss_fn, new_x, new_y, epochs, batch_size) -> nn.Module:
    """Keep training the same model and optimizer on the new task, as the example does; returns the model."""
    return adapt(model, new_x, new_y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, loss_fn=loss_fn,
                 inplace=True)
