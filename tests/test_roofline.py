"""The benchmarks' roofline: work counted on a call (FLOPs of its matrix products, bytes of its working set),
checked against counts by hand; and the report's GFLOP/s and fraction of the peak from a pytest-benchmark JSON."""
import math

import torch
import torch.nn.functional as F

from metalearn_fast.benchmarks import report, roofline
from metalearn_fast.benchmarks.entries import OURS, PER_TASK_LOOP, PLAIN_TORCH


def test_count_gives_the_flops_of_forward_and_backward_by_hand():
    B, I, O = 7, 5, 3
    x = torch.randn(B, I, requires_grad=True)
    w = torch.randn(I, O, requires_grad=True)
    forward = roofline.count(lambda: x @ w)
    assert forward["flops"] == 2 * B * I * O
    # the backward of a product is two products of the same size: the gradients of x and of w
    both = roofline.count(lambda: (x @ w).sum().backward())
    assert both["flops"] == 3 * 2 * B * I * O
    # the working set holds at least x, w, the output and the two gradients, each counted once
    assert both["bytes"] >= 4 * (2 * B * I + 2 * I * O + B * O)
    assert both["bytes"] < 4 * 10 * (B * I + I * O + B * O)


def test_count_includes_the_double_backward_of_second_order_maml():
    """One inner step of a linear model, its meta-gradient with and without create_graph, counted by hand."""
    x, y = torch.randn(4, 6), torch.randn(4, 2)
    w = torch.randn(6, 2, requires_grad=True)

    def meta_step(create_graph):
        def run():
            inner = torch.autograd.grad(((x @ w - y) ** 2).sum(), w, create_graph=create_graph)[0]
            ((x @ (w - 0.1 * inner) - y) ** 2).sum().backward()
        return run

    first, second = roofline.count(meta_step(False))["flops"], roofline.count(meta_step(True))["flops"]
    product = 2 * 4 * 6 * 2  # one [4, 6] @ [6, 2] product
    # first order: the inner forward and its weight gradient, the outer forward and its weight gradient (x needs none)
    assert first == 4 * product
    # second order adds the backward of the inner gradient x^T r(w): one product back to r, one to w
    assert second == 6 * product


def test_peak_is_a_finite_positive_rate():
    peak = roofline.peak_gflops(torch.device("cpu"), repeats=2)
    assert math.isfinite(peak) and peak > 0.1
    assert torch.get_num_threads() >= 1


def _one_core_gflops(kernel, flops: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return flops / roofline._best_seconds(kernel, torch.device("cpu"), repeats=3) / 1e9
    finally:
        torch.set_num_threads(threads)


def test_the_peak_is_not_below_what_other_kernels_reach_on_one_core():
    # a peak from the BLAS's product alone is half the core's on AMD CPUs (MKL there: 107 GFLOP/s where oneDNN's
    # convolutions reach 216-273), and put kernels at twice their true share of the peak: shapes other than the
    # peak's own, so that this measures the machine, not peak_gflops again
    threads = torch.get_num_threads()
    peak = roofline.peak_gflops(torch.device("cpu"), repeats=3)
    assert torch.get_num_threads() == threads  # restored
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    x = torch.randn(8, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
    reached = max(_one_core_gflops(lambda: a @ b, 2 * 384**3),
                  _one_core_gflops(lambda: F.conv2d(x, w, padding=1), 2 * 8 * 32 * 32 * 64 * 64 * 9))
    assert peak >= 0.7 * reached, (peak, reached)  # (0.7: the machine's speed moves between the two timings)


def _document(peak):
    def bench(entry, median, **extra):
        return {"group": "MAML toy", "name": f"test[{entry}]", "stats": {"median": median, "iqr": 0.0, "rounds": 5},
                "extra_info": {"entry": entry, **extra}}

    return {"machine_info": {"metalearn_fast": {"device": "cpu", "peak_gflops": peak, "threads": 2, "cores": 4}},
            "benchmarks": [bench(OURS, 1e-3), bench(PLAIN_TORCH, 4e-3, flops=2_000_000, bytes=8192)]}


def test_report_turns_the_counted_work_into_gflops_and_a_fraction_of_the_peak():
    text = report.report(_document(peak=20.0))
    # ours: 2 MFLOP in 1 ms = 2 GFLOP/s = 5% of 20 per core x 2 threads; plain torch 0.5 GFLOP/s; 4x faster;
    # 2e6 / 8192 FLOP per byte
    row = next(line for line in text.splitlines() if line.startswith("| MAML toy |"))
    assert row == "| MAML toy | 2.00 | 8 | 244.1 | 1.00 ms | 2.00 | 5.0% | 4.00x vs plain torch |"
    assert f"| {OURS} | 1.00 ms | 0.0 us | 5 | 4.00x | 2.00 |" in text
    assert f"| {PLAIN_TORCH} | 4.00 ms | 0.0 us | 5 | 1.00x | 0.50 |" in text
    assert ("Peak: 40.0 GFLOP/s = 20.0 per core (the faster of a float32 matrix product and a 3x3 convolution on one "
            "thread) x 2 core(s)") in text


def test_report_without_counted_work_has_no_roofline():
    document = _document(peak=None)
    for bench in document["benchmarks"]:
        bench["extra_info"].pop("flops", None)
    text = report.report(document)
    assert "How far from the hardware" not in text and "GFLOP/s" not in text


def test_roofline_without_a_peak_says_not_available():
    row = next(line for line in report.report(_document(peak=None)).splitlines() if line.startswith("| MAML toy |"))
    assert row.endswith("| 2.00 | n/a | 4.00x vs plain torch |")


def test_the_work_comes_from_plain_torch_else_the_per_task_loop():
    document = _document(peak=20.0)
    document["benchmarks"].append({"group": "MAML toy", "name": "test[loop]", "stats": {"median": 8e-3, "iqr": 0.0,
                                   "rounds": 5}, "extra_info": {"entry": PER_TASK_LOOP, "flops": 9, "bytes": 9}})
    assert "| MAML toy | 2.00 |" in report.report(document)  # plain torch's count
    document["benchmarks"] = [b for b in document["benchmarks"] if b["extra_info"]["entry"] != PLAIN_TORCH]
    assert "| MAML toy | 0.00 | 0 |" in report.report(document)  # the loop's, the only one left
