"""Long runs survive interruption: a learner, its optimizer and its task sampler saved mid-training and
loaded into fresh objects continue bit-identically; `metalearn-fast sine` stops cleanly on Ctrl-C, leaves
no partial file, and `--resume` finishes the run with the numbers of a run never interrupted."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from metalearn_fast import MAML, MLP, Reptile
from metalearn_fast.tasks import FewShotTasks, SinusoidTasks

from cli_helpers import run_main

# ---- state_dict: learner + optimizer + sampler continue bit-identically ----

LEARNERS = {
    "maml-adam": lambda: (MAML(MLP([1, 16, 16, 1]), inner_lr=0.05, inner_steps=2), torch.optim.Adam, "sine"),
    "meta-sgd-adamw": lambda: (MAML(MLP([1, 16, 1]), learn_inner_lr=True), torch.optim.AdamW, "sine"),
    "fomaml-sgd-momentum": lambda: (MAML(MLP([1, 16, 1]), first_order=True),
                                    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), "sine"),
    "anil-generic-classification": lambda: (
        MAML(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), adapt_head_only=True, loss="cross_entropy"),
        torch.optim.Adam, "fewshot"),
    "reptile": lambda: (Reptile(MLP([1, 16, 1]), inner_lr=0.05, inner_steps=3, outer_lr=0.3), None, "sine"),
}


def make(name, seed):
    torch.manual_seed(seed)
    learner, optimizer_class, data = LEARNERS[name]()
    optimizer = None if optimizer_class is None else optimizer_class(learner.parameters())
    if data == "sine":
        sampler = SinusoidTasks(seed=5)
    else:
        labels = torch.arange(60) % 6
        sampler = FewShotTasks(torch.randn(60, 4, generator=torch.Generator().manual_seed(1)) + labels[:, None],
                               labels, ways=3, shots=2, query_shots=3, seed=5)
    return learner, optimizer, sampler


def steps(learner, optimizer, sampler, count):
    for _ in range(count):
        batch = sampler.sample(4)
        learner.meta_step(batch) if optimizer is None else learner.meta_step(batch, optimizer)


def state_of(learner, optimizer):
    tensors = [t.detach().clone() for t in learner.state_dict().values()]
    if optimizer is not None:
        for state in optimizer.state_dict()["state"].values():
            tensors += [v.clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


@pytest.mark.parametrize("name", list(LEARNERS))
def test_a_saved_run_continues_bit_identically_in_fresh_objects(name):
    learner, optimizer, sampler = make(name, seed=0)
    steps(learner, optimizer, sampler, 5)
    buffer = io.BytesIO()  # through the bytes a file would hold
    torch.save({"learner": learner.state_dict(), "sampler": sampler.state_dict(),
                "optimizer": None if optimizer is None else optimizer.state_dict()}, buffer)
    steps(learner, optimizer, sampler, 5)
    uninterrupted = state_of(learner, optimizer)

    fresh, fresh_optimizer, fresh_sampler = make(name, seed=1)  # other weights until the state is loaded
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh.load_state_dict(saved["learner"])
    fresh_sampler.load_state_dict(saved["sampler"])
    if fresh_optimizer is not None:
        fresh_optimizer.load_state_dict(saved["optimizer"])
    steps(fresh, fresh_optimizer, fresh_sampler, 5)
    resumed = state_of(fresh, fresh_optimizer)
    assert len(resumed) == len(uninterrupted) > 0
    for a, b in zip(resumed, uninterrupted):
        assert torch.equal(a, b)


def test_a_sampler_state_belongs_to_its_seed():
    with pytest.raises(ValueError, match="seed 3"):
        SinusoidTasks(seed=4).load_state_dict(SinusoidTasks(seed=3).state_dict())


# ---- the main job: Ctrl-C, files written whole, --resume ----

# --log-every 4 with 20 validation points (every 3 steps) and --checkpoint-every 20: the loop draws 1 to 3 batches at
# a time, the draws ending where a checkpoint is saved
JOB = ["sine", "--meta-steps", "60", "--meta-batch", "7", "--test-tasks", "20", "--log-every", "4"]


def comparable(results):
    """What must not depend on an interruption: every number but the timings."""
    return {key: results[key] for key in ("results", "learning_curve", "validation", "budget")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run_main([*JOB, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def interrupt_on_call(monkeypatch, call):
    """Ctrl-C when the loop draws the ``call``-th training batch (each phase draws one per step)."""
    original = SinusoidTasks.sample_many
    drawn = {"count": 0}

    def sample_many(self, count, num_tasks, *args, **kwargs):
        if num_tasks == 7:  # training batches (validation and test sets are larger)
            drawn["count"] += count
            if drawn["count"] >= call:
                raise KeyboardInterrupt
        return original(self, count, num_tasks, *args, **kwargs)

    monkeypatch.setattr(SinusoidTasks, "sample_many", sample_many)


@pytest.mark.parametrize("call, where", [(45, "meta-training"), (85, "pretraining")])
def test_interrupted_run_resumes_to_the_uninterrupted_results(call, where, tmp_path, monkeypatch, capsys,
                                                              uninterrupted):
    out = tmp_path / "run"
    interrupt_on_call(monkeypatch, call)
    assert run_main([*JOB, "--checkpoint-every", "20", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"metalearn-fast sine: interrupted; continue it with: metalearn-fast sine --resume {out}"
    # nothing half-written: only the checkpoint (of step 40, or of the pretraining's step 20)
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint.pt"]
    monkeypatch.undo()

    assert run_main(["sine", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and ("40 meta-steps" in printed if where == "meta-training" else
                                           "60 meta-steps and 20 pretraining steps" in printed)
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["resumed"] is True
    assert comparable(resumed) == comparable(uninterrupted)
    assert not (out / "checkpoint.pt").exists()  # a finished run leaves its results, not a checkpoint


def test_interrupt_without_checkpoints_leaves_no_files(tmp_path, monkeypatch, capsys):
    interrupt_on_call(monkeypatch, 10)
    assert run_main([*JOB, "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "metalearn-fast sine: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_other_options_and_missing_checkpoints(tmp_path, capsys):
    assert run_main(["sine", "--resume", str(tmp_path)]) == 2
    assert f"--resume {tmp_path}: {tmp_path} holds no checkpoint.pt" in capsys.readouterr().err
    assert run_main(["sine", "--resume", str(tmp_path), "--meta-steps", "10", "--first-order"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("metalearn-fast sine: error: --resume continues a run with the options it was started with; "
                   "drop --meta-steps, --first-order")
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert run_main(["sine", "--resume", str(tmp_path)]) == 2
    assert "cannot read its checkpoint" in capsys.readouterr().err


def test_ctrl_c_in_a_terminal_run_exits_130_with_one_line(tmp_path):
    """A real SIGINT to the console command, mid-training."""
    env = {k: v for k, v in os.environ.items() if k != "METALEARN_FAST_BACKEND"}
    # a terminal's Ctrl-C reaches a process whose SIGINT is the default, even where this test runs in the
    # background of a script (which starts it with SIGINT ignored, and Python would keep it so)
    process = subprocess.Popen([sys.executable, "-m", "metalearn_fast", "sine", "--meta-steps", "100000",
                                "--checkpoint-every", "50", "--out", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoint.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"metalearn-fast sine: interrupted; continue it with: metalearn-fast sine --resume {tmp_path}")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pt"]
