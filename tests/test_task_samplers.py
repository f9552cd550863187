"""SinusoidTasks and FewShotTasks: what a batch holds, reproducibility from the seed, and clear errors."""
import math

import numpy as np
import pytest
import torch

from metalearn_fast import MAML, MLP, TaskBatch
from metalearn_fast.tasks import FewShotTasks, SinusoidTaskBatch, SinusoidTasks

# ---- SinusoidTasks ----


def test_sinusoid_batch_shapes_and_targets(device):
    sampler = SinusoidTasks(k_support=7, k_query=13, seed=0)
    batch = sampler.sample(6, device=device)
    assert isinstance(batch, SinusoidTaskBatch) and isinstance(batch, TaskBatch)
    assert batch.x_support.shape == batch.y_support.shape == (6, 7, 1)
    assert batch.x_query.shape == batch.y_query.shape == (6, 13, 1)
    assert batch.amplitude.shape == batch.phase.shape == (6,)
    for tensor in (batch.x_support, batch.y_support, batch.x_query, batch.amplitude):
        assert tensor.device.type == device.type and tensor.dtype == torch.float32
    # every target is its task's A sin(x - phi), computed here from the kept parameters
    a, phi = batch.amplitude.view(-1, 1, 1), batch.phase.view(-1, 1, 1)
    torch.testing.assert_close(batch.y_support, a * torch.sin(batch.x_support - phi))
    torch.testing.assert_close(batch.y_query, a * torch.sin(batch.x_query - phi))
    torch.testing.assert_close(batch.true_function(batch.x_query), batch.y_query)


def test_sinusoid_draws_cover_the_paper_ranges():
    batch = SinusoidTasks(seed=1).sample(20000)
    amplitude, phase, x = batch.amplitude, batch.phase, torch.cat([batch.x_support, batch.x_query], 1)
    assert 0.1 <= amplitude.min() < 0.15 and 4.95 < amplitude.max() <= 5.0
    assert 0.0 <= phase.min() < 0.01 and math.pi - 0.01 < phase.max() <= math.pi
    assert -5.0 <= x.min() < -4.99 and 4.99 < x.max() <= 5.0
    # uniform: the mean sits at the middle of each range
    assert abs(float(amplitude.mean()) - 2.55) < 0.05
    assert abs(float(phase.mean()) - math.pi / 2) < 0.05
    assert abs(float(x.mean())) < 0.05


def test_sinusoid_custom_ranges_and_dtype():
    batch = SinusoidTasks(amplitude=(2.0, 2.0), phase=(0.5, 0.5), x_range=(0.0, 1.0), seed=0).sample(
        3, dtype=torch.float64
    )
    assert batch.x_support.dtype == torch.float64
    assert torch.all(batch.amplitude == 2.0) and torch.all(batch.phase == 0.5)
    assert batch.x_support.min() >= 0.0 and batch.x_support.max() <= 1.0


def test_sinusoid_is_reproducible_from_the_seed(device):
    first = SinusoidTasks(seed=5)
    second = SinusoidTasks(seed=5)
    a1, a2 = first.sample(4, device=device), first.sample(4, device=device)
    b1, b2 = second.sample(4, device=device), second.sample(4, device=device)
    for x, y in ((a1, b1), (a2, b2)):
        assert torch.equal(x.x_support, y.x_support) and torch.equal(x.amplitude, y.amplitude)
    # successive batches and other seeds are fresh tasks
    assert not torch.equal(a1.amplitude, a2.amplitude)
    assert not torch.equal(SinusoidTasks(seed=6).sample(4, device=device).amplitude, a1.amplitude)


def test_sinusoid_sample_many_is_the_stream_of_single_draws():
    """On the CPU, count batches drawn at once are those of count calls of sample: checked against the documented
    order (amplitudes, phases, then each task's inputs, batch after batch) from a raw generator of the same seed."""
    tasks, k, q = 3, 4, 5
    lo_a, hi_a, lo_p, hi_p, lo_x, hi_x = 0.5, 2.0, 0.1, 3.0, -4.0, 4.0
    sampler = SinusoidTasks(amplitude=(lo_a, hi_a), phase=(lo_p, hi_p), x_range=(lo_x, hi_x), k_support=k,
                            k_query=q, seed=11)
    batches = [*sampler.sample_many(2, tasks), sampler.sample(tasks), *sampler.sample_many(3, tasks)]
    u = torch.rand(6 * tasks * (2 + k + q), generator=torch.Generator().manual_seed(11)).view(6, -1)
    for b, batch in enumerate(batches):
        amplitude = lo_a + (hi_a - lo_a) * u[b, :tasks]
        phase = lo_p + (hi_p - lo_p) * u[b, tasks:2 * tasks]
        x = (lo_x + (hi_x - lo_x) * u[b, 2 * tasks:]).view(tasks, k + q, 1)
        torch.testing.assert_close(batch.amplitude, amplitude)
        torch.testing.assert_close(batch.phase, phase)
        torch.testing.assert_close(batch.x_support, x[:, :k])
        torch.testing.assert_close(batch.x_query, x[:, k:])
        torch.testing.assert_close(batch.y_query, amplitude.view(-1, 1, 1) * torch.sin(x[:, k:] - phase.view(-1, 1, 1)))
    # and the same numbers as one call each, to the bit
    single = SinusoidTasks(amplitude=(lo_a, hi_a), phase=(lo_p, hi_p), x_range=(lo_x, hi_x), k_support=k,
                           k_query=q, seed=11)
    for batch in batches:
        one = single.sample(tasks)
        for name in ("x_support", "y_support", "x_query", "y_query", "amplitude", "phase"):
            assert torch.equal(getattr(one, name), getattr(batch, name))
    with pytest.raises(ValueError, match="count"):
        sampler.sample_many(0, 2)


def test_sinusoid_same_seed_same_tasks_whatever_k():
    """The task parameters are drawn first, so samplers that differ only in K give the same tasks."""
    small = SinusoidTasks(k_support=5, seed=3).sample(8)
    large = SinusoidTasks(k_support=20, seed=3).sample(8)
    assert torch.equal(small.amplitude, large.amplitude) and torch.equal(small.phase, large.phase)


def test_sinusoid_seed_none_follows_torch_manual_seed():
    torch.manual_seed(123)
    first = SinusoidTasks().sample(3)
    torch.manual_seed(123)
    second = SinusoidTasks().sample(3)
    assert torch.equal(first.x_query, second.x_query)


def test_sinusoid_batch_to_keeps_task_parameters():
    batch = SinusoidTasks(seed=0).sample(2)
    moved = batch.to("cpu")
    assert isinstance(moved, SinusoidTaskBatch)
    assert torch.equal(moved.amplitude, batch.amplitude) and torch.equal(moved.phase, batch.phase)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(k_support=0), ValueError, "k_support"),
        (dict(k_query=-1), ValueError, "k_query"),
        (dict(k_support=2.5), ValueError, "k_support"),
        (dict(amplitude=(5.0, 0.1)), ValueError, "amplitude.*low <= high"),
        (dict(phase=(0.0, float("nan"))), ValueError, "phase.*finite"),
        (dict(x_range=3.0), TypeError, "x_range must be a pair"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_sinusoid_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        SinusoidTasks(**kwargs)


def test_sinusoid_bad_sample_arguments():
    sampler = SinusoidTasks(seed=0)
    with pytest.raises(ValueError, match="num_tasks"):
        sampler.sample(0)
    with pytest.raises(TypeError, match="dtype"):
        sampler.sample(2, dtype=torch.int64)


def test_sinusoid_batch_checks_its_parameters():
    batch = SinusoidTasks(seed=0).sample(3)
    with pytest.raises(ValueError, match="amplitude must be a tensor of shape \\[3\\]"):
        SinusoidTaskBatch(batch.x_support, batch.y_support, batch.x_query, batch.y_query,
                          batch.amplitude[:2], batch.phase)


# ---- FewShotTasks ----

CLASSES, PER_CLASS = 7, 9


def labelled_examples():
    """x[i] = [i, label]: each example carries its own index and its original class, so a test can see
    exactly which examples a task drew. Classes are interleaved, not sorted."""
    labels = torch.arange(CLASSES * PER_CLASS) % CLASSES
    x = torch.stack([torch.arange(CLASSES * PER_CLASS, dtype=torch.float32), labels.float()], 1)
    return x, labels


def test_few_shot_batch_layout(device):
    x, y = labelled_examples()
    sampler = FewShotTasks(x.to(device), y.to(device), ways=3, shots=2, query_shots=4, seed=0)
    batch = sampler.sample(50)
    assert batch.is_classification
    assert batch.x_support.shape == (50, 6, 2) and batch.y_support.shape == (50, 6)
    assert batch.x_query.shape == (50, 12, 2) and batch.y_query.shape == (50, 12)
    assert batch.x_support.device.type == device.type
    assert batch.y_support.dtype == torch.int64
    # grouped by label: label 0's examples first
    assert torch.equal(batch.y_support[0].cpu(), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(batch.y_query[0].cpu(), torch.arange(3).repeat_interleave(4))


def test_few_shot_relabelling_and_disjoint_sets():
    x, y = labelled_examples()
    batch = FewShotTasks(x, y, ways=4, shots=3, query_shots=5, seed=1).sample(200)
    assigned = []
    for t in range(batch.num_tasks):
        support_ids, query_ids = batch.x_support[t, :, 0].long(), batch.x_query[t, :, 0].long()
        # no example drawn twice within a task, support and query disjoint
        all_ids = torch.cat([support_ids, query_ids])
        assert len(set(all_ids.tolist())) == len(all_ids)
        # each new label stands for one original class, the same one in support and query
        original = {}
        for features, label in zip(torch.cat([batch.x_support[t], batch.x_query[t]]),
                                   torch.cat([batch.y_support[t], batch.y_query[t]])):
            original.setdefault(int(label), set()).add(int(features[1]))
        assert all(len(classes) == 1 for classes in original.values())
        classes = [original[label].pop() for label in range(4)]
        assert len(set(classes)) == 4  # distinct classes
        assigned.append(classes[0])
    # the class that becomes label 0 is random: every class gets that role, about equally often
    counts = np.bincount(assigned, minlength=CLASSES)
    assert counts.min() > 10


def test_few_shot_draws_every_example_uniformly():
    x, y = labelled_examples()
    batch = FewShotTasks(x, y, ways=CLASSES, shots=1, query_shots=2, seed=2).sample(6000)
    # per task, 3 of each class's 9 examples: each example appears in a third of the tasks
    support_counts = np.bincount(batch.x_support[..., 0].long().flatten(), minlength=len(y))
    query_counts = np.bincount(batch.x_query[..., 0].long().flatten(), minlength=len(y))
    assert np.allclose(support_counts, 6000 / PER_CLASS, rtol=0.12)
    assert np.allclose(query_counts, 2 * 6000 / PER_CLASS, rtol=0.12)


def test_few_shot_is_reproducible_from_the_seed():
    x, y = labelled_examples()
    a = FewShotTasks(x, y, ways=3, shots=1, query_shots=1, seed=9)
    b = FewShotTasks(x, y, ways=3, shots=1, query_shots=1, seed=9)
    first, second = a.sample(10), b.sample(10)
    assert torch.equal(first.x_support, second.x_support) and torch.equal(first.x_query, second.x_query)
    assert not torch.equal(a.sample(10).x_support, first.x_support)


def test_few_shot_accepts_numpy_and_integer_examples():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(40, 4, 4), dtype=np.uint8)
    labels = np.repeat(np.arange(5), 8)
    batch = FewShotTasks(images, labels, ways=2, shots=2, query_shots=2, seed=0).sample(3)
    assert batch.x_support.dtype == torch.float32 and batch.x_support.shape == (3, 4, 4, 4)
    # the values are the examples', unscaled
    flat = torch.from_numpy(images.reshape(40, -1)).float()
    assert all((flat == row.flatten()).all(1).any() for row in batch.x_query.reshape(-1, 4, 4))


def test_few_shot_class_with_too_few_examples_is_named():
    x, y = labelled_examples()
    keep = ~((y == 4) & (torch.arange(len(y)) > 20))  # class 4 keeps 3 examples
    with pytest.raises(ValueError, match="shots \\+ query_shots = 5 examples, but class 4 has 3"):
        FewShotTasks(x[keep], y[keep], ways=2, shots=2, query_shots=3)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(ways=CLASSES + 1), ValueError, f"ways = {CLASSES + 1} needs at least {CLASSES + 1} classes"),
        (dict(ways=0), ValueError, "ways"),
        (dict(shots=0), ValueError, "shots"),
        (dict(query_shots=-2), ValueError, "query_shots"),
        (dict(y="float"), TypeError, "y must hold integer class labels"),
        (dict(y="2d"), ValueError, "y must be \\[N\\]"),
        (dict(x="short"), ValueError, "x must be \\[N, ...\\] with N = 63"),
        (dict(x="nan"), ValueError, "x contains NaN"),
        (dict(x="strings"), TypeError, "x must hold numbers"),
    ],
)
def test_few_shot_bad_arguments(change, error, message):
    x, y = labelled_examples()
    kwargs = dict(ways=2, shots=1, query_shots=1)
    if change.get("y") == "float":
        y = y.float()
    elif change.get("y") == "2d":
        y = y.view(-1, 1)
    if change.get("x") == "short":
        x = x[:-1]
    elif change.get("x") == "nan":
        x = x.clone()
        x[5, 0] = float("nan")
    elif change.get("x") == "strings":
        x = np.array(["a"] * len(y))
    kwargs.update({k: v for k, v in change.items() if k not in ("x", "y")})
    with pytest.raises(error, match=message):
        FewShotTasks(x, y, **kwargs)


def test_few_shot_batches_train_maml():
    """A FewShotTasks batch is a TaskBatch MAML takes as it is: a few meta-steps on separable classes lower
    the meta-loss."""
    torch.manual_seed(0)
    centres = torch.randn(10, 4) * 3
    labels = torch.arange(10).repeat_interleave(20)
    x = centres[labels] + 0.5 * torch.randn(len(labels), 4)
    sampler = FewShotTasks(x, labels, ways=3, shots=2, query_shots=3, seed=0)
    maml = MAML(MLP([4, 16, 3]), inner_lr=0.5, inner_steps=1, loss="cross_entropy")
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    fixed = sampler.sample(32)
    before = float(maml.meta_loss(fixed).detach())
    for _ in range(30):
        maml.meta_step(sampler.sample(16), optimizer)
    assert float(maml.meta_loss(fixed).detach()) < 0.5 * before
