"""The meta-learning algorithms, one per module: MAML and its family (FOMAML, Meta-SGD, ANIL, the MAML++ options) in
maml.py, Reptile in reptile.py, the task-batched machinery they share in task_batched.py."""
from .maml import MAML
from .reptile import Reptile

__all__ = ["MAML", "Reptile"]
