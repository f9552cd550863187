"""The main job: MAML on the sinusoid family (Finn et al. 2017, section 5.1), against two baselines.

y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]; an MLP 1-40-40-1 with MSE. MAML meta-trains
with Adam (a stretch of meta-steps in one call, MAML.meta_steps); the pretrained baseline trains the same
network with Adam on every point of the same stream of tasks with the same budget of per-example gradients (a
stretch of steps in one fused epoch, pretrain()'s path); the random init is the untrained network. All three
start from the same weights and are scored on fixed new test tasks after 0, 1 and 10 steps of the same
inner SGD. ``run`` returns the results and writes the figures and results.json; the command line
(metalearn_fast/cli.py) parses the options and prints.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import MAML, MLP, backend_info, reference
from ..algorithms.maml_plus import job_options
from ..tasks import SinusoidTasks
from ..train import train_in_order
from . import runs
from .options import check_variant, given, variant_name

SIZES = [1, 40, 40, 1]  # the MAML paper's network: two hidden layers of 40 ReLU units
EVAL_INNER_STEPS = (0, 1, 10)  # inner steps after which the table scores each method
# Fixed whatever the seed is, so that runs with different seeds are scored on the same tasks.
TEST_SEED = 2017
VALIDATION_SEED = 2018
VALIDATION_TASKS = 200
VALIDATION_QUERY = 100
VALIDATION_POINTS = 20  # validation checkpoints along training
FIGURE_TASKS = 3
FIGURE_GRID = 200
X_RANGE = (-5.0, 5.0)
METHOD_NAMES = {"maml": "MAML", "pretrained": "pretrained", "random_init": "random init"}


@dataclasses.dataclass
class Config:
    """Everything a run depends on; a checkpoint keeps it, so a resumed run continues the same run."""

    meta_steps: int = 30000
    meta_batch: int = 25
    inner_steps: int = 1
    inner_lr: float = 0.01
    meta_lr: float = 1e-3
    first_order: bool = False
    meta_sgd: bool = False
    maml_plus: bool = False
    k_support: int = 10
    k_query: int = 10
    eval_k: tuple = (5, 10, 20)
    test_tasks: int = 1000
    test_points: int = 120
    log_every: int = 150
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    loop_timing_steps: int = 10  # meta-steps timed for the per-task loop comparison
    checkpoint_every: Optional[int] = None
    quick: bool = False

    @property
    def figure_k(self) -> int:
        """The K of the figures and the summary line: the training K when the table has it."""
        return self.k_support if self.k_support in self.eval_k else self.eval_k[0]

    def pretrain_steps(self) -> int:
        """The pretraining steps that compute as many per-example gradients as MAML's meta-training.

        A MAML meta-step differentiates each of its meta_batch tasks' losses on k_support points at each of
        inner_steps inner steps, and on k_query points once for the meta-gradient; a pretraining step
        differentiates the loss on meta_batch tasks of k_support + k_query points each."""
        per_meta_step = self.inner_steps * self.k_support + self.k_query
        return max(1, round(self.meta_steps * per_meta_step / (self.k_support + self.k_query)))


class Run:
    """One run's models, optimizers, task streams and training progress: what a checkpoint saves."""

    def __init__(self, config: Config) -> None:
        self.config = config
        device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.start_model = MLP(SIZES, device=device)  # all three methods start from these weights
        plus = job_options(config.meta_steps, batchnorm=False) if config.maml_plus else {}
        self.maml = MAML(copy.deepcopy(self.start_model), inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                         first_order=config.first_order, learn_inner_lr=config.meta_sgd, **plus)
        self.pretrained = copy.deepcopy(self.start_model)
        self.maml_optimizer = torch.optim.Adam(self.maml.parameters(), lr=config.meta_lr)
        self.pretrain_optimizer = torch.optim.Adam(self.pretrained.parameters(), lr=config.meta_lr)
        # MAML and the baseline draw the same stream of training tasks, each from its own sampler
        self.samplers = {name: SinusoidTasks(k_support=config.k_support, k_query=config.k_query, seed=config.seed)
                         for name in ("maml", "pretrain")}
        self.phases = {"maml": runs.Phase.start(config.meta_steps, device),
                       "pretrain": runs.Phase.start(config.pretrain_steps(), device)}

    def state_dict(self) -> dict:
        return {
            "job": "sine",
            "backend": backend_info()["active"],  # the other backend's numbers differ in the last digits
            "config": dataclasses.asdict(self.config),
            "start_model": self.start_model.state_dict(),
            "maml": self.maml.state_dict(),
            "maml_optimizer": self.maml_optimizer.state_dict(),
            "pretrained": self.pretrained.state_dict(),
            "pretrain_optimizer": self.pretrain_optimizer.state_dict(),
            "samplers": {name: sampler.state_dict() for name, sampler in self.samplers.items()},
            "phases": {name: phase.state_dict() for name, phase in self.phases.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "Run":
        run = cls(config_from_dict(state["config"]))
        run.start_model.load_state_dict(state["start_model"])
        run.maml.load_state_dict(state["maml"])
        run.maml_optimizer.load_state_dict(state["maml_optimizer"])
        run.pretrained.load_state_dict(state["pretrained"])
        run.pretrain_optimizer.load_state_dict(state["pretrain_optimizer"])
        for name, sampler in run.samplers.items():
            sampler.load_state_dict(state["samplers"][name])
        device = torch.device(run.config.device)
        run.phases = {name: runs.Phase.from_state_dict(phase, device) for name, phase in state["phases"].items()}
        return run


QUICK = {"meta_steps": 500, "test_tasks": 200, "loop_timing_steps": 3}  # what --quick changes


def config_from_options(options: dict) -> Config:
    """A run's configuration from the command line's options (None: the default, or --quick's); UsageError for
    combinations that cannot work."""
    config = config_from_dict({"log_every": None, **given(options, QUICK)})
    if config.log_every is None:
        config.log_every = max(1, config.meta_steps // 200)
    config.device = runs.check_device(config.device)
    check_variant(config.meta_sgd, config.maml_plus)
    if config.test_tasks < 2:
        raise runs.UsageError(f"--test-tasks must be at least 2 (for the 95% interval), got {config.test_tasks}")
    largest_k = max(config.eval_k)
    if largest_k >= config.test_points:
        raise runs.UsageError(
            f"--eval-k {largest_k} is larger than the points a test task can spare: --test-points "
            f"{config.test_points} holds K support points plus at least one query point, so K <= "
            f"{config.test_points - 1}")
    return config


def resumed(folder: str) -> tuple[Config, dict]:
    """The configuration and state of the run whose checkpoint is in ``folder``; UsageError when there is none or
    its device is not on this machine."""
    state = runs.checkpoint_to_resume(folder, "sine")
    config = config_from_dict(state["config"])
    runs.check_device(config.device)
    return config, state


def config_from_dict(values: dict) -> Config:
    values = dict(values)
    values["eval_k"] = tuple(sorted(values["eval_k"]))
    return Config(**values)


def inner_learner(model, config: Config) -> MAML:
    """``model`` wrapped so that it adapts to a task with the run's inner SGD (MAML.adapt / MAML.predict)."""
    return MAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps)


def query_mse(learner: MAML, x_support, y_support, x_query, y_query, steps: int):
    """Each task's query MSE after ``steps`` inner SGD steps on its support set: [T]."""
    adapted = learner.adapt(x_support, y_support, steps=steps)
    with torch.no_grad():
        return (learner.predict(adapted, x_query) - y_query).pow(2).flatten(1).mean(1)


def run(config: Config, out: Path, resume: Optional[dict] = None, command: Optional[list] = None) -> dict:
    """Trains (or continues ``resume``, a checkpoint's state), evaluates, writes the figures and
    results.json (with ``command``, the command line that ran it) into ``out``, removes the checkpoint (the
    run is complete: results.json is its record), and returns the results."""
    with runs.threads(config.threads):
        return _run(config, out, resume, command)


def _run(config: Config, out: Path, resume: Optional[dict], command: Optional[list]) -> dict:
    run_started = time.perf_counter()
    job = Run(config) if resume is None else Run.from_state_dict(resume)
    config = job.config
    device = torch.device(config.device)
    learners = {"maml": job.maml, "pretrained": inner_learner(job.pretrained, config),
                "random_init": inner_learner(job.start_model, config)}
    validate = _validation(learners, config)
    _train(job, validate, out)
    random_init_validation = validate("random_init")()

    timing_batch = SinusoidTasks(k_support=config.k_support, k_query=config.k_query, seed=config.seed + 1).sample(
        config.meta_batch, device=device)
    loop_seconds = per_task_loop_seconds(job.start_model, timing_batch, config)

    evaluation_started = time.perf_counter()
    largest_k = config.eval_k[-1]
    pool = SinusoidTasks(k_support=largest_k, k_query=config.test_points - largest_k, seed=TEST_SEED)
    test = pool.sample(config.test_tasks, device=device)
    rows = evaluate(learners, test, config)
    evaluation_seconds = time.perf_counter() - evaluation_started

    maml_phase, pretrain_phase = job.phases["maml"], job.phases["pretrain"]
    curve = _learning_curve(job)
    validation = {"maml": maml_phase.validation, "pretrained": pretrain_phase.validation}
    fit_path, curve_path = out / "sine_fit.png", out / "sine_learning_curve.png"
    plot_fits(learners, test, config, fit_path)
    plot_learning_curve(curve, validation, random_init_validation, config, curve_path)
    results = {
        "config": {**dataclasses.asdict(config), "eval_inner_steps": list(EVAL_INNER_STEPS), "test_seed": TEST_SEED},
        "backend": backend_info()["active"],
        "torch": torch.__version__,
        "resumed": resume is not None,
        "seconds": {"total": time.perf_counter() - run_started, "maml": maml_phase.seconds,
                    "pretrain": pretrain_phase.seconds, "evaluation": evaluation_seconds},
        "speed": {"meta_steps_per_second": config.meta_steps / maml_phase.seconds,
                  "ms_per_meta_step": 1000 * maml_phase.seconds / config.meta_steps,
                  "per_task_loop_ms_per_meta_step": 1000 * loop_seconds},
        "budget": {
            "maml_meta_steps": config.meta_steps,
            "pretrain_steps": pretrain_phase.steps,
            "per_example_gradients": config.meta_steps * config.meta_batch * (
                config.inner_steps * config.k_support + config.k_query),
        },
        "learning_curve": curve,
        "validation": {"tasks": VALIDATION_TASKS, "k": config.k_support, "inner_steps": config.inner_steps,
                       **validation, "random_init": random_init_validation},
        "results": rows,
        "figures": {"fit": fit_path.name, "fit_k": config.figure_k, "learning_curve": curve_path.name},
        "command": command,
    }
    runs.write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    (out / runs.CHECKPOINT).unlink(missing_ok=True)
    return results


def _validation(learners: dict, config: Config) -> Callable[[str], Callable[[], float]]:
    """validation(method)(): the method's mean query MSE on held-out tasks after the training number of
    inner steps."""
    held_out = SinusoidTasks(k_support=config.k_support, k_query=VALIDATION_QUERY, seed=VALIDATION_SEED)
    v = held_out.sample(VALIDATION_TASKS, device=torch.device(config.device))

    def validation(method: str) -> Callable[[], float]:
        return lambda: float(query_mse(learners[method], v.x_support, v.y_support, v.x_query, v.y_query,
                                       config.inner_steps).mean())

    return validation


def _train(job: Run, validate: Callable[[str], Callable[[], float]], out: Path) -> None:
    """Meta-trains MAML, then pretrains the baseline, each phase from where the job's checkpoint left it."""
    config, device = job.config, torch.device(job.config.device)
    checkpoint = None
    if config.checkpoint_every is not None:
        checkpoint = lambda: runs.save_checkpoint(out, job.state_dict())  # noqa: E731

    def maml_steps(batches):  # one C++ call for all the meta-steps, Adam's update included (MAML.meta_steps)
        return job.maml.meta_steps(batches, job.maml_optimizer)

    def pretrain_steps(stack):  # every point of a step's tasks, one Adam step a batch, in one fused epoch
        sets = [torch.cat([stack.stacked(f"{v}_support"), stack.stacked(f"{v}_query")], 2).reshape(-1, 1)
                for v in ("x", "y")]
        rows = config.meta_batch * (config.k_support + config.k_query)
        return train_in_order(job.pretrained, job.pretrain_optimizer, F.mse_loss, *sets, rows)

    common = dict(log_every=config.log_every, checkpoint=checkpoint, checkpoint_every=config.checkpoint_every)
    pretrain_x = config.meta_steps / job.phases["pretrain"].steps
    for name, steps, desc, label, x_per_step in (
        ("maml", maml_steps, "meta-training MAML", "meta-loss", 1.0),
        ("pretrain", pretrain_steps, "pretraining the baseline", "loss", pretrain_x),
    ):
        phase, sampler = job.phases[name], job.samplers[name]
        runs.train(phase, lambda count: steps(sampler.sample_many(count, config.meta_batch, device=device)),
                   validate=validate("maml" if name == "maml" else "pretrained"),
                   validate_after=runs.validation_steps(phase.steps, VALIDATION_POINTS), desc=desc, label=label,
                   x_per_step=x_per_step, **common)


def _learning_curve(job: Run) -> dict:
    """The training losses averaged over intervals of log_every meta-steps (the pretraining's on the
    meta-step axis)."""
    config = job.config
    pretrain_steps = job.phases["pretrain"].steps
    steps, maml_curve = interval_means(job.phases["maml"].losses.cpu(), config.log_every)
    pretrain_every = max(1, round(config.log_every * pretrain_steps / config.meta_steps))
    pretrain_ends, pretrain_curve = interval_means(job.phases["pretrain"].losses.cpu(), pretrain_every)
    return {
        "step": steps,
        "maml_meta_loss": maml_curve,
        "pretrain_step": [end * config.meta_steps / pretrain_steps for end in pretrain_ends],
        "pretrain_loss": pretrain_curve,
    }


def per_task_loop_seconds(model, batch, config: Config) -> float:
    """Seconds per meta-step of the textbook implementation: a Python loop over the tasks, each adapted
    with torch.autograd.grad in plain torch. Timed on copies, so training is untouched."""
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def meta_step():
        total = 0.0
        for t in range(batch.num_tasks):
            fast = params
            for _ in range(config.inner_steps):
                support_loss = F.mse_loss(reference.mlp_forward(batch.x_support[t], fast), batch.y_support[t])
                grads = torch.autograd.grad(support_loss, fast, create_graph=not config.first_order)
                fast = [p - config.inner_lr * g for p, g in zip(fast, grads)]
            total = total + F.mse_loss(reference.mlp_forward(batch.x_query[t], fast), batch.y_query[t])
        (total / batch.num_tasks).backward()

    meta_step()  # warm-up
    _synchronize(batch.x_support.device)
    started = time.perf_counter()
    for _ in range(config.loop_timing_steps):
        meta_step()
    _synchronize(batch.x_support.device)
    return (time.perf_counter() - started) / config.loop_timing_steps


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(learners: dict, test, config: Config) -> list[dict]:
    """Rows {method, k, inner_steps, mean, ci95, tasks, diverged} of query MSE on the test tasks (diverged: how
    many tasks' MSE is not finite). ``test`` holds max K support points per task, of which K are used, and the
    query points, the same for every K."""
    rows = []
    for method, learner in learners.items():
        for k in config.eval_k:
            for steps in EVAL_INNER_STEPS:
                mse = query_mse(learner, test.x_support[:, :k], test.y_support[:, :k], test.x_query, test.y_query,
                                steps).double().cpu()
                ci95 = 1.96 * float(mse.std()) / math.sqrt(mse.numel())  # normal approximation over test tasks
                # SGD that overflows (a too large inner rate for the network's curvature) makes a task's MSE inf
                # or nan, and so the mean: the table says how many tasks did
                rows.append({"method": method, "k": k, "inner_steps": steps, "mean": float(mse.mean()),
                             "ci95": ci95, "tasks": mse.numel(), "diverged": int((~mse.isfinite()).sum())})
    return rows


def introduction(config: Config, backend: str) -> str:
    """What the run is, before it starts."""
    variant = variant_name(config.first_order, config.meta_sgd, config.maml_plus)
    return (
        f"metalearn-fast sine: {variant} on the sinusoid family y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], "
        f"x ~ U[−5, 5] (Finn et al. 2017, 5.1)\n"
        f"backend {backend}, device {config.device}, seed {config.seed}; MLP 1-40-40-1, K = {config.k_support} "
        f"support and {config.k_query} query points, {config.inner_steps} inner step(s) of SGD lr {config.inner_lr}, "
        f"Adam lr {config.meta_lr}, {config.meta_batch} tasks per meta-batch, {config.meta_steps} meta-steps")


def summary(results: dict, config: Config) -> str:
    """The run's timings, the table and the headline comparison, as printed at the end."""
    seconds, speed, budget, backend = results["seconds"], results["speed"], results["budget"], results["backend"]
    step_ms, loop_ms = speed["ms_per_meta_step"], speed["per_task_loop_ms_per_meta_step"]
    cell = {(r["method"], r["k"], r["inner_steps"]): r["mean"] for r in results["results"]}
    k = config.figure_k
    maml_mse = cell["maml", k, 1]
    return "\n".join([
        "",
        f"meta-training: {config.meta_steps} meta-steps in {seconds['maml']:.1f} s "
        f"({speed['meta_steps_per_second']:.0f} steps/s, {step_ms:.2f} ms per meta-step of {config.meta_batch} "
        f"tasks on the {backend} backend)",
        f"the same meta-step as a per-task loop in plain torch: {loop_ms:.1f} ms ({loop_ms / step_ms:.0f}x slower)",
        f"pretrained baseline: {budget['pretrain_steps']} Adam steps on {config.meta_batch} tasks x "
        f"{config.k_support + config.k_query} points in {seconds['pretrain']:.1f} s (the same number of "
        "per-example gradients as MAML)",
        "",
        f"query MSE on {config.test_tasks} new test tasks (mean ± 95% interval) after 0, 1 and 10 inner SGD steps "
        f"on K support points, lr {config.inner_lr}:",
        format_table(results["results"], config.eval_k),
        "",
        f"K = {k}, 1 inner step: MAML's error is {cell['pretrained', k, 1] / maml_mse:.1f}x lower than the "
        f"pretrained network's and {cell['random_init', k, 1] / maml_mse:.1f}x lower than a random init's",
    ])


def format_table(rows: list[dict], eval_k) -> str:
    """The results as aligned text: one line per (K, method), one column per inner-step count."""
    cell = {(r["method"], r["k"], r["inner_steps"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    headers = ["K", "method"] + [f"{n} step{'s' if n != 1 else ''}" for n in EVAL_INNER_STEPS]
    lines = []
    for k in eval_k:
        for method in methods:
            values = [_cell_text(cell[method, k, n]) for n in EVAL_INNER_STEPS]
            lines.append([str(k) if method == methods[0] else "", METHOD_NAMES[method]] + values)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

    def render(cells):
        return "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(render(headers))
    return "\n".join([render(headers), rule] + [render(line) for line in lines])


def _cell_text(row: dict) -> str:
    """A table cell: mean ± 95% interval, or how many test tasks diverged (their MSE overflowed) where any did."""
    if row.get("diverged"):
        return f"{row['diverged']} of {row['tasks']} diverged"
    return f"{row['mean']:.3f} ± {row['ci95']:.3f}"


def interval_means(losses, every: int) -> tuple[list[int], list[float]]:
    """(end steps, mean of each interval of ``every`` steps), the last interval possibly shorter."""
    ends, means = [], []
    for start in range(0, len(losses), every):
        chunk = losses[start : start + every]
        ends.append(start + len(chunk))
        means.append(float(chunk.double().mean()))
    return ends, means


def plot_fits(learners: dict, test, config: Config, path: Path) -> None:
    """The MAML paper's Figure 2: for a few test tasks, the true curve, the K support points and the network
    before adaptation and after 1 and 10 inner steps, for MAML and for the pretrained baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = config.figure_k
    tasks = min(FIGURE_TASKS, test.num_tasks)
    low, high = X_RANGE
    grid = torch.linspace(low, high, FIGURE_GRID, device=test.x_support.device).view(1, -1, 1).expand(tasks, -1, -1)
    first = test.select(0, tasks)
    truth = first.true_function(grid).cpu()
    x_support, y_support = first.x_support[:, :k], first.y_support[:, :k]
    shown = {name: learners[name] for name in ("maml", "pretrained")}
    curves = {}
    for name, learner in shown.items():
        for steps in EVAL_INNER_STEPS:
            adapted = learner.adapt(x_support, y_support, steps=steps)
            with torch.no_grad():
                curves[name, steps] = learner.predict(adapted, grid).cpu()
    styles = {0: dict(color="tab:gray", linestyle=":", label="before adaptation"),
              1: dict(color="tab:blue", linestyle="--", label="after 1 inner step"),
              10: dict(color="tab:green", linestyle="-", label="after 10 inner steps")}
    x_axis = grid[0, :, 0].cpu()
    figure, axes = plt.subplots(tasks, 2, figsize=(11, 3.2 * tasks), sharex=True, squeeze=False)
    for row in range(tasks):
        amplitude, phase = float(first.amplitude[row]), float(first.phase[row])
        for col, name in enumerate(shown):
            ax = axes[row, col]
            ax.plot(x_axis, truth[row, :, 0], color="black", linewidth=2.2, label="true curve")
            for steps in EVAL_INNER_STEPS:
                ax.plot(x_axis, curves[name, steps][row, :, 0], linewidth=1.8, **styles[steps])
            ax.scatter(x_support[row, :, 0].cpu(), y_support[row, :, 0].cpu(), marker="^", s=55, zorder=5,
                       color="tab:red", edgecolor="black", linewidth=0.6, label=f"the K = {k} support points")
            title = "MAML" if name == "maml" else "pretrained on all tasks"
            ax.set_title(f"{title}: test task {row + 1} (A = {amplitude:.2f}, φ = {phase:.2f})", fontsize=11)
            ax.set_ylim(-6, 6)
            ax.set_xlim(low, high)
            ax.grid(alpha=0.3)
            ax.set_ylabel("y")
            if row == tasks - 1:
                ax.set_xlabel("x")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=5, fontsize=10, frameon=False)
    figure.suptitle(f"Sinusoid regression, K = {k}: adapting to new tasks with inner SGD (lr {config.inner_lr})",
                    fontsize=13)
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    runs.save_figure(figure, path)


def _plain_log_ticks(ax) -> None:
    """Log-scale y ticks written as plain numbers (0.5, 1, 2) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(4.0, 6.0, 7.0, 8.0, 9.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))


def plot_learning_curve(curve: dict, validation: dict, random_init_mse: float, config: Config, path: Path) -> None:
    """Left: the training losses of MAML and of the pretrained baseline against the budget spent; right:
    both scored on held-out tasks at checkpoints, with the untrained network for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    left.plot(curve["step"], curve["maml_meta_loss"], color="tab:blue",
              label="MAML meta-loss (query MSE after adaptation)")
    left.plot(curve["pretrain_step"], curve["pretrain_loss"], color="tab:orange", label="pretraining loss (joint MSE)")
    left.set_yscale("log")
    _plain_log_ticks(left)
    left.set_xlabel("training budget spent (MAML meta-steps)")
    left.set_ylabel("training loss (MSE, log scale)")
    left.set_title("Training losses")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=9)
    steps_label = f"{config.inner_steps} inner step{'s' if config.inner_steps != 1 else ''}"
    for name, color in (("maml", "tab:blue"), ("pretrained", "tab:orange")):
        points = validation[name]
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3.5, color=color,
                   label=f"{METHOD_NAMES[name]}, after {steps_label}")
    right.axhline(random_init_mse, color="tab:gray", linestyle="--", label=f"random init, after {steps_label}")
    right.set_yscale("log")
    _plain_log_ticks(right)
    right.set_xlabel("training budget spent (MAML meta-steps)")
    right.set_ylabel("query MSE (log scale)")
    right.set_title(f"Held-out tasks: K = {config.k_support}, {VALIDATION_TASKS} tasks")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=9)
    figure.suptitle("Meta-learning the sinusoid family: MAML vs pretraining, same gradient budget", fontsize=13)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    runs.save_figure(figure, path)
