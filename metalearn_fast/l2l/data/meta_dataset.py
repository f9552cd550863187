"""MetaDataset and its two variants: a classification Dataset indexed by class, as learn2learn's
`learn2learn.data.meta_dataset` offers it. The task transforms sample from these maps."""
from __future__ import annotations

import os
import pickle
from collections import defaultdict

from torch.utils.data import Dataset

__all__ = ["MetaDataset", "UnionMetaDataset", "FilteredMetaDataset"]


def _scalar_label(label):
    """A tensor's or numpy scalar's label as a plain Python value, so it hashes by value."""
    return label.item() if hasattr(label, "item") else label


class MetaDataset(Dataset):
    """A classification Dataset that also knows which sample indices hold each label.

    Arguments:
        dataset: a torch Dataset whose items are `(data, label, ...)`; tensor labels are read with
            `.item()`.
        labels_to_indices: optional dict label -> list of sample indices.
        indices_to_labels: optional dict sample index -> label. Given one of the two maps, the other
            is derived from it; given neither, both are built by reading every sample once.

    Attributes `labels` (labels in order of first appearance), `labels_to_indices` and
    `indices_to_labels`. When `dataset` has a `_bookkeeping_path` attribute, the maps are pickled to
    that path on first use and read back from it afterwards (the maps passed in are then ignored).

    Example:
        meta = MetaDataset(TensorDataset(x, y))
        meta.labels_to_indices[3]  # every index whose label is 3
    """

    def __init__(self, dataset, labels_to_indices=None, indices_to_labels=None):
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"dataset must be a torch.utils.data.Dataset, got {type(dataset).__name__}"
            )
        self.dataset = dataset
        if hasattr(dataset, "_bookkeeping_path"):
            self.load_bookkeeping(dataset._bookkeeping_path)
        else:
            self.create_bookkeeping(labels_to_indices, indices_to_labels)

    def __getitem__(self, item):
        return self.dataset[item]

    def __len__(self):
        return len(self.dataset)

    def create_bookkeeping(self, labels_to_indices=None, indices_to_labels=None):
        """Set `labels_to_indices`, `indices_to_labels` and `labels`, from the maps given or the data.

        Arguments:
            labels_to_indices: optional dict label -> list of indices (takes precedence).
            indices_to_labels: optional dict index -> label.
        """
        if labels_to_indices is not None:
            indices_to_labels = {
                index: label for label, indices in labels_to_indices.items() for index in indices
            }
        elif indices_to_labels is not None:
            labels_to_indices = defaultdict(list)
            for index, label in indices_to_labels.items():
                labels_to_indices[label].append(index)
        else:
            labels_to_indices, indices_to_labels = self._read_labels()
        self._set_maps(labels_to_indices, indices_to_labels, list(labels_to_indices.keys()))

    def _read_labels(self):
        """Both maps, from the label of every sample of the wrapped dataset."""
        labels_to_indices = defaultdict(list)
        indices_to_labels = defaultdict(int)
        for index in range(len(self.dataset)):
            try:
                label = _scalar_label(self.dataset[index][1])
            except (ValueError, RuntimeError) as error:  # .item() on a label of several elements
                raise ValueError(
                    f"dataset must give one scalar label per sample; sample {index}: {error}"
                ) from error
            labels_to_indices[label].append(index)
            indices_to_labels[index] = label
        return labels_to_indices, indices_to_labels

    def _set_maps(self, labels_to_indices, indices_to_labels, labels):
        self.labels_to_indices = labels_to_indices
        self.indices_to_labels = indices_to_labels
        self.labels = labels
        # learn2learn's cache layout, so a cache file serves both libraries
        self._bookkeeping = {
            "labels_to_indices": labels_to_indices,
            "indices_to_labels": indices_to_labels,
            "labels": labels,
        }

    def load_bookkeeping(self, path):
        """Read the maps from the pickle at `path`, or build them and write that pickle.

        Arguments:
            path: file path of the cache.
        """
        if not os.path.exists(path):
            self.create_bookkeeping()
            self.serialize_bookkeeping(path)
            return
        with open(path, "rb") as file:
            cache = pickle.load(file)
        self._set_maps(cache["labels_to_indices"], cache["indices_to_labels"], cache["labels"])

    def serialize_bookkeeping(self, path):
        """Pickle the maps to `path`.

        Arguments:
            path: file path of the cache.
        """
        with open(path, "wb") as file:
            pickle.dump(self._bookkeeping, file, protocol=-1)


class UnionMetaDataset(MetaDataset):
    """The concatenation of several datasets, with every label made distinct.

    Each dataset's labels become consecutive integers in the order of its `labels`, offset by the
    number of labels of the datasets before it; sample indices are offset the same way. Items come
    back as lists `[data, new_label, ...]`.

    Arguments:
        datasets: a sequence of Datasets (plain ones are wrapped in MetaDataset).

    Example:
        union = UnionMetaDataset([train, valid])  # train labels 0..63, valid labels 64..79
    """

    def __init__(self, datasets):
        self.datasets = [ds if isinstance(ds, MetaDataset) else MetaDataset(ds) for ds in datasets]
        labels_to_indices = defaultdict(list)
        indices_to_labels = defaultdict(int)
        label_offset = index_offset = 0
        for dataset in self.datasets:
            rank = {label: position for position, label in enumerate(dataset.labels)}
            for index, label in dataset.indices_to_labels.items():
                new_label = label_offset + rank[label]
                indices_to_labels[index_offset + index] = new_label
                labels_to_indices[new_label].append(index_offset + index)
            index_offset += len(dataset.indices_to_labels)
            label_offset += len(dataset.labels_to_indices)
        self.labels_to_indices = labels_to_indices
        self.indices_to_labels = indices_to_labels
        self.labels = list(labels_to_indices.keys())

    def __getitem__(self, item):
        length = len(self)
        if not -length <= item < length:
            raise IndexError(f"item must be in [-{length}, {length}), got {item}")
        item %= length
        start = 0
        for dataset in self.datasets:
            if item < start + len(dataset):
                data = list(dataset[item - start])
                data[1] = self.indices_to_labels[item]
                return data
            start += len(dataset)
        raise IndexError(f"item {item} is past the end of the datasets")

    def __len__(self):
        return len(self.indices_to_labels)


class FilteredMetaDataset(MetaDataset):
    """The samples of a dataset whose label is in `labels`, keeping the original labels.

    Samples are renumbered 0..len-1, grouped in the order of `labels`. Labels absent from the
    dataset are skipped.

    Arguments:
        dataset: a Dataset (a plain one is wrapped in MetaDataset).
        labels: the labels to keep.

    Example:
        evens = FilteredMetaDataset(meta, [0, 2, 4])
    """

    def __init__(self, dataset, labels):
        if not isinstance(dataset, MetaDataset):
            dataset = MetaDataset(dataset)
        self.dataset = dataset
        self.to_true_indices = []
        labels_to_indices = defaultdict(list)
        indices_to_labels = defaultdict(int)
        for label in labels:
            for true_index in dataset.labels_to_indices.get(label, ()):
                new_index = len(self.to_true_indices)
                self.to_true_indices.append(true_index)
                labels_to_indices[label].append(new_index)
                indices_to_labels[new_index] = dataset.indices_to_labels[true_index]
        self.labels_to_indices = labels_to_indices
        self.indices_to_labels = indices_to_labels
        self.labels = list(labels_to_indices.keys())

    def __getitem__(self, item):
        return self.dataset[self.to_true_indices[item]]

    def __len__(self):
        return len(self.indices_to_labels)
