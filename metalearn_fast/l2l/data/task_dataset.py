"""Taskset: few-shot tasks drawn from a dataset by a pipeline of task transforms, as learn2learn's
`learn2learn.data.task_dataset` offers it.

A task description is a list of DataDescription, one per sample of the task. Each task transform maps
a description to a new one (None stands for every sample of the dataset); then each sample's own
`transforms` turn its index into data, and `task_collate` batches the samples."""
from __future__ import annotations

import operator
import random
import warnings

from torch.utils.data import default_collate

from .meta_dataset import MetaDataset

__all__ = ["DataDescription", "Taskset", "TaskDataset"]


class DataDescription:
    """One sample of a task description: its dataset index and the transforms that load it.

    Arguments:
        index: the sample's index in the dataset (an integer).

    Attribute `transforms` starts empty; `Taskset` applies them in order to `index`.
    """

    __slots__ = ("index", "transforms")

    def __init__(self, index):
        self.index = operator.index(index)
        self.transforms = []

    def __repr__(self):
        return f"DataDescription(index={self.index}, transforms={len(self.transforms)})"


class Taskset:
    """The tasks that a list of task transforms draws from a dataset.

    Task i is drawn on first access and its description cached, so it is the same task every time
    after; with `num_tasks=-1` nothing is cached, every access draws a new task, and `len` is 1.

    Arguments:
        dataset: a Dataset (a plain one is wrapped in MetaDataset).
        task_transforms: list of task transforms, applied in order (or one callable).
        num_tasks: how many distinct tasks, or -1 for an endless supply.
        task_collate: batches a task's samples; default `torch.utils.data.default_collate`, which
            gives `[X, y]` for `(x, y)` samples.

    Example:
        meta = MetaDataset(dataset)
        tasks = Taskset(meta, [NWays(meta, 5), KShots(meta, 1), LoadData(meta), RemapLabels(meta)])
        X, y = tasks.sample()
    """

    def __init__(self, dataset, task_transforms=None, num_tasks=-1, task_collate=None):
        num_tasks = operator.index(num_tasks)
        if num_tasks == 0 or num_tasks < -1:
            raise ValueError(f"num_tasks must be -1 (endless) or positive, got {num_tasks}")
        if not isinstance(dataset, MetaDataset):
            dataset = MetaDataset(dataset)
        self.dataset = dataset
        self.task_transforms = [] if task_transforms is None else task_transforms
        self.num_tasks = num_tasks
        self.task_collate = default_collate if task_collate is None else task_collate
        self.sampled_descriptions = {}
        self._task_id = 0

    def sample_task_description(self):
        """A new task description from the task transforms."""
        if callable(self.task_transforms):
            return self.task_transforms(None)
        description = None
        for transform in self.task_transforms:
            description = transform(description)
        return description

    def get_task(self, task_description):
        """The collated data of a task description.

        Arguments:
            task_description: a list of DataDescription.
        """
        samples = []
        for data_description in task_description:
            data = data_description.index
            for transform in data_description.transforms:
                data = transform(data)
            samples.append(data)
        return self.task_collate(samples)

    def sample(self):
        """A task at a random index (drawn with Python's `random`)."""
        return self[random.randint(0, len(self) - 1)]

    def __len__(self):
        # -1 reports 1 because every index draws a fresh task anyway
        return 1 if self.num_tasks == -1 else self.num_tasks

    def __getitem__(self, i):
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        if i not in self.sampled_descriptions:
            self.sampled_descriptions[i] = self.sample_task_description()
        return self.get_task(self.sampled_descriptions[i])

    def __iter__(self):
        self._task_id = 0
        return self

    def __next__(self):
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        if self._task_id >= self.num_tasks:
            raise StopIteration
        task = self[self._task_id]
        self._task_id += 1
        return task

    def __add__(self, other):
        raise NotImplementedError("Tasksets cannot be added; build one Taskset on a UnionMetaDataset")


_task_dataset_warned = False


class TaskDataset(Taskset):
    """Deprecated name of Taskset (warns once per process with DeprecationWarning)."""

    def __init__(self, *args, **kwargs):
        global _task_dataset_warned
        super().__init__(*args, **kwargs)
        if not _task_dataset_warned:
            _task_dataset_warned = True
            warnings.warn(
                "TaskDataset is deprecated, use Taskset instead.", DeprecationWarning, stacklevel=2
            )
