"""pretrain/adapt reproduce the founding example in plain torch; compat runs it; bad input is named."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import metalearn_fast as mf
from metalearn_fast import compat

from test_nn import PlainSimpleNet


def founding_train(model, optimizer, loss_fn, x, y, epochs, batch_size, shuffle=False):
    """The founding example's training loop, in plain torch with a DataLoader."""
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for batch_x, batch_y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch_x), batch_y)
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total / len(loader))
    return losses


def data(seed, n=200, features=10):
    rng = np.random.default_rng(seed)
    return rng.random((n, features)), rng.random((n, 1))


@pytest.mark.parametrize("shuffle", [False, True])
def test_pretrain_and_adapt_reproduce_plain_torch(shuffle):
    x, y = data(0)
    new_x, new_y = data(1)
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731

    torch.manual_seed(42)
    plain = PlainSimpleNet(10, 1)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    expected = founding_train(plain, plain_opt, nn.MSELoss(), as_t(x), as_t(y), 5, 32, shuffle)
    founding_train(plain, plain_opt, nn.MSELoss(), as_t(new_x), as_t(new_y), 3, 32, shuffle)
    # a DataLoader draws from the global RNG every epoch, shuffled or not: code run after training sees
    # the same random numbers as after the plain loop
    next_draw = torch.rand(4)

    torch.manual_seed(42)
    ours = mf.SimpleNet(10, 1)
    opt = torch.optim.Adam(ours.parameters(), lr=1e-3)
    got = mf.pretrain(ours, x, y, epochs=5, batch_size=32, optimizer=opt, shuffle=shuffle)
    assert len(got) == 5 and got[-1] < got[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    adapted = mf.adapt(ours, new_x, new_y, epochs=3, batch_size=32, optimizer=opt, shuffle=shuffle, inplace=True)
    assert adapted is ours
    for a, b in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.rand(4), next_draw)


def test_adapt_returns_a_copy_and_leaves_the_original_bit_identical():
    x, y = data(2)
    torch.manual_seed(0)
    model = mf.SimpleNet(10, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    mf.pretrain(model, x, y, epochs=1, optimizer=optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v.clone() for k, v in optimizer.state[model.fc1.weight].items()}
    adapted = mf.adapt(model, *data(3), epochs=2, optimizer=optimizer)
    assert adapted is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in optimizer.state[model.fc1.weight].items():
        assert torch.equal(v, state_before[k])
    assert any(not torch.equal(a, b) for a, b in zip(adapted.parameters(), model.parameters()))


@pytest.mark.parametrize("train", ["pretrain", "adapt"])
def test_optimizer_factory_and_custom_loss_are_used(train):
    """A factory's optimizer (SGD here, not the default Adam) and a custom loss (L1): the result is that of
    the plain loop with that optimizer and loss."""
    x, y = data(4)
    torch.manual_seed(3)
    model = mf.SimpleNet(10, 1)
    plain = PlainSimpleNet(10, 1)
    plain.load_state_dict(model.state_dict())
    calls = []

    def loss_fn(pred, target):
        calls.append(1)
        return (pred - target).abs().mean()

    factory = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5)  # noqa: E731
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    torch.manual_seed(5)
    expected = founding_train(plain, factory(plain.parameters()), nn.L1Loss(), as_t(x), as_t(y), 2, 32)
    torch.manual_seed(5)
    if train == "pretrain":
        np.testing.assert_allclose(mf.pretrain(model, x, y, epochs=2, optimizer=factory, loss_fn=loss_fn), expected,
                                   rtol=1e-5, atol=1e-6)
        trained = model
    else:
        trained = mf.adapt(model, x, y, epochs=2, optimizer=factory, loss_fn=loss_fn)
        assert trained is not model
    assert len(calls) == 2 * 7
    for a, b in zip(trained.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compat_runs_the_founding_example():
    x, y = data(5, n=100)
    torch.manual_seed(7)
    model = compat.get_model(10, 1)
    assert isinstance(model, mf.SimpleNet) and model.fc1.out_features == 128
    optimizer, loss_fn = compat.get_optimizer(model), compat.get_loss_fn()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 0.001
    start = model.fc1.weight.clone()
    assert compat.train(model, optimizer, loss_fn, x, y, 3, 32) is model  # as the founding example's train
    assert not torch.equal(model.fc1.weight, start)
    new_x, new_y = data(6, n=100)
    before = model.fc2.weight.clone()
    assert compat.learn_new_task(model, optimizer, loss_fn, new_x, new_y, 2, 32) is model
    assert not torch.equal(model.fc2.weight, before)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(x=np.zeros((0, 10)), y=np.zeros((0, 1))), ValueError, "x is empty"),
        (dict(x=np.zeros((10, 10)), y=np.zeros((9, 1))), ValueError, "same number of examples"),
        (dict(x=np.full((10, 10), np.nan), y=np.zeros((10, 1))), ValueError, "x contains NaN"),
        (dict(x=np.zeros((10, 10)), y=np.array([[np.inf]] * 10)), ValueError, "y contains NaN"),
        (dict(x=np.array([["a"] * 10] * 10), y=np.zeros((10, 1))), TypeError, "x must hold numbers"),
        (dict(x="data", y=np.zeros((10, 1))), TypeError, "x must be a numpy array"),
        (dict(x=np.zeros((10, 7)), y=np.zeros((10, 1))), ValueError, r"x must be \[\.\.\., 10\]"),
        (dict(x=np.zeros((10, 10)), y=np.zeros((10, 1)), epochs=-1), ValueError, "epochs"),
        (dict(x=np.zeros((10, 10)), y=np.zeros((10, 1)), batch_size=0), ValueError, "batch_size"),
        (dict(x=np.zeros((10, 10)), y=np.zeros((10, 1)), optimizer="adam"), TypeError, "optimizer"),
    ],
)
def test_bad_input_is_named(kwargs, error, message):
    model = mf.SimpleNet(10, 1)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(error, match=message):
        mf.pretrain(model, **kwargs)
    with pytest.raises(error, match=message):
        mf.adapt(model, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_foreign_optimizer_is_rejected():
    model, other = mf.SimpleNet(10, 1), mf.SimpleNet(10, 1)
    with pytest.raises(ValueError, match="optimizer holds parameters"):
        mf.pretrain(model, *data(0), optimizer=torch.optim.Adam(other.parameters()))


def test_pretrain_does_not_modify_the_callers_data():
    x, y = data(8)
    xt = torch.as_tensor(x, dtype=torch.float32)
    copy = xt.clone()
    mf.pretrain(mf.SimpleNet(10, 1), xt, y, epochs=1, shuffle=True)
    assert torch.equal(xt, copy)


def test_the_example_command_trains_on_both_tasks(capsys):
    from metalearn_fast import cli
    from metalearn_fast.experiments import founding

    result = founding.run(epochs=3, seed=0)
    assert result["task_after"] < 0.5 * result["task_before"]
    assert result["new_task_after"] < result["new_task_before"]
    assert cli.main(["example", "--epochs", "1"]) == 0
    assert "MSE on the new task" in capsys.readouterr().out


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_train_in_order_is_the_plain_loop_in_order(loss):
    """train_in_order: one Adam step per batch of consecutive rows, the fused epoch where pretrain would take it
    (mse) and the plain loop otherwise (l1), each against a plain-torch loop; no random number drawn."""
    from metalearn_fast.train import train_in_order, training_path

    loss_fn = torch.nn.functional.mse_loss if loss == "mse" else torch.nn.functional.l1_loss
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 3, generator=g, dtype=torch.float64), torch.randn(70, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    ours = mf.MLP([3, 16, 2], dtype=torch.float64)
    plain = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    with torch.no_grad():
        for p, q in zip(plain.parameters(), ours.parameters()):
            p.copy_(q)
    ours_optimizer, plain_optimizer = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ours, plain))
    expected = []
    for start in range(0, 70, 20):  # 20, 20, 20 and 10 rows
        plain_optimizer.zero_grad()
        value = loss_fn(plain(x[start:start + 20]), y[start:start + 20])
        value.backward()
        plain_optimizer.step()
        expected.append(value.detach())
    rng = torch.get_rng_state()
    got = train_in_order(ours, ours_optimizer, loss_fn, x, y, 20)
    assert torch.equal(torch.get_rng_state(), rng)
    assert training_path(ours, x, y, optimizer=ours_optimizer, loss_fn=loss_fn).startswith(
        "fused" if loss == "mse" else "python")
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-10, atol=1e-12)
    for p, q in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
