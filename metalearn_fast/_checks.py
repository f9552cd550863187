"""The argument checks every layer of the package shares: one home each, one wording of their errors."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor


def check_int(name: str, value, minimum: int) -> int:
    """An integer (not a bool) >= minimum, as int; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    """A positive finite real number, as float; TypeError or ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def tensor_of_numbers(name: str, data) -> Tensor:
    """A tensor as it is, or a numpy array / nested list of real numbers as a tensor of its dtype (shared
    memory where numpy allows); TypeError naming ``name`` for anything else."""
    if isinstance(data, Tensor):
        tensor = data
    else:
        if not isinstance(data, (np.ndarray, list, tuple)):
            raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(data).__name__}")
        array = np.asarray(data)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(f"{name} must hold numbers, got a numpy array of dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_complex():
        raise TypeError(f"{name} must be real numbers, got dtype {tensor.dtype}")
    return tensor
