"""The any-module MAML groups (conv4 and the BatchNorm MLP) timed interleaved in one process, with peak memory.

    python bench/any_module_interleaved.py [--rounds 9] [--threads 2] [--model conv4]

The workloads and entries of metalearn_fast/benchmarks/test_any_module.py (checked there against the per-task
loop in float64); here each round times one float32 meta-step of every entry in turn, the order alternating
between rounds (metalearn_fast/benchmarks/interleaved.py), so that a busy machine slows all entries alike. Then
one more call of each entry records its peak memory (benchmarks/plugin.py's measure). Prints a markdown table
per workload: the median meta-step, torch.func's median / the entry's, and learn2learn's / the entry's where
learn2learn is installed (a peer that is not installed is left out).
"""
import argparse
import importlib.util

import torch

from metalearn_fast.benchmarks import test_any_module as any_module
from metalearn_fast.benchmarks.entries import LEARN2LEARN, TORCH_FUNC
from metalearn_fast.benchmarks.interleaved import interleaved_medians
from metalearn_fast.benchmarks.plugin import PEERS, peak_memory_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=["conv4", "bn-mlp"], default="conv4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    installed = [e for e in any_module.ENTRIES if e not in PEERS or importlib.util.find_spec(PEERS[e])]
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds")
    for workload in [w for w in any_module.LARGE if w.model == args.model]:
        entries = [e for e in installed if e not in any_module.MEMORY_ONLY or workload.tasks == 32]
        steps = {entry: any_module.first_step(entry, workload, device)[2] for entry in entries}
        medians = interleaved_medians(steps, args.rounds)
        print(f"\n{workload.group}\n\n| entry | median | vs torch.func | vs learn2learn | peak memory |\n"
              "|---|---:|---:|---:|---:|")
        for entry in entries:
            l2l = f"{medians[LEARN2LEARN] / medians[entry]:.2f}x" if LEARN2LEARN in medians else "-"
            print(f"| {entry} | {medians[entry] * 1e3:.2f} ms | {medians[TORCH_FUNC] / medians[entry]:.2f}x | {l2l} "
                  f"| {peak_memory_mib(steps[entry], device):.1f} MiB |")


if __name__ == "__main__":
    main()
