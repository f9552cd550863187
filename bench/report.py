"""Print pytest-benchmark results as a Markdown table per group, with each entry's speedup over
the group's baseline (the entry named "plain torch", else the slowest), and the machine in the header.

Usage: python bench/report.py results.json [--baseline "plain torch"]
"""
from __future__ import annotations

import argparse
import json
import platform
import re
from collections import defaultdict


def machine(info: dict) -> str:
    cpu = info.get("cpu", {}).get("brand_raw") or platform.processor() or "unknown CPU"
    cores = info.get("cpu", {}).get("count", "?")
    return f"{cpu}, {cores} cores"


def entry_name(bench: dict) -> str:
    params = bench.get("params") or {}
    impl = params.get("impl")
    if impl:
        return impl
    match = re.search(r"\[(.*)\]", bench["name"])
    return match.group(1) if match else bench["name"]


def report(data: dict, baseline: str) -> str:
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or bench["name"]].append((entry_name(bench), bench["stats"]["median"]))
    extra = data.get("machine_info", {}).get("metalearn_fast", "")
    lines = [
        f"Machine: {machine(data.get('machine_info', {}))}; {extra}".rstrip("; "),
        f"Run at {data.get('datetime', '?')}; speedup = baseline median / entry median (higher is faster).",
        "",
    ]
    for group, entries in groups.items():
        base = dict(entries).get(baseline, max(t for _, t in entries))
        lines += [f"### {group}", "", "| entry | median | speedup vs " + baseline + " |", "|---|---:|---:|"]
        for name, median in sorted(entries, key=lambda e: e[1]):
            lines.append(f"| {name} | {format_time(median)} | {base / median:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--baseline", default="plain torch")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        print(report(json.load(f), args.baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
