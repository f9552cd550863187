"""The meta-batch split across gloo processes on this CPU, against one process on the whole batch.

One launch per world size (2 ranks, 3 ranks, both with uneven shards), started with the spawn start
method and a tcp:// rendezvous on a free localhost port. Each rank trains every configuration, then
goes through the failures (a rank raising inside meta_step, caught; then one that ends every rank),
and writes what it saw to a file; the launcher waits with a deadline, so a hang fails the tests
instead of stalling them. Each rank initialises its model from its own seed: only the broadcast from
rank 0 makes them start equal, and rank 0's seed is the single process's.
"""
import datetime
import importlib.util
import os
import signal
import socket
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from metalearn_fast import MAML, MLP, Reptile, TaskBatch
from metalearn_fast.distributed import (
    RankFailedError,
    is_distributed,
    process_group,
    rank_and_world_size,
    shard,
    shard_sizes,
)
from metalearn_fast.tasks import SinusoidTaskBatch, SinusoidTasks

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

SIZES = [2, 12, 12, 3]
TASKS = 5  # split 3 + 2 over two ranks and 2 + 2 + 1 over three: uneven both times
STEPS = 5
CLOSE = dict(rtol=0, atol=1e-10)
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=20)
LAUNCH_DEADLINE_S = 120  # far above the few seconds a launch takes, far below a hung CI job


# ---- what every rank runs, and the single process runs on the whole batch ----

class ShiftedMLP(nn.Module):
    """A model the fast path does not take (so the generic path runs), with a buffer: the broadcast
    must cover buffers too."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=torch.float64) for a, b in zip(SIZES[:-1], SIZES[1:]))
        self.register_buffer("shift", torch.randn(SIZES[0], dtype=torch.float64))

    def forward(self, x):
        x = x + self.shift
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


LOSSES = {"maml": "mse", "meta_sgd_adam": "cross_entropy", "anil_generic": "mse", "reptile": "cross_entropy"}


def make_learner(config, seed, loss=None):
    """The learner and optimizer of a configuration, initialised from ``seed``."""
    torch.manual_seed(seed)
    loss = loss or LOSSES[config]
    if config == "maml":
        learner = MAML(MLP(SIZES, dtype=torch.float64), inner_lr=0.1, inner_steps=2, loss=loss)
        return learner, torch.optim.SGD(learner.parameters(), lr=0.05)
    if config == "meta_sgd_adam":
        learner = MAML(MLP(SIZES, dtype=torch.float64), inner_lr=0.1, inner_steps=2, learn_inner_lr=True, loss=loss)
        with torch.no_grad():  # rates that differ between ranks too, until the broadcast
            for rate in learner.inner_lrs:
                rate.copy_(0.05 + 0.1 * torch.rand_like(rate))
        return learner, torch.optim.Adam(learner.parameters(), lr=0.01)
    if config == "anil_generic":
        learner = MAML(ShiftedMLP(), inner_lr=0.1, inner_steps=3, first_order=True, adapt_head_only=True, loss=loss)
        return learner, torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9)
    if config == "reptile":
        return Reptile(MLP(SIZES, dtype=torch.float64), inner_lr=0.1, inner_steps=3, outer_lr=0.5, loss=loss), None
    raise ValueError(config)


def make_batch(kind, step):
    """The global meta-batch of a step, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    x_support = torch.randn(TASKS, 6, SIZES[0], generator=g, dtype=torch.float64)
    x_query = torch.randn(TASKS, 7, SIZES[0], generator=g, dtype=torch.float64)
    if kind == "cross_entropy":
        y_support = torch.randint(0, SIZES[-1], (TASKS, 6), generator=g)
        y_query = torch.randint(0, SIZES[-1], (TASKS, 7), generator=g)
    else:
        y_support = torch.randn(TASKS, 6, SIZES[-1], generator=g, dtype=torch.float64)
        y_query = torch.randn(TASKS, 7, SIZES[-1], generator=g, dtype=torch.float64)
    return TaskBatch(x_support, y_support, x_query, y_query)


def meta_step(learner, optimizer, batch):
    return float(learner.meta_step(batch) if optimizer is None else learner.meta_step(batch, optimizer))


def train(config, seed, steps=range(STEPS), loss=None):
    """meta_step on this rank's shard of each step's batch (the whole batch without a process group).
    Returns the losses and the learner's final state (parameters, learned rates and buffers)."""
    learner, optimizer = make_learner(config, seed, loss)
    losses = [meta_step(learner, optimizer, shard(make_batch(LOSSES[config], step))) for step in steps]
    return losses, {name: value.detach().clone() for name, value in learner.state_dict().items()}


def failing_mse(rank_to_fail, state):
    """The MSE loss of each task, raising on one rank while state["fail"] is set."""

    def loss(pred, target):
        if state["fail"] and dist.get_rank() == rank_to_fail:
            raise ValueError(f"task data went bad on rank {rank_to_fail}")
        return (pred - target).pow(2).flatten(1).mean(1)

    return loss


# ---- what each rank runs: training, then failures ----

def run_rank(rank, world_size, result):
    """Everything a launch checks, in one launch per world size (each launch costs seconds of start-up)."""
    # 1. train every configuration on this rank's shards
    for config in LOSSES:
        result[config] = train(config, seed=rank)
    result["shard_size"] = shard(make_batch("mse", 0)).num_tasks

    # 2. MAML: rank 1 raises inside meta_step at step 2; every rank gets the error there and carries on
    state = {"fail": False}
    learner, optimizer = make_learner("maml", seed=rank, loss=failing_mse(1, state))
    for step in range(STEPS):
        state["fail"] = step == 2
        started = time.monotonic()
        try:
            learner.meta_step(shard(make_batch("mse", step)), optimizer)
        except RankFailedError as error:
            result["maml_error"] = (step, f"{type(error).__name__}: {error}", time.monotonic() - started)
    result["maml_state"] = {name: value.detach().clone() for name, value in learner.state_dict().items()}

    # 3. a failure nobody catches, so that every rank exits with an error
    reptile = Reptile(MLP(SIZES, dtype=torch.float64), inner_lr=0.1, inner_steps=1, outer_lr=0.5,
                      loss=failing_mse(0, state))
    for step in range(STEPS):
        result["steps_done"] = step
        if world_size == 2 and rank == 1 and step == 2:
            # in the user's own code, outside meta_step: rank 0 is left waiting in its all_reduce
            raise KeyError("rank 1 failed in its own code, before meta_step")
        state["fail"] = world_size == 3 and step == 2  # inside Reptile.meta_step, on rank 0
        result["last_step_started"] = time.monotonic()
        reptile.meta_step(shard(make_batch("mse", step)))


def kill_one_rank(rank, world_size, result):
    """Rank 0 (which also hosts the rendezvous store) is killed with SIGKILL at step 2, before its
    meta_step; the others are then waiting for it in their all_reduce."""
    learner, optimizer = make_learner("maml", seed=rank)
    for step in range(STEPS):
        result["steps_done"] = step
        if rank == 0 and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        result["last_step_started"] = time.monotonic()
        learner.meta_step(shard(make_batch("mse", step)), optimizer)


def _rank_main(rank, world_size, port, out_dir, scenario=run_rank, timeout=PROCESS_GROUP_TIMEOUT):
    torch.set_num_threads(1)
    result = {}
    # the library's own set-up and tear-down, as the example and the README use it
    with process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                       timeout=timeout):
        try:
            scenario(rank, world_size, result)
        except Exception as error:
            result["error"] = f"{type(error).__name__}: {error}"
            result["error_time"] = time.monotonic()
            raise
        finally:
            torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world_size, out_dir, scenario=run_rank, timeout=PROCESS_GROUP_TIMEOUT):
    """scenario (default run_rank) on world_size gloo ranks. Returns (exit codes, each rank's result)."""
    context = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, str(out_dir), scenario, timeout))
        for rank in range(world_size)
    ]
    start = time.monotonic()
    for process in processes:
        process.start()
    for process in processes:
        process.join(max(0.0, start + LAUNCH_DEADLINE_S - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()
    assert not hung, f"ranks {hung} of {world_size} were still running after {LAUNCH_DEADLINE_S} s"
    results = []
    for rank in range(world_size):
        path = os.path.join(out_dir, f"rank{rank}.pt")
        results.append(torch.load(path) if os.path.exists(path) else {})
    return [process.exitcode for process in processes], results


_LAUNCHES = {}


def launched(world_size, tmp_path_factory):
    """The exit codes and results of the launch on world_size ranks, made once per test session."""
    if world_size not in _LAUNCHES:
        _LAUNCHES[world_size] = launch(world_size, tmp_path_factory.mktemp(f"ranks{world_size}"))
    return _LAUNCHES[world_size]


@pytest.fixture(params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, tmp_path_factory):
    world_size = request.param
    exit_codes, results = launched(world_size, tmp_path_factory)
    missing = [rank for rank, result in enumerate(results) if "maml_state" not in result]
    assert not missing, f"ranks {missing} stopped early: {[results[rank].get('error') for rank in missing]}"
    return world_size, results


# ---- many ranks = one process on the whole batch ----

def test_every_rank_holds_its_share_of_the_tasks(ranks):
    world_size, results = ranks
    assert [result["shard_size"] for result in results] == shard_sizes(TASKS, world_size)
    assert len(set(shard_sizes(TASKS, world_size))) == 2  # the split is uneven


@pytest.mark.parametrize("config", list(LOSSES))
def test_ranks_end_where_one_process_on_the_whole_batch_ends(ranks, config):
    world_size, results = ranks
    assert not is_distributed()  # no process group here: the whole batch
    expected_losses, expected_state = train(config, seed=0)
    for rank, result in enumerate(results):
        losses, state = result[config]
        assert losses == pytest.approx(expected_losses, rel=1e-10, abs=0), f"rank {rank}"
        assert state.keys() == expected_state.keys()
        for name, value in state.items():
            torch.testing.assert_close(value, expected_state[name], **CLOSE, msg=f"rank {rank}: {name}")
    # and the weights moved: equal ranks are not merely untouched ranks
    start = make_learner(config, seed=0)[0].state_dict()
    assert any(not torch.equal(start[name], expected_state[name]) for name in start)


# ---- failures: every rank fails at the same step, nobody hangs ----

def test_a_rank_raising_inside_meta_step_fails_every_rank_at_that_step(ranks):
    world_size, results = ranks
    for rank, result in enumerate(results):
        step, message, seconds = result["maml_error"]
        assert step == 2, f"rank {rank}"
        assert message.startswith("RankFailedError: MAML.meta_step: rank 1 failed: "
                                  "ValueError: task data went bad on rank 1"), message
        assert seconds < 5, f"rank {rank} took {seconds:.1f} s to learn of the failure"
    # no rank updated its weights at the failed step, so all still equal the single process without it
    _, expected_state = train("maml", seed=0, steps=[0, 1, 3, 4])
    for rank, result in enumerate(results):
        for name, value in result["maml_state"].items():
            torch.testing.assert_close(value, expected_state[name], **CLOSE, msg=f"rank {rank}: {name}")


def test_an_uncaught_error_in_meta_step_ends_every_rank_with_it(tmp_path_factory):
    exit_codes, results = launched(3, tmp_path_factory)
    assert exit_codes == [1, 1, 1]
    for rank, result in enumerate(results):
        assert result["steps_done"] == 2, f"rank {rank}"
        expected = "RankFailedError: Reptile.meta_step: rank 0 failed: ValueError: task data went bad on rank 0"
        assert result["error"].startswith(expected), result["error"]
        assert result["error_time"] - result["last_step_started"] < 5


def test_a_rank_dying_outside_meta_step_fails_the_others_instead_of_hanging(tmp_path_factory):
    exit_codes, results = launched(2, tmp_path_factory)
    assert exit_codes[1] == 1 and results[1]["error"].startswith("KeyError")
    # rank 0 waits in its all_reduce until the process group sees that rank 1 is gone (its connection
    # closes) or, at the latest, until the process group's timeout
    assert exit_codes[0] == 1 and results[0]["steps_done"] == 2, results[0]
    assert results[0]["error"].startswith("CollectiveError: Reptile.meta_step: the all_reduce with the other ranks "
                                          "failed"), results[0]["error"]
    waited = results[0]["error_time"] - results[0]["last_step_started"]
    assert waited < PROCESS_GROUP_TIMEOUT.total_seconds() + 10, results[0]["error"]


KILL_TIMEOUT = datetime.timedelta(seconds=8)


def test_a_rank_killed_mid_run_fails_the_others_within_the_timeout(tmp_path):
    exit_codes, results = launch(3, tmp_path, scenario=kill_one_rank, timeout=KILL_TIMEOUT)
    assert exit_codes == [-signal.SIGKILL, 1, 1], [result.get("error") for result in results]
    for rank in (1, 2):
        result = results[rank]
        assert result["steps_done"] == 2, result
        assert result["error"].startswith("CollectiveError: MAML.meta_step: the all_reduce with the other ranks "
                                          "failed"), result["error"]
        waited = result["error_time"] - result["last_step_started"]
        assert waited < KILL_TIMEOUT.total_seconds() + 5, f"rank {rank} waited {waited:.1f} s"


# ---- in this process: no process group, or a group of one ----

def test_one_process_group_changes_nothing():
    expected_losses, expected_state = train("meta_sgd_adam", seed=0)
    with process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                       timeout=PROCESS_GROUP_TIMEOUT) as (rank, world_size):
        assert dist.is_initialized() and (rank, world_size) == (0, 1)
        assert not is_distributed() and rank_and_world_size() == (0, 1)
        losses, state = train("meta_sgd_adam", seed=0)
    assert not dist.is_initialized()  # ended with the block
    assert losses == expected_losses
    for name, value in state.items():
        assert torch.equal(value, expected_state[name]), name


def test_process_group_outside_a_launch_runs_one_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group("gloo") as (rank, world_size):
        assert (rank, world_size) == (0, 1) and not dist.is_initialized()


def test_process_group_ends_the_group_when_the_block_raises():
    with pytest.raises(KeyError, match="from the block"):
        with process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                           timeout=PROCESS_GROUP_TIMEOUT):
            raise KeyError("from the block")
    assert not dist.is_initialized()


def test_process_group_refuses_a_group_that_already_exists():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=PROCESS_GROUP_TIMEOUT)
    try:
        with pytest.raises(RuntimeError, match="already initialised"):
            with process_group("gloo", init_method="tcp://127.0.0.1:1", rank=0, world_size=1):
                pass
        assert dist.is_initialized()  # the caller's group is left alone
    finally:
        dist.destroy_process_group()


# ---- shard ----

def test_shard_sizes_are_tensor_split_sizes():
    for tasks in range(1, 9):
        for world_size in range(1, tasks + 1):
            expected = [len(part) for part in torch.tensor_split(torch.arange(tasks), world_size)]
            assert shard_sizes(tasks, world_size) == expected


def test_shard_slices_every_per_task_field_like_tensor_split():
    batch = SinusoidTasks(seed=0).sample(7, dtype=torch.float64)
    fields = ("x_support", "y_support", "x_query", "y_query", "amplitude", "phase")
    shards = [shard(batch, rank=rank, world_size=3) for rank in range(3)]
    assert [s.num_tasks for s in shards] == [3, 2, 2]
    for name in fields:
        expected = torch.tensor_split(getattr(batch, name), 3)
        for rank, part in enumerate(shards):
            assert type(part) is SinusoidTaskBatch
            assert torch.equal(getattr(part, name), expected[rank]), (rank, name)
    assert shard(batch) is batch  # no process group: the whole batch


def test_shard_of_a_sampler_draws_this_ranks_share_from_its_own_sampler():
    for rank, size in enumerate([3, 2, 2]):
        part = shard(SinusoidTasks(seed=10 + rank), 7, rank=rank, world_size=3, dtype=torch.float64)
        expected = SinusoidTasks(seed=10 + rank).sample(size, dtype=torch.float64)
        assert part.num_tasks == size and part.x_support.dtype == torch.float64
        assert torch.equal(part.x_support, expected.x_support) and torch.equal(part.y_query, expected.y_query)


def test_shard_errors_name_the_sizes():
    batch = make_batch("mse", 0)
    with pytest.raises(ValueError, match="5 tasks cannot be split across a world size of 6"):
        shard(batch, rank=0, world_size=6)
    with pytest.raises(ValueError, match="3 tasks cannot be split across a world size of 4"):
        shard(SinusoidTasks(seed=0), 3, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank must be < world_size = 2"):
        shard(batch, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        shard(batch, rank=0, world_size=0)
    with pytest.raises(TypeError, match="num_tasks"):
        shard(batch, 3)
    with pytest.raises(TypeError, match="num_tasks"):
        shard(SinusoidTasks(seed=0))
    with pytest.raises(TypeError, match="TaskBatch or a task sampler"):
        shard([batch])


def test_the_example_runs_in_one_process(capsys):
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "distributed_sine.py")
    spec = importlib.util.spec_from_file_location("distributed_sine", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--meta-steps", "3", "--meta-batch", "4"])
    out = capsys.readouterr().out
    assert "1 process(es)" in out and "meta-step    2" in out and "200 new tasks" in out
