"""learn2learn's loops with metalearn_fast.l2l against learn2learn itself, timed interleaved in one process.

    python bench/l2l_interleaved.py [--rounds 9] [--threads 1]

The workloads and entries of metalearn_fast/benchmarks/test_l2l.py (the same loops, checked there against the
plain-torch loop in float64); here each round times one float32 meta-step of every entry in turn, the order
alternating between rounds, so that a busy machine slows all entries alike. Prints the median per meta-step and
learn2learn's median / ours (above 1: faster). Needs learn2learn (its last release builds on Python <= 3.10);
without it, the hand-written plain-torch loop is the baseline.
"""
import argparse

import torch

from metalearn_fast.benchmarks.entries import LEARN2LEARN, OURS, PLAIN_TORCH
from metalearn_fast.benchmarks.interleaved import interleaved_medians
from metalearn_fast.benchmarks.test_l2l import WORKLOADS, first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import learn2learn  # noqa: F401

        baseline = LEARN2LEARN
    except ImportError:
        baseline = PLAIN_TORCH
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds; baseline: {baseline}")
    print(f"{'workload':<24}{baseline + ' ms':>18}{'metalearn_fast ms':>20}{'speedup':>10}")
    for workload in WORKLOADS:
        steps = {entry: first_step(entry, workload, device)[2] for entry in (baseline, OURS)}
        medians = interleaved_medians(steps, args.rounds)
        base, ours = (medians[e] * 1e3 for e in (baseline, OURS))
        print(f"{workload.id:<24}{base:>18.2f}{ours:>20.2f}{base / ours:>9.2f}x")


if __name__ == "__main__":
    main()
