"""learn2learn's API on metalearn_fast: change ``import learn2learn as l2l`` to ``import metalearn_fast.l2l as l2l``.

The same import paths (``l2l.algorithms``, ``l2l.algorithms.maml``, ``l2l.utils``, ``l2l.data``,
``l2l.data.transforms``, ``l2l.data.utils``) and the same numbers as learn2learn 0.2, in pure Python on
metalearn_fast's ops: no Cython and no torchvision, on any Python the package supports. Out of scope:
``l2l.vision``, ``l2l.nn``, ``l2l.optim``, ``l2l.gym``, ``l2l.text``, GBML and the Lightning wrappers.
"""
from . import algorithms, data, utils
from .utils import (accuracy, clone_module, clone_named_parameters, clone_parameters, detach_module, magic_box,
                    update_module)

__version__ = "0.2.0"  # the learn2learn release whose API and numbers this layer keeps

__all__ = [
    "accuracy",
    "algorithms",
    "clone_module",
    "clone_named_parameters",
    "clone_parameters",
    "data",
    "detach_module",
    "magic_box",
    "update_module",
    "utils",
]
