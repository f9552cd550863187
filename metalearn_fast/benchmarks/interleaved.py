"""Entries timed interleaved in one process: each round calls every entry once, the order alternating between
rounds, so that a machine that slows down or speeds up does so for all entries alike (pytest-benchmark times
one entry after another). The scripts bench/l2l_interleaved.py and bench/any_module_interleaved.py use it."""
import statistics
import time
from typing import Callable


def interleaved_medians(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """The median seconds of each entry's call over ``rounds`` rounds, after one round of warm-up."""
    times = {entry: [] for entry in steps}
    for round_ in range(rounds + 1):
        order = list(steps) if round_ % 2 == 0 else list(reversed(steps))
        for entry in order:
            start = time.perf_counter()
            steps[entry]()
            if round_:  # the first round warms up
                times[entry].append(time.perf_counter() - start)
    return {entry: statistics.median(spent) for entry, spent in times.items()}
