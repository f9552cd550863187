"""MAML.meta_step on the fused path (ops.maml_mlp_meta_step_: the meta-gradient and torch.optim's update
in one call) against the plain path it replaces: meta_loss(batch).backward() and optimizer.step();
Reptile.meta_step on the fused path (ops.reptile_mlp_step_) against an explicit per-task loop.

200 meta-steps on each path from the same weights and tasks must leave the same parameters, learned
rates, optimizer state and .grad, for MAML, FOMAML, Meta-SGD and ANIL, 1, 2 and 5 inner steps, MSE and
cross-entropy, float32 and float64; the plain path is itself checked against a per-task
torch.autograd.grad loop in test_maml.py.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import metalearn_fast as mf
from metalearn_fast import MAML, MLP, Reptile, TaskBatch, ops, reference
from metalearn_fast.algorithms import maml as maml_module

SIZES = [3, 8, 8, 2]
TASKS, SUPPORT, QUERY = 4, 5, 6
STEPS = 200
VARIANTS = {
    # variant: (MAML options, the optimizer)
    "maml": (dict(), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "fomaml": (dict(first_order=True), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    "meta-sgd": (dict(learn_inner_lr=True), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01)),
    "anil": (dict(adapt_head_only=True), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.1)),
    # LSLR, the multi-step loss annealed over 50 meta-steps, first order for the first 20
    "maml++": (dict(per_step_inner_lr=True, multi_step_loss=50, first_order_meta_steps=20),
               lambda p: torch.optim.Adam(p, lr=1e-2)),
}
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def batches(loss, dtype):
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        xs = torch.randn(TASKS, SUPPORT, SIZES[0], generator=g, dtype=dtype)
        xq = torch.randn(TASKS, QUERY, SIZES[0], generator=g, dtype=dtype)
        if loss == "mse":
            ys = torch.randn(TASKS, SUPPORT, SIZES[-1], generator=g, dtype=dtype)
            yq = torch.randn(TASKS, QUERY, SIZES[-1], generator=g, dtype=dtype)
        else:
            ys = torch.randint(0, SIZES[-1], (TASKS, SUPPORT), generator=g)
            yq = torch.randint(0, SIZES[-1], (TASKS, QUERY), generator=g)
        yield TaskBatch(xs, ys, xq, yq)


def learner(variant, inner_steps, loss, dtype):
    options, make_optimizer = VARIANTS[variant]
    torch.manual_seed(0)
    maml = MAML(MLP(SIZES, dtype=dtype), inner_lr=0.1, inner_steps=inner_steps, loss=loss, **options)
    return maml, make_optimizer(maml.parameters())


def plain_meta_step(maml, optimizer, batch):
    optimizer.zero_grad()
    loss = maml.meta_loss(batch)
    loss.backward()
    optimizer.step()
    if maml.plus is not None:
        maml.plus.advance()
    return float(loss.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("inner_steps", [1, 2, 5])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_meta_steps_leave_what_the_plain_path_leaves(variant, inner_steps, loss, dtype):
    fused, fused_optimizer = learner(variant, inner_steps, loss, dtype)
    plain, plain_optimizer = learner(variant, inner_steps, loss, dtype)
    assert fused.meta_step_path(fused_optimizer) == "fused"
    fused_losses = [float(fused.meta_step(batch, fused_optimizer)) for batch in batches(loss, dtype)]
    plain_losses = [plain_meta_step(plain, plain_optimizer, batch) for batch in batches(loss, dtype)]
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(plain_losses), **tolerance)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, **tolerance, msg=name)
        torch.testing.assert_close(b.grad, a.grad, **tolerance, msg=f"{name}.grad")
    expected, got = plain_optimizer.state_dict(), fused_optimizer.state_dict()
    assert got["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert got["state"][index].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(got["state"][index][key], value, **tolerance, msg=f"state {index} {key}")
    # training moved the weights: equal paths are not merely untouched ones
    start, _ = learner(variant, inner_steps, loss, dtype)
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), fused.parameters()))


def test_what_the_fused_step_does_not_cover_runs_the_plain_path():
    maml = MAML(MLP(SIZES), learn_inner_lr=True, adapt_head_only=True)
    assert maml.meta_step_path(torch.optim.Adam(maml.parameters())).startswith("python: learned rates with ANIL")
    maml = MAML(MLP(SIZES))
    assert "amsgrad" in maml.meta_step_path(torch.optim.Adam(maml.parameters(), amsgrad=True))
    assert "RMSprop" in maml.meta_step_path(torch.optim.RMSprop(maml.parameters()))
    partial = torch.optim.Adam(list(maml.parameters())[:2])
    assert "exactly the tensors" in maml.meta_step_path(partial)
    custom = MAML(MLP(SIZES), loss=lambda pred, target: (pred - target).abs().flatten(1).mean(1))
    assert custom.meta_step_path(torch.optim.Adam(custom.parameters())).startswith("python: the model is not")
    # and the plan follows a new param group
    optimizer = torch.optim.Adam(list(maml.parameters())[:2])
    optimizer.add_param_group({"params": list(maml.parameters())[2:]})
    assert maml.meta_step_path(optimizer) == "fused"


def test_the_fused_step_follows_a_replaced_parameter():
    """A parameter swapped for a new tensor in the model and in the optimizer's group (same groups, same counts):
    the next fused step updates the new tensor, not the one the plan was made with."""
    torch.manual_seed(0)
    maml = MAML(MLP(SIZES))
    optimizer = torch.optim.SGD(maml.parameters(), lr=0.1)
    batch = next(batches("mse", torch.float32))
    maml.meta_step(batch, optimizer)
    layer = maml.model[0]
    old = layer.weight
    layer.weight = torch.nn.Parameter(old.detach() + 1.0)
    optimizer.param_groups[0]["params"][0] = layer.weight
    new_before, old_before = layer.weight.detach().clone(), old.detach().clone()
    maml.meta_step(batch, optimizer)
    assert torch.equal(old, old_before)  # the replaced tensor is left alone
    assert not torch.equal(layer.weight, new_before) and layer.weight.grad is not None


def test_labels_out_of_range_are_named_on_the_fused_path():
    maml = MAML(MLP(SIZES), loss="cross_entropy")
    optimizer = torch.optim.Adam(maml.parameters())
    batch = next(batches("cross_entropy", torch.float32))
    labels = batch.y_query.clone()
    labels[1, 2] = SIZES[-1] + 2
    before = [p.detach().clone() for p in maml.parameters()]
    with pytest.raises(ValueError, match="y_query holds class label 4 but the model has 2 outputs"):
        maml.meta_step(TaskBatch(batch.x_support, batch.y_support, batch.x_query, labels), optimizer)
    assert all(torch.equal(a, b) for a, b in zip(maml.parameters(), before))  # nothing was updated


# On the fallback these ops are the reference code, which reads values (labels' range, Adam's step) in
# Python and so cannot be traced with symbolic shapes: opcheck checks its schema (the declared mutations)
# there, and everything (fake tensors, autograd registration, AOT tracing) on the compiled ops.
OPCHECK_TESTS = (torch.library._OPCHECK_DEFAULT_UTILS if mf.backend_info()["active"] == "extension" else ("test_schema",))


def op_arguments(variant="meta-sgd", dtype=torch.float64, loss="mse"):
    maml, optimizer = learner(variant, 2, loss, dtype)
    update = maml_module._fused_update(maml, optimizer)
    params = [p.detach() for p in maml.model.parameters()]
    learned = [r.detach() for r in maml_module._learned_rates(maml)]
    grads, state, settings = update.arguments()
    batch = next(batches(loss, dtype))
    return (params, learned or [torch.tensor(0.1, dtype=dtype)], grads, state, batch.x_support, batch.y_support,
            batch.x_query, batch.y_query, 2, maml.first_order, loss, maml._first_adapted_layer, bool(learned),
            update.kind, settings, *maml_module._per_step(maml))


@pytest.mark.parametrize("variant", ["meta-sgd", "anil", "maml++"])
def test_opcheck_meta_step(variant):
    torch.library.opcheck(torch.ops.metalearn_fast.maml_mlp_meta_step_.default, op_arguments(variant),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("variant, loss", list(itertools.product(VARIANTS, ["mse", "cross_entropy"])))
def test_the_compiled_op_matches_the_reference_op(variant, loss):
    results = []
    for op in (ops.maml_mlp_meta_step_, reference.maml_mlp_meta_step_):
        arguments = op_arguments(variant, loss=loss)
        with torch.no_grad():
            value = op(*arguments)
        params, rates, grads, state = arguments[:4]
        results.append([value] + [t.clone() for t in (*params, *rates, *grads, *state)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(ops._extension is None, reason="the extension's unboxed entry point")
def test_the_unboxed_entry_names_a_wrong_argument():
    """ops.maml_mlp_meta_step_ calls the extension without torch.ops' boxing: an argument of the wrong type is a
    TypeError naming it (as the schema would), not a crash, and nothing is updated."""
    arguments = list(op_arguments("meta-sgd"))
    before = [t.clone() for t in arguments[0]]
    cases = [(0, "not a list", r"argument 0 \(params\) must be a list"),
             (2, [1.0, 2.0], r"argument 2 \(grads\) must be a list of tensors"),
             (4, 3.0, r"argument 4 \(x_support\) must be a tensor"),
             (8, 2.0, r"argument 8 \(inner_steps\) must be an int"),
             (9, 1, r"argument 9 \(first_order\) must be a bool"),
             (10, None, r"argument 10 \(loss\) must be a str"),
             (14, ["lr"], r"argument 14 \(settings\) must be a list of numbers")]
    for index, value, message in cases:
        wrong = list(arguments)
        wrong[index] = value
        with pytest.raises(TypeError, match=message), torch.no_grad():
            ops._extension.maml_mlp_meta_step_(*wrong)
    with pytest.raises(TypeError, match="expected 17 arguments, got 15"):
        ops._extension.maml_mlp_meta_step_(*arguments[:15])
    for b, p in zip(before, arguments[0]):
        assert torch.equal(b, p)


def test_the_parameter_walk_equals_module_parameters():
    """ModelPlan.parameters (read at every meta-step) gives list(model.parameters()): after a parameter is
    replaced, with a parameter shared by two layers (once), and for a model that overrides parameters()."""
    from metalearn_fast.plan import ModelPlan

    torch.manual_seed(0)
    model = MLP([3, 8, 2])
    plan = ModelPlan(model, builtin_loss=True)
    assert [id(p) for p in plan.parameters()] == [id(p) for p in model.parameters()]
    model[0].weight = torch.nn.Parameter(torch.randn(8, 3))
    assert [id(p) for p in plan.parameters()] == [id(p) for p in model.parameters()]
    shared = torch.nn.Linear(4, 4)
    tied = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    assert [id(p) for p in ModelPlan(tied, builtin_loss=True).parameters()] == [id(p) for p in tied.parameters()]
    assert len(ModelPlan(tied, builtin_loss=True).parameters()) == 2

    class OnlyWeights(torch.nn.Sequential):
        def parameters(self, recurse=True):
            return (p for name, p in self.named_parameters() if name.endswith("weight"))

    custom = OnlyWeights(torch.nn.Linear(3, 4))
    assert [id(p) for p in ModelPlan(custom, builtin_loss=True).parameters()] == [id(custom[0].weight)]


# ---- Reptile: the fused step against a per-task loop with torch.autograd.grad ----

def reptile_loop_step(params, batch, inner_steps, inner_lr, outer_lr, loss):
    """Reptile written out task by task: copies, SGD with autograd.grad, the mean, the update."""
    task_loss = F.mse_loss if loss == "mse" else F.cross_entropy
    adapted, first_losses = [], []
    for xs, ys in zip(batch.x_support, batch.y_support):
        fast = [p.detach().clone().requires_grad_() for p in params]
        for step in range(inner_steps):
            value = task_loss(reference.mlp_forward(xs, fast), ys)
            if step == 0:
                first_losses.append(value.detach())
            grads = torch.autograd.grad(value, fast)
            fast = [(p - inner_lr * g).detach().requires_grad_() for p, g in zip(fast, grads)]
        adapted.append(fast)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(outer_lr * (torch.stack([task[i] for task in adapted]).mean(0) - p))
    return float(torch.stack(first_losses).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("inner_steps", [1, 2, 5])
def test_fused_reptile_steps_match_a_per_task_loop(inner_steps, loss, dtype):
    torch.manual_seed(0)
    reptile = Reptile(MLP(SIZES, dtype=dtype), inner_lr=0.1, inner_steps=inner_steps, outer_lr=0.5, loss=loss)
    assert reptile.meta_step_path() == "fused"
    params = [p.detach().clone() for p in reptile.parameters()]
    start = [p.clone() for p in params]
    fused_losses, loop_losses = [], []
    for batch in batches(loss, dtype):
        fused_losses.append(float(reptile.meta_step(batch)))
        loop_losses.append(reptile_loop_step(params, batch, inner_steps, 0.1, 0.5, loss))
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(loop_losses), **tolerance)
    for a, b in zip(reptile.parameters(), params):
        torch.testing.assert_close(a.detach(), b, **tolerance)
    assert any(not torch.equal(a, b) for a, b in zip(start, params))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_reptile_op_matches_its_reference_and_passes_opcheck(loss):
    batch = next(batches(loss, torch.float64))
    results = []
    for op in (ops.reptile_mlp_step_, reference.reptile_mlp_step_):
        torch.manual_seed(0)
        params = [p.detach() for p in MLP(SIZES, dtype=torch.float64).parameters()]
        with torch.no_grad():
            value = op(params, batch.x_support, batch.y_support, 3, 0.1, 0.5, loss)
        results.append([value, *params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.library.opcheck(torch.ops.metalearn_fast.reptile_mlp_step_.default,
                          (results[0][1:], batch.x_support, batch.y_support, 2, 0.1, 0.5, loss), test_utils=OPCHECK_TESTS)


def test_reptile_labels_out_of_range_are_named_on_the_fused_path():
    reptile = Reptile(MLP(SIZES), inner_lr=0.1, inner_steps=1, outer_lr=0.5, loss="cross_entropy")
    batch = next(batches("cross_entropy", torch.float32))
    labels = batch.y_support.clone()
    labels[0, 0] = 9
    with pytest.raises(ValueError, match="y_support holds class label 9 but the model has 2 outputs"):
        reptile.meta_step(TaskBatch(batch.x_support, labels, batch.x_query, batch.y_query))


def test_a_loss_beyond_float_range_is_not_finite_rather_than_an_error():
    """A diverging run gives a non-finite loss, as the plain path's float32 loss does, not an overflow error."""
    fused, fused_optimizer = learner("maml", 1, "mse", torch.float32)
    plain, plain_optimizer = learner("maml", 1, "mse", torch.float32)
    batch = next(batches("mse", torch.float32))
    huge = TaskBatch(batch.x_support, batch.y_support * 1e25, batch.x_query, batch.y_query * 1e25)
    value, expected = fused.meta_step(huge, fused_optimizer), plain_meta_step(plain, plain_optimizer, huge)
    assert not math.isfinite(expected) and not math.isfinite(value)
