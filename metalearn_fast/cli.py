"""The ``metalearn-fast`` command."""
from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from . import backend_info

    info = backend_info()
    width = max(len(key) for key in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _example(args: argparse.Namespace) -> int:
    """The founding example through metalearn_fast.compat: pretrain on one task, then learn a new one."""
    import time

    import numpy as np
    import torch

    from .compat import get_loss_fn, get_model, get_optimizer, learn_new_task, train

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x, y = rng.random((1000, 10)), rng.random((1000, 1))
    new_x, new_y = rng.random((1000, 10)), rng.random((1000, 1))
    model = get_model(10, 1)
    optimizer, loss_fn = get_optimizer(model), get_loss_fn()
    start = time.perf_counter()
    losses = train(model, optimizer, loss_fn, x, y, epochs=args.epochs, batch_size=32)
    learn_new_task(model, optimizer, loss_fn, new_x, new_y, epochs=args.epochs, batch_size=32)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        new_loss = loss_fn(model(torch.as_tensor(new_x, dtype=torch.float32)), torch.as_tensor(new_y, dtype=torch.float32))
    print(f"pretrain losses per epoch: {', '.join(f'{v:.4f}' for v in losses)}")
    print(f"loss on the new task after learn_new_task: {float(new_loss):.4f}")
    print(f"{2 * args.epochs} epochs in {elapsed:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalearn-fast", description="Fast meta-learning for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="which kernels were compiled and which backend runs").set_defaults(run=_info)
    example = commands.add_parser("example", help="the founding example (pretrain, then learn a new task)")
    example.add_argument("--epochs", type=int, default=10)
    example.add_argument("--seed", type=int, default=0)
    example.set_defaults(run=_example)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
