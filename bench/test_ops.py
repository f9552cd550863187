"""The ops suite: its code lives in metalearn_fast/benchmarks/test_ops.py (see that file)."""
from metalearn_fast.benchmarks.test_ops import *  # noqa: F401,F403
