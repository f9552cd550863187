"""The founding example through ``metalearn_fast.compat``: an MLP trained with Adam and MSE on one task,
then trained further on a new one (``metalearn-fast example``)."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..compat import get_loss_fn, get_model, get_optimizer, learn_new_task, train


def run(epochs: int, seed: int) -> dict:
    """Train on one task of random data, then learn a new one, with the founding example's functions:
    each task's MSE before and after its training, and the seconds the two trainings took."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tasks = [(torch.as_tensor(rng.random((1000, 10)), dtype=torch.float32),
              torch.as_tensor(rng.random((1000, 1)), dtype=torch.float32)) for _ in range(2)]
    model = get_model(10, 1)
    optimizer, loss_fn = get_optimizer(model), get_loss_fn()

    def mse(x, y) -> float:
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    result = {"task_before": mse(*tasks[0])}
    start = time.perf_counter()
    train(model, optimizer, loss_fn, *tasks[0], epochs=epochs, batch_size=32)
    result["task_after"], result["new_task_before"] = mse(*tasks[0]), mse(*tasks[1])
    learn_new_task(model, optimizer, loss_fn, *tasks[1], epochs=epochs, batch_size=32)
    result["seconds"] = time.perf_counter() - start
    result["new_task_after"] = mse(*tasks[1])
    return result
