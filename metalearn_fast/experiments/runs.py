"""What the main jobs share: a training loop that checkpoints and resumes, files written whole.

A job's output files are written under a temporary name and renamed into place, so an interrupted
run (Ctrl-C, a killed process) leaves either the previous file or none, never half of one. A job
that checkpoints saves its whole state (weights, optimizer state, the task samplers' random state,
the losses so far) every N steps; resuming from it continues to the same numbers as a run that was
never interrupted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

CHECKPOINT = "checkpoint.pt"


class UsageError(ValueError):
    """A job's option that cannot work (a device this machine lacks, a folder it cannot write): the command
    line reports it on one line with exit status 2."""


def check_device(text: str) -> str:
    """The --device text as a device this machine has (cpu, cuda, cuda:N, mps); UsageError otherwise."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {text}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise UsageError(f"--device {text!r}: unsupported device type {device.type!r} (use cpu, cuda, cuda:N or mps)")
    return str(device)


@contextlib.contextmanager
def threads(count: int):
    """torch's intra-op CPU threads set to ``count`` inside the block, restored after it (the caller may be a
    longer-lived process: the tests are). The jobs default to one: their matrices are too small to gain from
    more, and intra-op threads that wait on each other are many times slower on a machine already busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_out(text: str) -> Path:
    """The --out folder, made if needed; UsageError when it is a file or cannot be written."""
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {text} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".metalearn-fast-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--out {text}: cannot write there ({error.strerror or error})") from None
    return out


def checkpoint_to_resume(folder: str, job: str) -> dict:
    """The checkpoint in --resume ``folder`` of ``job``; UsageError when there is none, it cannot be read, or it
    is another job's."""
    try:
        state = load_checkpoint(Path(folder))
    except (FileNotFoundError, NotADirectoryError) as error:
        raise UsageError(f"--resume {folder}: {error}") from None
    except Exception as error:  # a damaged or foreign file
        raise UsageError(f"--resume {folder}: cannot read its checkpoint ({type(error).__name__}: {error})") from None
    if state.get("job") != job:
        raise UsageError(f"--resume {folder}: its checkpoint is of the {state.get('job')!r} job, not {job}")
    return state


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary_path)``, then rename it to ``path``: readers never see a partial file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda partial: partial.write_text(text))


def save_figure(figure, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG file, written whole, and closed."""
    import matplotlib.pyplot as plt

    write_atomically(path, lambda partial: figure.savefig(partial, format="png", dpi=dpi))
    plt.close(figure)


def save_checkpoint(folder: Path, state: dict) -> None:
    write_atomically(Path(folder) / CHECKPOINT, lambda partial: torch.save(state, partial))


def load_checkpoint(folder: Path) -> dict:
    """The checkpoint a job saved in ``folder``; FileNotFoundError when there is none."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CHECKPOINT} (a run saves one with --checkpoint-every N)")
    return torch.load(path, map_location="cpu", weights_only=False)


def progress_bar(**kwargs):
    """A tqdm progress bar on stderr."""
    from tqdm import tqdm

    return tqdm(mininterval=0.5, dynamic_ncols=True, file=sys.stderr, **kwargs)


@dataclasses.dataclass
class Phase:
    """One training loop's progress, all that a checkpoint keeps of it besides the weights.

    losses: the loss of every step, [steps] (on the training device until saved); validation: (x, score)
    at the start and at the checkpoints of ``validation_steps``; seconds: time spent in training steps.
    """

    steps: int
    losses: Tensor
    done: int = 0
    validation: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def start(cls, steps: int, device) -> "Phase":
        return cls(steps=steps, losses=torch.zeros(steps, device=device))

    @property
    def finished(self) -> bool:
        return self.done == self.steps

    def state_dict(self) -> dict:
        return {"steps": self.steps, "losses": self.losses[: self.done].cpu(), "done": self.done,
                "validation": list(self.validation), "seconds": self.seconds}

    @classmethod
    def from_state_dict(cls, state: dict, device) -> "Phase":
        phase = cls.start(state["steps"], device)
        phase.losses[: state["done"]] = state["losses"].to(device)
        phase.done, phase.validation, phase.seconds = state["done"], list(state["validation"]), state["seconds"]
        return phase


def validation_steps(steps: int, count: int) -> set[int]:
    """The steps (1-based) after which a loop is validated: ``count`` of them, evenly spread."""
    count = min(steps, count)
    return {round(steps * (i + 1) / count) for i in range(count)}


# The most batches a training loop asks for at once (the sine job draws them in one go: 1000 of its meta-batches
# are 4 MB).
MOST_BATCHES_AT_ONCE = 1000


def train(
    phase: Phase,
    run_steps: Callable[[int], Tensor],
    *,
    validate: Optional[Callable[[], float]],
    validate_after: set[int],
    desc: str,
    label: str,
    log_every: int,
    checkpoint: Optional[Callable[[], None]] = None,
    checkpoint_every: Optional[int] = None,
    x_per_step: float = 1.0,
) -> None:
    """Runs ``phase`` to its end: ``run_steps(count)`` runs the next ``count`` steps and returns their losses, a
    tensor [count] (kept without a host sync; ``each`` makes one from a one-step function and a source of batches).
    ``validate()`` scores the model off the clock, before the first step and after the steps in ``validate_after``,
    recorded at x = steps * x_per_step (None: no validation). ``checkpoint()`` runs every ``checkpoint_every`` steps
    and at the end, off the clock. Resumes where ``phase.done`` says.

    The loop runs the steps from one of these events (and the log points) to the next in one ``run_steps``, at most
    MOST_BATCHES_AT_ONCE: a checkpoint then saves the task samplers just after the batches of the steps done, and a
    resumed run asks for the same counts as one never interrupted."""
    if validate is not None and not phase.validation:
        phase.validation.append((0, validate()))
    validations = sorted(validate_after) if validate is not None else []
    with progress_bar(total=phase.steps, initial=phase.done, desc=desc, unit="step") as bar:
        started = time.perf_counter()
        while phase.done < phase.steps:
            end = min(phase.steps, phase.done + MOST_BATCHES_AT_ONCE, _next_multiple(phase.done, log_every))
            if checkpoint is not None:
                end = min(end, _next_multiple(phase.done, checkpoint_every))
            end = min([end] + [s for s in validations if s > phase.done][:1])
            losses = run_steps(end - phase.done)
            if not isinstance(losses, Tensor) or losses.shape != (end - phase.done,):
                got = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                raise RuntimeError(f"run_steps({end - phase.done}) must return [{end - phase.done}] losses, got {got}")
            phase.losses[phase.done : end] = losses
            bar.update(end - phase.done)
            phase.done = end
            if phase.done % log_every == 0:
                recent = phase.losses[phase.done - log_every : phase.done].mean()
                bar.set_postfix_str(f"{label} {float(recent):.3f}", refresh=False)
            validating = validate is not None and phase.done in validate_after
            saving = checkpoint is not None and (phase.done % checkpoint_every == 0 or phase.finished)
            if validating or saving:
                phase.seconds += time.perf_counter() - started
                if validating:
                    phase.validation.append((phase.done * x_per_step, validate()))
                if saving:
                    checkpoint()
                started = time.perf_counter()
        phase.seconds += time.perf_counter() - started


def each(step: Callable[[Any], Union[float, Tensor]], next_batches: Callable[[int], Iterable[Any]]
         ) -> Callable[[int], Tensor]:
    """train's run_steps from a one-step function: ``step(batch)`` returns a step's loss (a number, or a 0-dim
    tensor) for each batch of ``next_batches(count)``, an iterable of the next ``count`` batches (a list drawn at
    once, or a generator that makes them one at a time: ``one_at_a_time``)."""
    return lambda count: torch.stack([torch.as_tensor(step(batch)) for batch in next_batches(count)])


def _next_multiple(done: int, every: int) -> int:
    """The first multiple of ``every`` after ``done``."""
    return (done // every + 1) * every


def one_at_a_time(next_batch: Callable[[], Any]) -> Callable[[int], Iterable[Any]]:
    """each's next_batches for a source of one batch a call: each batch made when its step comes (large batches
    are not held ahead)."""
    return lambda count: (next_batch() for _ in range(count))
