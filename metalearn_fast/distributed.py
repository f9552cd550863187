"""The meta-batch split across processes with torch.distributed.

Launch one process per device (``torchrun --nproc_per_node N``), call
``torch.distributed.init_process_group`` as usual (gloo on CPU, NCCL on GPU), give each rank its
shard of the meta-batch with ``shard``, and call ``MAML.meta_step`` / ``Reptile.meta_step`` as in a
single process. Under a default process group of more than one process, meta_step then:

- broadcasts the learner's parameters and buffers from rank 0 on its first call, so every rank
  starts from the same weights whatever its own initialisation;
- computes this rank's quantity on its own tasks (MAML: the meta-gradient of every parameter the
  optimizer steps, learned Meta-SGD rates included; Reptile: the mean of the adapted weights);
- averages it over ranks with one all_reduce of one flat bucket, each rank weighted by its task count,
  so that uneven shards give exactly the mean over the whole meta-batch;
- applies the same update on every rank, so the ranks stay equal.

A rank whose own computation raises still takes part in that all_reduce (with a failure flag), so
every rank raises ``RankFailedError("... rank r failed: ...")`` at the same step instead of waiting for
it; no rank updates its weights at that step. A rank that never reaches meta_step (it died, was killed,
or failed in its own code) makes the others' all_reduce fail when its connection closes, or at the
latest at the process group's timeout: they raise ``CollectiveError``.

``process_group()`` initialises the default group for a block and ends it cleanly: on a normal exit
(and after a ``RankFailedError``, which every rank raises at the same step) the ranks meet in a barrier
before any of them destroys the group, so no rank tears down its connections while another still
communicates; after any other error the group is destroyed at once, which the other ranks see as a
closed connection instead of waiting for the timeout.

Without a process group, or with a group of one process, nothing changes. ``meta_loss``, ``adapt``
and ``predict`` always work on the local tasks only.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._checks import check_int
from .tasks import TaskBatch

__all__ = [
    "is_distributed",
    "rank_and_world_size",
    "process_group",
    "shard_sizes",
    "shard",
    "broadcast_parameters",
    "RankFailedError",
    "CollectiveError",
]

# a failing rank's message travels to the others in a fixed number of bytes
_MESSAGE_BYTES = 512


class RankFailedError(RuntimeError):
    """A rank's own computation raised inside a distributed meta_step. Every rank raises this error at
    the same step (the failure travels in the step's all_reduce), so the ranks are still in step."""


class CollectiveError(RuntimeError):
    """The all_reduce of a distributed meta_step failed: another rank died, was killed, left the group,
    or did not reach this step within the process group's timeout."""


def is_distributed() -> bool:
    """True when a default process group of more than one process is initialised: meta_step then
    averages over the ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group(
    backend: Optional[str] = None,
    *,
    timeout: datetime.timedelta = datetime.timedelta(minutes=5),
    init_method: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> Iterator[tuple[int, int]]:
    """Run a block inside the default process group, and end the group cleanly whatever happens.

    Yields (rank, world size). The group is initialised when the process was launched for it
    (``torchrun`` sets RANK and WORLD_SIZE) or when ``init_method`` is given (with ``rank`` and
    ``world_size``); otherwise the block runs as a single process, (0, 1), with no group. ``backend``
    is passed to ``init_process_group`` (None: torch's default, gloo on CPU and NCCL on CUDA);
    ``timeout`` bounds every collective, so a rank that disappears fails the others instead of hanging.

    On leaving the block normally, or with a ``RankFailedError`` (raised by every rank at the same
    step), all ranks wait in a barrier before any destroys the group: a rank that tears down while
    another still sends or receives can abort at interpreter exit. On any other error (including a
    ``CollectiveError`` or Ctrl-C) the group is destroyed at once: the other ranks may be anywhere, and
    the closed connection is what tells them.

    Example::

        with process_group("gloo", timeout=datetime.timedelta(seconds=120)) as (rank, world_size):
            ...  # maml.meta_step(shard(tasks, 256), optimizer)
    """
    launched = init_method is not None or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
    if not launched:
        yield rank_and_world_size()
        return
    if dist.is_initialized():
        raise RuntimeError("process_group: a default process group is already initialised; "
                           "destroy it first or use it without process_group()")
    options = {} if init_method is None else {"init_method": init_method, "rank": rank, "world_size": world_size}
    dist.init_process_group(backend, timeout=timeout, **options)
    synchronised_exit = False
    try:
        yield rank_and_world_size()
        synchronised_exit = True
    except RankFailedError:
        synchronised_exit = True
        raise
    finally:
        _end_process_group(synchronised_exit)


def _end_process_group(synchronised_exit: bool) -> None:
    """Destroy the default group; first meet the other ranks in a barrier when they are known to be
    leaving at the same point."""
    try:
        if synchronised_exit and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except Exception:  # a rank left early after all: destroying is all that is left to do
                pass
    finally:
        dist.destroy_process_group()
        gc.collect()  # free what still refers to the group's work now, not during interpreter shutdown


def shard_sizes(num_tasks: int, world_size: int) -> list[int]:
    """How many of num_tasks tasks each rank holds: torch.tensor_split's split, the first
    ``num_tasks % world_size`` ranks one more. Every rank needs at least one task."""
    num_tasks = check_int("num_tasks", num_tasks, 1)
    world_size = check_int("world_size", world_size, 1)
    if num_tasks < world_size:
        raise ValueError(
            f"a meta-batch of {num_tasks} tasks cannot be split across a world size of {world_size}: "
            "every rank needs at least one task"
        )
    base, extra = divmod(num_tasks, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    default_rank, default_world = rank_and_world_size()
    world_size = default_world if world_size is None else check_int("world_size", world_size, 1)
    rank = default_rank if rank is None else check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size = {world_size}, got {rank}")
    return rank, world_size


def shard(source, num_tasks: Optional[int] = None, *, rank: Optional[int] = None,
          world_size: Optional[int] = None, **sample_kwargs) -> TaskBatch:
    """This rank's tasks of a meta-batch.

    - ``shard(batch)``: ``batch`` is the global TaskBatch, the same on every rank (sampled from the same
      seed); returns this rank's contiguous slice of its T tasks, split as ``torch.tensor_split(T, world_size)``
      (uneven splits allowed: the first ``T % world_size`` ranks hold one task more). Every tensor field of the
      batch whose leading dimension is T is sliced (for a SinusoidTaskBatch, its amplitude and phase too);
      the result has the batch's type.
    - ``shard(sampler, num_tasks, **sample_kwargs)``: ``sampler`` has ``.sample(n, ...)`` and ``num_tasks`` is
      the size of the global meta-batch; this rank draws only its own share, ``sampler.sample(n_rank,
      **sample_kwargs)``. Give each rank its own seed (``SinusoidTasks(seed=base_seed + rank)``), or every rank
      draws the same tasks.

    rank and world_size default to those of the default process group, or 0 and 1 without one (the whole
    batch). Raises ValueError when there are fewer tasks than ranks.
    """
    rank, world_size = _rank_and_world(rank, world_size)
    if isinstance(source, TaskBatch):
        if num_tasks is not None or sample_kwargs:
            raise TypeError("shard(batch) takes the global TaskBatch alone; num_tasks and sampling options are "
                            "for shard(sampler, num_tasks)")
        total = source.num_tasks
        sizes = shard_sizes(total, world_size)
        if world_size == 1:
            return source
        start = sum(sizes[:rank])
        return source.select(start, start + sizes[rank])
    if callable(getattr(source, "sample", None)):
        if num_tasks is None:
            raise TypeError("shard(sampler, num_tasks): num_tasks, the size of the global meta-batch, is required")
        return source.sample(shard_sizes(num_tasks, world_size)[rank], **sample_kwargs)
    raise TypeError(
        f"shard takes a TaskBatch or a task sampler with .sample(num_tasks), got {type(source).__name__}"
    )


@torch.no_grad()
def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (a no-op without a
    distributed process group). meta_step does this on its first call; call it again after loading
    weights on one rank only."""
    if not is_distributed():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_contiguous():
            dist.broadcast(tensor, src=src)
        else:  # a collective needs contiguous memory
            staged = tensor.contiguous()
            dist.broadcast(staged, src=src)
            tensor.copy_(staged)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _all_reduce(tensor: Tensor, where: str, cause: Optional[BaseException] = None) -> None:
    """dist.all_reduce (sum), its failure raised as a CollectiveError that says what it means."""
    try:
        dist.all_reduce(tensor)
    except Exception as error:
        detail = f"; this rank had failed too: {_describe(cause)}" if cause is not None else ""
        # the failed call's frames hold its gloo work: drop them, so that the work is freed with the group, not
        # at interpreter exit, where freeing it can abort the process (SIGABRT) after the error was reported
        error.__traceback__ = None
        raise CollectiveError(
            f"{where}: the all_reduce with the other ranks failed: a rank died, was killed, left the group, or did "
            f"not reach this step within the process group's timeout ({_describe(error)}){detail}"
        ) from error


def _failure_message(where: str, bucket_device: torch.device, failed_ranks: list[int], rank: int,
                     local_message: str) -> str:
    """Every rank's view of which ranks failed and why. A second collective, on the failure path only:
    each failing rank writes its message into its own row of a byte buffer, and a sum gathers them."""
    world_size = dist.get_world_size()
    encoded = local_message.encode("utf-8")[:_MESSAGE_BYTES]
    rows = torch.zeros(world_size, _MESSAGE_BYTES, dtype=torch.uint8)
    rows[rank, : len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    rows = rows.to(bucket_device)
    _all_reduce(rows, where)
    rows = rows.cpu()
    reasons = []
    for r in failed_ranks:
        raw = bytes(rows[r].tolist()).rstrip(b"\0")
        reasons.append(f"rank {r} failed: {raw.decode('utf-8', errors='replace') or 'unknown error'}")
    return f"{where}: " + "; ".join(reasons) + " (no rank updated its weights at this step)"


def step_on_mean_gradients(optimizer: torch.optim.Optimizer, backward_of_shard: Callable[[], Tensor], tasks: int,
                           where: str) -> Tensor:
    """One optimizer step on the gradients of the whole meta-batch: each rank runs ``backward_of_shard()`` (the
    backward of the mean loss of its ``tasks`` tasks, returning that loss detached), the gradients of every
    parameter the optimizer
    steps are averaged over the ranks, each weighted by its task count, then every rank steps. Returns the mean
    loss over all tasks. If any rank raises, every rank raises RankFailedError before any weight changes."""
    stepped, seen = [], set()  # exactly what the optimizer steps, in an order every rank shares
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                stepped.append(p)
    optimizer.zero_grad()

    def local_mean_gradients():
        loss = backward_of_shard()
        return tasks, loss, [p.grad for p in stepped]

    loss, grads = _weighted_mean_over_ranks(local_mean_gradients, stepped, where)
    for p, grad in zip(stepped, grads):
        if grad is None:
            p.grad = None
        elif p.grad is None:
            p.grad = grad.clone()
        else:
            p.grad.copy_(grad)
    optimizer.step()
    return loss


def _weighted_mean_over_ranks(
    compute: Callable[[], tuple[int, Tensor, Sequence[Optional[Tensor]]]],
    layout: Sequence[Tensor],
    where: str,
) -> tuple[Tensor, list[Optional[Tensor]]]:
    """The mean over the whole meta-batch of quantities each rank computes on its own tasks.

    ``compute()`` returns (T_r, this rank's mean loss over its tasks as a 0-dim tensor, this rank's mean
    of each quantity over its tasks, None where it has none); ``layout`` holds one tensor shaped like each
    quantity, the same on every rank (it fixes the bucket even on a rank whose compute() raises). Returns
    (the mean loss over all T = sum T_r tasks, the mean of each quantity, None where no rank had it), each
    ``sum_r T_r * mean_r / T``, with one all_reduce of one flat bucket:
    ``[failed flag per rank, T_r, T_r * loss_r, has-value flag per quantity, T_r * values...]``.

    If compute() raises on any rank, every rank raises a RankFailedError naming the failed ranks and their errors.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dtype = torch.float32
    for tensor in layout:
        dtype = torch.promote_types(dtype, tensor.dtype)  # exact counts and weights, also for bf16/fp16
    device = layout[0].device
    head_size = world_size + 2 + len(layout)
    local_error: Optional[BaseException] = None
    try:
        count, loss, values = compute()
        values = list(values)
        if len(values) != len(layout):
            raise RuntimeError(f"{where}: {len(values)} quantities to average, expected {len(layout)}")
        head = torch.zeros(head_size, dtype=dtype, device=device)
        head[world_size] = count
        head[world_size + 1] = loss.detach().to(device=device, dtype=dtype) * count
        parts = [head]
        for i, (value, like) in enumerate(zip(values, layout)):
            if value is None:
                parts.append(torch.zeros(like.numel(), dtype=dtype, device=device))
            else:
                if value.shape != like.shape:
                    raise RuntimeError(f"{where}: quantity {i} has shape {list(value.shape)}, "
                                       f"expected {list(like.shape)}")
                head[world_size + 2 + i] = 1
                parts.append(value.detach().reshape(-1).to(device=device, dtype=dtype) * count)
        bucket = torch.cat(parts)
    except Exception as error:
        local_error = error
        bucket = torch.zeros(head_size + sum(like.numel() for like in layout), dtype=dtype, device=device)
        bucket[rank] = 1
    _all_reduce(bucket, where, local_error)
    head = bucket[:head_size].tolist()
    failed_ranks = [r for r in range(world_size) if head[r] > 0]
    if failed_ranks:
        local_message = _describe(local_error) if local_error is not None else ""
        message = _failure_message(where, device, failed_ranks, rank, local_message)
        raise RankFailedError(message) from local_error
    total = head[world_size]
    loss = bucket[world_size + 1] / bucket[world_size]  # a 0-dim tensor, as a single process returns it
    means: list[Optional[Tensor]] = []
    offset = head_size
    for i, like in enumerate(layout):
        size = like.numel()
        if head[world_size + 2 + i] > 0:
            mean = (bucket[offset : offset + size] / total).view(like.shape)
            means.append(mean.to(device=like.device, dtype=like.dtype))
        else:
            means.append(None)
        offset += size
    return loss, means
