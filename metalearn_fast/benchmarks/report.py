"""The benchmark report: pytest-benchmark's JSON as one Markdown table per group.

Each table gives every entry's median time and its speedup over the group's "plain torch" entry
(plain torch's median / the entry's: above 1 is faster), under a header naming the machine (CPU
model, cores, GPU, torch version, metalearn_fast backend). BENCHMARKS.md is this report.

Usage: python -m metalearn_fast.benchmarks.report results.json [more.json ...] [--baseline "plain torch"]
(bench/report.py is the same command.)
"""
from __future__ import annotations

import argparse
import json
import re

from .entries import ENTRY_ORDER, OURS, PLAIN_TORCH, TORCH_FUNC
from .roofline import COUNTED


def format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def entry_name(bench: dict) -> str:
    """The entry a benchmark measured: recorded by the suites, else its parameter or test id."""
    entry = (bench.get("extra_info") or {}).get("entry") or (bench.get("params") or {}).get("impl")
    if entry:
        return entry
    match = re.search(r"\[(.*)\]", bench["name"])
    return match.group(1) if match else bench["name"]


def _threads(count) -> str:
    return f"{count} torch thread{'' if count == 1 else 's'}" if count else "torch threads unknown"


def machine_header(data: dict) -> list[str]:
    info = data.get("machine_info") or {}
    ours = info.get("metalearn_fast") or {}
    cpu = ours.get("cpu") or (info.get("cpu") or {}).get("brand_raw") or info.get("processor") or "unknown CPU"
    cores = ours.get("cores") or (info.get("cpu") or {}).get("count") or "?"
    gpus = ", ".join(ours.get("gpus") or []) or "no GPU"
    device = ours.get("device", "cpu")
    if ours.get("device_name"):
        device = f"{device} ({ours['device_name']})"
    peers = ours.get("peers") or {}
    peer_text = ", ".join(f"{name} {version or 'not installed'}" for name, version in peers.items())
    commit_info = data.get("commit_info") or {}
    commit = commit_info.get("id") if commit_info.get("id") not in (None, "unversioned") else None
    if commit:
        commit = commit[:12] + (" with uncommitted changes" if commit_info.get("dirty") else "")
    lines = [
        f"- Machine: {cpu}, {cores} cores, {gpus}; {_threads(ours.get('threads'))}"
        + (f" (OMP_NUM_THREADS={ours['omp_num_threads']})" if ours.get("omp_num_threads") else ""),
        (
            f"- Software: torch {ours.get('torch', '?')}, metalearn_fast {ours.get('version', '?')} "
            f"on the {ours.get('backend', '?')} backend, Python {info.get('python_version', '?')}"
        ),
        f"- Device benchmarked: {device}; suite: {'quick (--quick)' if ours.get('quick') else 'full'}"
        + (f"; peers: {peer_text}" if peer_text else ""),
        f"- Run: {data.get('datetime', '?')}" + (f", commit {commit}" if commit else ""),
    ]
    return lines


GROUP_ORDER = ("ops:", "MAML", "pretrain:")  # the suites' groups start with these, in the report's order


def _order(name: str) -> tuple[int, str]:
    return (ENTRY_ORDER.index(name) if name in ENTRY_ORDER else len(ENTRY_ORDER), name)


def _group_order(group: str) -> int:
    return next((i for i, prefix in enumerate(GROUP_ORDER) if group.startswith(prefix)), len(GROUP_ORDER))


def _groups(data: dict) -> dict[str, dict[str, dict]]:
    """{group: {entry: its stats, with peak_mib, flops and bytes where recorded}}."""
    groups: dict[str, dict[str, dict]] = {}
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info") or {}
        stats = {**bench["stats"], **{key: extra[key] for key in ("peak_mib", "flops", "bytes") if key in extra}}
        groups.setdefault(bench.get("group") or bench["name"], {})[entry_name(bench)] = stats
    return groups


def _reference(entries: dict, baseline: str) -> str:
    """The entry a group's speedups divide by: the baseline, else torch.func (the any-module models, which no
    batched plain torch runs)."""
    return baseline if baseline in entries else TORCH_FUNC if TORCH_FUNC in entries else baseline


def _work(entries: dict) -> dict:
    """The group's counted work: roofline.count on the first of roofline.COUNTED's entries that the group has (every
    entry computes the same meta-step)."""
    counted = [entries[name] for name in COUNTED if entries.get(name, {}).get("flops")]
    return {"flops": counted[0]["flops"], "bytes": counted[0]["bytes"]} if counted else {}


def _ours(data: dict) -> dict:
    """What the suites recorded of the machine (plugin.pytest_benchmark_update_machine_info)."""
    return (data.get("machine_info") or {}).get("metalearn_fast") or {}


def _on_gpu(ours: dict) -> bool:
    return str(ours.get("device", "cpu")).startswith("cuda")


def _peak_cores(ours: dict) -> int:
    """The cores a CPU run's torch threads could use: min(threads, cores)."""
    return max(1, min(ours.get("threads") or 1, ours.get("cores") or 1))


def _peak(data: dict):
    """The run's peak GFLOP/s: the device's on a GPU; on a CPU one core's times _peak_cores; None where not
    recorded."""
    ours = _ours(data)
    peak = ours.get("peak_gflops")
    return peak if peak is None or _on_gpu(ours) else peak * _peak_cores(ours)


def _peak_text(data: dict) -> str:
    ours, peak = _ours(data), _peak(data)
    if peak is None:
        return "not recorded"
    if _on_gpu(ours):
        return f"{peak:.1f} GFLOP/s, the device's (float32 matrix product)"
    return (f"{peak:.1f} GFLOP/s = {ours['peak_gflops']} per core (the faster of a float32 matrix product and a 3x3 "
            "convolution on one thread) x "
            f"{_peak_cores(ours)} core(s) for the run's torch threads")


def roofline_table(data: dict, baseline: str = PLAIN_TORCH) -> list[str]:
    """The "how far from the hardware" table: per group, its work, working set and FLOPs per byte, and our
    entry's time, GFLOP/s, fraction of the peak and speedup."""
    peak = _peak(data)
    rows = []
    for group, entries in sorted(_groups(data).items(), key=lambda item: _group_order(item[0])):
        work, ours = _work(entries), entries.get(OURS)
        if not work or not ours:
            continue
        reference = _reference(entries, baseline)
        base = entries.get(reference, {}).get("median")
        gflops = work["flops"] / ours["median"] / 1e9
        of_peak = f"{100 * gflops / peak:.1f}%" if peak else "n/a"
        speedup = f"{base / ours['median']:.2f}x vs {reference}" if base else "n/a"
        rows.append(f"| {group} | {work['flops'] / 1e6:.2f} | {work['bytes'] / 2**10:.0f} | "
                    f"{work['flops'] / max(work['bytes'], 1):.1f} | {format_time(ours['median'])} | {gflops:.2f} | "
                    f"{of_peak} | {speedup} |")
    if not rows:
        return []
    return [f"Peak: {_peak_text(data)}. Work: the matrix-product FLOPs of one call of the group's plain-torch entry "
            "(else its per-task loop), counted by torch's FlopCounterMode; working set: the bytes of every tensor "
            "that call touches.", "",
            f"| workload | MFLOP | working set (KiB) | FLOP/byte | {OURS} | GFLOP/s | of peak | speedup |",
            "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]


def report(data: dict, baseline: str = PLAIN_TORCH) -> str:
    """The Markdown report of one pytest-benchmark JSON document: a section titled by its device."""
    groups = _groups(data)
    ours = _ours(data)
    on_gpu = _on_gpu(ours)
    lines = [f"## GPU: {ours.get('device_name') or ours.get('device')}" if on_gpu else "## CPU", ""]
    lines += machine_header(data)
    lines += [
        "",
        (
            f"Median of the timed rounds; IQR = interquartile range. Speedup = {baseline}'s median / the entry's "
            "(above 1: faster). Every entry was checked to compute the same result as plain torch before it was timed."
        ),
        "",
    ]
    if not groups:
        lines += ["No benchmark ran.", ""]
    roofline = roofline_table(data, baseline)
    if roofline:
        lines += ["### How far from the hardware", "", *roofline]
    for group in sorted(groups, key=_group_order):  # stable: the run's order within a suite
        entries = groups[group]
        reference = _reference(entries, baseline)
        base = entries.get(reference, {}).get("median")
        memory = any("peak_mib" in stats for stats in entries.values())
        flops = _work(entries).get("flops")
        lines += [f"### {group}", "", f"| entry | median | IQR | rounds | speedup vs {reference} |"
                  + (" GFLOP/s |" if flops else "") + (" peak memory |" if memory else ""),
                  "|---|---:|---:|---:|---:|" + ("---:|" if flops else "") + ("---:|" if memory else "")]
        for name in sorted(entries, key=_order):
            stats = entries[name]
            speedup = f"{base / stats['median']:.2f}x" if base else "n/a"
            peak = f" {stats['peak_mib']:.0f} MiB |" if "peak_mib" in stats else " n/a |"
            lines.append(f"| {name} | {format_time(stats['median'])} | {format_time(stats['iqr'])} | "
                         f"{stats['rounds']} | {speedup} |" + (f" {flops / stats['median'] / 1e9:.2f} |" if flops else "")
                         + (peak if memory else ""))
        lines.append("")
    return "\n".join(lines)


INTRO = """# Benchmarks

Generated by `metalearn-fast bench` (the suites in metalearn_fast/benchmarks; `pytest bench/ --benchmark-only
--benchmark-json=results.json` then `python bench/report.py results.json` is the same). Run it on your machine to
get your own numbers: see the README's Benchmarks section."""


def document(documents: list[dict], baseline: str = PLAIN_TORCH) -> str:
    """The whole report (BENCHMARKS.md): the introduction, then one section per JSON document."""
    return "\n\n".join([INTRO] + [report(data, baseline).rstrip() for data in documents]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Print pytest-benchmark JSON results as Markdown tables with speedups over plain torch."
    )
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json), one section each")
    parser.add_argument("--baseline", default=PLAIN_TORCH,
                        help=f"the entry speedups are relative to (default {PLAIN_TORCH!r})")
    args = parser.parse_args(argv)
    documents = []
    for path in args.json:
        with open(path) as f:
            documents.append(json.load(f))
    print(document(documents, args.baseline), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
