"""The ``metalearn-fast`` command: sine (the main job), info, example, bench."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
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
    from .benchmarks import run

    try:
        device = _check_device(args.device)
        if device.startswith("mps"):
            raise _UsageError(f"--device {args.device}: the benchmarks run on cpu, cuda or cuda:N")
    except _UsageError as error:
        print(f"{args.prog}: error: {error}", file=sys.stderr)
        return 2
    return run(quick=args.quick, device=device, keyword=args.keyword, json_path=args.json,
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

DEFAULTS = {"meta_steps": 30000, "test_tasks": 1000, "loop_timing_steps": 10}
QUICK = {"meta_steps": 500, "test_tasks": 200, "loop_timing_steps": 3}


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


def _check_device(text: str) -> str:
    """The --device text as a device this machine has (cpu, cuda, cuda:N, mps); _UsageError otherwise."""
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
    return str(device)


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


def _sine_config(args: argparse.Namespace):
    """The run's configuration from the options (with the defaults --quick changes); _UsageError for what
    argparse cannot check."""
    from .experiments.sine import Config

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
    fields = {name: getattr(args, name) for name in Config.__dataclass_fields__ if name not in ("device", "log_every")}
    fields["eval_k"] = tuple(args.eval_k)
    return Config(device=_check_device(args.device), log_every=args.log_every or max(1, args.meta_steps // 200),
                  **fields)


def _resumed_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The configuration saved in --resume DIR's checkpoint; _UsageError when other options are given too or
    DIR holds no checkpoint of this job."""
    from .experiments import runs
    from .experiments.sine import config_from_dict

    given = [action.option_strings[0] for action in parser._actions
             if action.option_strings and action.dest not in ("resume", "help")
             and getattr(args, action.dest) != action.default]
    if given:
        raise _UsageError(f"--resume continues a run with the options it was started with; drop {', '.join(given)}")
    try:
        state = runs.load_checkpoint(Path(args.resume))
    except (FileNotFoundError, NotADirectoryError) as error:
        raise _UsageError(f"--resume {args.resume}: {error}") from None
    except Exception as error:  # a damaged or foreign file
        raise _UsageError(f"--resume {args.resume}: cannot read its checkpoint ({type(error).__name__}: {error})") \
            from None
    if state.get("job") != "sine":
        raise _UsageError(f"--resume {args.resume}: its checkpoint is of the {state.get('job')!r} job, not sine")
    config = config_from_dict(state["config"])
    _check_device(config.device)
    return config, state


def _rerun_with_backend(args: argparse.Namespace, backend: str) -> int:
    """The backend is chosen once, when metalearn_fast is imported: run this command again in a fresh
    interpreter with METALEARN_FAST_BACKEND set. A Ctrl-C reaches the child too, which reports it."""
    env = dict(os.environ, METALEARN_FAST_BACKEND=backend)
    child = subprocess.Popen([sys.executable, "-m", "metalearn_fast", *args.argv], env=env)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue


def _sine(args: argparse.Namespace) -> int:
    from . import _ext

    try:
        if args.resume is not None:
            config, state = _resumed_config(args, args.parser)
            backend, out = state["backend"], _check_out(args.resume)
        else:
            config, state, backend, out = _sine_config(args), None, args.backend, _check_out(args.out)
    except _UsageError as error:
        print(f"{args.prog}: error: {error}", file=sys.stderr)
        return 2
    try:
        if state is not None:  # the saved run's backend, not the one this process would pick
            from . import backend_info

            if backend != backend_info()["active"]:
                return _rerun_with_backend(args, backend)
        elif backend is not None and backend != _ext.requested_backend():
            return _rerun_with_backend(args, backend)
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            return _run_sine(config, out, state, args)
        finally:  # main() may run inside a longer-lived process (the tests do)
            torch.set_num_threads(threads)
    except KeyboardInterrupt:
        from .experiments import runs

        saved = (out / runs.CHECKPOINT).is_file()
        hint = f"; continue it with: metalearn-fast sine --resume {out}" if saved else ""
        print(f"\n{args.prog}: interrupted{hint}", file=sys.stderr)
        return 130


def _run_sine(config, out: Path, state, args: argparse.Namespace) -> int:
    from . import backend_info
    from .experiments import runs, sine

    backend = backend_info()["active"]
    variant = ("first-order " if config.first_order else "") + ("Meta-SGD" if config.meta_sgd else "MAML")
    print(f"metalearn-fast sine: {variant} on the sinusoid family y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], "
          f"x ~ U[−5, 5] (Finn et al. 2017, 5.1)")
    print(f"backend {backend}, device {config.device}, seed {config.seed}; MLP 1-40-40-1, K = {config.k_support} "
          f"support and {config.k_query} query points, {config.inner_steps} inner step(s) of SGD lr {config.inner_lr}, "
          f"Adam lr {config.meta_lr}, {config.meta_batch} tasks per meta-batch, {config.meta_steps} meta-steps")
    if state is not None:
        done = state["phases"]["maml"]["done"], state["phases"]["pretrain"]["done"]
        print(f"resuming from {out / runs.CHECKPOINT}: {done[0]} meta-steps and {done[1]} pretraining steps done")
    results = sine.run(config, out, resume=state)
    results["command"] = ["metalearn-fast", *args.argv]
    seconds, speed = results["seconds"], results["speed"]
    step_ms, loop_ms = speed["ms_per_meta_step"], speed["per_task_loop_ms_per_meta_step"]
    budget = results["budget"]
    print()
    print(f"meta-training: {config.meta_steps} meta-steps in {seconds['maml']:.1f} s "
          f"({speed['meta_steps_per_second']:.0f} steps/s, {step_ms:.2f} ms per meta-step of {config.meta_batch} "
          f"tasks on the {backend} backend)")
    print(f"the same meta-step as a per-task loop in plain torch: {loop_ms:.1f} ms ({loop_ms / step_ms:.0f}x slower)")
    print(f"pretrained baseline: {budget['pretrain_steps']} Adam steps on {config.meta_batch} tasks x "
          f"{config.k_support + config.k_query} points in {seconds['pretrain']:.1f} s (the same number of "
          "per-example gradients as MAML)")
    print()
    print(f"query MSE on {config.test_tasks} new test tasks (mean ± 95% interval) after 0, 1 and 10 inner SGD steps "
          f"on K support points, lr {config.inner_lr}:")
    print(sine.format_table(results["results"], config.eval_k))
    cell = {(r["method"], r["k"], r["inner_steps"]): r["mean"] for r in results["results"]}
    k = config.figure_k
    maml_mse = cell["maml", k, 1]
    print(f"\nK = {k}, 1 inner step: MAML's error is {cell['pretrained', k, 1] / maml_mse:.1f}x lower than the "
          f"pretrained network's and {cell['random_init', k, 1] / maml_mse:.1f}x lower than a random init's")
    runs.write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    (out / runs.CHECKPOINT).unlink(missing_ok=True)  # the run is complete: results.json is its record
    figures = results["figures"]
    print(f"\nwrote {out / figures['fit']}, {out / figures['learning_curve']} and {out / 'results.json'} in "
          f"{seconds['total']:.0f} s")
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
    sine.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                      help="save the whole run to OUT/checkpoint.pt every N training steps (and at the end of each "
                      "training phase), written whole, so that --resume can continue it after an interruption")
    sine.add_argument("--resume", default=None, metavar="DIR",
                      help="continue the run whose checkpoint is in DIR, with the options it was started with, "
                      "to the same results as a run never interrupted; give no other options")
    sine.set_defaults(run=_sine, prog=sine.prog, parser=sine)


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
