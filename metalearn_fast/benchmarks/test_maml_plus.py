"""The cost of the MAML++ options: sinusoid MAML, MLP 1-40-40-1, 25 tasks x 10+10 points, 5 inner steps, second order.

One group per option (per-step inner rates, the multi-step loss, both). Entries:
- metalearn_fast: ``mf.MAML(model, ..., <option>).meta_step(TaskBatch, Adam)``;
- metalearn_fast, plain MAML: the same meta-step without the option (the fused op): what the option costs;
- plain torch: the option in lean batched torch (per-task weights [T, O, I], baddbmm, autograd.grad), the
  rates its own leaves.
Every entry's meta-loss and meta-gradient are checked against plain torch's with the same option (plain MAML's
against plain torch without it) before it is timed. Per-step BatchNorm needs a model with BatchNorm and
derivative-order annealing only switches the fused op's order: neither is timed here.
"""
import pytest
import torch

import metalearn_fast as mf
from metalearn_fast.benchmarks.entries import OURS, PLAIN_TORCH
from metalearn_fast.benchmarks.plugin import assert_same, meta_step_with, time_once
from metalearn_fast.benchmarks.test_maml import SINUSOID, Workload, make_batch, make_model

PLAIN_MAML = "metalearn_fast, plain MAML"
STEPS = 5
WORKLOAD = Workload(id="sinusoid-5step-second", inner_steps=STEPS, first_order=False, **SINUSOID)
WEIGHTS = [0.1, 0.1, 0.2, 0.2, 0.4]  # a multi-step loss mid-annealing: every step's query loss counts
OPTIONS = {
    "per-step inner rates (LSLR)": dict(per_step_inner_lr=True),
    "multi-step loss": dict(multi_step_loss=WEIGHTS),
    "LSLR and multi-step loss": dict(per_step_inner_lr=True, multi_step_loss=WEIGHTS),
}


def group(option: str) -> str:
    return f"MAML++ sinusoid, MLP 1-40-40-1, 25 tasks x 10+10 points, {STEPS} inner steps, second order: {option}"


def plain_torch(model, batch, options: dict):
    """meta_backward() of the option in lean batched torch; the per-step rates are leaves of its own."""
    params = list(model.parameters())
    x_support, y_support, x_query, y_query = batch
    tasks = x_support.shape[0]
    rates = [torch.full((STEPS,), WORKLOAD.inner_lr, requires_grad=True) for _ in params] \
        if options.get("per_step_inner_lr") else None
    weights = options.get("multi_step_loss") or [0.0] * (STEPS - 1) + [1.0]

    def forward(x, fast):
        h = x
        for layer in range(0, len(fast), 2):
            h = torch.baddbmm(fast[layer + 1].unsqueeze(1), h, fast[layer].transpose(1, 2))
            h = torch.relu(h) if layer + 2 < len(fast) else h
        return h

    def task_losses(pred, target):
        return (pred - target).square().mean(dim=(1, 2))

    def meta_backward():
        fast, loss = [p.expand(tasks, *p.shape) for p in params], 0
        for step in range(STEPS):
            grads = torch.autograd.grad(task_losses(forward(x_support, fast), y_support).sum(), fast, create_graph=True)
            fast = [p - (rates[i][step] if rates else WORKLOAD.inner_lr) * g for i, (p, g) in enumerate(zip(fast, grads))]
            if weights[step]:
                loss = loss + weights[step] * task_losses(forward(x_query, fast), y_query).mean()
        loss.backward()
        return loss.detach()

    return meta_backward, params + (rates or [])


def first_step(entry: str, options: dict, device):
    """(seconds, [meta-loss, *meta-gradient of the model], meta_step) of one meta-step of ``entry``."""
    model = make_model(WORKLOAD, device)
    batch = make_batch(WORKLOAD, device)
    if entry == PLAIN_TORCH:
        step, leaves = plain_torch(model, batch, options)
        meta_step = meta_step_with(step, torch.optim.Adam(leaves, lr=1e-3), False)
    else:
        maml = mf.MAML(model, inner_lr=WORKLOAD.inner_lr, inner_steps=STEPS, **options)
        tasks = mf.TaskBatch(*batch)
        meta_step = meta_step_with(lambda optimizer: maml.meta_step(tasks, optimizer),
                                   torch.optim.Adam(maml.parameters(), lr=1e-3), True)
    seconds, loss = time_once(meta_step, device)
    return seconds, [torch.as_tensor(loss), *(p.grad for p in model.parameters())], meta_step


@pytest.mark.parametrize("impl", [OURS, PLAIN_MAML, PLAIN_TORCH])
@pytest.mark.parametrize("option", OPTIONS)
def test_maml_plus_meta_step(measure, device, impl, option):
    options = {} if impl == PLAIN_MAML else OPTIONS[option]
    seconds, result, meta_step = first_step(impl, options, device)
    expected = first_step(PLAIN_TORCH, options, device)[1]
    assert_same(result, expected, f"{group(option)}, {impl}", rtol=1e-3, atol=1e-5)
    measure(group(option), impl, meta_step, seconds)
