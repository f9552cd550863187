"""Task transforms, as learn2learn's `learn2learn.data.transforms` offers them.

A task transform is a callable from a task description (a list of DataDescription, or None for every
sample of the dataset) to a new task description. The first transform of a pipeline gets None, which
lets NWays and FusedNWaysKShots pick classes without listing every sample first.

All randomness comes from Python's `random`, through exactly the calls learn2learn 0.2.0 makes (same
functions, arguments and order), so a seeded script draws the same tasks with either library."""
from __future__ import annotations

import copy
import itertools
import operator
import random
from collections import defaultdict

from .task_dataset import DataDescription

__all__ = [
    "TaskTransform",
    "LoadData",
    "FilterLabels",
    "ConsecutiveLabels",
    "RemapLabels",
    "NWays",
    "KShots",
    "FusedNWaysKShots",
]


def _check_meta(dataset, transform):
    if not hasattr(dataset, "indices_to_labels") or not hasattr(dataset, "labels_to_indices"):
        raise TypeError(
            f"dataset: {transform} needs a MetaDataset (with labels_to_indices and indices_to_labels), "
            f"got {type(dataset).__name__}; wrap it in MetaDataset first"
        )


def _positive_int(name, value):
    value = operator.index(value)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


class TaskTransform:
    """Base class of task transforms: holds the dataset and builds the full task description.

    Arguments:
        dataset: the dataset the task descriptions index into.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def new_task(self):
        """A task description holding every sample of the dataset, in index order."""
        return [DataDescription(index) for index in range(len(self.dataset))]


class LoadData(TaskTransform):
    """Make each sample load its data: `dataset[index]`.

    Arguments:
        dataset: the dataset to load from.
    """

    def _load(self, index):
        return self.dataset[index]

    def __call__(self, task_description):
        if task_description is None:
            task_description = self.new_task()
        for data_description in task_description:
            data_description.transforms.append(self._load)
        return task_description


class FilterLabels(TaskTransform):
    """Keep only the samples whose label is in `labels`.

    Arguments:
        dataset: a MetaDataset.
        labels: the labels to keep.
    """

    def __init__(self, dataset, labels):
        super().__init__(dataset)
        _check_meta(dataset, "FilterLabels")
        self.labels = list(labels)
        # membership is tested once per distinct label rather than once per sample
        keep = {label: label in self.labels for label in dataset.labels_to_indices}
        indices_to_labels = dataset.indices_to_labels
        self.filtered_indices = [keep[indices_to_labels[i]] for i in range(len(dataset))]

    def __call__(self, task_description):
        if task_description is None:
            task_description = self.new_task()
        return [dd for dd in task_description if self.filtered_indices[dd.index]]


class ConsecutiveLabels(TaskTransform):
    """Order the samples by label (a stable sort, so samples of a label keep their order).

    Arguments:
        dataset: a MetaDataset.
    """

    def __init__(self, dataset):
        super().__init__(dataset)
        _check_meta(dataset, "ConsecutiveLabels")

    def __call__(self, task_description):
        if task_description is None:
            task_description = self.new_task()
        indices_to_labels = self.dataset.indices_to_labels
        return sorted(task_description, key=lambda dd: indices_to_labels[dd.index])


class RemapLabels(TaskTransform):
    """Relabel a task's classes 0..n-1; place it after LoadData.

    Each loaded sample becomes a list `[x, new_label, ...]`. With `shuffle=True` the new labels are a
    random permutation (`random.shuffle`); with `shuffle=False` they follow the iteration order of the
    set of the task's labels (as in learn2learn, which is not necessarily sorted order).

    Arguments:
        dataset: a MetaDataset.
        shuffle: whether to shuffle which class gets which new label.
    """

    def __init__(self, dataset, shuffle=True):
        super().__init__(dataset)
        _check_meta(dataset, "RemapLabels")
        self.shuffle = shuffle

    def __call__(self, task_description):
        if task_description is None:
            task_description = self.new_task()
        indices_to_labels = self.dataset.indices_to_labels
        labels = list(set(indices_to_labels[dd.index] for dd in task_description))
        if self.shuffle:
            random.shuffle(labels)

        def remap(data):
            data = list(data)
            # list.index compares with ==, so a 0-d tensor label finds its int
            data[1] = labels.index(data[1])
            return data

        for data_description in task_description:
            data_description.transforms.append(remap)
        return task_description


class NWays(TaskTransform):
    """Keep the samples of `n` classes picked at random among the task's classes.

    Arguments:
        dataset: a MetaDataset.
        n: number of classes to keep.
    """

    def __init__(self, dataset, n=2):
        super().__init__(dataset)
        _check_meta(dataset, "NWays")
        self.n = _positive_int("n", n)
        self.indices_to_labels = dict(dataset.indices_to_labels)

    def _pick(self, classes, available):
        if self.n > len(classes):
            raise ValueError(f"n must be at most the number of {available} ({len(classes)}), got {self.n}")
        return random.sample(classes, k=self.n)

    def new_task(self):
        """The samples of `n` random classes of the whole dataset, class by class."""
        labels_to_indices = self.dataset.labels_to_indices
        chosen = self._pick(self.dataset.labels, "classes in the dataset")
        return [DataDescription(index) for label in chosen for index in labels_to_indices[label]]

    def __call__(self, task_description):
        if task_description is None:
            return self.new_task()
        indices_to_labels = self.indices_to_labels
        present = set()
        for dd in task_description:
            present.add(indices_to_labels[dd.index])
        # learn2learn samples from the set in its iteration order; list() keeps that order
        chosen = set(self._pick(list(present), "classes in the task description"))
        return [dd for dd in task_description if indices_to_labels[dd.index] in chosen]


class KShots(TaskTransform):
    """Keep `k` random samples of every class in the task.

    Classes come out in order of first appearance, each as `random.sample` (or, with replacement,
    `random.choices`) of its samples.

    Arguments:
        dataset: a MetaDataset.
        k: samples per class.
        replacement: whether to sample with replacement (repeats are separate copies).
    """

    def __init__(self, dataset, k=1, replacement=False):
        super().__init__(dataset)
        _check_meta(dataset, "KShots")
        self.k = _positive_int("k", k)
        self.replacement = replacement

    def __call__(self, task_description):
        if task_description is None:
            task_description = self.new_task()
        indices_to_labels = self.dataset.indices_to_labels
        by_class = defaultdict(list)
        for dd in task_description:
            by_class[indices_to_labels[dd.index]].append(dd)
        if self.replacement:
            # copies, so that later transforms append to each repeat only once
            groups = [
                [copy.deepcopy(dd) for dd in random.choices(dds, k=self.k)] for dds in by_class.values()
            ]
        else:
            for label, dds in by_class.items():
                if len(dds) < self.k:
                    raise ValueError(
                        f"k must be at most the number of samples of every class without replacement; "
                        f"class {label!r} has {len(dds)}, k is {self.k} (or pass replacement=True)"
                    )
            groups = [random.sample(dds, k=self.k) for dds in by_class.values()]
        return list(itertools.chain.from_iterable(groups))


class FusedNWaysKShots(TaskTransform):
    """FilterLabels, NWays and KShots in one transform, fast as the first of a pipeline.

    As the first transform it picks `n` labels with `random.sample(filter_labels, n)`, then for each
    `k` indices (`random.sample`, or `random.choice` k times with replacement); later in a pipeline it
    applies FilterLabels, NWays and KShots in turn.

    Arguments:
        dataset: a MetaDataset.
        n: number of classes per task.
        k: samples per class.
        replacement: whether to sample shots with replacement.
        filter_labels: the labels to draw classes from (default: all of the dataset's labels).
    """

    def __init__(self, dataset, n=2, k=1, replacement=False, filter_labels=None):
        super().__init__(dataset)
        _check_meta(dataset, "FusedNWaysKShots")
        self.n = _positive_int("n", n)
        self.k = _positive_int("k", k)
        self.replacement = replacement
        self.filter_labels = list(dataset.labels if filter_labels is None else filter_labels)
        self.filter = FilterLabels(dataset, self.filter_labels)
        self.nways = NWays(dataset, self.n)
        self.kshots = KShots(dataset, k=self.k, replacement=self.replacement)

    def new_task(self):
        """`k` samples of each of `n` random labels of `filter_labels`."""
        if self.n > len(self.filter_labels):
            raise ValueError(
                f"n must be at most the number of filter_labels ({len(self.filter_labels)}), got {self.n}"
            )
        task_description = []
        for label in random.sample(self.filter_labels, k=self.n):
            indices = self.dataset.labels_to_indices.get(label, ())
            if not indices:
                raise ValueError(f"filter_labels must hold labels of the dataset; {label!r} has no samples")
            if self.replacement:
                chosen = [random.choice(indices) for _ in range(self.k)]
            else:
                if len(indices) < self.k:
                    raise ValueError(
                        f"k must be at most the number of samples of every class without replacement; "
                        f"class {label!r} has {len(indices)}, k is {self.k} (or pass replacement=True)"
                    )
                chosen = random.sample(indices, k=self.k)
            task_description.extend(DataDescription(index) for index in chosen)
        return task_description

    def __call__(self, task_description):
        if task_description is None:
            return self.new_task()
        return self.kshots(self.nways(self.filter(task_description)))
