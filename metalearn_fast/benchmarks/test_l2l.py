"""learn2learn's loops, unchanged but for the import: ``metalearn_fast.l2l`` against learn2learn itself.

Each workload is a loop written as learn2learn's examples write it (``clone()``, ``adapt(loss)`` per task,
the query loss backpropagated task by task), run with ``metalearn_fast.l2l``, with learn2learn (where it is
installed: its last release does not build on Python 3.11+), and as the same loop hand-written in plain torch
(``functional_call`` and ``autograd.grad``: the report's baseline). For the sinusoid the batched engine,
``metalearn_fast.MAML(...).meta_step``, shows what the one-line move away from the per-task loop gives.

Timed: one meta-step (the loop, then an Adam step), float32. Checked first, in float64: every entry's meta-loss
and meta-gradient equal the plain-torch loop's.

- sine: MLP 1-40-40-1 (learn2learn's SineModel: three nn.Linear, F.relu), 16 tasks of 10 + 10 points, MSE,
  inner lr 0.01: MAML 5 steps second order, first-order MAML 1 step, MetaSGD 1 step;
- conv: the Omniglot CNN (4 x [conv 3x3 64 stride 2, BatchNorm2d with running statistics, ReLU], mean-pool,
  linear), 8 tasks 5-way 1-shot 28x28, cross-entropy, inner lr 0.4, 1 step, second order: learn2learn's
  ``vision/maml_omniglot.py`` setting, BatchNorm statistics shared with the original as learn2learn keeps them.
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metalearn_fast as mf
import metalearn_fast.l2l as l2l
from metalearn_fast.benchmarks.entries import LEARN2LEARN, OURS, PLAIN_TORCH
from metalearn_fast.benchmarks.peers import clone_adapt_meta_backward
from metalearn_fast.benchmarks.plugin import (PEERS, assert_same, meta_step_with, plain_torch_result, require_peer,
                                              time_once)

META_STEP = "metalearn_fast MAML.meta_step"


@dataclass(frozen=True)
class Workload:
    id: str
    algorithm: str  # "maml" or "metasgd"
    inner_steps: int
    first_order: bool

    @property
    def conv(self) -> bool:
        return self.id.startswith("conv")

    @property
    def inner_lr(self) -> float:
        return 0.4 if self.conv else 0.01

    @property
    def loss(self):
        return F.cross_entropy if self.conv else F.mse_loss

    @property
    def group(self) -> str:
        what = ("Omniglot CNN with BatchNorm, 8 tasks 5-way 1-shot" if self.conv
                else "sinusoid MLP 1-40-40-1, 16 tasks")
        name = "MetaSGD" if self.algorithm == "metasgd" else ("first-order MAML" if self.first_order else "MAML")
        steps = f"{self.inner_steps} step{'s' if self.inner_steps > 1 else ''}"
        return f"learn2learn loop: {name}, {what}, {steps}"


WORKLOADS = [
    Workload("sine-maml-5-steps", "maml", 5, False),
    Workload("sine-fomaml-1-step", "maml", 1, True),
    Workload("sine-metasgd-1-step", "metasgd", 1, False),
    Workload("conv-maml-1-step", "maml", 1, False),
]
QUICK = WORKLOADS[1:2]


class SineModel(nn.Module):
    """learn2learn's sine example network."""

    def __init__(self, dim: int = 40) -> None:
        super().__init__()
        self.hidden1, self.hidden2, self.hidden3 = nn.Linear(1, dim), nn.Linear(dim, dim), nn.Linear(dim, 1)

    def forward(self, x):
        return self.hidden3(F.relu(self.hidden2(F.relu(self.hidden1(x)))))


def omniglot_cnn() -> nn.Module:
    layers = []
    for channels in (1, 64, 64, 64):
        layers += [nn.Conv2d(channels, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))


def make_problem(workload: Workload, device, dtype):
    torch.manual_seed(0)
    model = (omniglot_cnn() if workload.conv else SineModel()).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    if workload.conv:
        labels = torch.arange(5).expand(8, 5).contiguous()
        batch = [torch.rand(8, 5, 1, 28, 28, generator=g), labels, torch.rand(8, 5, 1, 28, 28, generator=g), labels]
    else:
        x = torch.rand(16, 20, 1, generator=g) * 10 - 5
        y = (torch.rand(16, 1, 1, generator=g) * 4.9 + 0.1) * torch.sin(x - torch.rand(16, 1, 1, generator=g) * 3.14)
        batch = [x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]]
    return model, [t.to(device, dtype if t.is_floating_point() else t.dtype) for t in batch]


def with_l2l(lib):
    def entry(workload, model, batch):
        if workload.algorithm == "metasgd":
            learner = lib.algorithms.MetaSGD(model, lr=workload.inner_lr, first_order=workload.first_order)
        else:
            learner = lib.algorithms.MAML(model, lr=workload.inner_lr, first_order=workload.first_order)
        return learner, clone_adapt_meta_backward(learner, workload.loss, batch, workload.inner_steps)

    return entry


def hand_written(workload, model, batch):
    """The same loop in plain torch: per task, explicit inner steps on a dict of fast weights."""
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    holder = nn.Module()
    holder.model = model
    if workload.algorithm == "metasgd":
        holder.lrs = nn.ParameterList([nn.Parameter(torch.full_like(p, workload.inner_lr)) for p in params])
    tasks = batch[0].shape[0]

    def meta_backward():
        total = 0
        for x_support, y_support, x_query, y_query in zip(*batch):
            fast = params
            for _ in range(workload.inner_steps):
                loss = workload.loss(functional_call(model, dict(zip(names, fast)), (x_support,)), y_support)
                grads = torch.autograd.grad(loss, fast, create_graph=not workload.first_order)
                rates = holder.lrs if workload.algorithm == "metasgd" else [workload.inner_lr] * len(fast)
                fast = [p - r * g for p, r, g in zip(fast, rates, grads)]
            loss = workload.loss(functional_call(model, dict(zip(names, fast)), (x_query,)), y_query) / tasks
            loss.backward()
            total = total + loss.detach()
        return total

    return holder, meta_backward


def meta_step(workload, model, batch):
    """The batched engine on the same weights: every task at once, Adam's step included."""
    mlp = mf.MLP([1, 40, 40, 1]).to(batch[0])
    with torch.no_grad():
        for a, b in zip(mlp.parameters(), model.parameters()):
            a.copy_(b)
    maml = mf.MAML(mlp, inner_lr=workload.inner_lr, inner_steps=workload.inner_steps,
                   first_order=workload.first_order, learn_inner_lr=workload.algorithm == "metasgd")
    tasks = mf.TaskBatch(*batch)
    return maml, lambda optimizer: maml.meta_step(tasks, optimizer)


ENTRIES = {OURS: with_l2l(l2l), PLAIN_TORCH: hand_written, META_STEP: meta_step, LEARN2LEARN: None}


def first_step(entry, workload, device, dtype=torch.float32):
    """(seconds, [meta-loss, *meta-gradient], meta_step) of one meta-step of ``entry`` from fresh weights."""
    model, batch = make_problem(workload, device, dtype)
    if entry == LEARN2LEARN:
        import learn2learn

        make = with_l2l(learn2learn)
    else:
        make = ENTRIES[entry]
    learner, step = make(workload, model, batch)
    one_meta_step = meta_step_with(step, torch.optim.Adam(learner.parameters(), lr=1e-3), entry == META_STEP)
    seconds, loss = time_once(one_meta_step, device)
    return seconds, [torch.as_tensor(loss).reshape(()), *(p.grad for p in learner.parameters())], one_meta_step


@pytest.mark.parametrize("impl", list(ENTRIES))
@pytest.mark.parametrize("workload", [pytest.param(w, marks=() if w in QUICK else pytest.mark.large, id=w.id)
                                      for w in WORKLOADS])
def test_learn2learn_loop(measure, device, impl, workload):
    if impl in PEERS:
        require_peer(impl)
    if impl == META_STEP and workload.conv:
        pytest.skip("the conv network's meta_step runs in test_any_module.py, without running statistics")
    result = first_step(impl, workload, device, torch.float64)[1]
    expected = plain_torch_result(("l2l", workload, device),
                                  lambda: first_step(PLAIN_TORCH, workload, device, torch.float64)[1])
    assert_same(result, expected, f"{workload.group}, {impl}", rtol=1e-9, atol=1e-11)
    seconds, _, step = first_step(impl, workload, device)
    measure(workload.group, impl, step, seconds)
