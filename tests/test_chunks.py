"""max_tasks_per_chunk: a meta-batch in chunks gives the update of the whole batch at once (MAML, every variant,
every plan, and Reptile), while no computation ever holds more than a chunk of tasks."""
import copy

import pytest
import torch
from torch import nn

from metalearn_fast import MAML, MLP, Reptile, TaskBatch, ops
from metalearn_fast.algorithms import maml as maml_module

T, CHUNK = 7, 3  # chunks of 3, 3 and 1 tasks
VARIANTS = {
    "maml": {},
    "fomaml": {"first_order": True},
    "meta_sgd": {"learn_inner_lr": True},
    "anil": {"adapt_head_only": True},
}
CLOSE = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-6)}


class PlainMLP(nn.Module):
    """Not a stack the fast path recognises: the "module" plan."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(2, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def l1_per_task(pred, target):
    return (pred - target).abs().flatten(1).mean(1)


MODELS = {  # plan: (model, loss)
    "fused": (lambda: MLP([2, 8, 3]), "mse"),
    "fused-cross-entropy": (lambda: MLP([2, 8, 3]), "cross_entropy"),
    "batched": (lambda: MLP([2, 8, 3]), l1_per_task),
    "module": (PlainMLP, "mse"),
}


def make_batch(loss, dtype):
    g = torch.Generator().manual_seed(1)
    xs, xq = (torch.randn(T, k, 2, generator=g, dtype=dtype) for k in (4, 5))
    if loss == "cross_entropy":
        ys, yq = (torch.randint(0, 3, (T, k), generator=g) for k in (4, 5))
    else:
        ys, yq = (torch.randn(T, k, 3, generator=g, dtype=dtype) for k in (4, 5))
    return TaskBatch(xs, ys, xq, yq)


def pair(make, **options):
    """The same learner twice: at once and in chunks."""
    torch.manual_seed(0)
    whole = make(None, **options)
    chunked = copy.deepcopy(whole)
    chunked.max_tasks_per_chunk = CHUNK
    return whole, chunked


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("plan", list(MODELS))
def test_maml_meta_step_in_chunks_equals_the_whole_batch(plan, variant, dtype):
    model, loss = MODELS[plan]

    def make(chunk, **options):
        return MAML(model().to(dtype), inner_lr=0.1, inner_steps=2, loss=loss, max_tasks_per_chunk=chunk, **options)

    whole, chunked = pair(make, **VARIANTS[variant])
    assert whole.plan.kind == plan.split("-")[0]
    batch = make_batch(loss, dtype)
    results = []
    for learner in (whole, chunked):
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.5)  # fused when unchunked
        losses = [learner.meta_step(batch, optimizer) for _ in range(2)]
        results.append((losses, [p.detach() for p in learner.parameters()]))
    (whole_losses, whole_params), (chunked_losses, chunked_params) = results
    torch.testing.assert_close(torch.stack(chunked_losses), torch.stack(whole_losses), **CLOSE[dtype])
    for a, b in zip(chunked_params, whole_params):
        torch.testing.assert_close(a, b, **CLOSE[dtype])
    assert any(not torch.equal(a, b) for a, b in zip(whole_params, [p.detach() for p in pair(make)[0].parameters()]))


@pytest.mark.parametrize("plan", ["fused", "module"])
def test_reptile_in_chunks_equals_the_whole_batch(plan):
    model, loss = MODELS[plan]

    def make(chunk):
        return Reptile(model().double(), inner_lr=0.1, inner_steps=3, outer_lr=0.5, max_tasks_per_chunk=chunk)

    whole, chunked = pair(make)
    batch = make_batch(loss, torch.float64)
    losses = [[learner.meta_step(batch) for _ in range(2)] for learner in (whole, chunked)]
    torch.testing.assert_close(torch.stack(losses[1]), torch.stack(losses[0]), rtol=1e-12, atol=1e-14)
    for a, b in zip(chunked.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("plan", list(MODELS))
def test_no_computation_holds_more_than_a_chunk(plan, monkeypatch):
    """The tasks that every fused op and every forward pass on per-task parameters sees: a chunk at most."""
    model, loss = MODELS[plan]
    maml = MAML(model(), inner_lr=0.1, loss=loss, max_tasks_per_chunk=CHUNK)
    seen = []

    def recording(function, x_index, tasks=lambda x: x.shape[0]):
        def record(*args, **kwargs):
            seen.append(tasks(args[x_index]))
            return function(*args, **kwargs)
        return record

    monkeypatch.setattr("metalearn_fast.algorithms.maml.maml_mlp_loss", recording(ops.maml_mlp_loss, 2))
    monkeypatch.setattr("metalearn_fast.algorithms.maml.maml_mlp_meta_step_", recording(ops.maml_mlp_meta_step_, 4))
    monkeypatch.setattr(maml.plan, "forward", recording(maml.plan.forward, 1))
    monkeypatch.setattr("metalearn_fast.algorithms.maml._func_grad_meta_loss",
                        recording(maml_module._func_grad_meta_loss, 1, lambda batch: batch.num_tasks))
    maml.meta_step(make_batch(loss, torch.float32), torch.optim.Adam(maml.parameters(), lr=0.01))
    assert seen and max(seen) == CHUNK
