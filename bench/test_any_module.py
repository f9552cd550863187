"""The any-module suite: its code lives in metalearn_fast/benchmarks/test_any_module.py (see that file)."""
from metalearn_fast.benchmarks.test_any_module import *  # noqa: F401,F403
