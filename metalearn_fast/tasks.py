"""TaskBatch: a meta-batch of T few-shot tasks, each with a support set and a query set; and the task
samplers that make them: SinusoidTasks (the sinusoid regression family) and FewShotTasks (N-way
K-shot classification from any labelled examples)."""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import check_int, tensor_of_numbers

__all__ = ["TaskBatch", "BatchStack", "check_task_set", "SinusoidTasks", "SinusoidTaskBatch", "FewShotTasks"]


def check_task_set(x: Tensor, y: Tensor, x_name: str, y_name: str) -> int:
    """Check one set of examples for T tasks: x [T, K, ...] floating point, y [T, K, ...] of x's dtype
    (regression) or y [T, K] int64 class labels >= 0 (classification); T >= 1, K >= 1, all finite, one device.

    Returns the largest class label (-1 for regression targets). Raises TypeError for a non-tensor or a
    wrong dtype and ValueError for anything else, naming the argument.
    """
    for name, tensor in ((x_name, x), (y_name, y)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{x_name} must be floating point, got {x.dtype}")
    if x.dim() < 3:
        raise ValueError(f"{x_name} must be [T, K, features...], got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{x_name} holds no tasks (T = 0): the batch is empty")
    if x.shape[1] == 0:
        raise ValueError(f"{x_name} holds no examples per task (K = 0)")
    if y.device != x.device:
        raise ValueError(f"{y_name} must be on {x_name}'s device {x.device}, got {y.device}")
    if y.dim() < 2 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{y_name} must be [T, K, ...] with T = {x.shape[0]} tasks like {x_name}, got shape {list(y.shape)}"
        )
    if y.shape[1] != x.shape[1]:
        raise ValueError(
            f"{y_name} must hold one target per example of {x_name} (K = {x.shape[1]}), got shape {list(y.shape)}"
        )
    largest = -1
    if y.is_floating_point():
        if y.dtype != x.dtype:
            raise TypeError(
                f"{y_name} holds regression targets, so it must have {x_name}'s dtype {x.dtype}, got {y.dtype}"
            )
        if not torch.isfinite(y).all():
            raise ValueError(f"{y_name} contains NaN or infinite values")
    elif y.dtype == torch.int64:
        if y.dim() != 2:
            raise ValueError(f"{y_name} holds class labels, so it must be [T, K], got shape {list(y.shape)}")
        low, high = (int(v) for v in y.aminmax())
        if low < 0:
            raise ValueError(f"{y_name} holds class labels, which must be non-negative")
        largest = high
    else:
        raise TypeError(
            f"{y_name} must be floating point (regression) or int64 class labels (classification), got {y.dtype}"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{x_name} contains NaN or infinite values")
    return largest


def _as_task_tensor(name: str, data) -> Tensor:
    """A numpy array as a tensor: floating point in torch's default dtype, integers as int64 labels."""
    if isinstance(data, Tensor) or not isinstance(data, np.ndarray):
        return data
    if np.issubdtype(data.dtype, np.floating):
        return torch.as_tensor(data, dtype=torch.get_default_dtype())
    if np.issubdtype(data.dtype, np.integer):
        return torch.as_tensor(data, dtype=torch.int64)
    raise TypeError(f"{name} must hold numbers, got a numpy array of dtype {data.dtype}")


_INIT_FIELDS: dict = {}  # per TaskBatch class: the names of its constructor's fields, in order


def _init_fields(cls: type) -> list[str]:
    """The names of the constructor's fields of TaskBatch class ``cls``, in order."""
    return _INIT_FIELDS.get(cls) or _INIT_FIELDS.setdefault(cls, [f.name for f in dataclasses.fields(cls) if f.init])


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """T tasks, each with K support and Q query examples, checked on construction.

    x_support: [T, K, ...], y_support: [T, K, ...] (regression) or [T, K] int64 (class labels);
    x_query: [T, Q, ...], y_query: [T, Q, ...] or [T, Q]. Support and query share T, the feature
    shape of x, the dtype of x, the kind of y (and its trailing shape for regression) and the device.
    """

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor
    # the largest class label of the support and of the query set ((-1, -1) for regression), found once where
    # the batch is made, so that a learner checks them against its model without scanning the labels again
    largest_labels: tuple = field(init=False, default=(-1, -1), repr=False)

    def __post_init__(self) -> None:
        for name in ("x_support", "y_support", "x_query", "y_query"):
            object.__setattr__(self, name, _as_task_tensor(name, getattr(self, name)))
        largest = (check_task_set(self.x_support, self.y_support, "x_support", "y_support"),
                   check_task_set(self.x_query, self.y_query, "x_query", "y_query"))
        object.__setattr__(self, "largest_labels", largest)
        support, query = self.x_support, self.x_query
        if query.shape[0] != support.shape[0]:
            raise ValueError(f"x_query has T = {query.shape[0]} tasks but x_support has T = {support.shape[0]}")
        if query.shape[2:] != support.shape[2:]:
            raise ValueError(
                f"x_query must have the feature shape {list(support.shape[2:])} of x_support, "
                f"got shape {list(query.shape)}"
            )
        if query.dtype != support.dtype:
            raise TypeError(f"x_query must have x_support's dtype {support.dtype}, got {query.dtype}")
        if query.device != support.device:
            raise ValueError(f"x_query must be on x_support's device {support.device}, got {query.device}")
        if self.y_query.dtype != self.y_support.dtype:
            raise TypeError(f"y_query must have y_support's dtype {self.y_support.dtype}, got {self.y_query.dtype}")
        if self.y_support.is_floating_point() and self.y_query.shape[2:] != self.y_support.shape[2:]:
            raise ValueError(
                f"y_query must have the target shape {list(self.y_support.shape[2:])} of y_support, "
                f"got shape {list(self.y_query.shape)}"
            )

    @classmethod
    def _made_by_sampler(cls, *fields_in_order, largest_labels: tuple = (-1, -1)) -> "TaskBatch":
        """A batch whose tensors a sampler made valid by construction: the checks, which scan the data, are
        skipped (the sampler's own inputs were checked once, when it was made; largest_labels: bounds of the
        support and query sets' class labels, -1 for regression)."""
        batch = object.__new__(cls)
        # into __dict__ at once, as the frozen dataclass's own __init__ would set them one by one (a sampler makes
        # a batch per meta-step)
        batch.__dict__.update(zip(_init_fields(cls), fields_in_order, strict=True), largest_labels=largest_labels)
        return batch

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks."""
        return self.x_support.shape[0]

    def select(self, start: int, stop: int) -> "TaskBatch":
        """Tasks start..stop-1 as a batch of this batch's type: every field with the leading task dimension is
        sliced (a SinusoidTaskBatch's amplitude and phase too). A part of a checked batch is valid, so its data
        are not scanned again: it keeps this batch's largest labels, a bound on its own."""
        total = self.num_tasks
        part = object.__new__(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.init and isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == total:
                value = value[start:stop]
            object.__setattr__(part, f.name, value)
        return part

    def chunks(self, size: Optional[int]) -> list["TaskBatch"]:
        """The batch in consecutive parts of at most ``size`` tasks ([self] when it fits, or size is None)."""
        total = self.num_tasks
        if size is None or size >= total:
            return [self]
        return [self.select(start, min(start + size, total)) for start in range(0, total, size)]

    @property
    def is_classification(self) -> bool:
        """True when y holds int64 class labels, False when it holds regression targets."""
        return not self.y_support.is_floating_point()

    def to(self, device: Union[str, torch.device]) -> "TaskBatch":
        """The same batch on ``device``."""
        return TaskBatch(*(t.to(device) for t in (self.x_support, self.y_support, self.x_query, self.y_query)))


class BatchStack(Sequence):
    """Meta-batches of one type and one shape, stacked: each field of the batch type as one tensor with a leading
    batch dimension (x_support [count, T, K, ...], ...). A sequence of batches, each made when asked for, as views
    of the stacks; ``MAML.meta_steps`` runs on the stacks as they are.

    ``BatchStack(batch_type, fields)`` checks the stacks as batch_type checks one batch (of count x T tasks: shapes,
    dtypes, NaN, labels); a sampler's (``SinusoidTasks.sample_many``), valid by construction, is not checked."""

    def __init__(self, batch_type: type, fields: Sequence[Tensor]) -> None:
        if not (isinstance(batch_type, type) and issubclass(batch_type, TaskBatch)):
            raise TypeError(f"batch_type must be TaskBatch or a subclass, got {batch_type!r}")
        names, fields = _init_fields(batch_type), tuple(fields)
        if len(fields) != len(names):
            raise ValueError(f"fields must hold one stack per field of {batch_type.__name__} ({', '.join(names)}), "
                             f"got {len(fields)}")
        for name, stack in zip(names, fields):
            if not isinstance(stack, Tensor) or stack.dim() < 2 or stack.shape[0] != fields[0].shape[0]:
                got = list(stack.shape) if isinstance(stack, Tensor) else type(stack).__name__
                raise ValueError(f"{name} must be a tensor [count, T, ...] with the count of x_support's stack "
                                 f"({fields[0].shape[0] if isinstance(fields[0], Tensor) else '?'}), got {got}")
        if fields[0].shape[0] == 0:
            raise ValueError("the stacks hold no batches (count = 0)")
        whole = batch_type(*(stack.flatten(0, 1) for stack in fields))  # one batch of count x T tasks: its checks
        self._set(batch_type, fields, whole.largest_labels)

    @classmethod
    def _made_by_sampler(cls, batch_type: type, fields: Sequence[Tensor],
                         largest_labels: tuple = (-1, -1)) -> "BatchStack":
        """Stacks a sampler made valid by construction, not checked (TaskBatch._made_by_sampler's)."""
        stack = object.__new__(cls)
        stack._set(batch_type, tuple(fields), largest_labels)
        return stack

    def _set(self, batch_type: type, fields: tuple, largest_labels: tuple) -> None:
        self.batch_type, self.fields, self.largest_labels = batch_type, fields, largest_labels

    def __len__(self) -> int:
        return self.fields[0].shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return BatchStack._made_by_sampler(self.batch_type, [f[index] for f in self.fields], self.largest_labels)
        return self.batch_type._made_by_sampler(*(f[index] for f in self.fields), largest_labels=self.largest_labels)

    def __iter__(self) -> Iterator[TaskBatch]:
        for fields in zip(*(f.unbind() for f in self.fields)):
            yield self.batch_type._made_by_sampler(*fields, largest_labels=self.largest_labels)

    def stacked(self, name: str) -> Tensor:
        """The stack of field ``name`` of every batch (x_support: [count, T, K, ...])."""
        return self.fields[_init_fields(self.batch_type).index(name)]


def _check_interval(name: str, value) -> tuple[float, float]:
    """(low, high) with low <= high, both finite numbers."""
    try:
        low, high = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (low, high), got {value!r}") from None
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not math.isfinite(bound):
            raise ValueError(f"{name} must hold two finite numbers, got {value!r}")
    if low > high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value!r}")
    return float(low), float(high)


def _check_seed(seed) -> int:
    """The seed of a sampler's generators; None draws one from torch's global generator, so that
    torch.manual_seed upstream still makes the sampler reproducible."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


class _SeededSampler:
    """One generator per device, each seeded with the sampler's seed on first use: tasks are drawn on
    the device that will use them, and a sampler replays the same batches on the same device."""

    def __init__(self, seed) -> None:
        self.seed = _check_seed(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def state_dict(self) -> dict:
        """The sampler's random state (its seed and each device's generator): ``load_state_dict`` on a
        sampler made with the same arguments continues the same stream of tasks."""
        return {"seed": self.seed,
                "generators": {str(device): generator.get_state() for device, generator in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the state is of a sampler with seed {state['seed']}, this one has seed {self.seed}")
        self._generators = {}
        for device, generator_state in state["generators"].items():
            self._generator(torch.device(device)).set_state(generator_state)


@dataclass(frozen=True, eq=False)
class SinusoidTaskBatch(TaskBatch):
    """A TaskBatch of sinusoid tasks that keeps each task's parameters, so its true curve can be drawn.

    amplitude, phase: [T]; task t is y = amplitude[t] * sin(x - phase[t]).
    """

    amplitude: Tensor
    phase: Tensor

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("amplitude", "phase"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.shape != (self.num_tasks,):
                got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a tensor of shape [{self.num_tasks}] (one per task), got {got}")

    def true_function(self, x: Tensor) -> Tensor:
        """Each task's true curve at x: [T, N, 1] -> [T, N, 1]."""
        return self.amplitude.view(-1, 1, 1) * torch.sin(x - self.phase.view(-1, 1, 1))

    def to(self, device: Union[str, torch.device]) -> "SinusoidTaskBatch":
        """The same batch, task parameters included, on ``device``."""
        tensors = (self.x_support, self.y_support, self.x_query, self.y_query, self.amplitude, self.phase)
        return SinusoidTaskBatch(*(t.to(device) for t in tensors))


class SinusoidTasks(_SeededSampler):
    """The sinusoid regression family of the MAML paper (Finn et al. 2017, section 5.1).

    Task: y = A * sin(x - phi) with A ~ U[amplitude], phi ~ U[phase]; its support and query inputs are
    drawn independently from x ~ U[x_range]. ``sample(T)`` gives a SinusoidTaskBatch with x_support,
    y_support [T, k_support, 1] and x_query, y_query [T, k_query, 1], and the tasks' amplitude and phase.

    Every quantity of a batch is drawn in a fixed order (amplitudes, phases, then each task's inputs), so
    two samplers with the same seed and different k_support give the same tasks, and the same device
    replays the same batches. Different devices have different random streams.
    """

    def __init__(
        self,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        k_support: int = 10,
        k_query: int = 10,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__(seed)
        self.amplitude = _check_interval("amplitude", amplitude)
        self.phase = _check_interval("phase", phase)
        self.x_range = _check_interval("x_range", x_range)
        self.k_support = check_int("k_support", k_support, minimum=1)
        self.k_query = check_int("k_query", k_query, minimum=1)

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range}, "
            f"k_support={self.k_support}, k_query={self.k_query}, seed={self.seed})"
        )

    def sample(
        self, num_tasks: int, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32
    ) -> SinusoidTaskBatch:
        """num_tasks fresh tasks, generated on ``device`` in ``dtype``.

        One draw of uniform numbers per batch, in this order: the amplitudes, the phases, then each task's
        k_support + k_query inputs (``sample_many(1, num_tasks)``'s batch)."""
        return self.sample_many(1, num_tasks, device, dtype)[0]

    def sample_many(
        self, count: int, num_tasks: int, device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32
    ) -> BatchStack:
        """``count`` batches of num_tasks fresh tasks in one draw of uniform numbers and a few ops for them all
        (a training loop that draws a batch per meta-step spends tens of microseconds a batch in op calls), as a
        BatchStack of SinusoidTaskBatch.

        The numbers come in sample's order, batch after batch: on the CPU, whose generator gives them one after
        another however many a call asks for, the batches are those of ``count`` calls of ``sample(num_tasks)``;
        on CUDA, batches of the same law from the stream's own order. Each batch's x_support, y_support, x_query
        and y_query are [num_tasks, K or Q, 1] views (stacked: [count, num_tasks, K or Q, 1]), a task's support and
        query points side by side in memory (the fused meta-step's CPU kernel reads them in place)."""
        count = check_int("count", count, minimum=1)
        num_tasks = check_int("num_tasks", num_tasks, minimum=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        device = torch.device(device)
        shift, scale = self._affine(num_tasks, device, dtype)
        drawn = torch.rand((count, shift.numel()), generator=self._generator(device), device=device, dtype=dtype)
        values = torch.addcmul(shift, scale, drawn)  # low + (high - low) * u, per quantity
        tasks, k, q = num_tasks, self.k_support, self.k_query
        amplitude, phase, x = values.split_with_sizes([tasks, tasks, tasks * (k + q)], 1)
        x = x.view(count, tasks, k + q, 1)
        y = torch.sin(x - phase.view(count, tasks, 1, 1)).mul_(amplitude.view(count, tasks, 1, 1))
        (x_support, x_query), (y_support, y_query) = (t.split_with_sizes([k, q], 2) for t in (x, y))
        fields = (x_support, y_support, x_query, y_query, amplitude, phase)
        return BatchStack._made_by_sampler(SinusoidTaskBatch, fields)

    def _affine(self, tasks: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(low, high - low) of each number a batch of ``tasks`` draws, made once per shape."""
        key = (tasks, device, dtype)
        cache = self.__dict__.setdefault("_affine_cache", {})
        if key not in cache:
            counts = (tasks, tasks, tasks * (self.k_support + self.k_query))
            intervals = (self.amplitude, self.phase, self.x_range)
            low = torch.cat([torch.full((n,), lo, dtype=torch.float64) for n, (lo, _) in zip(counts, intervals)])
            width = torch.cat([torch.full((n,), hi - lo, dtype=torch.float64) for n, (lo, hi) in zip(counts, intervals)])
            cache[key] = (low.to(device=device, dtype=dtype), width.to(device=device, dtype=dtype))
        return cache[key]


class FewShotTasks(_SeededSampler):
    """N-way K-shot classification tasks drawn from any labelled examples.

    x: [N, ...] examples (numpy array or tensor; integer data becomes float32, unscaled), y: [N] integer
    class labels. Each task draws ``ways`` distinct classes and relabels them 0..ways-1 in a random
    order, then draws ``shots`` support and ``query_shots`` query examples of each, all distinct.
    ``sample(T)`` gives a TaskBatch with x_support [T, ways*shots, ...], y_support [T, ways*shots]
    and x_query [T, ways*query_shots, ...], y_query [T, ways*query_shots], grouped by label
    (label 0's examples first). Every class needs at least shots + query_shots examples.
    """

    def __init__(self, x, y, ways: int, shots: int, query_shots: int, seed: Optional[int] = None) -> None:
        super().__init__(seed)
        self.ways = check_int("ways", ways, minimum=1)
        self.shots = check_int("shots", shots, minimum=1)
        self.query_shots = check_int("query_shots", query_shots, minimum=1)
        x, y = tensor_of_numbers("x", x), tensor_of_numbers("y", y)
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"x must hold real numbers, got dtype {x.dtype}")
        if not x.is_floating_point():
            x = x.to(torch.float32)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.dim() != 1:
            raise ValueError(f"y must be [N], one class label per example, got shape {list(y.shape)}")
        if x.dim() < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x must be [N, ...] with N = {y.shape[0]} examples like y, got shape {list(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x and y hold no examples")
        if y.device != x.device:
            raise ValueError(f"y must be on x's device {x.device}, got {y.device}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        classes, counts = torch.unique(y.cpu().to(torch.int64), return_counts=True)
        if len(classes) < self.ways:
            raise ValueError(f"ways = {self.ways} needs at least {self.ways} classes, but y holds {len(classes)}")
        needed = self.shots + self.query_shots
        short = counts < needed
        if short.any():
            listed = ", ".join(f"class {int(c)} has {int(n)}" for c, n in zip(classes[short][:5], counts[short][:5]))
            more = f" (and {int(short.sum()) - 5} more classes)" if int(short.sum()) > 5 else ""
            raise ValueError(
                f"every class needs shots + query_shots = {needed} examples, but {listed}{more}; "
                "drop those classes or lower shots/query_shots"
            )
        self.x = x
        self.classes = classes  # the original labels, sorted
        # the examples of class c are x[by_class[start[c] : start[c] + counts[c]]]
        self._by_class = torch.argsort(y.cpu().to(torch.int64), stable=True)
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"FewShotTasks({self.x.shape[0]} examples of {self.num_classes} classes, ways={self.ways}, "
            f"shots={self.shots}, query_shots={self.query_shots}, seed={self.seed})"
        )

    def sample(self, num_tasks: int, device: Union[None, str, torch.device] = None) -> TaskBatch:
        """num_tasks fresh tasks on ``device`` (default: x's device). The draws are made on the CPU,
        so a seed gives the same tasks on every device."""
        num_tasks = check_int("num_tasks", num_tasks, minimum=1)
        generator = self._generator(torch.device("cpu"))
        ways, shots, queries = self.ways, self.shots, self.query_shots
        # the first `ways` classes of a random permutation: distinct, and their order is the relabelling
        chosen = torch.rand(num_tasks, self.num_classes, generator=generator).argsort(1)[:, :ways]  # [T, ways]
        counts = self._counts[chosen]  # [T, ways]
        # shots + queries distinct examples of each chosen class, by Floyd's algorithm (a uniform subset
        # in as many draws, whatever the class size), then shuffled so the support/query split is uniform
        picked = shots + queries
        picks = torch.empty(num_tasks, ways, picked, dtype=torch.int64)
        for i in range(picked):
            last = counts - picked + i  # draw from 0..last; `last` itself is never taken yet
            draw = (torch.rand(num_tasks, ways, generator=generator, dtype=torch.float64) * (last + 1)).long()
            draw = torch.minimum(draw, last)
            taken = (picks[:, :, :i] == draw.unsqueeze(-1)).any(-1)
            picks[:, :, i] = torch.where(taken, last, draw)
        shuffle = torch.rand(num_tasks, ways, picked, generator=generator).argsort(-1)
        picks = picks.gather(-1, shuffle)
        index = self._by_class[self._starts[chosen].unsqueeze(-1) + picks]  # [T, ways, s + q] into x
        support_index = index[:, :, :shots].reshape(num_tasks, ways * shots)
        query_index = index[:, :, shots:].reshape(num_tasks, ways * queries)
        labels = torch.arange(ways)
        y_support = labels.repeat_interleave(shots).expand(num_tasks, -1)
        y_query = labels.repeat_interleave(queries).expand(num_tasks, -1)
        device = self.x.device if device is None else torch.device(device)
        x = self.x
        # x was checked (finite) when the sampler was made, and the labels are 0..ways-1 by construction
        return TaskBatch._made_by_sampler(
            x[support_index.to(x.device)].to(device),
            y_support.contiguous().to(device),
            x[query_index.to(x.device)].to(device),
            y_query.contiguous().to(device),
            largest_labels=(ways - 1, ways - 1),
        )
