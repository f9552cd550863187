"""The learn2learn-loop suite: its code lives in metalearn_fast/benchmarks/test_l2l.py (see that file)."""
from metalearn_fast.benchmarks.test_l2l import *  # noqa: F401,F403
