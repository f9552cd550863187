"""Print pytest-benchmark JSON results as Markdown tables with each entry's speedup over plain torch.

    pytest bench/ --benchmark-only --benchmark-json=cpu.json
    python bench/report.py cpu.json [gpu.json] > BENCHMARKS.md

The report's code is metalearn_fast/benchmarks/report.py, which `metalearn-fast bench` also prints.
"""
from metalearn_fast.benchmarks.report import main

if __name__ == "__main__":
    raise SystemExit(main())
