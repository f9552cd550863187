"""The few-shot job's MAML against a plain-torch MAML of the same configuration.

    python bench/fewshot_vs_plain_torch.py DATA [fewshot options, e.g. --ways 3 --meta-steps 400]

Both start from the same weights and meta-train on the same stream of tasks (the job's seeded sampler) with
Adam; the plain one is the textbook loop: each task adapted with torch.autograd.grad (create_graph unless
--first-order) through torch.func.functional_call, the query losses averaged and backpropagated. Both are
scored on the job's test tasks after 0, 1 and N inner steps, the plain one adapted by the same kind of loop,
and without the job's best-checkpoint selection (the weights after the last step). Prints both accuracies and
both times per meta-step.
"""
import copy
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn_fast.cli import build_parser
from metalearn_fast.experiments import fewshot, options
from metalearn_fast.tasks import FewShotTasks


def plain_adapt(model, params, x, y, config, steps, create_graph):
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {name: p - config.inner_lr * g for (name, p), g in zip(params.items(), grads)}
    return params


def plain_accuracy(model, params, test, config, steps):
    scores = []
    for t in range(test.num_tasks):
        start = {name: p.detach().requires_grad_() for name, p in params.items()}
        adapted = plain_adapt(model, start, test.x_support[t], test.y_support[t], config, steps, False)
        with torch.no_grad():
            predicted = functional_call(model, adapted, (test.x_query[t],)).argmax(-1)
        scores.append((predicted == test.y_query[t]).double().mean())
    return torch.stack(scores)


def plain_meta_step(model, params, optimizer, batch, config):
    total = 0.0
    for t in range(batch.num_tasks):
        fast = plain_adapt(model, params, batch.x_support[t], batch.y_support[t], config, config.inner_steps,
                           not config.first_order)
        total = total + F.cross_entropy(functional_call(model, fast, (batch.x_query[t],)), batch.y_query[t])
    optimizer.zero_grad(set_to_none=True)
    (total / batch.num_tasks).backward()
    optimizer.step()


def main(argv):
    args = build_parser().parse_args(["fewshot", *argv])
    config = fewshot.config_from_options(options.config_values(args, fewshot.Config))
    if config.meta_sgd or config.anil:
        raise SystemExit("this comparison runs plain MAML and first-order MAML only")
    data, split = fewshot.prepare(config)
    job = fewshot.Run(config, data, split)
    model = copy.deepcopy(job.start_model)
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(params.values(), lr=config.meta_lr)
    stream = FewShotTasks(job.tasks.x, job.sets["train"].y, config.ways, config.shots, config.query, seed=config.seed)

    ours_seconds = plain_seconds = 0.0
    for step in range(config.meta_steps):
        started = time.perf_counter()
        job.maml.meta_step(job.tasks.sample(config.meta_batch), job.maml_optimizer)
        ours_seconds += time.perf_counter() - started
        started = time.perf_counter()
        plain_meta_step(model, params, optimizer, stream.sample(config.meta_batch), config)
        plain_seconds += time.perf_counter() - started
        if step == 0:  # the same computation: they part only by rounding, which training then amplifies
            ours = {name: p.grad for name, p in job.maml.model.named_parameters()}
            difference = max(float((ours[name] - p.grad).abs().max()) for name, p in params.items())
            scale = max(float(p.grad.abs().max()) for p in params.values())
            print(f"first meta-gradient: largest difference {difference:.1e} (largest entry {scale:.1e})")
    ours_ms, plain_ms = (1000 * s / config.meta_steps for s in (ours_seconds, plain_seconds))

    test = fewshot.sample_tasks(job.sets["test"], config, config.test_tasks, fewshot.TEST_SEED)
    print(f"{config.ways}-way {config.shots}-shot, model {config.model}, {config.meta_steps} meta-steps of "
          f"{config.meta_batch} tasks, {config.test_tasks} test tasks of unseen classes")
    print(f"ms per meta-step: metalearn_fast {ours_ms:.1f}, plain-torch loop {plain_ms:.1f} "
          f"({plain_ms / ours_ms:.1f}x)")
    for steps in (0, 1, config.eval_steps):
        ours = fewshot.accuracy(job.maml, test, steps)
        plain = plain_accuracy(model, params, test, config, steps)
        ci = [1.96 * float(s.std()) / math.sqrt(len(s)) for s in (ours, plain)]
        print(f"after {steps:>2} steps: metalearn_fast {100 * float(ours.mean()):.1f} ± {100 * ci[0]:.1f}%, "
              f"plain torch {100 * float(plain.mean()):.1f} ± {100 * ci[1]:.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
