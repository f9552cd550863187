"""Pretraining: the founding example and a larger MLP, Adam + MSE, minibatches in order.

Timed: one call of the whole training run (every epoch) from the model's current weights with a
fresh Adam. Every entry starts from the same weights and data, and before timing its per-epoch
losses and final weights are checked against plain torch's.

Entries of each group:
- metalearn_fast: ``mf.pretrain`` on ``mf.SimpleNet`` / ``mf.MLP`` (fused linear_relu layers);
- metalearn_fast fallback: what METALEARN_FAST_BACKEND=torch runs, in this process (the backend is
  chosen once per process): ``mf.pretrain`` on the same network with reference.linear_relu layers;
- plain torch: the founding example's loop, nn.Linear + nn.ReLU, ``loss.backward()``, ``optimizer.step()``.
learn2learn and higher have no pretraining loop of their own; they appear in the MAML groups.

Run: pytest bench/test_pretrain.py --benchmark-only (see the README's Benchmarks section).
"""
import pytest
import torch
from torch import nn

import metalearn_fast as mf
from metalearn_fast import reference
from metalearn_fast.benchmarks.entries import FALLBACK, OURS, PLAIN_TORCH
from metalearn_fast.benchmarks.plugin import assert_same, plain_torch_result, time_once

# (group, layer sizes, examples, batch size, epochs)
FOUNDING = ("pretrain: founding example, 1000x10 -> 128 -> 1, batch 32, 10 epochs, Adam", (10, 128, 1), 1000, 32, 10)
LARGE = ("pretrain: large, 100000x64 -> 512 -> 512 -> 1, batch 256, 1 epoch, Adam", (64, 512, 512, 1), 100_000, 256, 1)
WORKLOADS = [pytest.param(FOUNDING, id="founding"), pytest.param(LARGE, id="large", marks=pytest.mark.large)]
LR = 1e-3


class ReferenceLinearReLU(nn.Linear):
    """The fallback's linear_relu: reference.linear_relu, differentiated by autograd."""

    def forward(self, x):
        return reference.linear_relu(x, self.weight, self.bias)


def make_model(impl, sizes, device) -> nn.Module:
    """The network of ``impl``, with the weights every entry starts from (mf.MLP's, seed 0)."""
    torch.manual_seed(0)
    ours = mf.SimpleNet(sizes[0], sizes[-1], sizes[1]) if len(sizes) == 3 else mf.MLP(list(sizes))
    if impl == OURS:
        return ours.to(device)
    hidden = ReferenceLinearReLU if impl == FALLBACK else nn.Linear
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers.append(hidden(a, b))
        if impl == PLAIN_TORCH:
            layers.append(nn.ReLU())
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), ours.parameters()):
            mine.copy_(theirs)
    return model.to(device)


def plain_torch_train(model, x, y, epochs, batch_size):
    """The founding example's training loop in plain torch; returns each epoch's mean loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.MSELoss()
    losses = []
    for _ in range(epochs):
        total, batches = 0.0, 0
        for start in range(0, len(x), batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(x[start : start + batch_size]), y[start : start + batch_size])
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
        losses.append(total / batches)
    return losses


def ours_train(model, x, y, epochs, batch_size):
    return mf.pretrain(model, x, y, epochs=epochs, batch_size=batch_size, lr=LR)


TRAIN = {OURS: ours_train, FALLBACK: ours_train, PLAIN_TORCH: plain_torch_train}


# The check trains on the first CHECK_BATCHES minibatches only: float32 roundoff, which Adam's
# normalisation turns into whole steps of size lr on weights whose gradient is near zero, makes two
# correct implementations drift apart over a long run (in float64 they agree to 1e-15 on the large one).
CHECK_BATCHES = 20


def train_once(impl, workload, x, y, device):
    """(seconds, [per-epoch losses, *final weights]) of one training run from the initial weights."""
    _, sizes, _, batch_size, epochs = workload
    model = make_model(impl, sizes, device)
    seconds, losses = time_once(lambda: TRAIN[impl](model, x, y, epochs, batch_size), device)
    return seconds, [torch.tensor(losses, dtype=torch.float64), *(p.detach() for p in model.parameters())]


@pytest.mark.parametrize("impl", list(TRAIN))
@pytest.mark.parametrize("workload", WORKLOADS)
def test_pretrain(measure, device, impl, workload):
    group, sizes, examples, batch_size, epochs = workload
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(examples, sizes[0], generator=generator).to(device)
    y = torch.rand(examples, sizes[-1], generator=generator).to(device)
    checked = min(examples, CHECK_BATCHES * batch_size)
    seconds, result = train_once(impl, workload, x[:checked], y[:checked], device)
    expected = plain_torch_result(
        (workload, device), lambda: train_once(PLAIN_TORCH, workload, x[:checked], y[:checked], device)[1]
    )
    assert_same(result, expected, f"{group}, {impl}", rtol=1e-4, atol=1e-5)
    model = make_model(impl, sizes, device)
    measure(group, impl, lambda: TRAIN[impl](model, x, y, epochs, batch_size), seconds * examples / checked)
