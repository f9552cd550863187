"""Training an MLP: the founding program end to end, a wider MLP, a large one, and fuse() in a user's loop.

Timed: one call of the whole training run from the model's current weights with a fresh Adam.
Every entry starts from the same weights and data, and before timing its per-epoch losses and final
weights are checked against plain torch's.

Entries of the training groups:
- metalearn_fast: the founding program through ``metalearn_fast.compat`` (train, then learn_new_task),
  or ``mf.pretrain``: each epoch of an MLP is one call of the compiled mlp_train_epoch_ op, forward,
  loss, backward and Adam's update included;
- metalearn_fast fallback: what METALEARN_FAST_BACKEND=torch runs, in this process (the backend is
  chosen once per process): the same calls with reference.mlp_train_epoch_;
- plain torch: the founding example's loop as a skilled user writes it: nn.Linear + nn.ReLU, batches
  sliced from tensors, ``loss.backward()``, ``torch.optim.Adam(fused=True).step()``.

The fuse() groups time a user's own loop (zero_grad, forward, backward, Adam step) on ``fuse(model)``
against the same loop on the unfused nn.Sequential: the fused modules must never cost time.
learn2learn and higher have no pretraining loop of their own; they appear in the MAML groups.

Run: pytest bench/test_pretrain.py --benchmark-only (see the README's Benchmarks section).
"""
import contextlib
import copy

import pytest
import torch
from torch import nn

import metalearn_fast as mf
import metalearn_fast.train as train_module
from metalearn_fast import reference
from metalearn_fast.benchmarks.entries import FALLBACK, OURS, PLAIN_TORCH
from metalearn_fast.benchmarks.plugin import assert_same, plain_torch_result, time_once

LR = 1e-3


@contextlib.contextmanager
def reference_training_op():
    """What METALEARN_FAST_BACKEND=torch runs in place of the compiled epoch: reference.mlp_train_epoch_."""
    compiled = train_module.mlp_train_epoch_
    train_module.mlp_train_epoch_ = reference.mlp_train_epoch_
    try:
        yield
    finally:
        train_module.mlp_train_epoch_ = compiled


class Workload:
    """A training run: runs[i] = (examples, epochs) of its i-th call (the founding program makes two)."""

    def __init__(self, group, sizes, runs, batch_size, large=False):
        self.group, self.sizes, self.runs, self.batch_size, self.large = group, sizes, runs, batch_size, large


FOUNDING = Workload("training: the founding program, SimpleNet 10-128-1, Adam + MSE, batch 32: train 10 epochs on "
                    "1000 points, then learn_new_task 10 epochs on 100", (10, 128, 1), [(1000, 10), (100, 10)], 32)
WIDE = Workload("training: MLP 64-256-256-1, 20000 points, batch 64, 1 epoch, Adam + MSE", (64, 256, 256, 1),
                [(20_000, 1)], 64)
LARGE = Workload("training: large, 100000x64 -> 512 -> 512 -> 1, batch 256, 1 epoch, Adam + MSE",
                 (64, 512, 512, 1), [(100_000, 1)], 256, large=True)
WORKLOADS = [pytest.param(FOUNDING, id="founding"), pytest.param(WIDE, id="wide"),
             pytest.param(LARGE, id="large", marks=pytest.mark.large)]


def make_model(impl, sizes, device) -> nn.Module:
    """The network of ``impl``, with the weights every entry starts from (mf's, seed 0)."""
    torch.manual_seed(0)
    ours = mf.SimpleNet(sizes[0], sizes[-1], sizes[1]) if len(sizes) == 3 else mf.MLP(list(sizes))
    if impl != PLAIN_TORCH:
        return ours.to(device)
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), ours.parameters()):
            mine.copy_(theirs)
    return model.to(device)


def plain_torch_train(model, optimizer, data, batch_size):
    """The founding example's loop in plain torch over each (x, y, epochs); returns each epoch's mean loss."""
    loss_fn = nn.MSELoss()
    losses = []
    for x, y, epochs in data:
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


def ours_train(model, optimizer, data, batch_size):
    """mf.pretrain on each (x, y, epochs), which is what the founding program's compat.train and
    compat.learn_new_task run (they return the model, this returns the epoch losses for the check)."""
    losses = []
    for x, y, epochs in data:
        losses += mf.pretrain(model, x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer)
    return losses


def fallback_train(model, optimizer, data, batch_size):
    with reference_training_op():
        return ours_train(model, optimizer, data, batch_size)


TRAIN = {OURS: ours_train, FALLBACK: fallback_train, PLAIN_TORCH: plain_torch_train}


def make_optimizer(impl, model, device):
    if impl == PLAIN_TORCH:
        return torch.optim.Adam(model.parameters(), lr=LR, fused=device.type in ("cpu", "cuda"))
    return torch.optim.Adam(model.parameters(), lr=LR)


# The check trains on at most CHECK_BATCHES minibatches per run: float32 roundoff, which Adam's
# normalisation turns into whole steps of size lr on weights whose gradient is near zero, makes two
# correct implementations drift apart over a long run (in float64 they agree to 1e-15 on the large one).
CHECK_BATCHES = 20


def make_data(workload, device, check: bool):
    generator = torch.Generator().manual_seed(0)
    data = []
    for examples, epochs in workload.runs:
        x = torch.rand(examples, workload.sizes[0], generator=generator).to(device)
        y = torch.rand(examples, workload.sizes[-1], generator=generator).to(device)
        if check:
            kept = min(examples, CHECK_BATCHES * workload.batch_size)
            x, y, epochs = x[:kept], y[:kept], 1
        data.append((x, y, epochs))
    return data


def train_once(impl, workload, data, device):
    """(seconds, [per-epoch losses, *final weights]) of one training run from the initial weights."""
    model = make_model(impl, workload.sizes, device)
    optimizer = make_optimizer(impl, model, device)
    seconds, losses = time_once(lambda: TRAIN[impl](model, optimizer, data, workload.batch_size), device)
    return seconds, [torch.tensor(losses, dtype=torch.float64), *(p.detach() for p in model.parameters())]


def steps_of(workload, data):
    return sum(epochs * -(-len(x) // workload.batch_size) for x, _, epochs in data)


@pytest.mark.parametrize("impl", list(TRAIN))
@pytest.mark.parametrize("workload", WORKLOADS)
def test_training(measure, device, impl, workload):
    checked = make_data(workload, device, check=True)
    seconds, result = train_once(impl, workload, checked, device)
    expected = plain_torch_result((workload.group, device),
                                  lambda: train_once(PLAIN_TORCH, workload, checked, device)[1])
    assert_same(result, expected, f"{workload.group}, {impl}", rtol=1e-4, atol=1e-5)
    data = make_data(workload, device, check=False)
    model = make_model(impl, workload.sizes, device)
    optimizer = make_optimizer(impl, model, device)
    estimate = seconds * steps_of(workload, data) / steps_of(workload, checked)
    measure(workload.group, impl, lambda: TRAIN[impl](model, optimizer, data, workload.batch_size), estimate)


# ---- fuse(model) in the user's own loop ----

# (group, sizes, batch size); each timed run is USER_LOOP_STEPS steps
USER_LOOPS = [
    ("fuse() in a user's loop: 10-128-1, batch 32", (10, 128, 1), 32),
    ("fuse() in a user's loop: 64-256-256-1, batch 64", (64, 256, 256, 1), 64),
    ("fuse() in a user's loop: 784-512-512-10, batch 256", (784, 512, 512, 10), 256),
]
USER_LOOP_STEPS = 50


def user_loop(model, optimizer, x, y, batch_size):
    loss_fn = nn.MSELoss()
    for start in range(0, len(x), batch_size):
        optimizer.zero_grad()
        loss_fn(model(x[start : start + batch_size]), y[start : start + batch_size]).backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("impl", [OURS, PLAIN_TORCH])
@pytest.mark.parametrize("loop", USER_LOOPS, ids=["10-128-1", "64-256-256-1", "784-512-512-10"])
def test_fuse_in_a_user_loop(measure, device, impl, loop):
    group, sizes, batch_size = loop
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(USER_LOOP_STEPS * batch_size, sizes[0], generator=generator).to(device)
    y = torch.rand(USER_LOOP_STEPS * batch_size, sizes[-1], generator=generator).to(device)
    plain = make_model(PLAIN_TORCH, sizes, device)
    model = mf.fuse(copy.deepcopy(plain)) if impl == OURS else plain
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    check = 5 * batch_size

    def one_run(m):
        o = torch.optim.Adam(m.parameters(), lr=LR)
        return time_once(lambda: user_loop(m, o, x[:check], y[:check], batch_size), device)

    seconds, result = one_run(copy.deepcopy(model))
    expected = plain_torch_result((group, device), lambda: one_run(copy.deepcopy(plain))[1])
    assert_same(result, expected, f"{group}, {impl}", rtol=1e-4, atol=1e-5)
    measure(group, impl, lambda: user_loop(model, optimizer, x, y, batch_size), seconds * USER_LOOP_STEPS / 5)
