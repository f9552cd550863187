"""conv4 MAML on workloads beside the benchmark's 5-way 1-shot: ours with and without the extension's direct
convolutions, and torch.func, timed interleaved in one process.

    python bench/conv4_variants_interleaved.py [--rounds 5] [--threads 2]

The conv path (metalearn_fast/algorithms/convnet.py) picks per convolution between the extension's direct kernels
(csrc/cpu/grouped_conv_cpu.cpp) and oneDNN's grouped convolution, and sizes its chunks of tasks by their maps'
bytes; both rules were measured on the benchmark's workload. This checks them on others: 5-way 5-shot and 20-way
1-shot Omniglot-sized (28x28) meta-batches of 16 tasks, and mini-ImageNet-sized ones (84x84 RGB, 32 channels, 15
queries a class, 4 tasks), second order and first. Each round times one float32 meta-step (Adam) of every entry in
turn, the order alternating between rounds. Prints a markdown table: the median meta-step of each entry, the
direct kernels' gain (oneDNN only / ours) and torch.func's median / ours. The numbers of every entry are checked
against the per-task loop in float64 on conv4 by tests/test_convnet.py and the any-module benchmark.
"""
import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import metalearn_fast as mf
from metalearn_fast.algorithms import convnet
from metalearn_fast.benchmarks.interleaved import interleaved_medians
from metalearn_fast.benchmarks.peers import torch_func_meta_backward
from metalearn_fast.benchmarks.plugin import meta_step_with

INNER_LR = 0.4


@dataclass(frozen=True)
class Variant:
    name: str
    in_channels: int
    ways: int
    hidden: int
    side: int
    tasks: int
    shots: int
    queries: int
    first_order: bool


VARIANTS = [Variant(f"{name}, {'first' if first_order else 'second'} order", *shape, first_order)
            for name, shape in (("5-way 5-shot, 28x28, 16 tasks", (1, 5, 64, 28, 16, 5, 5)),
                                ("20-way 1-shot, 28x28, 16 tasks", (1, 20, 64, 28, 16, 1, 1)),
                                ("5-way 1-shot, 15 queries, 84x84 RGB, 32 channels, 4 tasks", (3, 5, 32, 84, 4, 1, 15)))
            for first_order in (False, True)]


def make(variant: Variant):
    """(model, TaskBatch) of a variant, the same for every entry."""
    torch.manual_seed(0)
    model = mf.nn.conv4(variant.in_channels, variant.ways, hidden=variant.hidden)
    generator = torch.Generator().manual_seed(0)

    def labels(per_class):
        count = variant.ways * per_class
        return (torch.arange(count) % variant.ways).expand(variant.tasks, count).contiguous()

    shape = (variant.in_channels, variant.side, variant.side)
    batch = mf.TaskBatch(torch.rand(variant.tasks, variant.ways * variant.shots, *shape, generator=generator),
                         labels(variant.shots),
                         torch.rand(variant.tasks, variant.ways * variant.queries, *shape, generator=generator),
                         labels(variant.queries))
    return model, batch


def ours(variant: Variant, direct: bool):
    model, batch = make(variant)
    maml = mf.MAML(model, inner_lr=INNER_LR, first_order=variant.first_order, loss="cross_entropy")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    choose = convnet._direct

    def meta_step():
        if direct:
            return maml.meta_step(batch, optimizer)
        convnet._direct = lambda *args, **kwargs: None  # oneDNN's grouped convolutions throughout
        try:
            return maml.meta_step(batch, optimizer)
        finally:
            convnet._direct = choose

    return meta_step


def with_torch_func(variant: Variant):
    model, batch = make(variant)
    tensors = [batch.x_support, batch.y_support, batch.x_query, batch.y_query]
    step = torch_func_meta_backward(model, F.cross_entropy, tensors, INNER_LR, 1, variant.first_order)
    return meta_step_with(step, torch.optim.Adam(model.parameters(), lr=1e-3), False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, cpu_simd "
          f"{mf.ops._extension.cpu_simd() if mf.ops._extension is not None else 'none (no extension)'}\n")
    print("| workload | metalearn_fast | oneDNN only | direct kernels' gain | torch.func | vs torch.func |\n"
          "|---|---:|---:|---:|---:|---:|")
    for variant in VARIANTS:
        steps = {"ours": ours(variant, True), "oneDNN only": ours(variant, False),
                 "torch.func": with_torch_func(variant)}
        medians = interleaved_medians(steps, args.rounds)
        print(f"| {variant.name} | {medians['ours'] * 1e3:.1f} ms | {medians['oneDNN only'] * 1e3:.1f} ms "
              f"| {medians['oneDNN only'] / medians['ours']:.2f}x | {medians['torch.func'] * 1e3:.1f} ms "
              f"| {medians['torch.func'] / medians['ours']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
