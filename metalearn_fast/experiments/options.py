"""The jobs' command-line options: argparse types whose errors name what was expected, and option tables."""
from __future__ import annotations

import argparse
import math
from typing import Callable

from .runs import UsageError


def number(kind: type, description: str, accept: Callable[[float], bool]) -> Callable[[str], float]:
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


positive_int = number(int, "a positive integer", lambda value: value >= 1)
non_negative_int = number(int, "a non-negative integer", lambda value: value >= 0)
positive_float = number(float, "a positive finite number", lambda value: value > 0 and math.isfinite(value))


MAML_PLUS = ("--maml++", None, False, "MAML++ (Antoniou et al. 2019): learned per-layer per-step inner rates, the "
             "multi-step loss and first-order meta-steps, both annealed over the first third of meta-training, and "
             "per-step BatchNorm where the model has BatchNorm")


def check_variant(meta_sgd: bool, maml_plus: bool) -> None:
    """UsageError for variant switches that cannot go together."""
    if maml_plus and meta_sgd:
        raise UsageError("--maml++ learns one inner rate per layer and step, --meta-sgd one per weight: choose one")


def variant_name(first_order: bool, meta_sgd: bool, maml_plus: bool) -> str:
    """The meta-learner a job runs, as its first line names it."""
    return ("first-order " if first_order else "") + ("Meta-SGD" if meta_sgd else "MAML++" if maml_plus else "MAML")


THREADS = ("--threads", positive_int, 1, "CPU threads for torch (default 1: the networks' matrices are too small to "
           "gain from more, and extra threads are many times slower on a busy machine)")


def choice(*choices: str) -> Callable[[str], str]:
    return number(str, f"one of {', '.join(choices)}", lambda value: value in choices)


def add_options(parser: argparse.ArgumentParser, table) -> None:
    """The options of ``table``: (flag, type or None for a switch, default, help) rows."""
    for flag, kind, default, text in table:
        dest = {"dest": flag[2:-2].replace("-", "_") + "_plus"} if flag.endswith("++") else {}  # --maml++: maml_plus
        if kind is None:
            parser.add_argument(flag, action="store_true", help=text, **dest)
        else:
            parser.add_argument(flag, type=kind, default=default, help=text, **dest)


def config_values(args: argparse.Namespace, config_class) -> dict:
    """The parsed options that are fields of the job's Config dataclass, by field name."""
    return {name: getattr(args, name) for name in config_class.__dataclass_fields__ if hasattr(args, name)}


def given(values: dict, quick: dict) -> dict:
    """The options given on the command line (None: not given), with ``quick``'s values for those not given
    when --quick is."""
    values = {name: value for name, value in values.items() if value is not None}
    return {**quick, **values} if values.get("quick") else values
