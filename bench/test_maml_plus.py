"""The MAML++ suite: its code lives in metalearn_fast/benchmarks/test_maml_plus.py (see that file)."""
from metalearn_fast.benchmarks.test_maml_plus import *  # noqa: F401,F403
