"""The maml suite: its code lives in metalearn_fast/benchmarks/test_maml.py (see that file)."""
from metalearn_fast.benchmarks.test_maml import *  # noqa: F401,F403
