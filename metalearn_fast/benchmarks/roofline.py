"""How far each benchmark workload runs from the hardware: its work counted once, the machine's peak measured once.

- Work: ``count(fn)`` runs one call of a group's plain-torch entry (or, where a group has none, its per-task
  loop) under torch's FlopCounterMode, which counts the FLOPs of every matrix product and convolution that call
  dispatches, forward and backward, double backward included (the elementwise ops are left out: they are a small
  share here). Not torch.func's entry: under vmap a convolution becomes a grouped one, whose backward the counter
  counts as if ungrouped (conv4, 16 tasks: 15.3 GFLOP where the per-task loop's 2.5 GFLOP is the work). The same
  call records every tensor storage it touches; their total size is the working set, the bytes a call must move
  at least once (compulsory traffic). Every entry of a group computes the same meta-step, so this count is the
  group's work.
- Peak: ``peak_gflops(device)`` times the fastest float32 kernels torch has: on a GPU a matrix product (the whole
  device); on a CPU, with one torch thread (one core's reachable peak), the faster of a matrix product and a 3x3
  convolution. The convolution is oneDNN's, which uses the core's widest vectors where the BLAS may not: on this
  project's AMD machines MKL's product reaches 107 GFLOP/s on one core, oneDNN's convolution 216-273.

Achieved GFLOP/s = work / an entry's median time; its fraction of the peak says how much of the machine the
entry uses; FLOPs per working-set byte against the machine's FLOP/byte ratio says which bound applies. The report
(report.py) prints both next to each group's speedups.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .entries import PER_TASK_LOOP, PLAIN_TORCH

COUNTED = (PLAIN_TORCH, PER_TASK_LOOP)  # the entries whose calls are counted, the first present giving the work

PEAK_SIZE = {"cpu": 512, "cuda": 8192}  # square float32 product timed for the peak
PEAK_CONV = (4, 256, 16)  # on a CPU also a 3x3 convolution: N, channels in and out, H = W (padded)


class _Storages(TorchDispatchMode):
    """Records the size of every tensor storage an op reads or writes, once per storage."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves((args, kwargs, out)):
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                try:
                    storage = value.untyped_storage()
                except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
                    continue
                self.sizes[storage.data_ptr()] = max(self.sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return out


def count(fn: Callable[[], object]) -> dict:
    """{"flops", "bytes"}: the matrix-product FLOPs of one call of fn() and the bytes of the storages it touches."""
    storages = _Storages()
    with FlopCounterMode(display=False) as flops, storages:
        fn()
    return {"flops": int(flops.get_total_flops()), "bytes": int(sum(storages.sizes.values()))}


def peak_gflops(device: torch.device, repeats: int = 10) -> float:
    """The best GFLOP/s of ``repeats`` calls of a float32 square product and, on a CPU, of a 3x3 convolution (the
    higher of the two): one core's on a CPU (one torch thread while timed), the device's on a GPU."""
    size = PEAK_SIZE["cuda" if device.type == "cuda" else "cpu"]
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    kernels = [(lambda: torch.mm(a, b), 2 * size**3)]
    if device.type == "cpu":
        n, channels, side = PEAK_CONV
        x = torch.randn(n, channels, side, side).contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, channels, 3, 3).contiguous(memory_format=torch.channels_last)
        kernels.append((lambda: F.conv2d(x, w, padding=1), 2 * n * side * side * channels * channels * 9))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return max(flops / _best_seconds(kernel, device, repeats) / 1e9 for kernel, flops in kernels)
    finally:
        torch.set_num_threads(threads)


def _best_seconds(kernel: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` calls of kernel(), after one that warms up."""
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        kernel()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best
