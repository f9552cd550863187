"""MAML on sinusoid regression, written against learn2learn's API (as its examples/maml_sine.py is): the only
line that names a library is the import, ``metalearn_fast.l2l`` in place of ``learn2learn``.

Sinusoid tasks (Finn et al. 2017): y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5];
2 x shots points per task, every other one for adaptation and the rest for the query loss.

Run: python examples/l2l_maml_sine.py [--iterations 300]
"""
import argparse
import random

import numpy as np
import torch
from torch import nn, optim

import metalearn_fast.l2l as l2l  # was: import learn2learn as l2l


class SineModel(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.hidden1 = nn.Linear(1, dim)
        self.hidden2 = nn.Linear(dim, dim)
        self.hidden3 = nn.Linear(dim, 1)

    def forward(self, x):
        x = nn.functional.relu(self.hidden1(x))
        x = nn.functional.relu(self.hidden2(x))
        return self.hidden3(x)


def sine_batch(tasks, points, rng):
    amplitude = rng.uniform(0.1, 5.0, (tasks, 1, 1))
    phase = rng.uniform(0, np.pi, (tasks, 1, 1))
    x = rng.uniform(-5, 5, (tasks, points, 1))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(amplitude * np.sin(x - phase), dtype=torch.float32)


def main(shots=10, tasks_per_batch=16, iterations=300, adapt_lr=0.01, meta_lr=0.001, adapt_steps=5, hidden_dim=40):
    random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SineModel(dim=hidden_dim)
    maml = l2l.algorithms.MAML(model, lr=adapt_lr, first_order=False, allow_unused=True)
    opt = optim.Adam(maml.parameters(), meta_lr)
    lossfn = nn.MSELoss(reduction="mean")
    for iteration in range(iterations):
        inputs, targets = sine_batch(tasks_per_batch, 2 * shots, rng)
        meta_train_loss = 0.0
        for i in range(tasks_per_batch):
            learner = maml.clone()
            x_support, y_support = inputs[i, ::2], targets[i, ::2]
            x_query, y_query = inputs[i, 1::2], targets[i, 1::2]
            for _ in range(adapt_steps):
                learner.adapt(lossfn(learner(x_support), y_support))
            meta_train_loss += lossfn(learner(x_query), y_query)
        meta_train_loss = meta_train_loss / tasks_per_batch
        if iteration % 50 == 0 or iteration == iterations - 1:
            print(f"Iteration: {iteration} Meta Train Loss {meta_train_loss.item():.4f}")
        opt.zero_grad()
        meta_train_loss.backward()
        opt.step()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    main(iterations=parser.parse_args().iterations)
