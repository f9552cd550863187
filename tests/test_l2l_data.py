"""metalearn_fast.l2l.data, the learn2learn.data drop-in: datasets indexed by class, Taskset and the task
transforms, partition_task, InfiniteIterator, OnDeviceDataset, clear errors, and the exact sequence of
Python `random` calls, replayed here by hand, that makes a seeded script draw learn2learn's tasks."""
import itertools
import os
import pickle
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from metalearn_fast.l2l.data import (
    DataDescription,
    FilteredMetaDataset,
    InfiniteIterator,
    MetaDataset,
    OnDeviceDataset,
    TaskDataset,
    Taskset,
    UnionMetaDataset,
    partition_task,
)
from metalearn_fast.l2l.data import task_dataset as task_dataset_module
from metalearn_fast.l2l.data.transforms import (
    ConsecutiveLabels,
    FilterLabels,
    FusedNWaysKShots,
    KShots,
    LoadData,
    NWays,
    RemapLabels,
)

CLASSES, PER_CLASS = 12, 6


def make_dataset(classes=CLASSES, per_class=PER_CLASS, stride=7):
    """Row i is [i, label(i)], so a task's X tells which samples it holds. Labels are interleaved
    (label(i) = stride*i mod classes), so first-appearance order is not sorted order."""
    labels = torch.tensor([(stride * i) % classes for i in range(classes * per_class)])
    data = torch.stack([torch.arange(len(labels)).float(), labels.float()], dim=1)
    return TensorDataset(data, labels)


@pytest.fixture
def meta():
    return MetaDataset(make_dataset())


def first_appearance(sequence):
    return list(dict.fromkeys(sequence))


def task_indices(X):
    return [int(v) for v in X[:, 0]]


def task_labels(X):
    return [int(v) for v in X[:, 1]]


class ListDataset(Dataset):
    """Items (data, label) from two lists; counts reads to show when the bookkeeping cache is used."""

    def __init__(self, data, labels):
        self.data, self.labels, self.reads = data, labels, 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        self.reads += 1
        return self.data[i], self.labels[i]


# ---- MetaDataset, FilteredMetaDataset, UnionMetaDataset ----


@pytest.mark.parametrize("not_a_dataset", [[(0, 1)], torch.zeros(3, 2), "data"])
def test_meta_dataset_rejects_non_datasets(not_a_dataset):
    with pytest.raises(TypeError, match="dataset"):
        MetaDataset(not_a_dataset)


def test_meta_dataset_maps_follow_the_data():
    dataset = make_dataset()
    meta = MetaDataset(dataset)
    labels = [int(y) for _, y in dataset]
    assert len(meta) == len(dataset) and meta[5][0].tolist() == dataset[5][0].tolist()
    assert meta.labels == first_appearance(labels) != sorted(meta.labels)
    assert all(type(label) is int for label in meta.labels)  # .item()'d, not 0-d tensors
    assert {label: len(meta.labels_to_indices[label]) for label in meta.labels} == Counter(labels)
    for index, label in enumerate(labels):
        assert meta.indices_to_labels[index] == label
        assert index in meta.labels_to_indices[label]


def test_meta_dataset_builds_one_map_from_the_other():
    labels_to_indices = {"b": [1, 3], "a": [0, 2, 4]}
    from_labels = MetaDataset(ListDataset([0] * 5, ["?"] * 5), labels_to_indices=labels_to_indices)
    assert dict(from_labels.indices_to_labels) == {0: "a", 1: "b", 2: "a", 3: "b", 4: "a"}
    assert from_labels.labels == ["b", "a"]
    from_indices = MetaDataset(ListDataset([0] * 5, ["?"] * 5), indices_to_labels={0: "a", 1: "b", 2: "a"})
    assert dict(from_indices.labels_to_indices) == {"a": [0, 2], "b": [1]}
    assert from_indices.labels == ["a", "b"]


def test_meta_dataset_string_labels_and_non_scalar_labels():
    strings = MetaDataset(ListDataset(list(range(6)), list("xyxzyx")))
    assert strings.labels == ["x", "y", "z"] and strings.labels_to_indices["x"] == [0, 2, 5]
    with pytest.raises(ValueError, match="scalar label"):
        MetaDataset(TensorDataset(torch.zeros(4, 2), torch.zeros(4, 3)))


def test_meta_dataset_bookkeeping_cache(tmp_path):
    path = str(tmp_path / "bookkeeping.pkl")
    first = ListDataset(list(range(6)), [2, 0, 2, 1, 0, 2])
    first._bookkeeping_path = path
    built = MetaDataset(first)
    assert first.reads == 6 and os.path.exists(path)
    with open(path, "rb") as file:
        cache = pickle.load(file)
    assert cache["labels"] == [2, 0, 1] and list(cache["labels_to_indices"][2]) == [0, 2, 5]
    # a second dataset with the same path is not read: its maps come from the pickle
    second = ListDataset(list(range(6)), [9] * 6)
    second._bookkeeping_path = path
    loaded = MetaDataset(second)
    assert second.reads == 0
    assert loaded.labels == built.labels and dict(loaded.indices_to_labels) == dict(built.indices_to_labels)


def test_filtered_meta_dataset_keeps_original_labels(meta):
    evens = FilteredMetaDataset(meta, [4, 0, 2, 99])  # 99 is not in the data: skipped
    assert evens.labels == [4, 0, 2] and len(evens) == 3 * PER_CLASS
    for label in evens.labels:
        assert len(evens.labels_to_indices[label]) == len(meta.labels_to_indices[label])
    for i in range(len(evens)):
        x, y = evens[i]
        assert int(y) == evens.indices_to_labels[i] == int(x[1])
    # samples are grouped in the order of the labels argument
    assert [evens.indices_to_labels[i] for i in range(len(evens))] == [4] * 6 + [0] * 6 + [2] * 6
    assert FilteredMetaDataset(make_dataset(), [1]).labels == [1]  # wraps a plain dataset


def test_union_meta_dataset_remaps_labels_per_dataset(meta):
    small = MetaDataset(ListDataset([torch.tensor([100.0 + i, -1.0]) for i in range(4)], [5, 3, 5, 3]))
    union = UnionMetaDataset([meta, small])
    assert len(union) == len(meta) + len(small)
    assert union.labels == list(range(CLASSES + 2))
    # meta's labels become their position in meta.labels; small's 5 -> 12 and 3 -> 13
    for i in range(len(meta)):
        assert union.indices_to_labels[i] == meta.labels.index(meta.indices_to_labels[i])
    assert [union.indices_to_labels[len(meta) + i] for i in range(4)] == [12, 13, 12, 13]
    x, y = union[len(meta) + 1]
    assert x.tolist() == [101.0, -1.0] and y == 13
    assert union[3][0].tolist() == meta[3][0].tolist() and union[3][1] == union.indices_to_labels[3]
    with pytest.raises(IndexError):
        union[len(union)]


def test_union_of_filtered_halves_has_every_class(meta):
    evens = FilteredMetaDataset(meta, [c for c in meta.labels if c % 2 == 0])
    odds = FilteredMetaDataset(meta, [c for c in meta.labels if c % 2 == 1])
    union = UnionMetaDataset((evens, odds))
    assert sorted(union.labels) == list(range(CLASSES)) and len(union) == len(meta)
    counts = Counter(union.indices_to_labels.values())
    assert set(counts.values()) == {PER_CLASS}


# ---- Taskset ----


def random_subset(task_description):
    return random.choices(task_description, k=5)


@pytest.mark.parametrize("num_tasks", [0, -2, -10])
def test_taskset_rejects_bad_num_tasks(meta, num_tasks):
    with pytest.raises(ValueError, match="num_tasks"):
        Taskset(meta, [LoadData(meta)], num_tasks=num_tasks)


def test_taskset_len_wraps_plain_datasets_and_collates_x_y():
    dataset = make_dataset()
    tasks = Taskset(dataset, [LoadData(dataset), random_subset], num_tasks=7)
    assert isinstance(tasks.dataset, MetaDataset) and len(tasks) == 7
    assert len(Taskset(dataset, [LoadData(dataset)])) == 1
    X, y = tasks[0]
    assert X.shape == (5, 2) and y.shape == (5,) and y.dtype == torch.int64
    assert task_labels(X) == y.tolist()
    pairs = Taskset(dataset, [LoadData(dataset), random_subset], task_collate=list).sample()
    assert isinstance(pairs, list) and len(pairs) == 5


def test_taskset_caches_tasks_for_positive_num_tasks(meta):
    tasks = Taskset(meta, [NWays(meta, 3), KShots(meta, 2), LoadData(meta)], num_tasks=4)
    first = [task_indices(X) for X, _ in tasks]
    assert len(first) == 4 and len(set(map(tuple, first))) > 1
    assert [task_indices(X) for X, _ in tasks] == first  # iterating again replays them
    assert [task_indices(tasks[i][0]) for i in range(4)] == first
    assert sorted(tasks.sampled_descriptions) == [0, 1, 2, 3]
    for _ in range(5):
        assert task_indices(tasks.sample()[0]) in first


def test_taskset_num_tasks_minus_one_draws_a_new_task_each_time(meta):
    tasks = Taskset(meta, [NWays(meta, 3), KShots(meta, 2), LoadData(meta)], num_tasks=-1)
    drawn = [task_indices(tasks[0][0]) for _ in range(4)]
    drawn += [task_indices(tasks.sample()[0]) for _ in range(4)]
    drawn += [task_indices(X) for X, _ in itertools.islice(tasks, 4)]
    assert len(set(map(tuple, drawn))) == len(drawn) and tasks.sampled_descriptions == {}


def test_taskset_same_seed_same_tasks(meta):
    def draw(seed):
        random.seed(seed)
        tasks = Taskset(meta, [NWays(meta, 4), KShots(meta, 3), LoadData(meta), RemapLabels(meta)])
        return [(task_indices(X), y.tolist()) for X, y in itertools.islice(tasks, 6)]

    assert draw(3) == draw(3) != draw(4)


def test_taskset_callable_transform_and_no_adding(meta):
    tasks = Taskset(meta, lambda description: [DataDescription(2), DataDescription(9)])
    assert tasks.sample().tolist() == [2, 9]  # no LoadData: the indices themselves are collated
    with pytest.raises(NotImplementedError):
        tasks + tasks


@pytest.mark.parametrize("workers", [0, 2])
def test_taskset_in_a_dataloader(meta, workers):
    transforms = [NWays(meta, 3), KShots(meta, 2), LoadData(meta), RemapLabels(meta)]
    tasks = Taskset(meta, transforms, num_tasks=6)
    loader = DataLoader(tasks, batch_size=2, shuffle=True, num_workers=workers)
    batches = list(loader)
    assert len(batches) == 3
    for X, y in batches:
        assert X.shape == (2, 6, 2) and y.shape == (2, 6)
        for row in y:
            assert sorted(Counter(row.tolist()).items()) == [(0, 2), (1, 2), (2, 2)]


def test_taskset_pickles_for_spawned_workers(meta):
    pipeline = [FusedNWaysKShots(meta, 3, 2), LoadData(meta), RemapLabels(meta), ConsecutiveLabels(meta)]
    tasks = Taskset(meta, pipeline, num_tasks=4)
    copied = pickle.loads(pickle.dumps(tasks))
    random.seed(2)
    expected = [y.tolist() + task_indices(X) for X, y in tasks]
    random.seed(2)
    assert [y.tolist() + task_indices(X) for X, y in copied] == expected


def test_task_dataset_is_a_deprecated_taskset(meta, monkeypatch):
    monkeypatch.setattr(task_dataset_module, "_task_dataset_warned", False)
    with pytest.warns(DeprecationWarning, match="Taskset"):
        tasks = TaskDataset(meta, [LoadData(meta)], num_tasks=2)
    assert isinstance(tasks, Taskset) and len(tasks) == 2


# ---- task transforms ----


def class_counts(y):
    return Counter(y.tolist())


@pytest.mark.parametrize("ways", [1, 3, 5])
def test_nways_keeps_every_sample_of_n_classes(meta, ways):
    tasks = Taskset(meta, [NWays(meta, ways), LoadData(meta)], num_tasks=10)
    for X, y in tasks:
        assert len(class_counts(y)) == ways
        assert set(class_counts(y).values()) == {PER_CLASS}
        assert task_labels(X) == y.tolist()


def test_nways_after_filter_labels_picks_among_the_kept_classes(meta):
    kept = [1, 4, 7, 10]
    tasks = Taskset(meta, [FilterLabels(meta, kept), NWays(meta, 2), LoadData(meta)], num_tasks=10)
    for _, y in tasks:
        counts = class_counts(y)
        assert len(counts) == 2 and set(counts) <= set(kept) and set(counts.values()) == {PER_CLASS}


@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("shots", [1, 4, 6])
def test_kshots_keeps_k_samples_of_every_class(meta, shots, replacement):
    tasks = Taskset(meta, [KShots(meta, shots, replacement), LoadData(meta)], num_tasks=3)
    for X, y in tasks:
        assert class_counts(y) == {label: shots for label in range(CLASSES)}
        assert task_labels(X) == y.tolist()
        if not replacement:
            assert len(set(task_indices(X))) == len(X)


def test_kshots_with_replacement_loads_each_repeat_once(meta):
    # 10 > 6 samples per class: repeats are certain, and each must be loaded exactly once
    tasks = Taskset(meta, [NWays(meta, 2), KShots(meta, 10, replacement=True), LoadData(meta)])
    X, y = tasks.sample()
    assert X.shape == (20, 2) and set(class_counts(y).values()) == {10}
    assert len(set(task_indices(X))) < 20


def test_filter_labels_keeps_exactly_the_chosen_classes(meta):
    chosen = [3, 8, 0]
    X, y = Taskset(meta, [FilterLabels(meta, chosen), LoadData(meta)]).sample()
    expected = [i for i in range(len(meta)) if meta.indices_to_labels[i] in chosen]
    assert task_indices(X) == expected


def test_remap_labels_gives_zero_to_n_minus_one_consistently(meta):
    for ways in range(1, 5):
        tasks = Taskset(meta, [NWays(meta, ways), KShots(meta, 2), LoadData(meta), RemapLabels(meta)])
        for _ in range(5):
            X, y = tasks.sample()
            assert sorted(set(y.tolist())) == list(range(ways))
            mapping = {}
            for original, new in zip(task_labels(X), y.tolist()):
                assert mapping.setdefault(original, new) == new


def test_remap_labels_without_shuffle_follows_set_order(meta):
    # {8, 3}: 8 lands in slot 0 of a small set's table, before 3, so set order is not sorted order
    description = FilterLabels(meta, [3, 8])(None)
    assert list(set([3, 8])) == [8, 3]
    state = random.getstate()
    LoadData(meta)(description)
    RemapLabels(meta, shuffle=False)(description)
    assert random.getstate() == state  # no randomness without shuffle
    X, y = Taskset(meta).get_task(description)
    assert {o: n for o, n in zip(task_labels(X), y.tolist())} == {8: 0, 3: 1}


def test_consecutive_labels_is_a_stable_sort(meta):
    order = [40, 5, 17, 29, 3, 64, 12, 0]
    sorted_description = ConsecutiveLabels(meta)([DataDescription(i) for i in order])
    # labels (7i mod 12): 40->4 5->11 17->11 29->11 3->9 64->4 12->0 0->0; ties keep input order
    assert [meta.indices_to_labels[i] for i in order] == [4, 11, 11, 11, 9, 4, 0, 0]
    assert [dd.index for dd in sorted_description] == [12, 0, 40, 64, 3, 5, 17, 29]


@pytest.mark.parametrize("replacement", [False, True])
def test_fused_nways_kshots_first_in_the_pipeline(meta, replacement):
    kept = [0, 2, 5, 7, 9]
    fused = FusedNWaysKShots(meta, n=3, k=4, replacement=replacement, filter_labels=kept)
    for X, y in Taskset(meta, [fused, LoadData(meta)], num_tasks=8):
        counts = class_counts(y)
        assert len(counts) == 3 and set(counts) <= set(kept) and set(counts.values()) == {4}
        # grouped class by class
        assert [label for label, _ in itertools.groupby(y.tolist())] == list(counts)


def test_fused_nways_kshots_later_in_a_pipeline_is_filter_nways_kshots(meta):
    start = [DataDescription(i) for i in range(0, len(meta), 2)]  # even indices: even labels
    fused = FusedNWaysKShots(meta, n=2, k=3, filter_labels=[1, 4, 6, 10])
    random.seed(11)
    got = [dd.index for dd in fused(list(start))]
    random.seed(11)
    unfused = KShots(meta, 3)(NWays(meta, 2)(FilterLabels(meta, [1, 4, 6, 10])(list(start))))
    assert got == [dd.index for dd in unfused] and len(got) == 6


def test_transform_errors_name_the_argument():
    meta = MetaDataset(make_dataset(classes=4, per_class=3))
    plain = make_dataset()
    cases = [
        (lambda: NWays(meta, 5)(None), ValueError, "n must be at most"),
        (lambda: NWays(meta, 3)(FilterLabels(meta, [0, 1])(None)), ValueError, "n must be at most"),
        (lambda: NWays(meta, 0), ValueError, "n must be a positive"),
        (lambda: KShots(meta, 4)(None), ValueError, "k must be at most"),
        (lambda: KShots(meta, 0), ValueError, "k must be a positive"),
        (lambda: FusedNWaysKShots(meta, n=5)(None), ValueError, "n must be at most"),
        (lambda: FusedNWaysKShots(meta, n=2, k=4)(None), ValueError, "k must be at most"),
        (lambda: FusedNWaysKShots(meta, n=1, filter_labels=[42])(None), ValueError, "filter_labels"),
        (lambda: NWays(plain, 2), TypeError, "MetaDataset"),
        (lambda: KShots(plain, 2), TypeError, "MetaDataset"),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=message):
            make()
    # with replacement, asking for more shots than a class holds is fine
    assert len(KShots(meta, 4, replacement=True)(None)) == 16
    assert len(FusedNWaysKShots(meta, n=2, k=4, replacement=True)(None)) == 8


# ---- the exact sequence of Python random calls (learn2learn 0.2.0 compatibility) ----


def oracle_nways_kshots_remap_consecutive(meta, ways, shots):
    """learn2learn's calls for [NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels] from None,
    replayed by hand: returns the expected (sample indices, remapped labels)."""
    label_of = meta.indices_to_labels
    classes = random.sample(meta.labels, k=ways)
    indices = [i for c in classes for i in meta.labels_to_indices[c]]
    by_class = {}
    for i in indices:
        by_class.setdefault(label_of[i], []).append(i)
    kept = [i for group in by_class.values() for i in random.sample(group, k=shots)]
    new_labels = list(set(label_of[i] for i in kept))
    random.shuffle(new_labels)
    kept = sorted(kept, key=lambda i: label_of[i])
    return kept, [new_labels.index(label_of[i]) for i in kept]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_calls_nways_kshots_remap_consecutive(meta, seed):
    pipeline = [NWays(meta, 5), KShots(meta, 2), LoadData(meta), RemapLabels(meta), ConsecutiveLabels(meta)]
    tasks = Taskset(meta, pipeline, num_tasks=-1)
    random.seed(seed)
    got = [(task_indices(X), y.tolist()) for X, y in itertools.islice(tasks, 5)]
    random.seed(seed)
    expected = [oracle_nways_kshots_remap_consecutive(meta, 5, 2) for _ in range(5)]
    assert got == expected


def test_random_calls_taskset_sample_draws_its_index_first(meta):
    pipeline = [NWays(meta, 3), KShots(meta, 1), LoadData(meta), RemapLabels(meta), ConsecutiveLabels(meta)]
    random.seed(5)
    endless = Taskset(meta, pipeline, num_tasks=-1)
    got = [(task_indices(X), y.tolist()) for X, y in (endless.sample() for _ in range(3))]
    random.seed(5)
    expected = []
    for _ in range(3):
        assert random.randint(0, 0) == 0  # sample() draws an index even when len is 1
        expected.append(oracle_nways_kshots_remap_consecutive(meta, 3, 1))
    assert got == expected
    # cached tasks: sample() returns task randint(0, num_tasks - 1), drawn on first use
    cached = Taskset(meta, pipeline, num_tasks=20)
    random.seed(6)
    X, y = cached.sample()
    random.seed(6)
    index = random.randint(0, 19)
    assert list(cached.sampled_descriptions) == [index]
    assert (task_indices(X), y.tolist()) == oracle_nways_kshots_remap_consecutive(meta, 3, 1)


def test_random_calls_kshots_with_replacement_and_nways_on_a_description(meta):
    kept = [9, 2, 11, 4]  # a set this small iterates them as 9, 2, 11, 4: not sorted
    pipeline = [FilterLabels(meta, kept), NWays(meta, 3), KShots(meta, 4, replacement=True), LoadData(meta)]
    tasks = Taskset(meta, pipeline)
    random.seed(21)
    got = [task_indices(tasks.sample()[0]) for _ in range(5)]
    random.seed(21)
    label_of = meta.indices_to_labels
    for indices in got:
        random.randint(0, 0)
        filtered = [i for i in range(len(meta)) if label_of[i] in kept]
        present = list(set(label_of[i] for i in filtered))
        assert present != sorted(present)
        classes = random.sample(present, k=3)
        by_class = {}
        for i in filtered:
            if label_of[i] in classes:
                by_class.setdefault(label_of[i], []).append(i)
        assert indices == [i for group in by_class.values() for i in random.choices(group, k=4)]


@pytest.mark.parametrize("replacement", [False, True])
def test_random_calls_fused_nways_kshots(meta, replacement):
    kept = [10, 3, 7, 1, 8, 0]
    pipeline = [FusedNWaysKShots(meta, n=4, k=3, replacement=replacement, filter_labels=kept), LoadData(meta)]
    tasks = Taskset(meta, pipeline)
    random.seed(8)
    got = [task_indices(X) for X, _ in itertools.islice(tasks, 5)]
    random.seed(8)
    for indices in got:
        expected = []
        for label in random.sample(kept, k=4):
            pool = meta.labels_to_indices[label]
            if replacement:
                expected += [random.choice(pool) for _ in range(3)]
            else:
                expected += random.sample(pool, k=3)
        assert indices == expected


# ---- partition_task, InfiniteIterator, OnDeviceDataset ----


def test_partition_task_splits_each_label_in_sorted_order():
    labels = torch.tensor([2, 0, 2, 1, 0, 1, 2, 0, 1])
    data = torch.arange(9).float().unsqueeze(1) * 10
    for shots in range(4):
        (xs, ys), (xq, yq) = partition_task(data, labels, shots)
        rows = {c: [i for i in range(9) if labels[i] == c] for c in (0, 1, 2)}
        assert xs.flatten().tolist() == [10.0 * i for c in (0, 1, 2) for i in rows[c][:shots]]
        assert xq.flatten().tolist() == [10.0 * i for c in (0, 1, 2) for i in rows[c][shots:]]
        assert ys.tolist() == [c for c in (0, 1, 2) for _ in range(shots)]
        assert yq.tolist() == [c for c in (0, 1, 2) for _ in range(3 - shots)]
        assert xs.dtype == data.dtype and ys.dtype == labels.dtype
    (xs, _), (xq, _) = partition_task(torch.randn(20, 3, 2), torch.zeros(20, dtype=torch.long), shots=7)
    assert xs.shape == (7, 3, 2) and xq.shape == (13, 3, 2)


def test_partition_task_errors():
    with pytest.raises(ValueError, match="labels"):
        partition_task(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="same number"):
        partition_task(torch.zeros(3, 2), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="shots"):
        partition_task(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), shots=3)


def test_infinite_iterator_restarts_the_loader():
    data = torch.arange(5).float()
    batches = InfiniteIterator(DataLoader(TensorDataset(data), batch_size=2))
    got = [next(batches)[0].tolist() for _ in range(7)]
    assert got == [[0.0, 1.0], [2.0, 3.0], [4.0]] * 2 + [[0.0, 1.0]]
    assert iter(batches) is batches
    with pytest.raises(ValueError, match="dataloader"):
        next(InfiniteIterator([]))


def test_on_device_dataset(tmp_path):
    source = ListDataset([torch.full((2, 2), float(i)) for i in range(5)], [1, 0, 1, 2, 0])
    source._bookkeeping_path = str(tmp_path / "cache.pkl")
    on_device = OnDeviceDataset(source, device="cpu", transform=lambda x: x + 0.5)
    assert len(on_device) == 5 and on_device._bookkeeping_path == source._bookkeeping_path
    assert on_device.tensors[0].shape == (5, 2, 2) and on_device.tensors[1].tolist() == [1, 0, 1, 2, 0]
    x, y = on_device[3]
    assert x.tolist() == [[3.5, 3.5], [3.5, 3.5]] and int(y) == 2
    assert MetaDataset(on_device).labels_to_indices[0] == [1, 4]
