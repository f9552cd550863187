"""The fused training epoch (ops.mlp_train_epoch_, which pretrain/adapt/compat use) against plain torch.

The oracle is the loop a user writes: an nn.Sequential of nn.Linear and nn.ReLU with the same weights,
``optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()`` with torch.optim's own
optimizer, batches sliced in order or in a DataLoader's shuffled order. The fused path must leave the
same epoch losses, weights, optimizer state and .grad, so that the Python loop can take over at any
step; everything it does not cover must take the Python loop, and say so.
"""
import copy
import importlib.util
import itertools
import re
import sys
import textwrap
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import metalearn_fast as mf
from metalearn_fast import ops, reference
from metalearn_fast.optim import FusedUpdate
from metalearn_fast.train import training_path

from conftest import forced_cpu_simd
from test_nn import plain_mlp

# ---- the founding program, verbatim but for its import ----

FOUNDING_PROGRAM = """
import numpy as np
from {module} import get_model, get_optimizer, get_loss_fn, train, learn_new_task

x = np.random.rand(1000, 10)
y = np.random.rand(1000, 1)
model = get_model(10, 1)
optimizer = get_optimizer(model)
loss_fn = get_loss_fn()
model = train(model, optimizer, loss_fn, x, y, epochs=10, batch_size=32)

new_x = np.random.rand(100, 10)
new_y = np.random.rand(100, 1)
model = learn_new_task(model, optimizer, loss_fn, new_x, new_y, epochs=10, batch_size=32)
"""


def plain_seed_module() -> types.ModuleType:
    """The founding program's functions in plain torch, as the seed writes them."""
    source = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SimpleNet(nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.fc1 = nn.Linear(input_size, 128)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(128, output_size)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def get_model(input_size, output_size):
    return SimpleNet(input_size, output_size)


def get_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=0.001)


def get_loss_fn():
    return nn.MSELoss()


def train(model, optimizer, loss_fn, x, y, epochs, batch_size):
    dataset = TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    loader = DataLoader(dataset, batch_size=batch_size)
    for epoch in range(epochs):
        for batch_x, batch_y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch_x), batch_y)
            loss.backward()
            optimizer.step()
    return model


def learn_new_task(model, optimizer, loss_fn, new_x, new_y, epochs, batch_size):
    return train(model, optimizer, loss_fn, new_x, new_y, epochs, batch_size)
'''
    module = types.ModuleType("founding_seed")
    exec(compile(source, "founding_seed", "exec"), module.__dict__)
    return module


def run_founding_program(module_name, modules):
    np.random.seed(0)
    torch.manual_seed(0)
    namespace = {}
    program = FOUNDING_PROGRAM.format(module=module_name)
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        exec(compile(textwrap.dedent(program), "founding_program", "exec"), namespace)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
    return namespace


def test_the_founding_program_runs_verbatim_with_one_changed_import():
    plain = run_founding_program("founding_seed", {"founding_seed": plain_seed_module()})
    ours = run_founding_program("metalearn_fast.compat", {})
    assert isinstance(ours["model"], nn.Module)  # train and learn_new_task return the model
    assert training_path(ours["model"], ours["new_x"], ours["new_y"], optimizer=ours["optimizer"]) == "fused"
    for (name, a), b in zip(plain["model"].named_parameters(), ours["model"].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # the optimizer state too: the program could go on with either
    expected, got = plain["optimizer"].state_dict()["state"], ours["optimizer"].state_dict()["state"]
    for index in expected:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[index][key], expected[index][key], rtol=1e-5, atol=1e-7)
    assert float(expected[0]["step"]) == 10 * 32 + 10 * 4


# ---- the matrix: optimizers x losses x orders x depths x dtypes ----

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-decay-maximize": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                                                     maximize=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum-dampening": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3),
    "sgd-nesterov-maximize": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.8, nesterov=True, maximize=True),
}
DEPTHS = {1: [6, 3], 2: [6, 16, 3], 4: [6, 16, 12, 8, 3]}
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
N, BATCH, EPOCHS = 50, 16, 3  # the last batch of each epoch holds 2 examples


def problem(loss, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 6, generator=g, dtype=dtype)
    y = torch.randn(N, 3, generator=g, dtype=dtype) if loss == "mse" else torch.randint(0, 3, (N,), generator=g)
    return x, y


def twins(depth, dtype, optimizer):
    """Our MLP and the plain nn.Sequential with the same initial weights, each with its optimizer."""
    torch.manual_seed(1)
    ours = mf.MLP(DEPTHS[depth], dtype=dtype)
    plain = plain_mlp(DEPTHS[depth]).to(dtype)
    with torch.no_grad():
        for a, b in zip(plain.parameters(), ours.parameters()):
            a.copy_(b)
    return ours, OPTIMIZERS[optimizer](ours.parameters()), plain, OPTIMIZERS[optimizer](plain.parameters())


def plain_epochs(model, optimizer, loss_fn, x, y, epochs, shuffle):
    """The user's loop: a DataLoader over (x, y) and zero_grad / backward / step per batch."""
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=shuffle)
    losses = []
    for _ in range(epochs):
        batch_losses = []
        for batch_x, batch_y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch_x), batch_y)
            loss.backward()
            optimizer.step()
            batch_losses.append(loss.item())
        losses.append(sum(batch_losses) / len(batch_losses))
    return losses


def assert_same_training(ours, our_optimizer, plain, plain_optimizer, dtype):
    tolerance = TOLERANCE[dtype]
    for (name, a), b in zip(plain.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, **tolerance, msg=f"weights {name}")
        torch.testing.assert_close(b.grad, a.grad, **tolerance, msg=f"last gradient {name}")
    expected, got = plain_optimizer.state_dict(), our_optimizer.state_dict()
    assert got["param_groups"] == expected["param_groups"]
    assert got["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert got["state"][index].keys() == state.keys(), index
        for key, value in state.items():
            torch.testing.assert_close(got["state"][index][key], value, **tolerance, msg=f"state {index} {key}")


LOSS_FUNCTIONS = {"mse": nn.MSELoss, "cross_entropy": nn.CrossEntropyLoss}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("depth", list(DEPTHS))
@pytest.mark.parametrize("shuffle", [False, True], ids=["sequential", "shuffled"])
@pytest.mark.parametrize("loss", list(LOSS_FUNCTIONS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fused_epochs_leave_what_the_plain_loop_leaves(optimizer, loss, shuffle, depth, dtype):
    x, y = problem(loss, dtype)
    ours, our_optimizer, plain, plain_optimizer = twins(depth, dtype, optimizer)
    torch.manual_seed(7)  # the shuffled order comes from the global generator, as a DataLoader's does
    expected = plain_epochs(plain, plain_optimizer, LOSS_FUNCTIONS[loss](), x, y, EPOCHS, shuffle)
    torch.manual_seed(7)
    got = mf.pretrain(ours, x, y, epochs=EPOCHS, batch_size=BATCH, optimizer=our_optimizer,
                      loss_fn=LOSS_FUNCTIONS[loss](), shuffle=shuffle)
    assert got.path == "fused"
    np.testing.assert_allclose(got, expected, **TOLERANCE[dtype])
    assert_same_training(ours, our_optimizer, plain, plain_optimizer, dtype)
    # the Python optimizer takes over where the fused epochs stopped
    torch.manual_seed(8)
    plain_epochs(plain, plain_optimizer, LOSS_FUNCTIONS[loss](), x, y, 1, shuffle)
    torch.manual_seed(8)
    plain_epochs(ours, our_optimizer, LOSS_FUNCTIONS[loss](), x, y, 1, shuffle)
    assert_same_training(ours, our_optimizer, plain, plain_optimizer, dtype)


@pytest.mark.parametrize("optimizer", ["adam", "sgd-momentum-dampening"])
def test_a_scheduler_changes_the_learning_rate_between_calls(optimizer):
    dtype = torch.float64
    x, y = problem("mse", dtype)
    ours, our_optimizer, plain, plain_optimizer = twins(2, dtype, optimizer)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (our_optimizer, plain_optimizer)]
    for _ in range(3):
        mf.pretrain(ours, x, y, epochs=1, batch_size=BATCH, optimizer=our_optimizer)
        plain_epochs(plain, plain_optimizer, nn.MSELoss(), x, y, 1, False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()": the fused step marks it
            for scheduler in schedulers:
                scheduler.step()
    assert our_optimizer.param_groups[0]["lr"] == plain_optimizer.param_groups[0]["lr"] < 0.01
    assert_same_training(ours, our_optimizer, plain, plain_optimizer, dtype)


def test_the_compiled_op_matches_the_reference_op():
    """ops.mlp_train_epoch_ against reference.mlp_train_epoch_ (the fallback), both on the same state."""
    for loss, optimizer in itertools.product(LOSS_FUNCTIONS, ["adam", "sgd-nesterov-maximize"]):
        x, y = problem(loss, torch.float64)
        runs = []
        for op in (ops.mlp_train_epoch_, reference.mlp_train_epoch_):
            model, opt, _, _ = twins(4, torch.float64, optimizer)
            params = list(model.parameters())
            update = FusedUpdate.plan(opt, params)
            grads, state, settings = update.arguments()
            order = torch.randperm(N, generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                losses = op(params, grads, state, x, y, order, BATCH, loss, update.kind, settings)
            runs.append((losses, [p.detach().clone() for p in params], [t.clone() for t in state]))
        (losses, params, state), (ref_losses, ref_params, ref_state) = runs
        torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=1e-14)
        for a, b in zip(params + state, ref_params + ref_state):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- what the fused path does not cover takes the Python loop, and says why ----

def amsgrad(p):
    return torch.optim.Adam(p, lr=1e-2, amsgrad=True)


def with_hook(model):
    model[0].register_forward_hook(lambda module, inputs, output: None)
    return model


def frozen(model):
    model[0].bias.requires_grad_(False)
    return model


FALLBACKS = {
    # case: (make the model, the optimizer, the loss function, the reason in path)
    "amsgrad": (lambda m: m, amsgrad, nn.MSELoss(), "not plain Adam state|amsgrad"),
    "rmsprop": (lambda m: m, lambda p: torch.optim.RMSprop(p, lr=1e-3), nn.MSELoss(), "RMSprop"),
    "tensor lr": (lambda m: m, lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-2)), nn.MSELoss(), "tensor"),
    "custom loss": (lambda m: m, OPTIMIZERS["adam"], nn.L1Loss(), "L1Loss"),
    "sum-reduced loss": (lambda m: m, OPTIMIZERS["adam"], nn.MSELoss(reduction="sum"), "MSELoss"),
    "hooks": (with_hook, OPTIMIZERS["adam"], nn.MSELoss(), "hooks"),
    "frozen": (frozen, OPTIMIZERS["adam"], nn.MSELoss(), "frozen"),
    "tanh": (lambda m: nn.Sequential(m[0], nn.Tanh(), m[2]), OPTIMIZERS["adam"], nn.MSELoss(), "not an MLP"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_what_the_fused_path_does_not_cover_runs_the_plain_loop(case):
    make, make_optimizer, loss_fn, reason = FALLBACKS[case]
    dtype = torch.float64
    x, y = problem("mse", dtype)
    torch.manual_seed(1)
    ours = make(plain_mlp([6, 16, 3]).to(dtype))
    plain = copy.deepcopy(ours)
    our_optimizer = make_optimizer([p for p in ours.parameters() if p.requires_grad])
    plain_optimizer = make_optimizer([p for p in plain.parameters() if p.requires_grad])
    got = mf.pretrain(ours, x, y, epochs=2, batch_size=BATCH, optimizer=our_optimizer, loss_fn=loss_fn)
    assert got.path.startswith("python: ")
    assert re.search(reason, got.path), got.path
    expected = plain_epochs(plain, plain_optimizer, loss_fn, x, y, 2, False)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_mixed_dtypes_take_the_plain_loop():
    model = plain_mlp([6, 16, 3]).double()
    model[2].float()
    x, y = problem("mse", torch.float64)
    assert training_path(model, x, y).startswith("python: ")


def test_labels_out_of_range_and_mse_targets_of_another_shape_take_the_plain_loop():
    model = mf.MLP([6, 16, 3])
    x, _ = problem("mse", torch.float32)
    assert training_path(model, x, torch.randn(N)).startswith("python: y is")  # MSELoss would broadcast
    labels = torch.randint(0, 3, (N,))
    assert training_path(model, x, labels, loss_fn=nn.CrossEntropyLoss()) == "fused"
    labels[4] = 3
    assert "class labels" in training_path(model, x, labels, loss_fn=nn.CrossEntropyLoss())


# ---- the op's checks, opcheck, NaN warning, progress ----

# On the fallback these ops are the reference code, which reads values (labels' range, Adam's step) in
# Python and so cannot be traced with symbolic shapes: opcheck checks its schema (the declared mutations)
# there, and everything (fake tensors, autograd registration, AOT tracing) on the compiled ops.
OPCHECK_TESTS = (torch.library._OPCHECK_DEFAULT_UTILS if mf.backend_info()["active"] == "extension" else ("test_schema",))


def op_arguments(loss="mse", dtype=torch.float64, optimizer="adam"):
    model, opt, _, _ = twins(2, dtype, optimizer)
    params = [p.detach() for p in model.parameters()]
    update = FusedUpdate.plan(opt, list(model.parameters()))
    grads, state, settings = update.arguments()
    x, y = problem(loss, dtype)
    return params, grads, state, x, y, update.kind, settings


@pytest.mark.parametrize("loss, optimizer", [("mse", "adam"), ("cross_entropy", "sgd-momentum-dampening")])
def test_opcheck_training_ops(loss, optimizer):
    params, grads, state, x, y, kind, settings = op_arguments(loss, optimizer=optimizer)
    order = torch.randperm(N)
    torch.library.opcheck(torch.ops.metalearn_fast.mlp_train_epoch_.default,
                          (params, grads, state, x, y, order, BATCH, loss, kind, settings), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(torch.ops.metalearn_fast.optimizer_step_.default, (params, grads, state, kind, settings),
                          test_utils=OPCHECK_TESTS)


BAD_OP_ARGUMENTS = {
    "labels out of range": (lambda a: a.update(y=torch.full((N,), 5)), "class labels in \\[0, 3\\)", "cross_entropy"),
    "y of another shape": (lambda a: a.update(y=torch.randn(N, 2, dtype=torch.float64)), "y must be \\[50, 3\\]", "mse"),
    "x of another dtype": (lambda a: a.update(x=a["x"].float()), "x must have the params' dtype", "mse"),
    "order out of range": (lambda a: a.update(order=torch.arange(N) + 1), "order must index", "mse"),
    "batch size 0": (lambda a: a.update(batch_size=0), "batch_size must be >= 1", "mse"),
    "settings too short": (lambda a: a.update(settings=a["settings"][:-1]), "settings must hold 7", "mse"),
    "state missing": (lambda a: a.update(state=a["state"][:-1]), "state must hold", "mse"),
    "unknown optimizer": (lambda a: a.update(optimizer="lion"), "optimizer must be 'adam' or 'sgd'", "mse"),
}


@pytest.mark.parametrize("case", list(BAD_OP_ARGUMENTS))
@pytest.mark.parametrize("op", [ops.mlp_train_epoch_, reference.mlp_train_epoch_], ids=["op", "reference"])
def test_bad_op_arguments_are_named(op, case):
    change, message, loss = BAD_OP_ARGUMENTS[case]
    params, grads, state, x, y, kind, settings = op_arguments(loss)
    arguments = dict(params=params, grads=grads, state=state, x=x, y=y, order=None, batch_size=BATCH, loss=loss,
                     optimizer=kind, settings=settings)
    change(arguments)
    with pytest.raises((ValueError, TypeError), match=message):
        op(*arguments.values())


def test_a_loss_that_turns_infinite_warns_once_naming_the_epoch_and_batch():
    x, y = problem("mse", torch.float32)
    model = mf.MLP([6, 16, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e25)
    with pytest.warns(RuntimeWarning, match=r"pretrain: the loss is (inf|nan) at epoch 1, batch \d") as warned:
        losses = mf.pretrain(model, x, y, epochs=3, batch_size=BATCH, optimizer=optimizer)
    assert len([w for w in warned if "the loss is" in str(w.message)]) == 1
    assert losses.path == "fused" and not np.isfinite(losses[-1])


def test_progress_shows_a_bar_over_epochs(capsys):
    x, y = problem("mse", torch.float32)
    mf.pretrain(mf.MLP([6, 16, 3]), x, y, epochs=2, batch_size=BATCH, progress=True)
    captured = capsys.readouterr()
    # a tqdm bar on stderr; without tqdm (it comes with the [jobs] extra), one line per epoch on stdout
    shown = captured.err if importlib.util.find_spec("tqdm") else captured.out
    assert "2/2" in shown and "loss" in shown


def test_adapt_takes_the_fused_path_and_leaves_the_original_alone(monkeypatch):
    x, y = problem("mse", torch.float32)
    model = mf.SimpleNet(6, 3)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def counting(*args):
        calls.append(1)
        return ops.mlp_train_epoch_(*args)

    monkeypatch.setattr("metalearn_fast.train.mlp_train_epoch_", counting)
    adapted = mf.adapt(model, x, y, epochs=2, batch_size=BATCH)
    assert len(calls) == 2  # one call per epoch
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert any(not torch.equal(a, b) for a, b in zip(adapted.parameters(), before))


@pytest.mark.parametrize("level", ["none", "avx2", "avx512"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_the_optimizer_loops_of_each_instruction_set_step_as_torch_optim(optimizer, level):
    """optimizer_step_'s raw CPU loops, in the portable, AVX2 and AVX-512 copies, against torch.optim's step: three
    steps on tensors whose sizes leave remainders of every register width (first steps make the state)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(37,), (5, 7), (1,), (3, 17)]
    ours = [torch.randn(s, generator=g, dtype=torch.float32, requires_grad=True) for s in shapes]
    plain = [p.detach().clone().requires_grad_() for p in ours]
    our_optimizer, plain_optimizer = OPTIMIZERS[optimizer](ours), OPTIMIZERS[optimizer](plain)
    update = FusedUpdate.plan(our_optimizer, ours)
    with forced_cpu_simd(level):
        for _ in range(3):
            grads = [torch.randn(s, generator=g) for s in shapes]
            for p, grad in zip(plain, grads):
                p.grad = grad.clone()
            plain_optimizer.step()
            op_grads, state, settings = update.arguments()
            for slot, grad in zip(op_grads, grads):
                slot.copy_(grad)
            with torch.no_grad():
                torch.ops.metalearn_fast.optimizer_step_(ours, op_grads, state, update.kind, settings)
            update.finish(state)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(our_optimizer.state.values(), plain_optimizer.state.values()):
        for key, value in b.items():
            torch.testing.assert_close(a[key], value, rtol=1e-6, atol=1e-7, msg=key)
