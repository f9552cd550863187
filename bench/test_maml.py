"""MAML meta-step on the sinusoid setup (MAML paper, section 5.1): 25 tasks, 10 support + 10 query
points, MLP 1-40-40-1, inner SGD lr 0.01; 1 and 5 inner steps, second and first order.

Each group: our fast path (the MAML engine on the compiled ops), our fallback (the same engine on
reference.py, which computes the meta-gradient by autograd), a plain batched-torch MAML written
here (per-task weights stacked as W[T,O,I], baddbmm), and the per-task loop peers use.
Timed: one meta-step = meta-loss, meta-gradient and an Adam step of the meta-parameters.

Run: pytest bench/test_maml.py --benchmark-only --benchmark-group-by=group
"""
import pytest
import torch
import torch.nn.functional as F

import metalearn_fast as mf
from metalearn_fast import reference
from conftest import synchronize

TASKS, SUPPORT, QUERY, INNER_LR = 25, 10, 10, 0.01
SIZES = [1, 40, 40, 1]


def sinusoid_batch(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand(TASKS, 1, 1, generator=g)
    phase = torch.pi * torch.rand(TASKS, 1, 1, generator=g)
    xs = -5 + 10 * torch.rand(TASKS, SUPPORT, 1, generator=g)
    xq = -5 + 10 * torch.rand(TASKS, QUERY, 1, generator=g)
    batch = [xs, amplitude * torch.sin(xs - phase), xq, amplitude * torch.sin(xq - phase)]
    return [t.to(device) for t in batch]


def batched_torch_meta_loss(params, xs, ys, xq, yq, steps, first_order):
    """Plain batched torch: every task at once through stacked per-task weights."""
    tasks = xs.shape[0]

    def forward(x, fast):
        h = x
        for layer in range(len(fast) // 2):
            weight, bias = fast[2 * layer], fast[2 * layer + 1]
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            if layer + 1 < len(fast) // 2:
                h = torch.relu(h)
        return h

    fast = [p.expand(tasks, *p.shape) for p in params]
    for _ in range(steps):
        support = (forward(xs, fast) - ys).square().mean(dim=(1, 2)).sum()
        grads = torch.autograd.grad(support, fast, create_graph=not first_order)
        fast = [p - INNER_LR * g for p, g in zip(fast, grads)]
    return (forward(xq, fast) - yq).square().mean()


def per_task_loop_meta_loss(params, xs, ys, xq, yq, steps, first_order):
    """What peers do: adapt one task at a time in a Python loop."""

    def forward(x, fast):
        return F.linear(torch.relu(F.linear(torch.relu(F.linear(x, fast[0], fast[1])), fast[2], fast[3])), fast[4], fast[5])

    total = 0
    for t in range(xs.shape[0]):
        fast = list(params)
        for _ in range(steps):
            grads = torch.autograd.grad(F.mse_loss(forward(xs[t], fast), ys[t]), fast, create_graph=not first_order)
            fast = [p - INNER_LR * g for p, g in zip(fast, grads)]
        total = total + F.mse_loss(forward(xq[t], fast), yq[t])
    return total / xs.shape[0]


def fallback_meta_loss(params, xs, ys, xq, yq, steps, first_order):
    """Our engine's fallback: reference.maml_mlp_meta_grad, wrapped as the engine wraps it."""
    rate = [torch.tensor(INNER_LR, dtype=xs.dtype, device=xs.device)]
    loss, grads, _ = reference.maml_mlp_meta_grad(params, rate, xs, ys, xq, yq, steps, first_order, "mse", 0, True)
    for p, g in zip(params, grads):
        p.grad = g if p.grad is None else p.grad + g
    return loss


def engine_meta_loss(model, steps, first_order):
    """Our engine, through its public API: MAML(model).meta_loss(TaskBatch)."""
    maml = mf.MAML(model, inner_lr=INNER_LR, inner_steps=steps, first_order=first_order)
    assert maml.uses_fast_path

    def meta_loss(params, xs, ys, xq, yq, steps, first_order):
        return maml.meta_loss(mf.TaskBatch(xs, ys, xq, yq))

    return meta_loss


IMPLEMENTATIONS = {
    "metalearn_fast": engine_meta_loss,
    "metalearn_fast fallback": fallback_meta_loss,
    "plain torch": batched_torch_meta_loss,
    "per-task loop": per_task_loop_meta_loss,
}


def meta_gradient(fn, params, batch, steps, first_order):
    for p in params:
        p.grad = None
    loss = fn(params, *batch, steps, first_order)
    if loss.requires_grad:
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_maml_sinusoid_meta_step(benchmark, impl, steps, first_order, device):
    torch.manual_seed(0)
    model = mf.MLP(SIZES).to(device)
    params = list(model.parameters())
    batch = sinusoid_batch(device)
    fn = IMPLEMENTATIONS[impl]
    if fn is engine_meta_loss:
        fn = engine_meta_loss(model, steps, first_order)
    # a wrong fast answer must not win: the meta-loss and meta-gradient must equal plain torch's
    loss, grads = meta_gradient(fn, params, batch, steps, first_order)
    expected_loss, expected_grads = meta_gradient(batched_torch_meta_loss, params, batch, steps, first_order)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    benchmark.group = f"MAML sinusoid meta-step: {steps} inner step{'s' if steps > 1 else ''}, " + (
        "first order" if first_order else "second order"
    )

    def meta_step():
        optimizer.zero_grad()
        loss = fn(params, *batch, steps, first_order)
        if loss.requires_grad:
            loss.backward()
        optimizer.step()
        synchronize(device)

    benchmark(meta_step)
