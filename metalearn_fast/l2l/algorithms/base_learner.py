"""``l2l.algorithms.base_learner``: the wrapper module that MAML and MetaSGD build on."""
from torch import nn

__all__ = ["BaseLearner"]


class BaseLearner(nn.Module):
    """An nn.Module wrapping ``module``: calls go to it, and so do attributes the wrapper does not have.

    ``learner.some_method()`` therefore runs the wrapped (for a clone: the adapted) module's method.
    """

    def __init__(self, module=None):
        super().__init__()
        self.module = module

    def __getattr__(self, attr):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["module"], attr)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
