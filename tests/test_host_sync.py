"""A meta-step on data already on its device reads no tensor value on the host (no ``.item()``, ``float()``,
``int()`` or ``bool()`` of a tensor), so that a CUDA step runs ahead of the host until the user reads the
loss it returns.

On every device the op trace is read: each ``aten._local_scalar_dense`` (what those calls dispatch to) is
attributed to the file of the package that asked for it, and none may come from the engine. The fallback's
reference ops check class labels by value on the CPU only (on other devices with a device-side assert). On
CUDA, ``torch.cuda.set_sync_debug_mode("error")`` makes any sync an error.
"""
import contextlib
import os
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import metalearn_fast as mf
from metalearn_fast import MAML, MLP, Reptile, TaskBatch

PACKAGE = os.path.dirname(mf.__file__)
TORCH = os.path.dirname(torch.__file__)
MACHINERY = [os.path.join(TORCH, name) for name in ("_dynamo", "_compile.py", "_tensor.py", "utils/_python_dispatch.py")]
ENGINE = {"algorithms/maml.py", "algorithms/reptile.py", "algorithms/task_batched.py", "plan.py", "optim.py",
          "tasks.py", "distributed.py", "nn.py", "ops.py", "train.py"}


class ScalarReads(TorchDispatchMode):
    """Records, for every tensor value read on the host, the file that asked for it: a file of the package,
    or "elsewhere" (torch itself, e.g. torch.optim reading its CPU step count, or the test)."""

    def __init__(self):
        super().__init__()
        self.callers = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            # the innermost caller, past the dispatch machinery and torch's Tensor wrappers (Tensor.__format__)
            frames = [f for f in traceback.extract_stack()[:-1]
                      if not any(part in f.filename for part in MACHINERY)]
            caller = frames[-1].filename
            self.callers.append(os.path.relpath(caller, PACKAGE) if caller.startswith(PACKAGE) else "elsewhere")
        return func(*args, **(kwargs or {}))


class PlainMLP(nn.Module):
    """Not a stack the fast path recognises: the "module" plan."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def l1_per_task(pred, target):
    return (pred - target).abs().flatten(1).mean(1)


LEARNERS = {
    "fused-mse": lambda: MAML(MLP([3, 16, 4]), inner_steps=2),
    "fused-cross-entropy": lambda: MAML(MLP([3, 16, 4]), inner_steps=2, loss="cross_entropy"),
    "fused-meta-sgd": lambda: MAML(MLP([3, 16, 4]), learn_inner_lr=True),
    "batched": lambda: MAML(MLP([3, 16, 4]), adapt_head_only=True, loss=l1_per_task),
    "module": lambda: MAML(PlainMLP(), first_order=True),
    "reptile-fused": lambda: Reptile(MLP([3, 16, 4]), inner_lr=0.1, inner_steps=2, outer_lr=0.5),
    "reptile-module": lambda: Reptile(PlainMLP(), inner_lr=0.1, inner_steps=2, outer_lr=0.5),
}


def make_batch(learner, device):
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(5, k, 3, generator=g).to(device) for k in (4, 6)]
    if learner.loss == "cross_entropy":
        y = [torch.randint(0, 4, (5, k), generator=g).to(device) for k in (4, 6)]
    else:
        y = [torch.randn(5, k, 4, generator=g).to(device) for k in (4, 6)]
    return TaskBatch(x[0], y[0], x[1], y[1])  # its checks read values: where the data is made, not per step


@pytest.mark.parametrize("name", list(LEARNERS))
def test_a_meta_step_reads_no_tensor_value_on_the_host(name, device):
    torch.manual_seed(0)
    learner = LEARNERS[name]().to(device)
    batch = make_batch(learner, device)
    optimizer = None if isinstance(learner, Reptile) else torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step():
        return learner.meta_step(batch) if optimizer is None else learner.meta_step(batch, optimizer)

    step()  # the first step makes the optimizer state and caches
    reads = ScalarReads()
    syncs = torch.cuda.set_sync_debug_mode if device.type == "cuda" else None
    with reads, (contextlib.nullcontext() if syncs is None else _sync_errors()):
        losses = [step() for _ in range(2)]
    engine_reads = [caller for caller in reads.callers if caller in ENGINE]
    assert engine_reads == [], f"the engine read tensor values on the host from {engine_reads}"
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad for loss in losses)
    assert losses[0].device == device and torch.isfinite(torch.stack(losses)).all()


@contextlib.contextmanager
def _sync_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
