"""The MAML (MLP) groups' fused meta-step against plain torch, timed interleaved in one process.

    python bench/maml_interleaved.py [--rounds 15] [--threads 2]

The sinusoid and Omniglot-sized workloads and the entries of metalearn_fast/benchmarks/test_maml.py (each
checked there against plain torch): metalearn_fast, its per-task kernel forced to AVX2 (on a CPU with AVX-512),
and plain torch as a skilled user writes it (batched over tasks, torch's fused Adam). Each round times a block
of about 20 ms of float32 meta-steps of every entry in turn, the order alternating between rounds
(metalearn_fast/benchmarks/interleaved.py): pytest-benchmark times one entry after another, and this machine's
speed drifts between them. Prints one markdown table: the median meta-step of each entry and plain torch's
median / the entry's.
"""
import argparse
import time

import torch

from metalearn_fast.benchmarks import test_maml as maml
from metalearn_fast.benchmarks.entries import OURS, OURS_AVX2, PLAIN_TORCH
from metalearn_fast.benchmarks.interleaved import interleaved_medians


def _seconds_per_call(step) -> float:
    """A step's seconds per call over about 50 ms of calls (after one call of warm-up)."""
    step()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.05:
        step()
        calls += 1
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    entries = [OURS, PLAIN_TORCH]
    extension = maml.mf.ops._extension
    if extension is not None and extension.CPU_SIMD_AVAILABLE == "avx512":
        entries.insert(1, OURS_AVX2)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds\n\n"
          f"| workload | {' | '.join(entries)} | {' | '.join(f'{e}: speedup' for e in entries[:-1])} |\n"
          f"|---|{'---:|' * (2 * len(entries) - 1)}")
    for workload in [w for w in maml.WORKLOADS if not w.id.startswith("wide")]:
        steps = {e: maml.first_step(e, workload, device)[2] for e in entries}
        # each entry's calls in blocks of about 20 ms: one call of a 0.1 ms step between two of plain torch's
        # would time the caches plain torch leaves behind, not the step
        calls = {e: max(1, round(0.02 / _seconds_per_call(step))) for e, step in steps.items()}
        blocks = {e: (lambda step=steps[e], n=calls[e]: [step() for _ in range(n)]) for e in entries}
        medians = {e: t / calls[e] for e, t in interleaved_medians(blocks, args.rounds).items()}
        times = " | ".join(f"{medians[e] * 1e6:.1f} us" for e in entries)
        ratios = " | ".join(f"{medians[PLAIN_TORCH] / medians[e]:.2f}x" for e in entries[:-1])
        print(f"| {workload.group} | {times} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
