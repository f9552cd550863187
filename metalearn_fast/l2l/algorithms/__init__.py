"""``l2l.algorithms``: MAML and Meta-SGD with learn2learn's API (``clone()`` / ``adapt(loss)``)."""
from .base_learner import BaseLearner
from .maml import MAML, maml_update
from .meta_sgd import MetaSGD, meta_sgd_update

__all__ = ["BaseLearner", "MAML", "MetaSGD", "maml_update", "meta_sgd_update"]
