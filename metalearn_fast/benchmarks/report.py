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

from .entries import ENTRY_ORDER, PLAIN_TORCH, TORCH_FUNC


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


def report(data: dict, baseline: str = PLAIN_TORCH) -> str:
    """The Markdown report of one pytest-benchmark JSON document: a section titled by its device."""
    groups: dict[str, dict[str, dict]] = {}
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info") or {}
        stats = {**bench["stats"], **({"peak_mib": extra["peak_mib"]} if "peak_mib" in extra else {})}
        groups.setdefault(bench.get("group") or bench["name"], {})[entry_name(bench)] = stats
    ours = (data.get("machine_info") or {}).get("metalearn_fast") or {}
    on_gpu = str(ours.get("device", "cpu")).startswith("cuda")
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
    for group in sorted(groups, key=_group_order):  # stable: the run's order within a suite
        entries = groups[group]
        # groups without the baseline (the any-module models, which no batched plain torch runs) use torch.func's
        reference = baseline if baseline in entries else TORCH_FUNC if TORCH_FUNC in entries else baseline
        base = entries.get(reference, {}).get("median")
        memory = any("peak_mib" in stats for stats in entries.values())
        lines += [f"### {group}", "", f"| entry | median | IQR | rounds | speedup vs {reference} |"
                  + (" peak memory |" if memory else ""), "|---|---:|---:|---:|---:|" + ("---:|" if memory else "")]
        for name in sorted(entries, key=_order):
            stats = entries[name]
            speedup = f"{base / stats['median']:.2f}x" if base else "n/a"
            peak = f" {stats['peak_mib']:.0f} MiB |" if "peak_mib" in stats else " n/a |"
            lines.append(f"| {name} | {format_time(stats['median'])} | {format_time(stats['iqr'])} | "
                         f"{stats['rounds']} | {speedup} |" + (peak if memory else ""))
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
