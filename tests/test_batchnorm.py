"""BatchNorm as in the MAML paper's models (track_running_stats=False): each task is normalised with its own
batch statistics, in the inner and the outer loop, exactly as a per-task loop does; running statistics, which
would mix the tasks of a meta-batch, are refused with a clear error.

The oracle runs one task at a time: torch.func.functional_call of the model on that task's parameters and
data, adapted with torch.autograd.grad (create_graph for second order), float64.
"""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from metalearn_fast import MAML, Reptile, TaskBatch
from metalearn_fast.plan import ModelPlan

T, K, Q, INNER_LR, STEPS = 4, 6, 5, 0.1, 2


def bn_mlp(track=False):
    """The paper's BatchNorm MLP, scaled down: Linear -> BatchNorm1d -> ReLU blocks, then a Linear head."""
    layers = []
    for fan_in, fan_out in ((3, 16), (16, 8)):
        layers += [nn.Linear(fan_in, fan_out), nn.BatchNorm1d(fan_out, track_running_stats=track), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(8, 4))


def conv_net():
    """conv4's building block, twice: conv 3x3 stride 2 -> BatchNorm2d (no running statistics) -> ReLU, then
    mean-pool and a linear head."""
    blocks = []
    for c_in, c_out in ((1, 6), (6, 6)):
        blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out, track_running_stats=False),
                   nn.ReLU()]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


MODELS = {"bn-mlp": (bn_mlp, (3,)), "conv": (conv_net, (1, 8, 8))}


def make_batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, K, *shape, generator=g, dtype=torch.float64)
    xq = torch.randn(T, Q, *shape, generator=g, dtype=torch.float64)
    # class labels: cross-entropy over the 4 outputs
    return TaskBatch(xs, torch.randint(0, 4, (T, K), generator=g), xq, torch.randint(0, 4, (T, Q), generator=g))


def loop_meta_loss(model, batch, first_order, head_only):
    """Mean over tasks of the query loss after each task's own inner loop, one task at a time."""
    names = [name for name, _ in model.named_parameters()]
    meta = list(model.parameters())
    adapted = [len(meta) - 2, len(meta) - 1] if head_only else list(range(len(meta)))
    losses = []
    for t in range(batch.num_tasks):
        params = list(meta)
        for _ in range(STEPS):
            out = functional_call(model, dict(zip(names, params)), (batch.x_support[t],))
            inner = nn.functional.cross_entropy(out, batch.y_support[t])
            grads = torch.autograd.grad(inner, [params[i] for i in adapted], create_graph=not first_order)
            for i, g in zip(adapted, grads):
                params[i] = params[i] - INNER_LR * g
        out = functional_call(model, dict(zip(names, params)), (batch.x_query[t],))
        losses.append(nn.functional.cross_entropy(out, batch.y_query[t]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("head_only", [False, True], ids=["maml", "anil"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("name", list(MODELS))
def test_each_task_is_normalised_with_its_own_statistics(name, first_order, head_only):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    batch = make_batch(shape)
    maml = MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, first_order=first_order, adapt_head_only=head_only,
                loss="cross_entropy")
    assert maml.plan.kind == "module"
    ours = maml.meta_loss(batch)
    expected = loop_meta_loss(model, batch, first_order, head_only)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    wrt = list(model.parameters())
    expected_grads = torch.autograd.grad(expected, wrt)
    for got, want in zip(torch.autograd.grad(ours, wrt), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # the statistics matter: normalising over the whole meta-batch instead would give other numbers
    assert all(g.abs().sum() > 0 for g in expected_grads)


def test_statistics_of_the_whole_meta_batch_would_differ():
    """The oracle's premise: a task's output depends on its own batch only, not on the other tasks'."""
    torch.manual_seed(0)
    model = bn_mlp().double()
    batch = make_batch((3,))
    per_task = torch.stack([model(batch.x_support[t]) for t in range(T)])
    pooled = model(batch.x_support.reshape(T * K, 3)).reshape(T, K, 4)
    assert not torch.allclose(per_task, pooled)


@pytest.mark.parametrize("learner", ["maml", "reptile"])
def test_running_statistics_are_refused_naming_the_module(learner):
    with pytest.raises(ValueError, match=r"model\.1 \(BatchNorm1d\) keeps running statistics.*track_running_stats=False"):
        if learner == "maml":
            MAML(bn_mlp(track=True))
        else:
            Reptile(bn_mlp(track=True), inner_lr=0.1, inner_steps=1, outer_lr=0.1)


@pytest.mark.parametrize("norm, shape", [(lambda: nn.BatchNorm1d(5, track_running_stats=False), (7, 5)),
                                         (lambda: nn.BatchNorm1d(5, affine=False, track_running_stats=False), (7, 5, 3)),
                                         (lambda: nn.BatchNorm2d(5, eps=1e-3, track_running_stats=False), (4, 5, 3, 2))])
def test_the_torch_func_path_computes_batchnorm_as_torch_does(norm, shape):
    """The module path runs BatchNorm in plain ops under torch.func (plan.ModelPlan.func_model): the same
    values and first and second derivatives as torch's own."""
    torch.manual_seed(0)
    model = nn.Sequential(norm(), nn.Tanh()).double()
    if model[0].affine:
        nn.init.normal_(model[0].weight)
        nn.init.normal_(model[0].bias)
    twin = ModelPlan(model, builtin_loss=True).func_model()
    assert type(twin[0]).__name__ == "_BatchNormFromOps"
    assert [name for name, _ in twin.named_parameters()] == [name for name, _ in model.named_parameters()]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    outputs = []
    for net in (model, twin):
        y = net(x)
        (g,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
        outputs.append((y, g, gg))
    for ours, torchs in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(ours, torchs, rtol=1e-10, atol=1e-12)
