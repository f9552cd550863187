"""The pretrain suite: its code lives in metalearn_fast/benchmarks/test_pretrain.py (see that file)."""
from metalearn_fast.benchmarks.test_pretrain import *  # noqa: F401,F403
