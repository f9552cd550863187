"""MAML meta-steps: the sinusoid setup, an Omniglot-sized MLP and a wide one, second and first order.

Timed: one whole meta-step = the meta-loss over the meta-batch, its gradient w.r.t. the
meta-parameters, and an Adam step. Every entry starts from the same weights (mf.MLP, seed 0) and the
same data; the peers' models are nn.Sequential(nn.Linear, nn.ReLU, ...) holding those same Parameters.
The baselines step with ``torch.optim.Adam(fused=True)``, torch's fastest Adam on CPU and CUDA.

Entries of each group:
- metalearn_fast: ``mf.MAML(model, ...).meta_step(TaskBatch, Adam)``: for an MLP the whole meta-step,
  Adam's update included, is one call of the compiled maml_mlp_meta_step_ op when the extension is active;
- metalearn_fast, AVX2 kernels: on a CPU with AVX-512 (where metalearn_fast runs its AVX-512 per-task kernel),
  the same meta-step with the kernel's AVX2 copy (set_cpu_simd), to measure what AVX-512 gives;
- metalearn_fast fallback: what METALEARN_FAST_BACKEND=torch runs for it, called directly in this
  process (the backend is chosen once per process): reference.maml_mlp_meta_step_;
- plain torch: every task at once in lean batched torch: per-task weights [T, O, I], one baddbmm per
  layer, autograd.grad;
- torch.func: ``vmap`` over tasks of an inner loop written with ``grad`` and ``functional_call``;
- per-task loop: one task at a time with autograd.grad, as most MAML code is written;
- higher: ``higher.innerloop_ctx`` per task (skipped when higher is not installed);
- learn2learn: ``l2l.algorithms.MAML``, ``clone()`` and ``adapt()`` per task (skipped when absent).

Run: pytest bench/test_maml.py --benchmark-only (see the README's Benchmarks section).
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metalearn_fast as mf
from metalearn_fast import reference
from metalearn_fast.benchmarks.entries import (
    FALLBACK,
    HIGHER,
    LEARN2LEARN,
    OURS,
    OURS_AVX2,
    PER_TASK_LOOP,
    PLAIN_TORCH,
    TORCH_FUNC,
)
from metalearn_fast.benchmarks.peers import higher_meta_backward, learn2learn_meta_backward, torch_func_meta_backward
from metalearn_fast.benchmarks.plugin import (PEERS, assert_same, meta_step_with, plain_torch_result, require_peer,
                                              time_once)
from metalearn_fast.optim import FusedUpdate


@dataclass(frozen=True)
class Workload:
    setting: str  # the model and meta-batch, for the group's title
    id: str
    sizes: tuple
    tasks: int
    support: int  # examples per task in the support set
    query: int
    inner_lr: float
    loss: str  # "mse" or "cross_entropy"
    inner_steps: int
    first_order: bool

    @property
    def group(self) -> str:
        steps = f"{self.inner_steps} inner step{'s' if self.inner_steps > 1 else ''}"
        return f"MAML {self.setting}: {steps}, {'first' if self.first_order else 'second'} order"


SINUSOID = dict(setting="sinusoid, MLP 1-40-40-1, 25 tasks x 10+10 points", sizes=(1, 40, 40, 1), tasks=25,
                support=10, query=10, inner_lr=0.01, loss="mse")
# the MAML paper's Omniglot setup on an MLP: 5-way 1-shot (one query per class), meta-batch 32, inner lr 0.4
OMNIGLOT = dict(setting="Omniglot-sized, MLP 784-256-128-64-64-5, 32 tasks 5-way 1-shot",
                sizes=(784, 256, 128, 64, 64, 5), tasks=32, support=5, query=5, inner_lr=0.4, loss="cross_entropy")
WIDE = dict(setting="wide, MLP 512-512-512-10, 8 tasks x 64+64 examples", sizes=(512, 512, 512, 10), tasks=8,
            support=64, query=64, inner_lr=0.01, loss="cross_entropy")

WORKLOADS = [
    Workload(id=f"{prefix}-{steps}step-{'first' if first_order else 'second'}", inner_steps=steps,
             first_order=first_order, **setting)
    for prefix, setting, step_counts in (
        ("sinusoid", SINUSOID, (1, 5)), ("omniglot", OMNIGLOT, (1,)), ("wide", WIDE, (1,))
    )
    for steps in step_counts
    for first_order in (False, True)
]


def make_batch(workload: Workload, device):
    """(x_support, y_support, x_query, y_query): sinusoid tasks, or random inputs with balanced labels."""
    generator = torch.Generator().manual_seed(0)
    T, K, Q = workload.tasks, workload.support, workload.query
    if workload.loss == "mse":
        amplitude = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=generator)
        phase = torch.pi * torch.rand(T, 1, 1, generator=generator)
        xs = -5 + 10 * torch.rand(T, K, 1, generator=generator)
        xq = -5 + 10 * torch.rand(T, Q, 1, generator=generator)
        batch = [xs, amplitude * torch.sin(xs - phase), xq, amplitude * torch.sin(xq - phase)]
    else:
        inputs, classes = workload.sizes[0], workload.sizes[-1]

        def labels(count):  # every class equally often, as an N-way K-shot sampler draws them
            return (torch.arange(count) % classes).expand(T, count).contiguous()

        batch = [torch.rand(T, K, inputs, generator=generator), labels(K),
                 torch.rand(T, Q, inputs, generator=generator), labels(Q)]
    return [t.to(device) for t in batch]


def make_model(workload: Workload, device) -> mf.MLP:
    torch.manual_seed(0)
    return mf.MLP(list(workload.sizes)).to(device)


def plain_twin(model: mf.MLP) -> nn.Sequential:
    """nn.Sequential(nn.Linear, nn.ReLU, ..., nn.Linear) holding ``model``'s own Parameters."""
    layers = []
    for module in model:
        linear = nn.Linear(module.in_features, module.out_features, device="meta")
        linear.weight, linear.bias = module.weight, module.bias
        layers.append(linear)
        if isinstance(module, mf.FusedLinearReLU):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def task_loss(workload: Workload):
    """The loss of one task: pred [K, C], target [K, C] or [K] labels -> scalar."""
    return F.mse_loss if workload.loss == "mse" else F.cross_entropy


def accumulate(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g if p.grad is None else p.grad + g


# ---- the entries: each returns meta_backward(), which puts the meta-gradient in .grad and returns the
# meta-loss, or (ours and its fallback, marked by WHOLE_STEP) meta_step(optimizer), which also steps ----


def ours(workload, model, batch):
    maml = mf.MAML(model, inner_lr=workload.inner_lr, inner_steps=workload.inner_steps,
                   first_order=workload.first_order, loss=workload.loss)
    tasks = mf.TaskBatch(*batch)

    def meta_step(optimizer):
        return maml.meta_step(tasks, optimizer)

    return meta_step


def ours_avx2(workload, model, batch):
    step = ours(workload, model, batch)
    extension = mf.ops._extension

    def meta_step(optimizer):
        before = extension.set_cpu_simd("avx2")
        try:
            return step(optimizer)
        finally:
            extension.set_cpu_simd(before)

    return meta_step


def require_avx512(device) -> None:
    """Skip the AVX2 entry where the default kernel is not the AVX-512 one."""
    extension = mf.ops._extension
    if device.type != "cpu" or extension is None or extension.CPU_SIMD_AVAILABLE != "avx512":
        pytest.skip("the per-task kernel's AVX2 copy against its AVX-512 one: needs the extension on a CPU with "
                    "AVX-512")


def fallback(workload, model, batch):
    params = list(model.parameters())
    rate = [torch.tensor(workload.inner_lr, dtype=params[0].dtype, device=params[0].device)]

    def meta_step(optimizer):
        update = FusedUpdate.plan(optimizer, params)
        grads, state, settings = update.arguments()
        with torch.no_grad():
            loss = reference.maml_mlp_meta_step_(params, rate, grads, state, *batch, workload.inner_steps,
                                                 workload.first_order, workload.loss, 0, False, update.kind,
                                                 settings)
        update.finish(state)
        return loss

    return meta_step


WHOLE_STEP = (ours, ours_avx2, fallback)


def plain_torch(workload, model, batch):
    params = list(model.parameters())
    x_support, y_support, x_query, y_query = batch
    tasks = workload.tasks

    def forward(x, fast):  # x [T, K, I], fast: weight [T, O, I], bias [T, O] per layer
        h = x
        for layer in range(0, len(fast), 2):
            h = torch.baddbmm(fast[layer + 1].unsqueeze(1), h, fast[layer].transpose(1, 2))
            if layer + 2 < len(fast):
                h = torch.relu(h)
        return h

    def task_losses(pred, target):  # each task's own mean loss: [T]
        if workload.loss == "mse":
            return (pred - target).square().mean(dim=(1, 2))
        return F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view(tasks, -1).mean(1)

    def meta_backward():
        fast = [p.expand(tasks, *p.shape) for p in params]
        for _ in range(workload.inner_steps):
            # the sum, so that each task's weights get the gradient of that task's loss
            support = task_losses(forward(x_support, fast), y_support).sum()
            grads = torch.autograd.grad(support, fast, create_graph=not workload.first_order)
            fast = [p - workload.inner_lr * g for p, g in zip(fast, grads)]
        loss = task_losses(forward(x_query, fast), y_query).mean()
        loss.backward()
        return loss.detach()

    return meta_backward


def torch_func(workload, model, batch):
    return torch_func_meta_backward(plain_twin(model), task_loss(workload), batch, workload.inner_lr,
                                    workload.inner_steps, workload.first_order)


def per_task_loop(workload, model, batch):
    params = list(model.parameters())
    loss_fn = task_loss(workload)

    def forward(x, weights):
        h = x
        for layer in range(0, len(weights), 2):
            h = F.linear(h, weights[layer], weights[layer + 1])
            if layer + 2 < len(weights):
                h = torch.relu(h)
        return h

    def meta_backward():
        total = 0
        for x_support, y_support, x_query, y_query in zip(*batch):
            fast = params
            for _ in range(workload.inner_steps):
                grads = torch.autograd.grad(loss_fn(forward(x_support, fast), y_support), fast,
                                            create_graph=not workload.first_order)
                fast = [p - workload.inner_lr * g for p, g in zip(fast, grads)]
            total = total + loss_fn(forward(x_query, fast), y_query)
        loss = total / workload.tasks
        loss.backward()
        return loss.detach()

    return meta_backward


def with_higher(workload, model, batch):
    return higher_meta_backward(plain_twin(model), task_loss(workload), batch, workload.inner_lr, workload.inner_steps,
                                workload.first_order)


def with_learn2learn(workload, model, batch):
    return learn2learn_meta_backward(plain_twin(model), task_loss(workload), batch, workload.inner_lr,
                                     workload.inner_steps, workload.first_order)


ENTRIES = {
    OURS: ours,
    OURS_AVX2: ours_avx2,
    FALLBACK: fallback,
    PLAIN_TORCH: plain_torch,
    TORCH_FUNC: torch_func,
    PER_TASK_LOOP: per_task_loop,
    HIGHER: with_higher,
    LEARN2LEARN: with_learn2learn,
}


def baseline_optimizer(params, device):
    """Adam as a skilled user builds it: torch's fused kernel where the device has one."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=1e-3, fused=fused)


def meta_step_of(entry, workload, device):
    """(model, meta_step()) of ``entry``: one whole meta-step with its own Adam."""
    model = make_model(workload, device)
    make = ENTRIES[entry]
    step = make(workload, model, make_batch(workload, device))
    if make in WHOLE_STEP:
        return model, meta_step_with(step, torch.optim.Adam(model.parameters(), lr=1e-3), True)
    return model, meta_step_with(step, baseline_optimizer(model.parameters(), device), False)


def first_step(entry, workload, device):
    """(seconds, [meta-loss, *meta-gradient], meta_step) of one meta-step of ``entry`` from fresh weights."""
    model, meta_step = meta_step_of(entry, workload, device)
    seconds, loss = time_once(meta_step, device)
    return seconds, [torch.as_tensor(loss), *(p.grad for p in model.parameters())], meta_step


@pytest.mark.parametrize("impl", list(ENTRIES))
@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.id for w in WORKLOADS])
def test_maml_meta_step(measure, device, impl, workload):
    if impl in PEERS:
        require_peer(impl)
    if impl == OURS_AVX2:
        require_avx512(device)
    seconds, result, meta_step = first_step(impl, workload, device)
    expected = plain_torch_result((workload, device), lambda: first_step(PLAIN_TORCH, workload, device)[1])
    assert_same(result, expected, f"{workload.group}, {impl}", rtol=1e-3, atol=1e-5)
    measure(workload.group, impl, meta_step, seconds)
