"""The benchmark suites, shipped with the package so that ``metalearn-fast bench`` runs from any install.

pytest-benchmark suites, one group per workload, each group holding our path, our fallback and the
baselines (plain torch, and where they apply torch.func, a per-task loop, higher, learn2learn):

- test_ops.py       linear_relu forward+backward, sgd_step over a meta-batch of parameters
- test_maml.py      MAML meta-steps: sinusoid (1 and 5 inner steps), Omniglot-sized MLP, wide MLP;
                    second and first order
- test_maml_plus.py the MAML++ options' cost: sinusoid, 5 inner steps, against MAML without them
- test_pretrain.py  the founding example's training run and a larger one
- plugin.py         --device, --quick, the check-then-time policy, the machine record
- report.py         the JSON results as Markdown tables with speedups over plain torch

``pytest bench/ --benchmark-only`` in a clone runs the same suites (bench/ re-exports them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

SUITES = Path(__file__).resolve().parent


def pytest_command(json_path: Path, quick: bool = False, device: str = "cpu",
                   keyword: Optional[str] = None) -> list[str]:
    """The pytest command line that runs the suites and writes pytest-benchmark's JSON to json_path."""
    command = [
        sys.executable, "-m", "pytest", str(SUITES),
        # the suites' own settings only: no ini file or cache of whatever project the command runs in
        "-c", os.devnull, "--rootdir", str(SUITES), "-p", "no:cacheprovider",
        "-q", "-rs", "--benchmark-only", "--benchmark-group-by=group", "--benchmark-quiet",
        f"--benchmark-json={json_path}", f"--device={device}",
    ]
    if quick:
        command.append("--quick")
    if keyword:
        command += ["-k", keyword]
    return command


def run(quick: bool = False, device: str = "cpu", keyword: Optional[str] = None, json_path: Optional[str] = None,
        markdown_path: Optional[str] = None) -> int:
    """Run the suites, print the report, and return pytest's exit status (0 when every check passed)."""
    from importlib.util import find_spec

    missing = [name for name in ("pytest", "pytest_benchmark") if find_spec(name) is None]
    if missing:
        print(f"metalearn-fast bench needs pytest and pytest-benchmark ({', '.join(missing)} missing): "
              "pip install pytest pytest-benchmark", file=sys.stderr)
        return 2
    from .report import document

    with tempfile.TemporaryDirectory(prefix="metalearn-fast-bench-") as folder:
        results = Path(json_path) if json_path else Path(folder) / "results.json"
        results.unlink(missing_ok=True)  # a report of an earlier run's results must not pass for this one's
        status = subprocess.call(pytest_command(results, quick, device, keyword))
        if not results.exists():
            print(f"metalearn-fast bench: pytest exited with status {status} before writing results", file=sys.stderr)
            return status or 1
        text = document([json.loads(results.read_text())])
    print()
    print(text, end="")
    if markdown_path:
        Path(markdown_path).write_text(text)
        print(f"\nwrote {markdown_path}")
    return status
