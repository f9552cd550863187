"""The pytest plugin of the benchmark suites: their options, fixtures, timing policy and machine record.

Loaded by the suites' conftest.py (``metalearn-fast bench``) and by bench/conftest.py (``pytest bench/``).

Options:
  --device cpu|cuda|cuda:N   where every workload runs (default cpu)
  --quick                    small workloads only and a shorter time per entry (under a minute on 2 cores)

Memory: after the timing, one more call is made with its peak memory recorded (``extra_info["peak_mib"]``,
a column of the report): on CUDA the peak of torch's allocator above what was allocated before the call; on a
Linux CPU the peak resident set size above the one before the call (the kernel's high-water mark, reset for
the call, with glibc's free memory and metalearn_fast's kept blocks (empty_cpu_cache) returned first), which
counts every allocation, torch's or not.

Work: for the entries of roofline.COUNTED (plain torch, the per-task loop) one more call is counted by roofline.count: its
matrix-product FLOPs and working set (``extra_info["flops"]``, ``extra_info["bytes"]``); the machine's peak
(roofline.peak_gflops) is measured once and recorded with the machine. The report turns them into GFLOP/s and a
fraction of the peak.

Timing: each entry runs once first, the check that it computes the same result as plain torch,
which also warms it up and tells how long a call takes. Then rounds of ``iterations`` calls are timed with
``benchmark.pedantic``: enough iterations per round that a round lasts at least a millisecond, and
enough rounds to fill ``--benchmark-max-time`` (default 1 s; 0.1 s with --quick), never fewer than
``--benchmark-min-rounds`` (default 5; 2 with --quick) — pytest-benchmark's own options, read here.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import math
import os
import platform
import time
from typing import Callable

import pytest
import torch

from ..ops import empty_cpu_cache
from . import roofline
from .entries import HIGHER, LEARN2LEARN

PEERS = {HIGHER: "higher", LEARN2LEARN: "learn2learn"}  # entry -> module
HOW_TO_INSTALL = {
    HIGHER: "pip install higher (or the peers extra: pip install 'metalearn-fast[peers]')",
    # learn2learn 0.2.0, its latest release, ships C files that no longer compile on Python 3.11+
    LEARN2LEARN: "pip install learn2learn, on Python 3.10 or older (its latest release, 0.2.0, "
                 "does not build on 3.11+)",
}

QUICK_MAX_TIME = 0.1
QUICK_MIN_ROUNDS = 2
MIN_ROUND_SECONDS = 1e-3  # shorter rounds would measure the timer as much as the workload


def pytest_addoption(parser):
    group = parser.getgroup("metalearn_fast benchmarks")
    group.addoption("--device", default="cpu", help="device every workload runs on: cpu, cuda or cuda:N (default cpu)")
    group.addoption(
        "--quick", action="store_true",
        help="small workloads only (no large linear_relu shape, no large pretrain) and fewer rounds",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "large: a large workload, left out by --quick")
    name = config.getoption("--device")
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise pytest.UsageError(f"--device {name!r} is not a torch device (use cpu, cuda or cuda:N)") from None


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    large = [item for item in items if item.get_closest_marker("large")]
    if large:
        config.hook.pytest_deselected(items=large)
        items[:] = [item for item in items if item not in large]


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--device {name}: no GPU is visible to torch {torch.__version__}")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that a timed call includes the work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def require_peer(entry: str) -> None:
    """Skip, with the reason, when the peer library of ``entry`` is not installed."""
    pytest.importorskip(PEERS[entry], reason=f"{PEERS[entry]} is not installed: {HOW_TO_INSTALL[entry]}")


def assert_same(got, expected, what: str, rtol: float, atol: float) -> None:
    """A wrong fast answer must not win: every entry is checked against plain torch before it is timed."""
    got, expected = list(got), list(expected)
    assert len(got) == len(expected), f"{what}: {len(got)} results, plain torch gives {len(expected)}"
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(
            a, b, rtol=rtol, atol=atol,
            msg=lambda message, index=index: f"{what}, result {index} differs from plain torch: {message}",
        )


_plain_torch_results: dict = {}


def plain_torch_result(key, compute: Callable[[], object]):
    """compute(), once per key in a session: plain torch's result, which each entry of a group is checked against."""
    if key not in _plain_torch_results:
        _plain_torch_results[key] = compute()
    return _plain_torch_results[key]


def meta_step_with(step: Callable, optimizer: torch.optim.Optimizer, steps_itself: bool) -> Callable[[], object]:
    """One meta-step of an entry: ``step(optimizer)`` for one that steps the optimizer itself (ours), else
    zero_grad, ``step()`` (the meta-backward, returning the loss) and ``optimizer.step()``."""
    if steps_itself:
        return lambda: step(optimizer)

    def meta_step():
        optimizer.zero_grad()
        loss = step()
        optimizer.step()
        return loss

    return meta_step


def time_once(fn: Callable[[], object], device: torch.device):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mib(fn: Callable[[], object], device: torch.device):
    """The peak memory one call of fn() takes above what was in use before it, in MiB; None where this machine
    cannot tell (a CPU that is not Linux's)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        empty_cpu_cache()  # the blocks metalearn_fast keeps for reuse count as the call's, as glibc's would
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the high-water mark VmHWM to the current resident set
        before = _status_kib("VmRSS")
    except (OSError, KeyError, AttributeError):
        return None
    fn()
    return (_status_kib("VmHWM") - before) / 1024


@pytest.fixture
def measure(benchmark, request, device):
    """measure(group, entry, fn, first_call_seconds): time fn() in ``group`` as ``entry``.

    ``first_call_seconds`` is how long the checking call took; it sizes the rounds."""
    config = request.config
    max_time = float(config.getoption("benchmark_max_time"))
    min_rounds = int(config.getoption("benchmark_min_rounds"))
    if config.getoption("--quick"):
        max_time, min_rounds = min(max_time, QUICK_MAX_TIME), min(min_rounds, QUICK_MIN_ROUNDS)

    def run(group: str, entry: str, fn: Callable[[], object], first_call_seconds: float) -> None:
        benchmark.group = group
        benchmark.extra_info["entry"] = entry

        def timed():
            fn()
            synchronize(device)

        if benchmark.disabled:  # --benchmark-disable: pytest-benchmark makes this one call
            benchmark(timed)
            return
        seconds = first_call_seconds
        if seconds < 0.01:  # a first call this short is mostly one-time cost: look again
            seconds = min(time_once(timed, device)[0] for _ in range(3))
        iterations = max(1, math.ceil(MIN_ROUND_SECONDS / max(seconds, 1e-9)))
        rounds = max(min_rounds, int(max_time / (seconds * iterations)))
        benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=1 if seconds < 0.1 else 0)
        peak = peak_memory_mib(fn, device)
        if peak is not None:
            benchmark.extra_info["peak_mib"] = round(peak, 1)
        if entry in roofline.COUNTED:
            benchmark.extra_info.update(roofline.count(fn))

    return run


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(distribution: str):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """What the report's header needs, beside pytest-benchmark's own machine record."""
    import metalearn_fast

    info = metalearn_fast.backend_info()
    device = config.getoption("--device")
    cpu = machine_info.get("cpu") or {}
    machine_info["metalearn_fast"] = {
        "version": metalearn_fast.__version__,
        "backend": info["active"],
        "torch": info["torch"],
        "torch_cuda": info["torch_cuda"],
        "cpu": cpu.get("brand_raw") or _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),  # set by hand on a busy machine, say so
        "gpus": info["devices"],
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device))
        if device.startswith("cuda") and torch.cuda.is_available()
        else "",
        "quick": bool(config.getoption("--quick")),
        "peers": {module: _version(module) for module in PEERS.values()},
        # float32 GFLOP/s of one core (CPU, one thread) or of the GPU: the roofline's peak
        "peak_gflops": round(roofline.peak_gflops(torch.device(device)), 1) if _device_usable(device) else None,
    }


def _device_usable(name: str) -> bool:
    return not name.startswith("cuda") or torch.cuda.is_available()
