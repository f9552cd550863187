"""TaskBatch: construction, its properties, .to(), and a clear error for each malformed input."""
import dataclasses

import pytest
import torch

from metalearn_fast import TaskBatch

T, K, Q = 4, 5, 6


def regression_tensors(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x_support, y_support = torch.randn(T, K, 2, generator=g), torch.randn(T, K, 3, generator=g)
    x_query, y_query = torch.randn(T, Q, 2, generator=g), torch.randn(T, Q, 3, generator=g)
    return {name: t.to(device) for name, t in zip(("x_support", "y_support", "x_query", "y_query"),
                                                   (x_support, y_support, x_query, y_query))}


def classification_tensors():
    tensors = regression_tensors()
    g = torch.Generator().manual_seed(1)
    tensors["y_support"] = torch.randint(0, 3, (T, K), generator=g)
    tensors["y_query"] = torch.randint(0, 3, (T, Q), generator=g)
    return tensors


def test_regression_batch_keeps_its_tensors(device):
    tensors = regression_tensors(device)
    batch = TaskBatch(**tensors)
    assert batch.num_tasks == T
    assert not batch.is_classification
    for name, tensor in tensors.items():
        assert getattr(batch, name) is tensor
    # positional order is support x, support y, query x, query y
    positional = TaskBatch(*tensors.values())
    assert positional.x_query is tensors["x_query"] and positional.y_support is tensors["y_support"]


def test_classification_batch():
    batch = TaskBatch(**classification_tensors())
    assert batch.is_classification and batch.num_tasks == T


def test_to_moves_every_tensor(device):
    batch = TaskBatch(**classification_tensors())
    moved = batch.to(device)
    assert isinstance(moved, TaskBatch)
    for name in ("x_support", "y_support", "x_query", "y_query"):
        assert getattr(moved, name).device.type == device.type
        assert torch.equal(getattr(moved, name).cpu(), getattr(batch, name))


def test_batch_is_frozen():
    batch = TaskBatch(**regression_tensors())
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.x_support = torch.zeros(T, K, 2)


def replaced(tensors, **changes):
    return {**tensors, **changes}


def bad_cases():
    reg = regression_tensors()
    cls = classification_tensors()
    nan_x = reg["x_support"].clone()
    nan_x[1, 2, 0] = float("nan")
    inf_y = reg["y_query"].clone()
    inf_y[0, 0, 1] = float("inf")
    inf_x = reg["x_query"].clone()
    inf_x[3, 5, 1] = -float("inf")
    nan_y = reg["y_support"].clone()
    nan_y[2, 1, 2] = float("nan")
    negative = cls["y_query"].clone()
    negative[2, 3] = -1
    return {
        # empty batch: no tasks, or no examples in a set
        "no tasks": (replaced(reg, **{k: v[:0] for k, v in reg.items()}), ValueError, "x_support.*T = 0"),
        "no support examples": (replaced(reg, x_support=reg["x_support"][:, :0], y_support=reg["y_support"][:, :0]),
                                ValueError, "x_support.*K = 0"),
        "no query examples": (replaced(reg, x_query=reg["x_query"][:, :0], y_query=reg["y_query"][:, :0]),
                              ValueError, "x_query.*K = 0"),
        # T must agree everywhere; the error names the argument that disagrees
        "T of y_support": (replaced(reg, y_support=reg["y_support"][:3]), ValueError, "y_support.*T = 4"),
        "T of x_query": (replaced(reg, x_query=reg["x_query"][:3], y_query=reg["y_query"][:3]), ValueError, "x_query"),
        "T of y_query": (replaced(reg, y_query=reg["y_query"][:2]), ValueError, "y_query.*T = 4"),
        "K of y_support": (replaced(reg, y_support=reg["y_support"][:, :4]), ValueError, "y_support.*K = 5"),
        "K of y_query": (replaced(cls, y_query=cls["y_query"][:, :2]), ValueError, "y_query.*K = 6"),
        "features": (replaced(reg, x_query=torch.randn(T, Q, 3)), ValueError, "x_query must have the feature shape"),
        "x without a task dim": (replaced(reg, x_support=reg["x_support"][0]), ValueError, "x_support must be"),
        "integer x": (replaced(reg, x_support=reg["x_support"].long()), TypeError, "x_support must be floating"),
        "x dtypes differ": (replaced(reg, x_query=reg["x_query"].double(), y_query=reg["y_query"].double()),
                            TypeError, "x_query must have"),
        "y dtype not x's": (replaced(reg, y_support=reg["y_support"].double()), TypeError, "y_support.*dtype"),
        "regression target shapes": (replaced(reg, y_query=reg["y_query"][..., :2]), ValueError, "y_query must have"),
        "int32 labels": (replaced(cls, y_support=cls["y_support"].int()), TypeError, "y_support.*int64"),
        "bool labels": (replaced(cls, y_query=cls["y_query"] > 0), TypeError, "y_query"),
        "labels with a feature dim": (replaced(cls, y_support=cls["y_support"].unsqueeze(-1)),
                                      ValueError, "y_support.*\\[T, K\\]"),
        "negative label": (replaced(cls, y_query=negative), ValueError, "y_query.*non-negative"),
        "labels and targets mixed": (replaced(reg, y_query=cls["y_query"]), TypeError, "y_query must have"),
        "nan in x_support": (replaced(reg, x_support=nan_x), ValueError, "x_support contains NaN"),
        "inf in x_query": (replaced(reg, x_query=inf_x), ValueError, "x_query contains NaN or infinite"),
        "nan in y_support": (replaced(reg, y_support=nan_y), ValueError, "y_support contains NaN"),
        "inf in y_query": (replaced(reg, y_query=inf_y), ValueError, "y_query contains NaN or infinite"),
        "not a tensor": (replaced(reg, y_support=reg["y_support"].tolist()), TypeError, "y_support must be a torch"),
    }


@pytest.mark.parametrize("case", list(bad_cases()))
def test_bad_batch_names_the_argument(case):
    tensors, error, message = bad_cases()[case]
    with pytest.raises(error, match=message):
        TaskBatch(**tensors)


def test_mixed_devices_are_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device (CUDA) to mix devices")
    tensors = regression_tensors()
    with pytest.raises(ValueError, match="y_support must be on"):
        TaskBatch(**replaced(tensors, y_support=tensors["y_support"].cuda()))
    with pytest.raises(ValueError, match="x_query must be on"):
        TaskBatch(**replaced(tensors, x_query=tensors["x_query"].cuda(), y_query=tensors["y_query"].cuda()))


def test_numpy_arrays_are_accepted_as_tensors_would_be():
    """Data as users have it: float arrays become torch's default dtype, integer arrays int64 class labels, and
    a MAML meta-step on the numpy batch equals one on the tensor batch."""
    import numpy as np

    from metalearn_fast import MAML, MLP

    tensors = classification_tensors()
    arrays = {name: t.numpy().astype(np.float64 if t.is_floating_point() else np.int32) for name, t in tensors.items()}
    batch = TaskBatch(**arrays)
    assert batch.x_support.dtype == torch.get_default_dtype() and batch.y_support.dtype == torch.int64
    assert batch.largest_labels == (int(tensors["y_support"].max()), int(tensors["y_query"].max()))
    losses = []
    for data in (batch, TaskBatch(**tensors)):
        torch.manual_seed(0)
        maml = MAML(MLP([2, 8, 3]), loss="cross_entropy")
        losses.append(maml.meta_loss(data))
    torch.testing.assert_close(losses[0], losses[1])
    with pytest.raises(TypeError, match="x_support must hold numbers"):
        TaskBatch(**{**arrays, "x_support": np.array([["a"]])})
