"""MAML on sinusoid regression with every meta-batch split across processes.

    torchrun --nproc_per_node 2 examples/distributed_sine.py     # gloo on CPU, or NCCL with one GPU per process
    python examples/distributed_sine.py                          # one process: the same script, no process group

Each rank draws only its own share of every meta-batch, from its own sampler (seed + rank), so the
meta-batch grows with the number of processes at no cost to any one of them. MAML.meta_step averages
the meta-gradients over the ranks (weighted by their task counts) before each optimizer step, and
broadcasts rank 0's weights at the first step, so every rank holds the same model throughout.
"""
import argparse
import datetime
import os

import torch
import torch.distributed as dist

from metalearn_fast import MAML, MLP
from metalearn_fast.distributed import process_group, shard
from metalearn_fast.tasks import SinusoidTasks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-step, over all processes")
    parser.add_argument("--meta-steps", type=int, default=300)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate for the meta-parameters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds a rank waits for the others before failing instead of hanging")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # set by torchrun
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # a process group when launched by torchrun, none in a plain `python` run; ended cleanly on every exit
    with process_group("nccl" if device.type == "cuda" else "gloo",
                       timeout=datetime.timedelta(seconds=args.timeout)) as (rank, world_size):
        torch.manual_seed(args.seed)
        maml = MAML(MLP([1, 40, 40, 1]), inner_lr=args.inner_lr, inner_steps=args.inner_steps).to(device)
        optimizer = torch.optim.Adam(maml.parameters(), lr=args.lr)
        tasks = SinusoidTasks(seed=args.seed + 1 + rank)  # a seed per rank: each draws different tasks
        if rank == 0:
            print(f"{world_size} process(es) on {device.type}, {args.meta_batch} tasks per meta-step")
        for step in range(args.meta_steps):
            loss = maml.meta_step(shard(tasks, args.meta_batch, device=device), optimizer)
            if rank == 0 and (step % 50 == 0 or step == args.meta_steps - 1):
                print(f"meta-step {step:4d}  meta-loss {loss:.4f}")

        if world_size > 1:
            weights = torch.cat([p.detach().reshape(-1) for p in maml.parameters()])
            every_rank = [torch.empty_like(weights) for _ in range(world_size)]
            dist.all_gather(every_rank, weights)
            if rank == 0:
                same = all(torch.equal(w, weights) for w in every_rank)
                print(f"all {world_size} ranks hold the same weights: {same}")

        if rank == 0:
            test = SinusoidTasks(k_support=10, k_query=100, seed=12345).sample(200, device=device)
            with torch.no_grad():
                before = (maml.model(test.x_query) - test.y_query).pow(2).mean()
                adapted = maml.adapt(test.x_support, test.y_support, steps=10)
                after = (maml.predict(adapted, test.x_query) - test.y_query).pow(2).mean()
            print(f"200 new tasks: query MSE {before:.4f} before adapting, {after:.4f} after 10 steps on 10 examples")
        # leaving the block: every rank waits for rank 0's evaluation before the group is destroyed


if __name__ == "__main__":
    main()
