"""The extension's direct grouped convolution against oneDNN's (ATen's CPU convolution), call by call, on conv4's
four blocks as convnet.py's meta-step runs them.

    python bench/grouped_conv_calls.py [--tasks 8] [--examples 5] [--threads 2] [--repeats 30]

Each block: the tasks' maps side by side in the channels (groups = tasks), channels-last, float32. Times the
forward pass and the input and weight gradients together (the first block: the weight gradient alone, its input
being the data) of each, best quarter of --repeats calls after warm-up, and prints a markdown table. Both compute
the same numbers (tests/test_grouped_conv.py checks the kernels against ATen's).
"""
import argparse
import time

import torch
import torch.nn.functional as F

import metalearn_fast as mf

aten = torch.ops.aten


def seconds(call, repeats: int) -> float:
    for _ in range(3):
        call()
    spent = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        spent.append(time.perf_counter() - start)
    return sorted(spent)[len(spent) // 4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--examples", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    ext = mf.ops._extension
    if ext is None or ext.cpu_simd() == "none":
        raise SystemExit("needs the compiled extension with its AVX2 or AVX-512 kernels")
    torch.set_num_threads(args.threads)
    groups, stride, padding = args.tasks, [2, 2], [1, 1]
    print(f"torch {torch.__version__}, {args.threads} thread(s), cpu_simd {ext.cpu_simd()}, {groups} tasks of "
          f"{args.examples} examples\n")
    print("| conv4 block | oneDNN forward | direct forward | oneDNN gradients | direct gradients |\n"
          "|---|---:|---:|---:|---:|")
    for block, (side, c_in) in enumerate(((28, 1), (14, 64), (7, 64), (4, 64)), 1):
        x = torch.randn(args.examples, groups * c_in, side, side).contiguous(memory_format=torch.channels_last)
        w = torch.randn(groups * 64, c_in, 3, 3).contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(F.conv2d(x, w, None, stride, padding, groups=groups))
        need_input = block > 1
        mask = [need_input, True, False]
        times = [seconds(call, args.repeats) * 1e6 for call in (
            lambda: F.conv2d(x, w, None, stride, padding, groups=groups),
            lambda: ext.grouped_conv(x, w, None, stride, padding, groups),
            lambda: aten.convolution_backward(g, x, w, None, stride, padding, [1, 1], False, [0, 0], groups, mask),
            lambda: ext.grouped_conv_backward(g, x, w, stride, padding, groups, need_input, True, False))]
        out = g.shape[2]
        print(f"| {block} ({side}x{side}x{c_in} -> {out}x{out}x64{'' if need_input else ', weight gradient only'}) | "
              + " | ".join(f"{t:.0f} us" for t in times) + " |")


if __name__ == "__main__":
    main()
