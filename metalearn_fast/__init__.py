"""metalearn_fast: fast meta-learning for PyTorch.

Pretrain-then-adapt (``pretrain``, ``adapt``) and the MAML family, on fused C++/CUDA kernels
with a pure-torch fallback that gives the same numbers (see ``backend_info()``).
"""
from . import nn, ops, reference, tasks
from .algorithms import MAML, Reptile
from .nn import MLP, FusedLinearReLU, SimpleNet, fuse
from .ops import backend_info, empty_cpu_cache, linear_relu, linear_relu_backward, sgd_step, sgd_step_
from .tasks import BatchStack, FewShotTasks, SinusoidTasks, TaskBatch
from .train import adapt, pretrain

__version__ = "0.1.0"


def load_fewshot(path: str, device: str = "cpu") -> MAML:
    """The MAML learner that ``metalearn-fast fewshot`` saved as model.pt, ready to ``adapt`` to a new task of
    raw inputs and ``predict`` its query set (see metalearn_fast.experiments.fewshot.load)."""
    from .experiments.fewshot import load

    return load(path, device)


__all__ = [
    "BatchStack",
    "FewShotTasks",
    "FusedLinearReLU",
    "MAML",
    "MLP",
    "Reptile",
    "SimpleNet",
    "SinusoidTasks",
    "TaskBatch",
    "adapt",
    "backend_info",
    "empty_cpu_cache",
    "fuse",
    "linear_relu",
    "linear_relu_backward",
    "load_fewshot",
    "nn",
    "ops",
    "pretrain",
    "reference",
    "sgd_step",
    "sgd_step_",
    "tasks",
]
