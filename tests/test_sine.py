"""`metalearn-fast sine`: MAML beats both baselines, both backends trace the same curve, and bad
arguments get a one-line error with exit status 2."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import run_main


def run_module(argv, backend_env=None):
    """``python -m metalearn_fast ...`` in a fresh interpreter, METALEARN_FAST_BACKEND unset unless given."""
    env = {k: v for k, v in os.environ.items() if k != "METALEARN_FAST_BACKEND"}
    if backend_env is not None:
        env["METALEARN_FAST_BACKEND"] = backend_env
    return subprocess.run([sys.executable, "-m", "metalearn_fast", *argv], env=env, capture_output=True,
                          text=True, timeout=300)


def result(rows, method, k, steps):
    (row,) = [r for r in rows if r["method"] == method and r["k"] == k and r["inner_steps"] == steps]
    return row["mean"]


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 800 and height >= 400


def test_maml_beats_pretraining_and_random_init(tmp_path, capsys):
    """A shortened run of the main job (2000 meta-steps instead of the default's tens of thousands) already
    shows the ordering the full run is held to."""
    status = run_main(["sine", "--meta-steps", "2000", "--test-tasks", "300", "--seed", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["results"]
    assert len(rows) == 3 * 3 * 3  # methods x K x inner steps
    maml_1, maml_10 = result(rows, "maml", 10, 1), result(rows, "maml", 10, 10)
    assert maml_1 <= 0.5 * result(rows, "pretrained", 10, 1)
    assert maml_1 <= result(rows, "random_init", 10, 1) / 3
    assert maml_10 < maml_1
    # before any inner step MAML is just a network: adaptation is where it wins
    assert result(rows, "maml", 10, 0) > 2 * maml_1
    # the baseline got the same budget: K support = K query and one inner step make it one step per meta-step
    assert results["budget"] == {"maml_meta_steps": 2000, "pretrain_steps": 2000,
                                 "per_example_gradients": 2000 * 25 * 20}
    assert len(results["learning_curve"]["step"]) == 200 and results["learning_curve"]["step"][-1] == 2000
    # the printed table holds the same numbers
    assert f"{maml_1:.3f} ±" in out and "random init" in out
    check_png(tmp_path / "sine_fit.png")
    check_png(tmp_path / "sine_learning_curve.png")


def test_backends_give_the_same_meta_loss_curve(tmp_path):
    common = ["sine", "--quick", "--meta-steps", "100", "--log-every", "1", "--seed", "3"]
    auto = run_module([*common, "--backend", "auto", "--out", str(tmp_path / "auto")])
    # METALEARN_FAST_BACKEND unset: --backend torch must switch backends by running itself again
    torch = run_module([*common, "--backend", "torch", "--out", str(tmp_path / "torch")])
    assert auto.returncode == 0, auto.stderr
    assert torch.returncode == 0, torch.stderr
    auto_results = json.loads((tmp_path / "auto" / "results.json").read_text())
    torch_results = json.loads((tmp_path / "torch" / "results.json").read_text())
    assert torch_results["backend"] == "torch"
    # --quick's preset, with the explicit --meta-steps taking precedence
    assert torch_results["config"]["meta_steps"] == 100 and torch_results["config"]["test_tasks"] == 200
    if auto_results["backend"] != "extension":
        pytest.skip("the compiled extension is not available, so there is only one backend to compare")
    auto_curve = auto_results["learning_curve"]["maml_meta_loss"]
    torch_curve = torch_results["learning_curve"]["maml_meta_loss"]
    assert len(auto_curve) == len(torch_curve) == 100
    np.testing.assert_allclose(auto_curve, torch_curve, rtol=1e-4, atol=0)
    assert auto_curve[-1] < auto_curve[0]  # it is a training curve, not a constant


def test_variant_flags_take_effect(tmp_path, capsys):
    """Same seed: the first meta-loss is the same for MAML, FOMAML and Meta-SGD (same weights, same tasks,
    same inner rate at the start), and later ones differ because the meta-gradients differ."""
    curves = {}
    variants = {"maml": [], "fomaml": ["--first-order"], "meta_sgd": ["--meta-sgd"], "maml_plus": ["--maml++"]}
    for name, flags in variants.items():
        out = tmp_path / name
        argv = ["sine", "--quick", "--meta-steps", "40", "--log-every", "1", "--test-tasks", "20", "--out", str(out),
                *flags]
        assert run_main(argv) == 0
        curves[name] = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    losses = {name: results["learning_curve"]["maml_meta_loss"] for name, results in curves.items()}
    for name in ("fomaml", "meta_sgd", "maml_plus"):
        assert losses[name][0] == pytest.approx(losses["maml"][0], rel=1e-5)
        assert losses[name][-1] != pytest.approx(losses["maml"][-1], rel=1e-5)
    assert curves["fomaml"]["config"]["first_order"] and curves["meta_sgd"]["config"]["meta_sgd"]
    assert curves["maml_plus"]["config"]["maml_plus"]


@pytest.mark.parametrize(
    "inner_steps, k_support, k_query, expected", [(1, 10, 10, 40), (3, 10, 10, 80), (2, 5, 15, 50)]
)
def test_pretraining_gets_the_same_gradient_budget(inner_steps, k_support, k_query, expected):
    """A meta-step differentiates inner_steps x k_support + k_query points per task, a pretraining step
    k_support + k_query: 40 meta-steps of 3 x 10 + 10 points are worth 80 pretraining steps of 20."""
    from metalearn_fast.experiments.sine import Config

    config = Config(meta_steps=40, inner_steps=inner_steps, k_support=k_support, k_query=k_query)
    assert config.pretrain_steps() == expected


BAD_ARGUMENTS = {
    "negative meta-steps": (["--meta-steps", "-5"], "--meta-steps"),
    "zero meta-steps": (["--meta-steps", "0"], "--meta-steps"),
    "negative inner steps": (["--inner-steps", "-1"], "--inner-steps"),
    "meta-batch not a number": (["--meta-batch", "many"], "--meta-batch"),
    "negative inner lr": (["--inner-lr", "-0.01"], "--inner-lr"),
    "nan inner lr": (["--inner-lr", "nan"], "--inner-lr"),
    "K larger than the test points": (["--eval-k", "5,10,200"], "--eval-k 200"),
    "test points too few for K": (["--test-points", "20"], "--test-points 20"),
    "bad K list": (["--eval-k", "5,ten"], "--eval-k"),
    "unknown device": (["--device", "tpu"], "--device"),
    "absent CUDA device": (["--device", "cuda:99"], "--device cuda:99"),
    "unknown backend": (["--backend", "cuda"], "--backend"),
    "unknown option": (["--epochs", "3"], "--epochs"),
    "two ways to learn the rates": (["--maml++", "--meta-sgd"], "--maml++"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_give_one_line_and_status_2(case, tmp_path, capsys):
    extra, named = BAD_ARGUMENTS[case]
    status = run_main(["sine", "--out", str(tmp_path / "out"), *extra])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    # argparse reports an unknown option from the top-level parser ("metalearn-fast: error: ...")
    assert len(lines) == 1 and re.match(r"metalearn-fast( sine)?: error: ", lines[0]), captured.err
    assert named in lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("not a folder")
    assert run_main(["sine", "--quick", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"metalearn-fast sine: error: --out {target} is a file, not a folder"
    assert target.read_text() == "not a folder"


def test_console_error_has_no_traceback(tmp_path):
    finished = run_module(["sine", "--meta-steps", "-3", "--out", str(tmp_path)])
    assert finished.returncode == 2
    assert finished.stdout == ""
    assert "Traceback" not in finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert lines[-1] == "metalearn-fast sine: error: argument --meta-steps: must be a positive integer, got '-3'"
    # before it, only the import's one warning of an install without the extension (its message and source line)
    assert len(lines) == 1 or (len(lines) == 3 and "installed without it" in lines[0]), lines


def test_info_prints_the_backend_report(capsys):
    import metalearn_fast

    assert run_main(["info"]) == 0
    lines = dict((line.split(None, 1) + [""])[:2] for line in capsys.readouterr().out.splitlines())
    assert lines["active"] == metalearn_fast.backend_info()["active"]
    assert "compiled_cpu" in lines and "torch" in lines


def test_threads_are_restored_after_a_run(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        argv = ["sine", "--meta-steps", "5", "--test-tasks", "2", "--threads", "1", "--out", str(tmp_path)]
        assert run_main(argv) == 0
        # the run itself used one thread (recorded from torch during the run)
        assert json.loads((tmp_path / "results.json").read_text())["config"]["threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()


def test_the_table_counts_the_test_tasks_whose_sgd_diverged():
    """An inner rate far above what the network's curvature allows makes every task's SGD overflow within 10
    steps: the table says so instead of printing nan ± nan; before any step every MSE is finite."""
    import torch

    from metalearn_fast import MAML
    from metalearn_fast.experiments import sine
    from metalearn_fast.nn import MLP
    from metalearn_fast.tasks import SinusoidTasks

    torch.manual_seed(0)
    config = sine.Config(eval_k=(5,), test_tasks=7)
    test = SinusoidTasks(k_support=5, k_query=20, seed=1).sample(7)
    rows = sine.evaluate({"maml": MAML(MLP(sine.SIZES), inner_lr=1e6)}, test, config)
    by_steps = {r["inner_steps"]: r for r in rows}
    assert by_steps[0]["diverged"] == 0 and math.isfinite(by_steps[0]["mean"])
    assert by_steps[10]["diverged"] == 7 and not math.isfinite(by_steps[10]["mean"])
    table = sine.format_table(rows, config.eval_k)
    assert "7 of 7 diverged" in table and "nan" not in table
    assert f"{by_steps[0]['mean']:.3f} ± {by_steps[0]['ci95']:.3f}" in table
