"""The ``metalearn-fast`` command: sine (the main job), info, example, bench."""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def _info(args: argparse.Namespace) -> int:
    from . import backend_info

    info = backend_info()
    width = max(len(key) for key in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _example(args: argparse.Namespace) -> int:
    """The founding example through metalearn_fast.compat: pretrain on one task, then learn a new one."""
    import time

    import numpy as np
    import torch

    from .compat import get_loss_fn, get_model, get_optimizer, learn_new_task, train

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x, y = rng.random((1000, 10)), rng.random((1000, 1))
    new_x, new_y = rng.random((1000, 10)), rng.random((1000, 1))
    model = get_model(10, 1)
    optimizer, loss_fn = get_optimizer(model), get_loss_fn()
    start = time.perf_counter()
    losses = train(model, optimizer, loss_fn, x, y, epochs=args.epochs, batch_size=32)
    learn_new_task(model, optimizer, loss_fn, new_x, new_y, epochs=args.epochs, batch_size=32)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        new_loss = loss_fn(model(torch.as_tensor(new_x, dtype=torch.float32)), torch.as_tensor(new_y, dtype=torch.float32))
    print(f"pretrain losses per epoch: {', '.join(f'{v:.4f}' for v in losses)}")
    print(f"loss on the new task after learn_new_task: {float(new_loss):.4f}")
    print(f"{2 * args.epochs} epochs in {elapsed:.2f} s")
    return 0


# ---- metalearn-fast bench: the benchmark suites (metalearn_fast/benchmarks) and their report ----


def _bench(args: argparse.Namespace) -> int:
    import re

    import torch

    from .benchmarks import run

    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        print(f"{args.prog}: error: --device {args.device!r}: use cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{args.prog}: error: --device {args.device}: no GPU is visible to torch {torch.__version__}", file=sys.stderr)
        return 2
    return run(quick=args.quick, device=args.device, keyword=args.keyword, json_path=args.json,
               markdown_path=args.markdown)


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="time the kernels and the MAML engine against plain torch, torch.func and the peers; print the ratios",
        description=(
            "Runs the pytest-benchmark suites shipped in metalearn_fast.benchmarks: the ops (linear_relu, sgd_step), "
            "MAML meta-steps (sinusoid, Omniglot-sized, wide) and pretraining, each group holding metalearn_fast, its "
            "pure-torch fallback and the baselines (plain torch, torch.func, a per-task loop, and higher and "
            "learn2learn when installed). Every entry is checked against plain torch before it is timed. Prints one "
            "Markdown table per group with each entry's median time and speedup over plain torch. Needs pytest and "
            "pytest-benchmark."
        ),
    )
    bench.add_argument("--quick", action="store_true",
                       help="small workloads only and fewer rounds (under a minute on 2 CPU cores)")
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    bench.add_argument("-k", dest="keyword", metavar="EXPRESSION",
                       help="only the benchmarks whose test names match, as pytest -k (e.g. maml, pretrain)")
    bench.add_argument("--json", metavar="FILE", help="keep pytest-benchmark's JSON results in FILE")
    bench.add_argument("--markdown", metavar="FILE", help="also write the report to FILE (e.g. BENCHMARKS.md)")
    bench.set_defaults(run=_bench, prog=bench.prog)


# ---- metalearn-fast sine: MAML on the sinusoid family, against two baselines ----

SINE_SIZES = [1, 40, 40, 1]  # the MAML paper's network: two hidden layers of 40 ReLU units
EVAL_INNER_STEPS = (0, 1, 10)  # inner steps after which the table scores each method
# Fixed whatever --seed is, so that runs with different seeds are scored on the same tasks.
TEST_SEED = 2017
VALIDATION_SEED = 2018
VALIDATION_TASKS = 200
VALIDATION_QUERY = 100
VALIDATION_POINTS = 20  # validation checkpoints along training
FIGURE_TASKS = 3
FIGURE_GRID = 200
DEFAULTS = {"meta_steps": 30000, "test_tasks": 1000, "loop_timing_steps": 10}
QUICK = {"meta_steps": 500, "test_tasks": 200, "loop_timing_steps": 3}
METHOD_NAMES = {"maml": "MAML", "pretrained": "pretrained", "random_init": "random init"}


class _UsageError(Exception):
    """A bad command-line argument: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line, no usage dump: the message names the argument
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind: type, description: str, accept: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: the text as ``kind``, refused (one line, exit 2) unless ``accept(value)``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda value: value >= 1)
_non_negative_int = _number(int, "a non-negative integer", lambda value: value >= 0)
_positive_float = _number(float, "a positive finite number", lambda value: value > 0 and math.isfinite(value))


def _k_list(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}") from None
    if values[0] < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}")
    return values


def _check_device(text: str):
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise _UsageError(f"--device {text!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _UsageError(f"--device {text}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise _UsageError(f"--device {text}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise _UsageError(f"--device {text!r}: unsupported device type {device.type!r} (use cpu, cuda, cuda:N or mps)")
    return device


def _check_out(text: str) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise _UsageError(f"--out {text} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".metalearn-fast-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise _UsageError(f"--out {text}: cannot write there ({error.strerror or error})") from None
    return out


def _sine_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the defaults that --quick changes and checks what argparse cannot; raises _UsageError."""
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.test_tasks < 2:
        raise _UsageError(f"--test-tasks must be at least 2 (for the 95% interval), got {args.test_tasks}")
    largest_k = args.eval_k[-1]
    if largest_k >= args.test_points:
        raise _UsageError(
            f"--eval-k {largest_k} is larger than the points a test task can spare: --test-points {args.test_points} "
            f"holds K support points plus at least one query point, so K <= {args.test_points - 1}"
        )
    if args.log_every is None:
        args.log_every = max(1, args.meta_steps // 200)
    args.device = _check_device(args.device)
    args.out = _check_out(args.out)
    return args


def _pretrain_steps(args: argparse.Namespace) -> int:
    """The pretraining steps that compute as many per-example gradients as MAML's meta-training.

    A MAML meta-step differentiates each of its meta_batch tasks' losses on k_support points at each of
    inner_steps inner steps, and on k_query points once for the meta-gradient; a pretraining step
    differentiates the loss on meta_batch tasks of k_support + k_query points each."""
    per_meta_step = args.inner_steps * args.k_support + args.k_query
    return max(1, round(args.meta_steps * per_meta_step / (args.k_support + args.k_query)))


def _query_mse(learner, x_support, y_support, x_query, y_query, steps: int):
    """Each task's query MSE after ``steps`` inner SGD steps on its support set: [T]."""
    import torch

    adapted = learner.adapt(x_support, y_support, steps=steps)
    with torch.no_grad():
        return (learner.predict(adapted, x_query) - y_query).pow(2).flatten(1).mean(1)


def _inner_learner(model, args):
    """``model`` wrapped so that it adapts to a task with the run's inner SGD (MAML.adapt / MAML.predict)."""
    from .maml import MAML

    return MAML(model, inner_lr=args.inner_lr, inner_steps=args.inner_steps)


def _train(step_fn, steps, args, validate, progress, desc, label, budget_per_step=1):
    """``steps`` calls of ``step_fn(batch) -> loss`` on fresh batches of the task stream MAML draws, with a
    progress bar showing the loss and steps/s. ``validate()`` scores the network on held-out tasks at a few
    checkpoints, off the clock, at x = step * budget_per_step (in MAML meta-steps). Returns (loss of every
    step [steps], validation [(x, mse)], seconds spent training)."""
    import torch

    from .tasks import SinusoidTasks

    sampler = SinusoidTasks(k_support=args.k_support, k_query=args.k_query, seed=args.seed)
    losses = torch.zeros(steps, device=args.device)
    checkpoints = _checkpoints(steps)
    validation = [(0, validate())]
    elapsed = 0.0
    with progress(total=steps, desc=desc, unit="step") as bar:
        started = time.perf_counter()
        for step in range(steps):
            losses[step] = step_fn(sampler.sample(args.meta_batch, device=args.device))
            bar.update()
            if (step + 1) % args.log_every == 0:
                recent = losses[step + 1 - args.log_every : step + 1].mean()
                bar.set_postfix_str(f"{label} {float(recent):.3f}", refresh=False)
            if (step + 1) in checkpoints:
                elapsed += time.perf_counter() - started
                validation.append(((step + 1) * budget_per_step, validate()))
                started = time.perf_counter()
    return losses.cpu(), validation, elapsed


def _train_maml(maml, args, validate, progress):
    """Meta-trains maml in place: meta_steps Adam steps on fresh meta-batches (see _train)."""
    import torch

    optimizer = torch.optim.Adam(maml.parameters(), lr=args.meta_lr)

    def meta_step(batch):
        optimizer.zero_grad(set_to_none=True)
        loss = maml.meta_loss(batch)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return _train(meta_step, args.meta_steps, args, validate, progress, "meta-training MAML", "meta-loss")


def _train_pretrained(model, args, steps, validate, progress):
    """The joint baseline: ``steps`` Adam steps on the MSE of one network over all points of meta_batch fresh
    tasks (support and query alike), the same task stream MAML draws (see _train)."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.Adam(model.parameters(), lr=args.meta_lr)

    def joint_step(batch):
        x = torch.cat([batch.x_support, batch.x_query], 1).reshape(-1, 1)
        y = torch.cat([batch.y_support, batch.y_query], 1).reshape(-1, 1)
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return _train(joint_step, steps, args, validate, progress, "pretraining the baseline", "loss",
                  budget_per_step=args.meta_steps / steps)


def _checkpoints(steps: int) -> set[int]:
    """The steps (1-based) after which training is validated: VALIDATION_POINTS of them, evenly spread."""
    count = min(steps, VALIDATION_POINTS)
    return {round(steps * (i + 1) / count) for i in range(count)}


def _plain_mlp(params, x):
    """The sine network in plain torch (no custom op): params [W0, b0, W1, b1, W2, b2], x [N, 1]."""
    import torch.nn.functional as F

    for i in range(0, len(params) - 2, 2):
        x = F.relu(F.linear(x, params[i], params[i + 1]))
    return F.linear(x, params[-2], params[-1])


def _per_task_loop_seconds(model, batch, args, repeats: int) -> float:
    """Seconds per meta-step of the textbook implementation: a Python loop over the tasks, each adapted
    with torch.autograd.grad in plain torch. Timed on copies, so training is untouched."""
    import torch
    import torch.nn.functional as F

    params = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def meta_step():
        total = 0.0
        for t in range(batch.num_tasks):
            fast = params
            for _ in range(args.inner_steps):
                support_loss = F.mse_loss(_plain_mlp(fast, batch.x_support[t]), batch.y_support[t])
                grads = torch.autograd.grad(support_loss, fast, create_graph=not args.first_order)
                fast = [p - args.inner_lr * g for p, g in zip(fast, grads)]
            total = total + F.mse_loss(_plain_mlp(fast, batch.x_query[t]), batch.y_query[t])
        (total / batch.num_tasks).backward()

    meta_step()  # warm-up
    _synchronize(args.device)
    started = time.perf_counter()
    for _ in range(repeats):
        meta_step()
    _synchronize(args.device)
    return (time.perf_counter() - started) / repeats


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _evaluate(learners, test, args):
    """Rows {method, k, inner_steps, mean, ci95, tasks} of query MSE on the test tasks. ``test`` holds max K
    support points per task, of which K are used, and the query points, the same for every K."""
    rows = []
    for method, learner in learners.items():
        for k in args.eval_k:
            for steps in EVAL_INNER_STEPS:
                mse = _query_mse(learner, test.x_support[:, :k], test.y_support[:, :k], test.x_query, test.y_query,
                                 steps)
                mse = mse.double().cpu()
                # normal approximation over test tasks
                ci95 = 1.96 * float(mse.std()) / math.sqrt(mse.numel())
                rows.append({"method": method, "k": k, "inner_steps": steps, "mean": float(mse.mean()),
                             "ci95": ci95, "tasks": mse.numel()})
    return rows


def _format_table(rows, args) -> str:
    """The results as aligned text: one line per (K, method), one column per inner-step count."""
    cell = {(r["method"], r["k"], r["inner_steps"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    headers = ["K", "method"] + [f"{n} step{'s' if n != 1 else ''}" for n in EVAL_INNER_STEPS]
    lines = []
    for k in args.eval_k:
        for method in methods:
            values = [f"{cell[method, k, n]['mean']:.3f} ± {cell[method, k, n]['ci95']:.3f}" for n in EVAL_INNER_STEPS]
            lines.append([str(k) if method == methods[0] else "", METHOD_NAMES[method]] + values)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

    def render(cells):
        return "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(render(headers))
    return "\n".join([render(headers), rule] + [render(line) for line in lines])


def _plot_fits(learners, test, args, path: Path) -> int:
    """The MAML paper's Figure 2: for a few test tasks, the true curve, the K support points and the network
    before adaptation and after 1 and 10 inner steps, for MAML and for the pretrained baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    k = args.k_support if args.k_support in args.eval_k else args.eval_k[0]
    tasks = min(FIGURE_TASKS, test.num_tasks)
    low, high = -5.0, 5.0
    grid = torch.linspace(low, high, FIGURE_GRID, device=args.device).view(1, -1, 1).expand(tasks, -1, -1)
    x_support, y_support = test.x_support[:tasks, :k], test.y_support[:tasks, :k]
    truth = (test.amplitude[:tasks].view(-1, 1, 1) * torch.sin(grid - test.phase[:tasks].view(-1, 1, 1))).cpu()
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
        amplitude, phase = float(test.amplitude[row]), float(test.phase[row])
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
    figure.suptitle(f"Sinusoid regression, K = {k}: adapting to new tasks with inner SGD (lr {args.inner_lr})",
                    fontsize=13)
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return k


def _interval_means(losses, every: int):
    """(end steps, mean of each interval of ``every`` steps), the last interval possibly shorter."""
    ends, means = [], []
    for start in range(0, len(losses), every):
        chunk = losses[start : start + every]
        ends.append(start + len(chunk))
        means.append(float(chunk.double().mean()))
    return ends, means


def _plain_log_ticks(ax) -> None:
    """Log-scale y ticks written as plain numbers (0.5, 1, 2) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(4.0, 6.0, 7.0, 8.0, 9.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))


def _plot_learning_curve(curve, validation, random_init_mse, args, path: Path) -> None:
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
    steps_label = f"{args.inner_steps} inner step{'s' if args.inner_steps != 1 else ''}"
    for name, color in (("maml", "tab:blue"), ("pretrained", "tab:orange")):
        points = validation[name]
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3.5, color=color,
                   label=f"{METHOD_NAMES[name]}, after {steps_label}")
    right.axhline(random_init_mse, color="tab:gray", linestyle="--", label=f"random init, after {steps_label}")
    right.set_yscale("log")
    _plain_log_ticks(right)
    right.set_xlabel("training budget spent (MAML meta-steps)")
    right.set_ylabel("query MSE (log scale)")
    right.set_title(f"Held-out tasks: K = {args.k_support}, {VALIDATION_TASKS} tasks")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=9)
    figure.suptitle("Meta-learning the sinusoid family: MAML vs pretraining, same gradient budget", fontsize=13)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _rerun_with_backend(args: argparse.Namespace) -> int:
    """The backend is chosen once, when metalearn_fast is imported: run this command again in a fresh
    interpreter with METALEARN_FAST_BACKEND set."""
    env = dict(os.environ, METALEARN_FAST_BACKEND=args.backend)
    command = [sys.executable, "-m", "metalearn_fast", *args.argv]
    return subprocess.run(command, env=env).returncode


def _sine(args: argparse.Namespace) -> int:
    from . import _ext

    try:
        _sine_settings(args)
    except _UsageError as error:
        print(f"{args.prog}: error: {error}", file=sys.stderr)
        return 2
    try:
        if args.backend is not None and args.backend != _ext.requested_backend():
            return _rerun_with_backend(args)
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            return _run_sine(args)
        finally:  # main() may run inside a longer-lived process (the tests do)
            torch.set_num_threads(threads)
    except KeyboardInterrupt:
        print(f"\n{args.prog}: interrupted", file=sys.stderr)
        return 130


def _run_sine(args: argparse.Namespace) -> int:
    import copy
    import json

    import torch
    from tqdm import tqdm

    from . import backend_info
    from .maml import MAML
    from .nn import MLP
    from .tasks import SinusoidTasks

    run_started = time.perf_counter()
    device = args.device
    backend = backend_info()["active"]
    variant = ("first-order " if args.first_order else "") + ("Meta-SGD" if args.meta_sgd else "MAML")
    print(f"metalearn-fast sine: {variant} on the sinusoid family y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], "
          f"x ~ U[−5, 5] (Finn et al. 2017, 5.1)")
    print(f"backend {backend}, device {device}, seed {args.seed}; MLP 1-40-40-1, K = {args.k_support} support and "
          f"{args.k_query} query points, {args.inner_steps} inner step(s) of SGD lr {args.inner_lr}, Adam lr "
          f"{args.meta_lr}, {args.meta_batch} tasks per meta-batch, {args.meta_steps} meta-steps")

    def progress(**kwargs):
        return tqdm(mininterval=0.5, dynamic_ncols=True, file=sys.stderr, **kwargs)

    torch.manual_seed(args.seed)
    start_model = MLP(SINE_SIZES, device=device)  # all three methods start from these weights
    maml = MAML(copy.deepcopy(start_model), inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                first_order=args.first_order, learn_inner_lr=args.meta_sgd)
    pretrained_model = copy.deepcopy(start_model)
    learners = {"maml": maml, "pretrained": _inner_learner(pretrained_model, args),
                "random_init": _inner_learner(start_model, args)}

    held_out = SinusoidTasks(k_support=args.k_support, k_query=VALIDATION_QUERY, seed=VALIDATION_SEED)
    validation_tasks = held_out.sample(VALIDATION_TASKS, device=device)

    def validate(method: str) -> float:
        """Mean query MSE on the held-out tasks after the training number of inner steps."""
        v = validation_tasks
        mse = _query_mse(learners[method], v.x_support, v.y_support, v.x_query, v.y_query, args.inner_steps)
        return float(mse.mean())

    meta_losses, maml_validation, maml_seconds = _train_maml(maml, args, lambda: validate("maml"), progress)
    pretrain_steps = _pretrain_steps(args)
    pretrain_losses, pretrain_validation, pretrain_seconds = _train_pretrained(
        pretrained_model, args, pretrain_steps, lambda: validate("pretrained"), progress
    )
    random_init_validation = validate("random_init")

    timing_batch = SinusoidTasks(k_support=args.k_support, k_query=args.k_query, seed=args.seed + 1).sample(
        args.meta_batch, device=device
    )
    loop_seconds = _per_task_loop_seconds(start_model, timing_batch, args, args.loop_timing_steps)

    evaluation_started = time.perf_counter()
    pool = SinusoidTasks(k_support=args.eval_k[-1], k_query=args.test_points - args.eval_k[-1], seed=TEST_SEED)
    test = pool.sample(args.test_tasks, device=device)
    rows = _evaluate(learners, test, args)
    evaluation_seconds = time.perf_counter() - evaluation_started

    steps, maml_curve = _interval_means(meta_losses, args.log_every)
    pretrain_every = max(1, round(args.log_every * pretrain_steps / args.meta_steps))
    pretrain_ends, pretrain_curve = _interval_means(pretrain_losses, pretrain_every)
    curve = {
        "step": steps,
        "maml_meta_loss": maml_curve,
        "pretrain_step": [end * args.meta_steps / pretrain_steps for end in pretrain_ends],
        "pretrain_loss": pretrain_curve,
    }
    validation = {"maml": maml_validation, "pretrained": pretrain_validation}
    fit_path, curve_path = args.out / "sine_fit.png", args.out / "sine_learning_curve.png"
    figure_k = _plot_fits(learners, test, args, fit_path)
    _plot_learning_curve(curve, validation, random_init_validation, args, curve_path)

    step_ms = 1000 * maml_seconds / args.meta_steps
    print()
    print(f"meta-training: {args.meta_steps} meta-steps in {maml_seconds:.1f} s "
          f"({args.meta_steps / maml_seconds:.0f} steps/s, {step_ms:.2f} ms per meta-step of {args.meta_batch} tasks "
          f"on the {backend} backend)")
    print(f"the same meta-step as a per-task loop in plain torch: {1000 * loop_seconds:.1f} ms "
          f"({loop_seconds * 1000 / step_ms:.0f}x slower)")
    print(f"pretrained baseline: {pretrain_steps} Adam steps on {args.meta_batch} tasks x "
          f"{args.k_support + args.k_query} points in {pretrain_seconds:.1f} s (the same number of per-example "
          "gradients as MAML)")
    print()
    print(f"query MSE on {args.test_tasks} new test tasks (mean ± 95% interval) after 0, 1 and 10 inner SGD steps "
          f"on K support points, lr {args.inner_lr}:")
    print(_format_table(rows, args))
    cell = {(r["method"], r["k"], r["inner_steps"]): r["mean"] for r in rows}
    k = args.k_support if args.k_support in args.eval_k else args.eval_k[0]
    maml_mse = cell["maml", k, 1]
    print(f"\nK = {k}, 1 inner step: MAML's error is {cell['pretrained', k, 1] / maml_mse:.1f}x lower than the "
          f"pretrained network's and {cell['random_init', k, 1] / maml_mse:.1f}x lower than a random init's")

    total_seconds = time.perf_counter() - run_started
    results = {
        "command": ["metalearn-fast", *args.argv],
        "config": {
            "meta_steps": args.meta_steps, "meta_batch": args.meta_batch, "inner_steps": args.inner_steps,
            "inner_lr": args.inner_lr, "meta_lr": args.meta_lr, "first_order": args.first_order,
            "meta_sgd": args.meta_sgd, "k_support": args.k_support, "k_query": args.k_query,
            "eval_k": args.eval_k, "eval_inner_steps": list(EVAL_INNER_STEPS), "test_tasks": args.test_tasks,
            "test_points": args.test_points, "seed": args.seed, "test_seed": TEST_SEED, "device": str(device),
            "log_every": args.log_every, "quick": args.quick, "threads": torch.get_num_threads(),
        },
        "backend": backend,
        "torch": torch.__version__,
        "seconds": {"total": total_seconds, "maml": maml_seconds, "pretrain": pretrain_seconds,
                    "evaluation": evaluation_seconds},
        "speed": {"meta_steps_per_second": args.meta_steps / maml_seconds, "ms_per_meta_step": step_ms,
                  "per_task_loop_ms_per_meta_step": 1000 * loop_seconds},
        "budget": {
            "maml_meta_steps": args.meta_steps,
            "pretrain_steps": pretrain_steps,
            "per_example_gradients": args.meta_steps * args.meta_batch * (args.inner_steps * args.k_support
                                                                           + args.k_query),
        },
        "learning_curve": curve,
        "validation": {
            "tasks": VALIDATION_TASKS, "k": args.k_support, "inner_steps": args.inner_steps,
            "maml": maml_validation, "pretrained": pretrain_validation, "random_init": random_init_validation,
        },
        "results": rows,
        "figures": {"fit": fit_path.name, "fit_k": figure_k, "learning_curve": curve_path.name},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {fit_path}, {curve_path} and {args.out / 'results.json'} in {total_seconds:.0f} s")
    return 0


def _add_sine_parser(commands) -> None:
    sine = commands.add_parser(
        "sine",
        help="meta-learn the sinusoid family with MAML, against pretraining and random init (the main job)",
        description=(
            "Meta-trains MAML on the sinusoid family of the MAML paper (Finn et al. 2017, 5.1): y = A·sin(x − φ), "
            "A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5], MLP 1-40-40-1, MSE. Then scores it on fixed new test tasks "
            "against two baselines from the same initial weights: a network pretrained on all tasks jointly (with "
            "the same budget: as many per-example gradients as MAML computes, i.e. meta_steps x (inner_steps x "
            "k_support + k_query) / (k_support + k_query) Adam steps on meta-batches of k_support + k_query "
            "points per task) and the untrained network, each fine-tuned with the same inner SGD. Prints a table "
            "of query MSE after 0, 1 and 10 inner steps and writes sine_fit.png, sine_learning_curve.png and "
            "results.json into --out."
        ),
    )
    sine.add_argument("--meta-steps", type=_positive_int, default=None,
                      help=f"meta-training steps (default {DEFAULTS['meta_steps']}, "
                      f"{QUICK['meta_steps']} with --quick)")
    sine.add_argument("--meta-batch", type=_positive_int, default=25, help="tasks per meta-step (default 25)")
    sine.add_argument("--inner-steps", type=_positive_int, default=1,
                      help="inner SGD steps during meta-training (default 1)")
    sine.add_argument("--inner-lr", type=_positive_float, default=0.01,
                      help="inner SGD learning rate, for every method (default 0.01)")
    sine.add_argument("--meta-lr", type=_positive_float, default=1e-3,
                      help="Adam learning rate of meta-training and pretraining (default 0.001)")
    sine.add_argument("--first-order", action="store_true", help="first-order MAML (no second derivatives)")
    sine.add_argument("--meta-sgd", action="store_true", help="Meta-SGD: also learn one inner rate per weight")
    sine.add_argument("--k-support", type=_positive_int, default=10,
                      help="support points per training task (default 10)")
    sine.add_argument("--k-query", type=_positive_int, default=10, help="query points per training task (default 10)")
    sine.add_argument("--eval-k", type=_k_list, default=[5, 10, 20], metavar="K[,K...]",
                      help="support-set sizes of the table (default 5,10,20)")
    sine.add_argument("--test-tasks", type=_positive_int, default=None,
                      help=f"test tasks (default {DEFAULTS['test_tasks']}, {QUICK['test_tasks']} with --quick)")
    sine.add_argument("--test-points", type=_positive_int, default=120,
                      help="points per test task: the support sets are its first K, the query set its last "
                      "test_points - max K (default 120)")
    sine.add_argument("--log-every", type=_positive_int, default=None,
                      help="meta-steps per point of the logged learning curve (default meta_steps / 200)")
    sine.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the weights and the training tasks")
    sine.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    sine.add_argument("--threads", type=_positive_int, default=1,
                      help="CPU threads for torch (default 1: the sine network's matrices are too small to gain "
                      "from more, and extra threads slow it down badly on a busy machine)")
    sine.add_argument("--out", default="sine-results",
                      help="folder for the figures and results.json (default sine-results)")
    sine.add_argument("--backend", choices=["auto", "torch"], default=None,
                      help="auto: the compiled kernels when they load; torch: the pure-torch fallback "
                      "(default: METALEARN_FAST_BACKEND, else auto)")
    sine.add_argument("--quick", action="store_true", help="a run of a few seconds: fewer meta-steps and test tasks")
    sine.set_defaults(run=_sine, prog=sine.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metalearn-fast", description="Fast meta-learning for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_sine_parser(commands)
    commands.add_parser("info", help="which kernels were compiled and which backend runs").set_defaults(run=_info)
    example = commands.add_parser("example", help="the founding example (pretrain, then learn a new task)")
    example.add_argument("--epochs", type=_non_negative_int, default=10)
    example.add_argument("--seed", type=_non_negative_int, default=0)
    example.set_defaults(run=_example)
    _add_bench_parser(commands)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
