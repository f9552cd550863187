"""The ``metalearn-fast`` command: sine (the main job), fewshot (on your own data), glyphs, info, example, bench."""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .experiments import options


def _info(args: argparse.Namespace) -> int:
    from . import backend_info

    info = backend_info()
    print("\n".join(f"{key:<{max(map(len, info))}}  {value}" for key, value in info.items()))
    return 0


def _example(args: argparse.Namespace) -> int:
    """The founding example through metalearn_fast.compat: pretrain on one task, then learn a new one."""
    from .experiments import founding

    result = founding.run(epochs=args.epochs, seed=args.seed)
    print(f"MSE on the first task: {result['task_before']:.4f} before train, {result['task_after']:.4f} after")
    print(f"MSE on the new task: {result['new_task_before']:.4f} before learn_new_task, "
          f"{result['new_task_after']:.4f} after")
    print(f"{2 * args.epochs} epochs in {result['seconds']:.2f} s")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .benchmarks import run
    from .experiments.runs import UsageError, check_device

    device = check_device(args.device)
    if device.startswith("mps"):
        raise UsageError(f"--device {args.device}: the benchmarks run on cpu, cuda or cuda:N")
    return run(quick=args.quick, device=device, keyword=args.keyword, json_path=args.json,
               markdown_path=args.markdown)


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="time the kernels and the MAML engine against plain torch, torch.func and the peers; print the ratios",
        description="Runs the pytest-benchmark suites of metalearn_fast.benchmarks (ops, MAML meta-steps, "
        "pretraining), each entry checked against plain torch before it is timed, and prints one Markdown table per "
        "group: median times and speedups over plain torch. Needs pytest and pytest-benchmark.",
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

class _Parser(argparse.ArgumentParser):  # errors in one line, no usage dump: the message names the argument
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _k_list(text: str) -> list[int]:
    return sorted({options.positive_int(part) for part in text.split(",")})


def _resumed_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The configuration and state saved in --resume DIR's checkpoint; UsageError when other options are given."""
    from .experiments import runs, sine

    given = [action.option_strings[0] for action in parser._actions
             if action.option_strings and action.dest not in ("resume", "help")
             and getattr(args, action.dest) != action.default]
    if given:
        raise runs.UsageError(f"--resume continues a run with the options it was started with; drop {', '.join(given)}")
    return sine.resumed(args.resume)


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

    if _missing_job_packages(args, "sine"):
        return 2
    from .experiments import sine
    from .experiments.runs import check_out

    if args.resume is not None:
        config, state = _resumed_config(args, args.parser)
        backend, out = state["backend"], check_out(args.resume)
    else:  # what argparse cannot check is checked here (UsageError)
        values = options.config_values(args, sine.Config)
        config, state, backend, out = sine.config_from_options(values), None, args.backend, check_out(args.out)
    try:
        if state is not None:  # the saved run's backend, not the one this process would pick
            from . import backend_info

            if backend != backend_info()["active"]:
                return _rerun_with_backend(args, backend)
        elif backend is not None and backend != _ext.requested_backend():
            return _rerun_with_backend(args, backend)
        return _run_sine(config, out, state, args)
    except KeyboardInterrupt:
        from .experiments import runs

        saved = (out / runs.CHECKPOINT).is_file()
        hint = f"; continue it with: metalearn-fast sine --resume {out}" if saved else ""
        print(f"\n{args.prog}: interrupted{hint}", file=sys.stderr)
        return 130


def _run_sine(config, out: Path, state, args: argparse.Namespace) -> int:
    from . import backend_info
    from .experiments import runs, sine

    print(sine.introduction(config, backend_info()["active"]))
    if state is not None:
        done = state["phases"]["maml"]["done"], state["phases"]["pretrain"]["done"]
        print(f"resuming from {out / runs.CHECKPOINT}: {done[0]} meta-steps and {done[1]} pretraining steps done")
    results = sine.run(config, out, resume=state, command=["metalearn-fast", *args.argv])
    print(sine.summary(results, config))
    figures = results["figures"]
    print(f"\nwrote {out / figures['fit']}, {out / figures['learning_curve']} and {out / 'results.json'} in "
          f"{results['seconds']['total']:.0f} s")
    return 0


_SINE_OPTIONS = [  # flag, type (None: a switch), default, help
    ("--meta-steps", options.positive_int, None,
     "meta-training steps (default 30000, 500 with --quick)"),
    ("--meta-batch", options.positive_int, 25, "tasks per meta-step (default 25)"),
    ("--inner-steps", options.positive_int, 1, "inner SGD steps during meta-training (default 1)"),
    ("--inner-lr", options.positive_float, 0.01, "inner SGD learning rate, for every method (default 0.01)"),
    ("--meta-lr", options.positive_float, 1e-3, "Adam learning rate of meta-training and pretraining (default 0.001)"),
    ("--first-order", None, False, "first-order MAML (no second derivatives)"),
    ("--meta-sgd", None, False, "Meta-SGD: also learn one inner rate per weight"),
    options.MAML_PLUS,
    ("--k-support", options.positive_int, 10, "support points per training task (default 10)"),
    ("--k-query", options.positive_int, 10, "query points per training task (default 10)"),
    ("--eval-k", _k_list, [5, 10, 20], "support-set sizes of the table, K[,K...] (default 5,10,20)"),
    ("--test-tasks", options.positive_int, None,
     "test tasks (default 1000, 200 with --quick)"),
    ("--test-points", options.positive_int, 120, "points per test task: the support sets are its first K, the query set "
     "its last test_points - max K (default 120)"),
    ("--log-every", options.positive_int, None, "meta-steps per point of the logged learning curve (default meta_steps / 200)"),
    ("--seed", options.non_negative_int, 0, "seed of the weights and the training tasks"),
    ("--device", str, "cpu", "cpu, cuda, cuda:N or mps (default cpu)"),
    options.THREADS,
    ("--out", str, "sine-results", "folder for the figures and results.json (default sine-results)"),
    ("--quick", None, False, "a run of a few seconds: fewer meta-steps and test tasks"),
    ("--checkpoint-every", options.positive_int, None, "save the whole run to OUT/checkpoint.pt every N training steps (and "
     "at the end of each training phase), written whole, so that --resume can continue it after an interruption"),
    ("--resume", str, None, "continue the run whose checkpoint is in DIR, with the options it was started with, to "
     "the same results as a run never interrupted; give no other options"),
    ("--backend", options.choice("auto", "torch"), None, "auto: the compiled kernels when they load; torch: the pure-torch "
     "fallback (default: METALEARN_FAST_BACKEND, else auto)"),
]


def _add_sine_parser(commands) -> None:
    sine = commands.add_parser(
        "sine",
        help="meta-learn the sinusoid family with MAML, against pretraining and random init (the main job)",
        description=(
            "Meta-trains MAML on the sinusoid family of the MAML paper (Finn et al. 2017, 5.1), MLP 1-40-40-1, MSE, "
            "and scores it on fixed new test tasks against a network pretrained on all tasks jointly with the same "
            "budget of per-example gradients and the untrained network, all from the same initial weights and "
            "fine-tuned with the same inner SGD. Prints a table of query MSE after 0, 1 and 10 inner steps and "
            "writes sine_fit.png, sine_learning_curve.png and results.json into --out."
        ),
    )
    options.add_options(sine, _SINE_OPTIONS)
    sine.set_defaults(run=_sine, prog=sine.prog, parser=sine)


def _missing_job_packages(args: argparse.Namespace, job: str) -> bool:
    """True, after saying so on one line, when the [jobs] extra is not installed."""
    missing = [name for name in ("tqdm", "matplotlib", "PIL") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{args.prog}: error: the {job} job needs {', '.join(missing)}: pip install 'metalearn-fast[jobs]'",
              file=sys.stderr)
    return bool(missing)


def _fewshot(args: argparse.Namespace) -> int:
    if _missing_job_packages(args, "fewshot"):
        return 2
    from .experiments import fewshot
    from .experiments.runs import check_out

    config = fewshot.config_from_options(options.config_values(args, fewshot.Config))
    data, split = fewshot.prepare(config)
    out = check_out(args.out)
    print(fewshot.introduction(config, data, split))
    try:
        results = fewshot.run(config, data, split, out, command=["metalearn-fast", *args.argv])
    except KeyboardInterrupt:
        print(f"\n{args.prog}: interrupted", file=sys.stderr)
        return 130
    print(fewshot.summary(results, config))
    written = ", ".join(str(out / name) for name in results["figures"].values())
    print(f"\nwrote {written}, {out / 'results.json'} and {out / 'model.pt'} in {results['seconds']['total']:.0f} s")
    return 0


def _glyphs(args: argparse.Namespace) -> int:
    from .experiments import fewshot_data

    if _missing_job_packages(args, "glyphs"):
        return 2
    folder = fewshot_data.write_glyphs(args.folder, args.classes, args.per_class, args.size, args.seed)
    print(f"wrote {args.classes} classes of {args.per_class} {args.size}x{args.size} images into {folder}")
    return 0


def _add_fewshot_parsers(commands) -> None:
    from .experiments import fewshot

    parser = commands.add_parser(
        "fewshot",
        help="N-way K-shot MAML on your own classes (image folders or .npz) vs pretrain-then-fine-tune",
        description=(
            "Splits the classes of DATA into meta-train, meta-validation and meta-test, meta-trains MAML on tasks of "
            "the meta-train classes and scores it on test tasks of unseen classes against a classifier pretrained on "
            "all meta-train classes with the same gradient budget (then fine-tuned with a new head) and the untrained "
            "network. DATA: a folder of class folders of images (e.g. Omniglot's images_background, miniImageNet's "
            "train folder), or an .npz with x [N, ...] and y [N]. Prints a table of query accuracy after 0, 1 and N "
            "inner steps and writes results.json, figures and model.pt (metalearn_fast.load_fewshot) into --out."),
    )
    parser.add_argument("data", metavar="DATA", help="a folder of class folders of images, or an .npz file")
    options.add_options(parser, fewshot.OPTIONS)
    parser.set_defaults(run=_fewshot, prog=parser.prog)
    glyphs = commands.add_parser("glyphs", help="write a generated set of handwritten-like characters to try fewshot on")
    glyphs.add_argument("folder", metavar="FOLDER")
    glyphs.add_argument("--classes", type=options.positive_int, default=100)
    glyphs.add_argument("--per-class", type=options.positive_int, default=20)
    glyphs.add_argument("--size", type=options.positive_int, default=28)
    glyphs.add_argument("--seed", type=options.non_negative_int, default=0)
    glyphs.set_defaults(run=_glyphs, prog=glyphs.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metalearn-fast", description="Fast meta-learning for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_sine_parser(commands)
    _add_fewshot_parsers(commands)
    commands.add_parser("info", help="which kernels were compiled and which backend runs").set_defaults(run=_info)
    example = commands.add_parser("example", help="the founding example (pretrain, then learn a new task)")
    example.add_argument("--epochs", type=options.non_negative_int, default=10)
    example.add_argument("--seed", type=options.non_negative_int, default=0)
    example.set_defaults(run=_example)
    _add_bench_parser(commands)
    return parser


def main(argv=None) -> int:
    from .experiments.runs import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except UsageError as error:  # an option argparse could not check: one line, exit status 2
        print(f"{getattr(args, 'prog', 'metalearn-fast')}: error: {error}", file=sys.stderr)
        return 2

