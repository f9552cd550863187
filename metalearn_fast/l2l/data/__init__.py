"""learn2learn's data API (`learn2learn.data`): datasets indexed by class, task sampling with task
transforms, and small data helpers. Random choices replay learn2learn 0.2.0's calls to Python's
`random`, so a seeded script gets the same tasks."""
from . import transforms
from .meta_dataset import FilteredMetaDataset, MetaDataset, UnionMetaDataset
from .task_dataset import DataDescription, TaskDataset, Taskset
from .utils import InfiniteIterator, OnDeviceDataset, partition_task

__all__ = [
    "transforms",
    "MetaDataset",
    "UnionMetaDataset",
    "FilteredMetaDataset",
    "TaskDataset",
    "Taskset",
    "DataDescription",
    "OnDeviceDataset",
    "partition_task",
    "InfiniteIterator",
]
