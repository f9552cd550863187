"""MAML meta-steps of the paper's models that are not Linear/ReLU stacks: the any-module path, with peak memory.

- conv4: 4 x [conv 3x3, 64 channels, stride 2, BatchNorm2d without running statistics, ReLU], mean-pool,
  linear; 28x28 grayscale inputs, 5-way 1-shot (one query per class), the MAML paper's Omniglot network;
- the BatchNorm MLP: 784-256-128-64-64-5 with Linear -> BatchNorm1d (no running statistics) -> ReLU.

Timed: one whole meta-step (meta-loss, meta-gradient, an Adam step), 1 inner step of lr 0.4, cross-entropy.
Every entry starts from the same weights and data. Before it is timed (in float32) it is checked in float64
against the per-task loop, the textbook definition, on the meta-loss and the meta-gradient (BatchNorm over 5
examples makes float32 gradients differ by 0.3% between correct implementations), except torch.func at second
order: its meta-gradient through BatchNorm differs from the loop's (by 4e-3 of 1.6 in float64 on the
BatchNorm MLP, where metalearn_fast and the loop agree to 3e-13; without BatchNorm torch.func agrees too), so it
is checked on the meta-loss only, and timed.

Entries:
- metalearn_fast: ``mf.MAML(model, ...).meta_step(TaskBatch, Adam)`` (every task at once);
- metalearn_fast, 4 (3, 2) tasks per chunk: the same with ``max_tasks_per_chunk=4`` (3, 2): bounded memory, 3 and
  2 on the 32-task memory comparison only;
- torch.func: ``vmap`` over tasks of an inner loop written with ``grad`` and ``functional_call``;
- per-task loop: one task at a time with autograd.grad, its query loss backpropagated at once (as
  learn2learn does: the memory of one task);
- higher, learn2learn: per task, when installed.

The report's speedups are against torch.func; its peak-memory column is what one meta-step took above what was
in use before it (see plugin.py).
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metalearn_fast as mf
from metalearn_fast.benchmarks.entries import HIGHER, LEARN2LEARN, OURS, PER_TASK_LOOP, TORCH_FUNC
from metalearn_fast.benchmarks.peers import higher_meta_backward, learn2learn_meta_backward, torch_func_meta_backward
from metalearn_fast.benchmarks.plugin import (PEERS, assert_same, meta_step_with, plain_torch_result, require_peer,
                                              time_once)

CHUNKED = "metalearn_fast, 4 tasks per chunk"
CHUNKED_2 = "metalearn_fast, 2 tasks per chunk"
CHUNKED_3 = "metalearn_fast, 3 tasks per chunk"
MEMORY_ONLY = (CHUNKED_2, CHUNKED_3)  # entries of the 32-task memory comparison only
INNER_LR, WAYS, SHOTS = 0.4, 5, 1


def conv4() -> nn.Module:
    return mf.nn.conv4(1, WAYS)


def bn_mlp() -> nn.Module:
    return mf.nn.batchnorm_mlp((784, 256, 128, 64, 64, WAYS))


@dataclass(frozen=True)
class Workload:
    model: str  # "conv4" or "bn-mlp"
    tasks: int
    first_order: bool

    @property
    def id(self) -> str:
        return f"{self.model}-{self.tasks}tasks-{'first' if self.first_order else 'second'}"

    @property
    def group(self) -> str:
        what = "conv4, 28x28" if self.model == "conv4" else "BatchNorm MLP 784-256-128-64-64-5"
        return (f"MAML {what}, {self.tasks} tasks 5-way 1-shot: 1 inner step, "
                f"{'first' if self.first_order else 'second'} order")


# --quick runs the small one only, so that the suite cannot rot; the others are the workloads, and the
# memory comparison at 32 tasks
QUICK = [Workload("bn-mlp", 4, False)]
LARGE = [Workload(model, 16, first_order) for model in ("conv4", "bn-mlp") for first_order in (False, True)]
LARGE += [Workload("conv4", 32, False)]


def make_model(workload: Workload, device) -> nn.Module:
    torch.manual_seed(0)
    return (conv4() if workload.model == "conv4" else bn_mlp()).to(device)


def make_batch(workload: Workload, device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (1, 28, 28) if workload.model == "conv4" else (784,)
    labels = (torch.arange(WAYS * SHOTS) % WAYS).expand(workload.tasks, WAYS * SHOTS).contiguous()
    batch = [torch.rand(workload.tasks, WAYS * SHOTS, *shape, generator=generator), labels,
             torch.rand(workload.tasks, WAYS * SHOTS, *shape, generator=generator), labels.clone()]
    return [t.to(device) for t in batch]


# ---- the entries: each returns meta_backward(), which puts the meta-gradient in .grad and returns the loss, or
# (ours) meta_step(optimizer), which also steps ----


def ours(workload, model, batch, chunk=None):
    maml = mf.MAML(model, inner_lr=INNER_LR, first_order=workload.first_order, loss="cross_entropy",
                   max_tasks_per_chunk=chunk)
    tasks = mf.TaskBatch(*batch)
    return lambda optimizer: maml.meta_step(tasks, optimizer)


def torch_func(workload, model, batch):
    return torch_func_meta_backward(model, F.cross_entropy, batch, INNER_LR, 1, workload.first_order)


def per_task_loop(workload, model, batch):
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())

    def meta_backward():
        total = 0
        for x_support, y_support, x_query, y_query in zip(*batch):
            support = F.cross_entropy(model(x_support), y_support)
            grads = torch.autograd.grad(support, params, create_graph=not workload.first_order)
            fast = {name: p - INNER_LR * g for name, p, g in zip(names, params, grads)}
            loss = F.cross_entropy(functional_call(model, fast, (x_query,)), y_query) / workload.tasks
            loss.backward()
            total = total + loss.detach()
        return total

    return meta_backward


def with_higher(workload, model, batch):
    return higher_meta_backward(model, F.cross_entropy, batch, INNER_LR, 1, workload.first_order)


def with_learn2learn(workload, model, batch):
    return learn2learn_meta_backward(model, F.cross_entropy, batch, INNER_LR, 1, workload.first_order)


ENTRIES = {
    OURS: ours,
    CHUNKED: lambda workload, model, batch: ours(workload, model, batch, chunk=4),
    CHUNKED_2: lambda workload, model, batch: ours(workload, model, batch, chunk=2),
    CHUNKED_3: lambda workload, model, batch: ours(workload, model, batch, chunk=3),
    TORCH_FUNC: torch_func,
    PER_TASK_LOOP: per_task_loop,
    HIGHER: with_higher,
    LEARN2LEARN: with_learn2learn,
}


def first_step(entry, workload, device, dtype=torch.float32):
    """(seconds, [meta-loss, *meta-gradient], meta_step) of one meta-step of ``entry`` from fresh weights."""
    model = make_model(workload, device).to(dtype)
    batch = [t.to(dtype) if t.is_floating_point() else t for t in make_batch(workload, device)]
    step = ENTRIES[entry](workload, model, batch)
    # the same Adam for every entry: torch's fused kernel where the device has one
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    meta_step = meta_step_with(step, optimizer, entry in (OURS, CHUNKED, *MEMORY_ONLY))
    seconds, loss = time_once(meta_step, device)
    return seconds, [torch.as_tensor(loss), *(p.grad for p in model.parameters())], meta_step


@pytest.mark.parametrize("impl", list(ENTRIES))
@pytest.mark.parametrize("workload", QUICK + [pytest.param(w, marks=pytest.mark.large) for w in LARGE],
                         ids=[w.id for w in QUICK + LARGE])
def test_any_module_meta_step(measure, device, impl, workload):
    if impl in MEMORY_ONLY and workload.tasks != 32:
        pytest.skip("chunks of 2 and 3 tasks are timed on the 32-task memory comparison only")
    if impl in PEERS:
        require_peer(impl)
    result = first_step(impl, workload, device, torch.float64)[1]
    expected = plain_torch_result(("any-module", workload, device),
                                  lambda: first_step(PER_TASK_LOOP, workload, device, torch.float64)[1])
    if impl == TORCH_FUNC and not workload.first_order:  # see the module docstring
        result, expected = result[:1], expected[:1]
    assert_same(result, expected, f"{workload.group}, {impl}", rtol=1e-7, atol=1e-9)
    seconds, _, meta_step = first_step(impl, workload, device)
    measure(workload.group, impl, meta_step, seconds)
