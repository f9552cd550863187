"""Float32 on the fused paths against the float64 truth: never further from it than plain float32 torch.

Plain float32 torch is not float64: rounding moves its trajectory away from the float64 one (by 1e-6
on tame problems, by 1e-2 where a ReLU unit sits on its threshold and Adam amplifies gradients near its
eps). A fused path computes the same float32 arithmetic in another order, so it may differ from plain
float32 by rounding, but must stay as close to the float64 truth as plain float32 torch does: within
FACTOR times plain float32's distance, plus SLACK. The truth and the plain float32 run are the loops a
user writes (nn.Sequential and torch.optim; a per-task ``torch.autograd.grad`` loop for MAML); every
distance is the largest absolute weight difference after training.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metalearn_fast as mf
from metalearn_fast import TaskBatch

from conftest import forced_cpu_simd
from test_nn import plain_mlp

FACTOR, SLACK = 4.0, 1e-5

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
    "sgd-nesterov-decay": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.5, dampening=0.1),
}


def our_mlp(start):
    """metalearn_fast's MLP holding start's weights (start: plain_mlp, whose ReLUs shift the state_dict keys)."""
    ours = mf.MLP([start[0].in_features] + [m.out_features for m in start if isinstance(m, nn.Linear)])
    with torch.no_grad():
        for a, b in zip(ours.parameters(), start.parameters()):
            a.copy_(b)
    return ours


def distance(model, truth) -> float:
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(model.parameters(), truth.parameters()))


def assert_as_close_as_plain(ours, plain32, truth, what):
    ours_off, plain_off = distance(ours, truth), distance(plain32, truth)
    assert ours_off <= FACTOR * plain_off + SLACK, (
        f"{what}: float32 is {ours_off:.3g} from the float64 truth, plain float32 torch {plain_off:.3g}")


def plain_training(model, make_optimizer, x, y, epochs, batch_size, dtype):
    model = copy.deepcopy(model).to(dtype)
    optimizer = make_optimizer(model.parameters())
    x, y = x.to(dtype), y.to(dtype)
    for _ in range(epochs):
        for start in range(0, x.shape[0], batch_size):
            optimizer.zero_grad()
            F.mse_loss(model(x[start:start + batch_size]), y[start:start + batch_size]).backward()
            optimizer.step()
    return model


# (sizes, examples): both sides of the per-batch kernel's size rule (its layers hold at most 128 x 128
# weights; wider ones take the ATen loop), several outputs, a batch that does not divide the data
CASES = {
    "narrow": ([8, 32, 1], 2000),
    "kernel-edge": ([64, 128, 128, 1], 2000),
    "wide-aten": ([64, 256, 256, 1], 3000),
    "three-outputs": ([16, 64, 64, 3], 1500),
}


@pytest.mark.parametrize("calls", [1, 3], ids=["3-epochs-in-one-call", "1-epoch-in-each-of-3-calls"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES))
def test_fused_float32_epochs_stay_as_close_to_float64_as_plain_float32(case, optimizer, calls):
    sizes, examples = CASES[case]
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(examples, sizes[0], generator=g), torch.rand(examples, sizes[-1], generator=g)
    torch.manual_seed(0)
    start = plain_mlp(sizes)
    truth = plain_training(start, OPTIMIZERS[optimizer], x, y, 3, 64, torch.float64)
    plain32 = plain_training(start, OPTIMIZERS[optimizer], x, y, 3, 64, torch.float32)
    ours = our_mlp(start)
    our_optimizer = OPTIMIZERS[optimizer](ours.parameters())
    for _ in range(calls):
        losses = mf.pretrain(ours, x, y, epochs=3 // calls, batch_size=64, optimizer=our_optimizer)
        assert losses.path == "fused"
    assert_as_close_as_plain(ours, plain32, truth, f"pretrain {case} {optimizer}")


def sine_batches(steps, tasks=4, shots=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        amplitude = torch.rand(tasks, 1, 1, generator=g) * 4.9 + 0.1
        phase = torch.rand(tasks, 1, 1, generator=g) * torch.pi
        x = torch.rand(tasks, 2 * shots, 1, generator=g) * 10 - 5
        y = amplitude * torch.sin(x - phase)
        yield TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def per_task_meta_training(start, batches, inner_lr, inner_steps, dtype, step_rates=False, weights=None):
    """MAML the way the paper writes it: each task adapts by torch.autograd.grad, the mean query loss
    backpropagates, Adam steps. MAML++: with step_rates, a learned rate per parameter and inner step (Adam trains
    them too); with weights, the weighted sum of the query losses after every inner step."""
    model = copy.deepcopy(start).to(dtype)
    rates = [torch.full((inner_steps,), inner_lr, dtype=dtype, requires_grad=True) for _ in model.parameters()] \
        if step_rates else None
    optimizer = torch.optim.Adam(list(model.parameters()) + (rates or []), lr=1e-3)
    names = [name for name, _ in model.named_parameters()]
    weights = weights or [0.0] * (inner_steps - 1) + [1.0]
    for batch in batches:
        optimizer.zero_grad()
        losses = []
        for t in range(batch.x_support.shape[0]):
            params = list(model.parameters())
            for step in range(inner_steps):
                pred = torch.func.functional_call(model, dict(zip(names, params)), (batch.x_support[t].to(dtype),))
                grads = torch.autograd.grad(F.mse_loss(pred, batch.y_support[t].to(dtype)), params, create_graph=True)
                params = [p - (rates[i][step] if rates else inner_lr) * g for i, (p, g) in enumerate(zip(params, grads))]
                if weights[step]:
                    pred = torch.func.functional_call(model, dict(zip(names, params)), (batch.x_query[t].to(dtype),))
                    losses.append(weights[step] * F.mse_loss(pred, batch.y_query[t].to(dtype)))
        (torch.stack(losses).sum() / batch.x_support.shape[0]).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("simd", ["avx2", "avx512"])
@pytest.mark.parametrize("path", ["fused-meta-step", "meta-loss-backward"])
@pytest.mark.parametrize("sizes,inner_steps", [([1, 40, 40, 1], 1), ([1, 40, 40, 1], 5), ([1, 64, 128, 1], 2)])
def test_float32_meta_training_stays_as_close_to_float64_as_plain_float32(sizes, inner_steps, path, simd):
    """The per-task kernel's AVX2 and AVX-512 copies, each forced (skipped on a CPU without it)."""
    torch.manual_seed(0)
    start = plain_mlp(sizes)
    steps, inner_lr = 60, 0.01
    truth = per_task_meta_training(start, sine_batches(steps), inner_lr, inner_steps, torch.float64)
    plain32 = per_task_meta_training(start, sine_batches(steps), inner_lr, inner_steps, torch.float32)
    model = our_mlp(start)
    maml = mf.MAML(model, inner_lr=inner_lr, inner_steps=inner_steps)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    with forced_cpu_simd(simd):
        for batch in sine_batches(steps):
            if path == "fused-meta-step":
                maml.meta_step(batch, optimizer)
            else:  # the per-task kernel as an autograd op, torch.optim's own step
                optimizer.zero_grad()
                maml.meta_loss(batch).backward()
                optimizer.step()
    if path == "fused-meta-step":
        assert maml.meta_step_path(optimizer) == "fused"
    assert_as_close_as_plain(model, plain32, truth, f"MAML {sizes} {inner_steps} steps, {path}")


@pytest.mark.parametrize("path", ["fused-meta-step", "meta-loss-backward"])
def test_float32_maml_plus_plus_stays_as_close_to_float64_as_plain_float32(path):
    """The fused op's MAML++ arguments (per-step learned rates, a multi-step loss) in float32, the same way."""
    torch.manual_seed(0)
    start = plain_mlp([1, 40, 40, 1])
    steps, inner_lr, inner_steps, weights = 60, 0.01, 3, [0.2, 0.3, 0.5]
    plus = dict(step_rates=True, weights=weights)
    truth = per_task_meta_training(start, sine_batches(steps), inner_lr, inner_steps, torch.float64, **plus)
    plain32 = per_task_meta_training(start, sine_batches(steps), inner_lr, inner_steps, torch.float32, **plus)
    model = our_mlp(start)
    maml = mf.MAML(model, inner_lr=inner_lr, inner_steps=inner_steps, per_step_inner_lr=True, multi_step_loss=weights)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    assert maml.meta_step_path(optimizer) == "fused"
    for batch in sine_batches(steps):
        if path == "fused-meta-step":
            maml.meta_step(batch, optimizer)
        else:
            optimizer.zero_grad()
            maml.meta_loss(batch).backward()
            optimizer.step()
    assert distance(model, truth) > 0  # training moved float32 off the truth: the comparison below means something
    assert_as_close_as_plain(model, plain32, truth, f"MAML++ {path}")
