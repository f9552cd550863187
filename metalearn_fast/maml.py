"""MAML and Reptile, where earlier releases kept them: they now live in metalearn_fast.algorithms."""
from .algorithms import MAML, Reptile

__all__ = ["MAML", "Reptile"]
