"""Data helpers of learn2learn's `learn2learn.data.utils`: InfiniteIterator, partition_task and
OnDeviceDataset (the download helpers are left out: nothing here downloads)."""
from __future__ import annotations

import torch

__all__ = ["InfiniteIterator", "partition_task", "OnDeviceDataset"]


class InfiniteIterator:
    """Iterate over a DataLoader (or any re-iterable) forever, restarting it when it runs out.

    Arguments:
        dataloader: the iterable to loop over.

    Example:
        batches = InfiniteIterator(DataLoader(dataset, batch_size=32, shuffle=True))
        for step in range(10_000):
            X, y = next(batches)
    """

    def __init__(self, dataloader):
        self.dataloader = dataloader
        self.iterator = iter(dataloader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.dataloader)
        try:
            return next(self.iterator)
        except StopIteration:
            # learn2learn spins forever here
            raise ValueError("dataloader must yield at least one item per pass; it is empty") from None


def partition_task(data, labels, shots=1):
    """Split a classification task into a support set and a query set.

    For each label (in sorted order), its first `shots` rows go to the support set and the rest to
    the query set; every label must have the same number of rows.

    Arguments:
        data: tensor [N, ...] of samples.
        labels: tensor [N] of their labels.
        shots: support rows per label.

    Returns `((support_data, support_labels), (query_data, query_labels))`.

    Example:
        X, y = taskset.sample()
        (X_support, y_support), (X_query, y_query) = partition_task(X, y, shots=5)
    """
    if data.size(0) != labels.size(0):
        raise ValueError(
            f"labels must hold one label per row of data ({data.size(0)}), got {labels.size(0)}"
        )
    support, query = [], []
    rows_per_label = None
    for label in labels.unique():
        rows = (labels == label).nonzero().flatten()
        if rows_per_label is None:
            rows_per_label = rows.numel()
        if rows.numel() != rows_per_label:
            raise ValueError(
                f"labels must give every label the same number of rows; label {label.item()} has "
                f"{rows.numel()}, another has {rows_per_label}"
            )
        if not 0 <= shots <= rows.numel():
            raise ValueError(f"shots must be in [0, rows per label = {rows.numel()}], got {shots}")
        support.append(rows[:shots])
        query.append(rows[shots:])
    support = torch.cat(support) if support else labels.new_empty(0, dtype=torch.long)
    query = torch.cat(query) if query else labels.new_empty(0, dtype=torch.long)
    return (data[support], labels[support]), (data[query], labels[query])


class OnDeviceDataset(torch.utils.data.TensorDataset):
    """A dataset copied into two tensors (data, labels), optionally on a device.

    On CPU with CUDA available the tensors are pinned, for fast copies to the GPU. `transform`
    applies to the data of each item on access; a `_bookkeeping_path` of the source carries over,
    so MetaDataset reuses its cache.

    Arguments:
        dataset: a dataset of `(x, y)` pairs with tensor `x`.
        device: where to keep the tensors (default CPU).
        transform: optional callable applied to `x` in `__getitem__`.

    Example:
        meta = MetaDataset(OnDeviceDataset(mnist, device="cuda"))
    """

    def __init__(self, dataset, device=None, transform=None):
        data, labels = [], []
        for x, y in dataset:
            data.append(x.unsqueeze(0))
            labels.append(y)
        data = torch.cat(data, dim=0)
        labels = torch.tensor(labels)
        if device is not None:
            data, labels = data.to(device), labels.to(device)
        if data.device == torch.device("cpu") and torch.cuda.is_available():
            data, labels = data.pin_memory(), labels.pin_memory()
        super().__init__(data, labels)
        self.transform = transform
        if hasattr(dataset, "_bookkeeping_path"):
            self._bookkeeping_path = dataset._bookkeeping_path

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        if self.transform is not None:
            x = self.transform(x)
        return x, y
