"""metalearn_fast.l2l.algorithms and metalearn_fast.l2l.utils, the learn2learn drop-in: MAML, MetaSGD,
maml_update, meta_sgd_update, BaseLearner, clone_module, update_module, detach_module, clone_parameters,
clone_named_parameters, magic_box and accuracy, with learn2learn 0.2's semantics (shared/l2l_API.md).

The oracle is independent of the implementation: copies of the model's tensors, torch.func.functional_call,
torch.autograd.grad and explicit inner steps p - lr * g, all in float64; the meta-gradient of the query loss
is compared with what ``loss.backward()`` on the adapted clone leaves in the original model's ``.grad``.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metalearn_fast.l2l as l2l
from metalearn_fast.l2l.algorithms import MAML, BaseLearner, MetaSGD, maml_update, meta_sgd_update
from metalearn_fast.l2l.utils import (accuracy, clone_module, clone_named_parameters, clone_parameters,
                                      detach_module, magic_box, update_module)

DT = torch.float64
LR = 0.1
TOL = dict(rtol=1e-10, atol=1e-10)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ---- models ----

def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


class Net(nn.Module):
    """A forward with a keyword argument, a method that uses the weights, and a plain attribute."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(4, 6, dtype=DT)
        self.head = nn.Linear(6, 3, dtype=DT)
        self.tag = "net"

    def features(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x, scale=1.0):
        return self.head(self.features(x)) * scale


class CNN(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, dtype=DT)
        self.bn1 = nn.BatchNorm2d(4, dtype=DT)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, dtype=DT)
        self.bn2 = nn.BatchNorm2d(4, dtype=DT)
        self.fc = nn.Linear(4 * 2 * 2, 3, dtype=DT)
        with torch.no_grad():  # non-trivial affine parameters, so that they matter
            for bn in (self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


class Tied(nn.Module):
    """b.weight is a.weight: one Parameter held by two submodules."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(5, 5, dtype=DT)
        self.b = nn.Linear(5, 5, dtype=DT)
        self.b.weight = self.a.weight
        self.out = nn.Linear(5, 2, dtype=DT)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class WithUnused(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.used = nn.Linear(4, 6, dtype=DT)
        self.spare = nn.Linear(4, 6, dtype=DT)
        self.head = nn.Linear(6, 3, dtype=DT)

    def forward(self, x):
        return self.head(torch.tanh(self.used(x)))


class RNNNet(nn.Module):
    def __init__(self, cell, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = cell(3, 5, batch_first=True, dtype=DT)
        self.head = nn.Linear(5, 2, dtype=DT)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def frozen_mlp(seed=0):
    model = mlp(seed)
    model[2].weight.requires_grad_(False)
    return model


# ---- tasks: losses of a callable f (a learner, or the oracle's functional forward) ----

def regression(in_shape=(4,), out=3, n=6, seed=1):
    xs, xq = randn(n, *in_shape, seed=seed), randn(n, *in_shape, seed=seed + 1)
    ys, yq = randn(n, out, seed=seed + 2), randn(n, out, seed=seed + 3)
    inner = lambda f: ((f(xs) - ys) ** 2).mean()  # noqa: E731
    outer = lambda f: ((f(xq) - yq) ** 2).mean()  # noqa: E731
    return inner, outer


def classification(in_shape, classes=3, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs, xq = randn(n, *in_shape, seed=seed), randn(n, *in_shape, seed=seed + 1)
    ys, yq = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (n,), generator=g)
    return (lambda f: F.cross_entropy(f(xs), ys)), (lambda f: F.cross_entropy(f(xq), yq))


# ---- the oracle ----

def oracle(model, inner, outer, steps=1, lr=LR, first_order=False, lrs=None, allow_nograd=False):
    """MAML (or Meta-SGD with ``lrs``) on copies of model's tensors, by functional_call.

    Returns the query loss, the adapted parameters (by name, tied ones once), the meta-gradient of every
    parameter that requires grad (None where the query loss does not depend on it), the gradient of the
    rates (lrs, or lr when it is a tensor), and the buffers after the same forwards (BatchNorm statistics).
    """
    model = copy.deepcopy(model)  # functional_call leaves an RNN's flat weight list stale: run it on a copy
    named = dict(model.named_parameters())  # tied parameters once, functional_call ties the other names
    theta = {k: p.detach().clone().requires_grad_(p.requires_grad) for k, p in named.items()}
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    if lrs is not None:
        rates = {k: r.detach().clone().requires_grad_() for k, r in zip(named, lrs)}
    elif isinstance(lr, torch.Tensor):
        rates = {"lr": lr.detach().clone().requires_grad_()}
    else:
        rates = {}
    moving = [k for k in theta if theta[k].requires_grad or not allow_nograd]
    fast = dict(theta)

    def run(loss_fn):
        return loss_fn(lambda *a, **kw: functional_call(model, {**fast, **buffers}, a, kw))

    for _ in range(steps):
        loss = run(inner)
        grads = torch.autograd.grad(loss, [fast[k] for k in moving], create_graph=not first_order,
                                    allow_unused=True)
        for k, g in zip(moving, grads):
            if g is None:
                continue
            if first_order:
                g = g.detach()
            rate = rates[k] if lrs is not None else rates.get("lr", lr)
            fast[k] = fast[k] - rate * g
    query = run(outer)
    wrt = [k for k in theta if theta[k].requires_grad]
    grads = torch.autograd.grad(query, [theta[k] for k in wrt] + list(rates.values()), allow_unused=True)
    return SimpleNamespace(
        loss=query.detach(),
        fast={k: v.detach() for k, v in fast.items()},
        grads=dict(zip(wrt, grads[:len(wrt)])),
        rate_grads=list(grads[len(wrt):]),
        buffers=buffers,
    )


def learn(wrapper, inner, outer, steps=1, clone_kw=None, adapt_kw=None):
    """The learn2learn loop: clone, adapt ``steps`` times on inner, backward of outer. Returns (learner, loss)."""
    learner = wrapper.clone(**(clone_kw or {}))
    for _ in range(steps):
        assert learner.adapt(inner(learner), **(adapt_kw or {})) is None
    loss = outer(learner)
    loss.backward()
    return learner, loss


def snapshot(model):
    return [(name, p, p.detach().clone()) for name, p in model.named_parameters()]


def assert_untouched(model, snap):
    """The same Parameter objects, with the same values: only .grad may have changed."""
    now = dict(model.named_parameters())
    assert list(now) == [name for name, _, _ in snap]
    for name, p, value in snap:
        assert now[name] is p and isinstance(p, nn.Parameter), name
        assert torch.equal(p.detach(), value), name


def assert_meta_grads(model, ref):
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif ref.grads[name] is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None, f"no meta-gradient reached the original {name}"
            close(p.grad, ref.grads[name])


def assert_adapted(learner, ref):
    for name, p in learner.module.named_parameters():
        close(p.detach(), ref.fast[name])


# ---- re-exports ----

def test_top_level_and_module_reexports():
    import metalearn_fast.l2l.algorithms.base_learner as base_learner_mod
    import metalearn_fast.l2l.algorithms.maml as maml_mod
    import metalearn_fast.l2l.algorithms.meta_sgd as meta_sgd_mod
    from metalearn_fast.l2l.utils import clone_module as cm, update_module as um

    assert l2l.clone_module is l2l.utils.clone_module is cm
    assert l2l.update_module is l2l.utils.update_module is um
    for name in ("detach_module", "clone_parameters", "clone_named_parameters", "magic_box", "accuracy"):
        assert getattr(l2l, name) is getattr(l2l.utils, name), name
    assert l2l.algorithms.maml.maml_update is maml_mod.maml_update is l2l.algorithms.maml_update
    assert l2l.algorithms.MAML is maml_mod.MAML
    assert l2l.algorithms.MetaSGD is meta_sgd_mod.MetaSGD
    assert l2l.algorithms.meta_sgd_update is meta_sgd_mod.meta_sgd_update
    assert l2l.algorithms.BaseLearner is base_learner_mod.BaseLearner
    assert issubclass(MAML, BaseLearner) and issubclass(MetaSGD, BaseLearner)
    assert issubclass(BaseLearner, nn.Module)
    for fn in (l2l.clone_module, l2l.algorithms.MAML, l2l.algorithms.maml_update):
        assert fn.__module__.startswith("metalearn_fast.l2l.")  # ours, not learn2learn's


# ---- MAML: the wrapper ----

@pytest.mark.parametrize("allow_nograd", [False, True])
def test_maml_wrapper_attributes(allow_nograd):
    model = mlp()
    maml = MAML(model, lr=0.25, allow_nograd=allow_nograd)
    assert maml.module is model
    assert maml.lr == 0.25 and maml.first_order is False
    assert maml.allow_nograd is allow_nograd
    assert maml.allow_unused is allow_nograd  # defaults to allow_nograd
    assert MAML(model, lr=0.25, allow_unused=True, allow_nograd=allow_nograd).allow_unused is True
    assert MAML(model, lr=0.25, allow_unused=False, allow_nograd=True).allow_unused is False
    params = list(maml.parameters())
    assert len(params) == len(list(model.parameters()))
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert list(maml.state_dict()) == ["module." + k for k in model.state_dict()]
    assert dict(maml.named_parameters()).keys() == {"module." + k for k, _ in model.named_parameters()}


def test_maml_forward_and_getattr_use_the_adapted_module():
    model = Net()
    maml = MAML(model, lr=LR)
    x = randn(5, 4, seed=3)
    assert torch.equal(maml(x, scale=2.0), model(x, scale=2.0))
    assert torch.equal(maml(x, 3.0), model(x, 3.0))
    assert maml.tag == "net" and maml.body is model.body
    assert torch.equal(maml.features(x), model.features(x))
    with pytest.raises(AttributeError):
        maml.no_such_attribute

    inner, _ = regression(seed=4)
    learner = maml.clone()
    learner.adapt(inner(learner))
    ref = oracle(model, inner, lambda f: f(x).sum())
    # the method and the keyword run on the adapted weights
    expected_features = torch.tanh(F.linear(x, ref.fast["body.weight"], ref.fast["body.bias"]))
    close(learner.features(x), expected_features)
    close(learner(x, scale=2.0), 2.0 * F.linear(expected_features, ref.fast["head.weight"], ref.fast["head.bias"]))
    assert learner.tag == "net"
    assert learner.body is learner.module.body and learner.body is not model.body


def test_clone_flags_inherited_and_overridden():
    model = mlp()
    maml = MAML(model, lr=0.3, first_order=True, allow_unused=False, allow_nograd=True)
    clone = maml.clone()
    assert isinstance(clone, MAML) and clone.lr == 0.3
    assert (clone.first_order, clone.allow_unused, clone.allow_nograd) == (True, False, True)
    other = maml.clone(first_order=False, allow_unused=True, allow_nograd=False)
    assert (other.first_order, other.allow_unused, other.allow_nograd) == (False, True, False)
    again = other.clone()  # a clone of a clone inherits from its own wrapper
    assert (again.first_order, again.allow_unused, again.allow_nograd) == (False, True, False)
    assert clone.module is not model and type(clone.module) is type(model)
    assert all(a is not b for a, b in zip(clone.module.modules(), model.modules()))


def test_clone_wrapper_training_true_module_flag_copied():
    model = mlp()
    maml = MAML(model, lr=LR)
    maml.eval()
    assert not model.training
    clone = maml.clone()
    assert clone.training is True
    assert all(not m.training for m in clone.module.modules())  # the module's own flags are copied
    model.train()
    assert all(m.training for m in maml.clone().module.modules())


def test_clone_is_a_differentiable_copy():
    model = mlp()
    maml = MAML(model, lr=LR)
    snap = snapshot(model)
    x = randn(7, 4, seed=2)
    clone = maml.clone()
    assert torch.equal(clone(x), model(x))
    for (name, p), q in zip(clone.module.named_parameters(), model.parameters()):
        assert p is not q and not isinstance(p, nn.Parameter) and p.grad_fn is not None, name
        assert p.data_ptr() != q.data_ptr() and torch.equal(p, q), name
    _, outer = regression(seed=5)
    outer(clone).backward()
    assert_meta_grads(model, oracle(model, lambda f: f(x).sum(), outer, steps=0))
    assert_untouched(model, snap)


def test_adapt_returns_none_and_updates_in_place():
    model = mlp()
    maml = MAML(model, lr=LR)
    inner, outer = regression(seed=6)
    learner = maml.clone()
    module, subs = learner.module, list(learner.module.modules())
    before = [p for p in learner.parameters()]
    assert learner.adapt(inner(learner)) is None
    assert learner.module is module and all(a is b for a, b in zip(learner.module.modules(), subs))
    assert all(a is not b for a, b in zip(learner.parameters(), before))
    ref = oracle(model, inner, outer)
    assert_adapted(learner, ref)
    close(outer(learner).detach(), ref.loss)


# ---- MAML: meta-gradients against the oracle ----

@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_maml_mlp_matches_oracle(steps, first_order):
    model = mlp()
    snap = snapshot(model)
    inner, outer = regression(seed=7)
    learner, loss = learn(MAML(model, lr=LR, first_order=first_order), inner, outer, steps)
    ref = oracle(model, inner, outer, steps, first_order=first_order)
    close(loss.detach(), ref.loss)
    assert_adapted(learner, ref)
    assert_meta_grads(model, ref)
    assert_untouched(model, snap)


def test_first_order_differs_from_second_order():
    inner, outer = regression(seed=8)
    results = {}
    for label, maml_kw, adapt_kw, clone_kw in [
        ("second", {}, {}, {}),
        ("first", {"first_order": True}, {}, {}),
        ("first_by_adapt", {}, {"first_order": True}, {}),
        ("first_by_clone", {}, {}, {"first_order": True}),
        ("second_by_adapt", {"first_order": True}, {"first_order": False}, {}),
    ]:
        model = mlp()
        learn(MAML(model, lr=0.5, **maml_kw), inner, outer, 2, clone_kw, adapt_kw)
        results[label] = [p.grad.clone() for p in model.parameters()]
    model = mlp()
    second = oracle(model, inner, outer, 2, lr=0.5)
    first = oracle(model, inner, outer, 2, lr=0.5, first_order=True)
    for label, grads in results.items():
        ref = first if label.startswith("first") else second
        for (name, _), g in zip(model.named_parameters(), grads):
            close(g, ref.grads[name])
    gap = max((second.grads[k] - first.grads[k]).abs().max().item() for k in second.grads)
    assert gap > 1e-4, "the oracle's first and second order should differ on this task"


def test_meta_batch_accumulates_and_optimizer_steps_the_model():
    model = mlp()
    maml = MAML(model, lr=LR)
    tasks = [regression(seed=s) for s in (10, 20)]
    for inner, outer in tasks:
        learn(maml, inner, outer, 2)
    refs = [oracle(model, inner, outer, 2) for inner, outer in tasks]
    for name, p in model.named_parameters():
        close(p.grad, refs[0].grads[name] + refs[1].grads[name])
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(maml.parameters(), lr=0.1).step()
    for p, b, name in zip(model.parameters(), before, dict(model.named_parameters())):
        close(p.detach(), b - 0.1 * (refs[0].grads[name] + refs[1].grads[name]))


def test_learnable_lr_tensor_gets_its_meta_gradient():
    model = mlp()
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    inner, outer = regression(seed=9)
    learn(MAML(model, lr=lr), inner, outer, 2)
    ref = oracle(model, inner, outer, 2, lr=lr)
    assert_meta_grads(model, ref)
    close(lr.grad, ref.rate_grads[0])


def test_clone_of_an_adapted_clone_is_differentiable_to_the_original():
    model = mlp()
    maml = MAML(model, lr=LR)
    inner, outer = regression(seed=11)
    learner = maml.clone()
    learner.adapt(inner(learner))
    second = learner.clone()
    second.adapt(inner(second))
    outer(second).backward()
    assert_meta_grads(model, oracle(model, inner, outer, 2))


# ---- BatchNorm ----

def test_batchnorm_train_buffers_shared_and_updated():
    model = CNN()
    model.train()
    snap = snapshot(model)
    start = {k: b.clone() for k, b in model.named_buffers()}
    inner, outer = classification((1, 6, 6), seed=12)
    ref = oracle(model, inner, outer, 2, lr=0.3)  # on copies of the buffers: model's stay as they are
    assert all(torch.equal(b, start[k]) for k, b in model.named_buffers())
    maml = MAML(model, lr=0.3)
    learner = maml.clone()
    for bn in ("bn1", "bn2"):
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert getattr(getattr(learner.module, bn), buf) is getattr(getattr(model, bn), buf), (bn, buf)
    for _ in range(2):
        learner.adapt(inner(learner))
    loss = outer(learner)
    loss.backward()
    assert learner.module.bn1.running_mean is model.bn1.running_mean  # still shared after adapt
    close(loss.detach(), ref.loss)
    assert_adapted(learner, ref)
    assert_meta_grads(model, ref)
    assert_untouched(model, snap)
    for bn in ("bn1", "bn2"):
        assert int(getattr(model, bn).num_batches_tracked) == 3  # two inner forwards and the query's
        for buf in ("running_mean", "running_var"):
            value = getattr(getattr(model, bn), buf)
            assert not torch.equal(value, start[f"{bn}.{buf}"]), f"{bn}.{buf} did not move"
            assert value.grad_fn is None and not value.requires_grad
    # the oracle's copies saw the same three forwards: the shared statistics must hold the same values
    for name, value in model.named_buffers():
        close(value, ref.buffers[name])


def test_batchnorm_eval_uses_running_statistics():
    model = CNN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    start = {k: b.clone() for k, b in model.named_buffers()}
    inner, outer = classification((1, 6, 6), seed=13)
    learner, loss = learn(MAML(model, lr=0.3), inner, outer, 2)
    assert learner.training and not learner.module.bn1.training
    ref = oracle(model, inner, outer, 2, lr=0.3)
    close(loss.detach(), ref.loss)
    assert_meta_grads(model, ref)
    for name, value in model.named_buffers():
        assert torch.equal(value, start[name]), name


# ---- tied parameters ----

def test_tied_parameters_stay_tied_and_match_oracle():
    model = Tied()
    snap = snapshot(model)
    inner, outer = regression((5,), out=2, seed=14)
    maml = MAML(model, lr=0.4)
    learner = maml.clone()
    assert learner.module.b.weight is learner.module.a.weight
    assert learner.module.a.weight is not model.a.weight
    assert len(list(learner.parameters())) == len(list(model.parameters())) == 5
    for _ in range(2):
        learner.adapt(inner(learner))
        assert learner.module.b.weight is learner.module.a.weight
    loss = outer(learner)
    loss.backward()
    ref = oracle(model, inner, outer, 2, lr=0.4)
    close(loss.detach(), ref.loss)
    assert_adapted(learner, ref)
    assert_meta_grads(model, ref)
    assert model.b.weight is model.a.weight
    assert_untouched(model, snap)


class SharedSubmodule(nn.Module):
    """learn2learn's shared-parameters test model, smaller: ``seq`` is also ``net[0]``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.seq = nn.Sequential(nn.Conv2d(1, 3, 3, 2, 1, dtype=DT), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(3, 2, 3, 2, 1, dtype=DT))
        self.net = nn.Sequential(self.seq, self.head)

    def forward(self, x):
        return self.net(x).flatten(1)


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_submodule_reachable_twice(algorithm):
    model = SharedSubmodule()
    snap = snapshot(model)
    inner, outer = regression((1, 6, 6), out=8, seed=33)
    wrapper = MAML(model, lr=0.3) if algorithm == "maml" else perturbed_meta_sgd(model, lr=0.3)
    rates = None if algorithm == "maml" else [r.detach().clone() for r in wrapper.lrs]
    ref = oracle(model, inner, outer, 2, lr=0.3, lrs=rates)
    learner, loss = learn(wrapper, inner, outer, 2)
    assert len(list(learner.parameters())) == len(list(model.parameters())) == 4
    assert learner.module.seq[0].weight is learner.module.net[0][0].weight
    close(loss.detach(), ref.loss)
    assert_adapted(learner, ref)
    assert_meta_grads(model, ref)
    assert_untouched(model, snap)


# ---- allow_nograd / allow_unused ----

@pytest.mark.parametrize("where", ["init", "clone", "adapt"])
def test_allow_nograd_frozen_parameter(where):
    model = frozen_mlp()
    snap = snapshot(model)
    frozen = model[2].weight.detach().clone()
    inner, outer = regression(seed=15)
    kw = {"allow_nograd": True}
    maml = MAML(model, lr=LR, **(kw if where == "init" else {}))
    learner, loss = learn(maml, inner, outer, 2, kw if where == "clone" else None, kw if where == "adapt" else None)
    assert torch.equal(learner.module[2].weight, frozen) and not learner.module[2].weight.requires_grad
    ref = oracle(model, inner, outer, 2, allow_nograd=True)
    close(loss.detach(), ref.loss)
    assert_adapted(learner, ref)
    assert not torch.equal(learner.module[0].weight, model[0].weight)  # the others moved
    assert_meta_grads(model, ref)
    assert model[2].weight.grad is None
    assert_untouched(model, snap)


@pytest.mark.parametrize("where", ["init", "clone", "adapt", "allow_nograd"])
def test_allow_unused_parameter(where):
    model = WithUnused()
    snap = snapshot(model)
    inner, outer = regression(seed=16)
    kw = {"allow_nograd": True} if where == "allow_nograd" else {"allow_unused": True}
    maml = MAML(model, lr=LR, **(kw if where in ("init", "allow_nograd") else {}))
    learner, loss = learn(maml, inner, outer, 2, kw if where == "clone" else None, kw if where == "adapt" else None)
    assert torch.equal(learner.module.spare.weight, model.spare.weight)
    assert torch.equal(learner.module.spare.bias, model.spare.bias)
    ref = oracle(model, inner, outer, 2)
    close(loss.detach(), ref.loss)
    assert_adapted(learner, ref)
    assert_meta_grads(model, ref)
    assert model.spare.weight.grad is None and model.used.weight.grad is not None
    assert_untouched(model, snap)


def test_allow_nograd_with_frozen_and_unused_together():
    model = WithUnused()
    model.head.bias.requires_grad_(False)
    inner, outer = regression(seed=17)
    learner, _ = learn(MAML(model, lr=LR, allow_nograd=True), inner, outer, 1)
    ref = oracle(model, inner, outer, 1, allow_nograd=True)
    assert_adapted(learner, ref)
    assert_meta_grads(model, ref)


@pytest.mark.parametrize("case", ["unused", "frozen", "frozen_allow_unused"])
def test_default_flags_raise_runtime_error_naming_the_flag(case, capsys):
    model = WithUnused() if case == "unused" else frozen_mlp()
    maml = MAML(model, lr=LR, allow_unused=True if case == "frozen_allow_unused" else None)
    learner = maml.clone()
    before = list(learner.parameters())
    inner, _ = regression(seed=18)
    loss = inner(learner)
    flag = "allow_unused" if case == "unused" else "allow_nograd"
    with pytest.raises(RuntimeError, match=flag):
        learner.adapt(loss)
    assert all(a is b for a, b in zip(learner.parameters(), before))  # nothing half-updated
    assert "Traceback" not in capsys.readouterr().out
    # the flag the message names makes the same call work
    learner.adapt(inner(learner), **{flag: True})


# ---- RNNs ----

def flat_weights_current(rnn):
    """An RNN's flat weight list holds the tensors its attributes name (learn2learn re-flattens after each change)."""
    return all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_rnn_clone_adapt_matches_oracle(cell):
    model = RNNNet(cell)
    snap = snapshot(model)
    x = randn(4, 5, 3, seed=19)
    out0 = model(x).detach()
    inner, outer = regression((5, 3), out=2, n=4, seed=20)
    learner = MAML(model, lr=0.5).clone()
    assert flat_weights_current(learner.module.rnn) and learner.module.rnn.weight_ih_l0 is not model.rnn.weight_ih_l0
    for _ in range(2):
        learner.adapt(inner(learner))
        assert flat_weights_current(learner.module.rnn)  # re-flattened by adapt, before any forward
    loss = outer(learner)
    loss.backward()
    ref = oracle(model, inner, outer, 2, lr=0.5)
    close(loss.detach(), ref.loss)
    assert_adapted(learner, ref)
    close(learner(x).detach(), functional_call(copy.deepcopy(model), ref.fast, (x,)).detach())
    assert_meta_grads(model, ref)
    assert_untouched(model, snap)
    assert flat_weights_current(model.rnn)
    assert torch.equal(model(x).detach(), out0)


# ---- MetaSGD ----

def perturbed_meta_sgd(model, lr=LR, **kw):
    meta = MetaSGD(model, lr=lr, **kw)
    with torch.no_grad():  # one different rate per entry, so that a mis-pairing shows
        for i, r in enumerate(meta.lrs):
            r.mul_(1.0 + torch.rand(r.shape, generator=torch.Generator().manual_seed(i), dtype=r.dtype))
    return meta


def test_metasgd_parameters_and_state_dict():
    model = mlp()
    meta = MetaSGD(model, lr=0.05)
    assert meta.module is model and meta.first_order is False
    assert isinstance(meta.lrs, nn.ParameterList)
    own = list(model.parameters())
    params = list(meta.parameters())
    assert len(params) == 2 * len(own)
    assert all(a is b for a, b in zip(params[:len(own)], own))
    assert all(a is b for a, b in zip(params[len(own):], meta.lrs))
    for p, r in zip(own, meta.lrs):
        assert isinstance(r, nn.Parameter) and r.shape == p.shape and r.dtype == p.dtype
        assert torch.equal(r, torch.full_like(p, 0.05))
    keys = list(meta.state_dict())
    assert keys == ["module." + k for k in model.state_dict()] + [f"lrs.{i}" for i in range(len(own))]
    assert MetaSGD(model).lrs[0].detach().eq(1.0).all()  # lr defaults to 1.0
    mine = [torch.full_like(p, 0.5) for p in own]
    assert MetaSGD(model, lrs=mine, first_order=True).lrs is mine


def test_metasgd_clone_copies_rates_differentiably():
    model = mlp()
    meta = perturbed_meta_sgd(model, first_order=True)
    clone = meta.clone()
    assert isinstance(clone, MetaSGD) and clone.first_order is True
    assert clone.module is not model and isinstance(clone.lrs, list)
    assert len(clone.lrs) == len(meta.lrs)
    for a, b in zip(clone.lrs, meta.lrs):
        assert a is not b and torch.equal(a, b) and a.grad_fn is not None
    x = randn(5, 4, seed=21)
    assert torch.equal(clone(x), model(x))
    sum(r.sum() for r in clone.lrs).backward()
    assert all(torch.equal(r.grad, torch.ones_like(r)) for r in meta.lrs)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_metasgd_matches_oracle(steps, first_order):
    model = mlp()
    snap = snapshot(model)
    meta = perturbed_meta_sgd(model, first_order=first_order)
    rates = [r.detach().clone() for r in meta.lrs]
    inner, outer = regression(seed=22)
    learner, loss = learn(meta, inner, outer, steps)
    ref = oracle(model, inner, outer, steps, first_order=first_order, lrs=rates)
    close(loss.detach(), ref.loss)
    assert_adapted(learner, ref)
    assert_meta_grads(model, ref)
    for r, g in zip(meta.lrs, ref.rate_grads):
        assert r.grad is not None, "the rates got no gradient"
        close(r.grad, g)
    assert all(torch.equal(r.detach(), v) for r, v in zip(meta.lrs, rates))
    assert_untouched(model, snap)


def test_metasgd_first_order_detaches_gradient_but_rates_learn():
    inner, outer = regression(seed=23)
    grads = {}
    for first_order in (False, True):
        model = mlp()
        meta = perturbed_meta_sgd(model)
        learn(meta, inner, outer, 2, adapt_kw={"first_order": first_order})
        grads[first_order] = ([p.grad.clone() for p in model.parameters()], [r.grad.clone() for r in meta.lrs])
    model = mlp()
    rates = [r.detach() for r in perturbed_meta_sgd(model).lrs]
    fo = oracle(model, inner, outer, 2, first_order=True, lrs=rates)
    so = oracle(model, inner, outer, 2, first_order=False, lrs=rates)
    for (name, _), g in zip(model.named_parameters(), grads[True][0]):
        close(g, fo.grads[name])
    for g, ref in zip(grads[True][1], fo.rate_grads):
        assert g.abs().sum() > 0
        close(g, ref)
    assert max((a - b).abs().max().item() for a, b in zip(grads[True][0], grads[False][0])) > 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(fo.rate_grads, so.rate_grads)) > 1e-6


def test_metasgd_adapt_in_place_tied_and_batchnorm():
    model = Tied()
    meta = perturbed_meta_sgd(model, lr=0.3)
    rates = [r.detach().clone() for r in meta.lrs]
    assert len(rates) == 5
    inner, outer = regression((5,), out=2, seed=24)
    learner = meta.clone()
    module = learner.module
    assert learner.adapt(inner(learner)) is None and learner.module is module
    assert learner.module.b.weight is learner.module.a.weight
    learner.adapt(inner(learner))
    outer(learner).backward()
    ref = oracle(model, inner, outer, 2, lrs=rates)
    assert_adapted(learner, ref)
    assert_meta_grads(model, ref)
    for r, g in zip(meta.lrs, ref.rate_grads):
        close(r.grad, g)

    cnn = CNN()
    meta = perturbed_meta_sgd(cnn, lr=0.2)
    rates = [r.detach().clone() for r in meta.lrs]
    inner, outer = classification((1, 6, 6), seed=25)
    ref = oracle(cnn, inner, outer, 1, lrs=rates)  # before the learner's forwards move the statistics
    learner = meta.clone()
    assert learner.module.bn2.running_var is cnn.bn2.running_var
    learner.adapt(inner(learner))
    outer(learner).backward()
    assert_meta_grads(cnn, ref)
    for name, value in cnn.named_buffers():
        close(value, ref.buffers[name])


def test_metasgd_unused_parameter_raises():
    meta = MetaSGD(WithUnused(), lr=LR)
    learner = meta.clone()
    inner, _ = regression(seed=26)
    with pytest.raises(RuntimeError):
        learner.adapt(inner(learner))


# ---- maml_update / meta_sgd_update ----

def test_maml_update_with_clone_module_as_in_the_rl_examples():
    model = mlp()
    snap = snapshot(model)
    inner, outer = regression(seed=27)
    clone = l2l.clone_module(model)
    subs = list(clone.modules())
    for _ in range(2):
        grads = torch.autograd.grad(inner(clone), list(clone.parameters()), create_graph=True)
        assert l2l.algorithms.maml.maml_update(clone, LR, grads) is clone
    assert all(a is b for a, b in zip(clone.modules(), subs))
    outer(clone).backward()
    ref = oracle(model, inner, outer, 2)
    for name, p in clone.named_parameters():
        close(p.detach(), ref.fast[name])
    assert_meta_grads(model, ref)
    assert_untouched(model, snap)


def test_maml_update_none_grads_update_attribute_and_tensor_lr():
    model = mlp()
    clone = clone_module(model)
    params = list(clone.parameters())
    grads = [randn(*p.shape, seed=i) for i, p in enumerate(params)]
    grads[1] = None
    maml_update(clone, 0.5, grads)
    after = list(clone.parameters())
    assert after[1] is params[1]
    for p, q, g in zip(params, after, grads):
        if g is not None:
            close(q.detach(), p.detach() - 0.5 * g)

    clone = clone_module(model)
    for i, p in enumerate(clone.parameters()):
        p.update = randn(*p.shape, seed=40 + i)
    expected = [p.detach() + p.update for p in clone.parameters()]
    assert maml_update(clone, 123.0) is clone  # grads=None: the .update attributes are applied as they are
    for q, e in zip(clone.parameters(), expected):
        close(q.detach(), e)

    lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
    clone = clone_module(model)
    grads = [randn(*p.shape, seed=60 + i) for i, p in enumerate(clone.parameters())]
    maml_update(clone, lr, grads)
    sum(p.sum() for p in clone.parameters()).backward()
    close(lr.grad, -sum(g.sum() for g in grads))


def test_meta_sgd_update():
    model = Tied()
    clone = clone_module(model)
    params = list(clone.parameters())
    lrs = [torch.rand(p.shape, dtype=DT, generator=torch.Generator().manual_seed(i)).requires_grad_()
           for i, p in enumerate(params)]
    grads = [randn(*p.shape, seed=70 + i) for i, p in enumerate(params)]
    subs = list(clone.modules())
    assert meta_sgd_update(clone, lrs, grads) is clone
    assert all(a is b for a, b in zip(clone.modules(), subs))
    assert clone.b.weight is clone.a.weight
    for p, q, r, g in zip(params, clone.parameters(), lrs, grads):
        close(q.detach(), p.detach() - r.detach() * g)
    sum((p ** 2).sum() for p in clone.parameters()).backward()
    for q, r, g in zip(clone.parameters(), lrs, grads):
        close(r.grad, -2 * q.detach() * g)
    for p in model.parameters():  # back through the clone to the original
        assert p.grad is not None


# ---- BaseLearner ----

def test_base_learner_delegates_to_its_module():
    model = Net()

    class Plus(BaseLearner):  # as the MAML++ example subclasses it
        def __init__(self, module):
            super().__init__(module)
            self.extra = nn.Parameter(torch.zeros((), dtype=DT))

        def forward(self, x):
            return self.module(x) + self.extra

    x = randn(3, 4, seed=28)
    base = BaseLearner(model)
    assert base.module is model and torch.equal(base(x, scale=0.5), model(x, scale=0.5))
    assert base.tag == "net" and base.head is model.head
    assert torch.equal(base.features(x), model.features(x))
    assert list(base.state_dict()) == ["module." + k for k in model.state_dict()]
    with pytest.raises(AttributeError):
        base.missing
    plus = Plus(model)
    assert torch.equal(plus(x), model(x)) and plus.tag == "net"
    assert list(plus.parameters())[0] is plus.extra and len(list(plus.parameters())) == 5
    assert BaseLearner().module is None


# ---- clone_module / update_module / detach_module ----

def test_clone_module_basics():
    model = mlp()
    x = randn(4, 4, seed=29)
    clone = clone_module(model)
    assert type(clone) is type(model) and clone is not model
    assert torch.equal(clone(x), model(x))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(clone.parameters(), model.parameters()))
    with torch.no_grad():  # the clone holds copies: changing the original afterwards leaves it as it was
        model[0].weight.add_(1.0)
    assert not torch.equal(clone[0].weight, model[0].weight)
    assert clone_module(5) == 5 and clone_module(None) is None
    obj = object()
    assert clone_module(obj) is obj


def test_clone_module_none_children_hooks_training_and_buffers():
    class Tricky(nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = nn.ModuleList([nn.Linear(2, 1, dtype=DT), None, nn.Linear(1, 1, dtype=DT)])
            self.register_buffer("stat", torch.ones(3, dtype=DT))
            self.register_buffer("learned", torch.ones(3, dtype=DT, requires_grad=True))

    model = Tricky()
    model.eval()
    calls = []
    model.mods[0].register_forward_hook(lambda mod, inp, out: calls.append(mod))
    clone = clone_module(model)
    assert clone.mods[1] is None and isinstance(clone.mods[2], nn.Linear)
    assert not clone.training and not clone.mods[0].training
    assert clone.stat is model.stat  # a buffer without grad: the original's
    assert clone.learned is not model.learned and clone.learned.grad_fn is not None
    clone.mods[0](torch.ones(1, 2, dtype=DT))
    assert calls == [clone.mods[0]]  # hooks are shared with the original


def test_clone_module_memo_keeps_shared_parameters_shared():
    shared = nn.Linear(3, 3, dtype=DT)
    a, b = nn.Sequential(shared), nn.Sequential(shared, nn.Tanh())
    memo = {}
    ca, cb = clone_module(a, memo), clone_module(b, memo)
    assert ca[0].weight is cb[0].weight and ca[0].weight is not shared.weight
    assert clone_module(b)[0].weight is not ca[0].weight
    model = Tied()
    clone = clone_module(model)
    assert clone.b.weight is clone.a.weight


def test_clone_module_gradient_reaches_the_original():
    model = CNN()
    snap = snapshot(model)
    _, outer = classification((1, 6, 6), seed=30)
    clone = clone_module(model)
    outer(clone).backward()
    ref = oracle(model, lambda f: f(randn(2, 1, 6, 6)).sum(), outer, steps=0)
    assert_meta_grads(model, ref)
    assert model.bn1.num_batches_tracked.item() == 1 and clone.bn1.num_batches_tracked is model.bn1.num_batches_tracked
    assert_untouched(model, snap)


def test_update_module_updates_in_place_and_keeps_ties():
    model = Tied()
    clone = clone_module(model)
    subs = list(clone.modules())
    updates = [randn(*p.shape, seed=80 + i) for i, p in enumerate(clone.parameters())]
    updates[3] = None
    before = list(clone.parameters())
    assert update_module(clone, updates=updates) is clone
    assert all(a is b for a, b in zip(clone.modules(), subs))
    assert clone.b.weight is clone.a.weight
    after = list(clone.parameters())
    assert after[3] is before[3]
    for p, q, u in zip(model.parameters(), after, updates):
        if u is not None:
            close(q.detach(), p.detach() + u)
            assert q.data_ptr() != p.data_ptr()

    clone = clone_module(model)
    for i, p in enumerate(clone.parameters()):
        p.update = randn(*p.shape, seed=90 + i).requires_grad_()
    ups = [p.update for p in clone.parameters()]
    update_module(clone)
    for p, q, u in zip(model.parameters(), clone.parameters(), ups):
        close(q.detach(), p.detach() + u.detach())
    assert clone.b.weight is clone.a.weight
    sum(q.sum() for q in clone.parameters()).backward()
    assert all(torch.equal(u.grad, torch.ones_like(u)) for u in ups)


def test_update_module_rebuilds_rnn_weights():
    model = RNNNet(nn.GRU)
    clone = clone_module(model)
    updates = [0.1 * randn(*p.shape, seed=100 + i) for i, p in enumerate(clone.parameters())]
    update_module(clone, updates)
    assert flat_weights_current(clone.rnn)
    x = randn(3, 4, 3, seed=31)
    expected = {k: p.detach() + u for (k, p), u in zip(model.named_parameters(), updates)}
    close(clone(x).detach(), functional_call(copy.deepcopy(model), expected, (x,)))


def test_detach_module():
    model = frozen_mlp()
    clone = clone_module(model)
    x = randn(3, 4, seed=32)
    values = [p.detach().clone() for p in clone.parameters()]
    tensors = list(clone.parameters())
    assert detach_module(clone) is None
    assert all(a is b for a, b in zip(clone.parameters(), tensors))  # in place
    assert all(p.grad_fn is None and not p.requires_grad for p in clone.parameters())
    assert all(torch.equal(p, v) for p, v in zip(clone.parameters(), values))
    with pytest.raises(RuntimeError):
        torch.autograd.grad(clone(x).sum(), list(clone.parameters()))

    clone = clone_module(model)
    detach_module(clone, keep_requires_grad=True)
    assert [p.requires_grad for p in clone.parameters()] == [p.requires_grad for p in model.parameters()]
    assert all(p.grad_fn is None for p in clone.parameters())
    clone(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())  # severed from the original
    assert clone[0].weight.grad is not None
    detach_module(clone)
    assert not any(p.requires_grad for p in clone.parameters())
    detach_module(None)  # anything but a module: nothing to do


# ---- clone_parameters, clone_named_parameters, magic_box, accuracy ----

def test_clone_parameters_and_named_parameters():
    model = mlp()
    copies = clone_parameters(list(model.parameters()))
    assert isinstance(copies, list) and len(copies) == len(list(model.parameters()))
    named = clone_named_parameters(dict(model.named_parameters()))
    assert list(named) == [k for k, _ in model.named_parameters()]
    for c, (k, p) in zip(copies, model.named_parameters()):
        assert c is not p and torch.equal(c, p) and c.grad_fn is not None
        assert named[k] is not p and torch.equal(named[k], p)
    (sum(c.sum() for c in copies) + 2 * sum(v.sum() for v in named.values())).backward()
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())


def test_magic_box():
    theta = torch.tensor([0.3, -1.2], dtype=DT, requires_grad=True)
    x = (theta ** 3).sum()
    box = magic_box(x)
    assert torch.equal(box.detach(), torch.ones((), dtype=DT))
    (g,) = torch.autograd.grad(box, theta, create_graph=True)
    close(g, 3 * theta.detach() ** 2)  # first derivative: x'
    (h,) = torch.autograd.grad(g.sum(), theta)
    close(h, 6 * theta.detach() + 3 * theta.detach() ** 2 * (3 * theta.detach() ** 2).sum())  # x'' + x' x'
    assert magic_box(2.5) == 2.5


def test_accuracy():
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    acc = accuracy(preds, torch.tensor([1, 0, 0, 0]))
    assert acc.dim() == 0 and acc.dtype == torch.float32
    assert acc.item() == 0.75
    assert accuracy(preds, torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == 1.0
    assert accuracy(preds, torch.tensor([0, 1, 0, 1])).item() == 0.0
