"""`metalearn-fast fewshot`: the loader (image folders and .npz), the class split, normalisation from the
meta-train classes only, one-line errors with exit status 2, and an end-to-end run in which MAML beats a random
init and whose saved model reproduces its recorded accuracy. All data is generated here."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import metalearn_fast
from metalearn_fast.experiments import fewshot, fewshot_data
from metalearn_fast.experiments.runs import UsageError

from cli_helpers import run_main


def write_images(root, counts, size=(6, 5), mode="L", seed=0):
    """root/CLASS/i.png for each (CLASS, count): random images of ``size`` (width, height); returns their arrays
    by class."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
        arrays[name] = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
        for i, array in enumerate(arrays[name]):
            Image.fromarray(array, mode).save(root / name / f"{i}.png")
    return arrays


def test_folder_loader_reads_every_class_folder_in_order(tmp_path):
    arrays = write_images(tmp_path / "data", {"b": 3, "a": 2, "alphabet/c1": 4})
    data = fewshot_data.load(str(tmp_path / "data"))
    assert data.class_names == ["a", "alphabet/c1", "b"]  # nested folders (Omniglot's layout) are classes too
    assert data.is_image and data.x.shape == (9, 1, 5, 6) and data.x.dtype == torch.float32
    assert data.y.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    expected = np.concatenate([np.stack(arrays[name]) for name in data.class_names]) / 255.0
    np.testing.assert_allclose(data.x[:, 0].numpy(), expected, atol=1e-7)
    # a saved model's users read new images the same way
    again = fewshot_data.load_images([tmp_path / "data" / "b" / "2.png"], channels=1, image_size=[5, 6])
    assert torch.equal(again, data.x[8:9])


def test_folder_loader_converts_channels_and_size(tmp_path):
    arrays = write_images(tmp_path / "data", {"a": 2, "b": 2}, size=(8, 6), mode="RGB")
    rgb = fewshot_data.load(str(tmp_path / "data"))
    assert rgb.x.shape == (4, 3, 6, 8)
    np.testing.assert_allclose(rgb.x[0].permute(1, 2, 0).numpy(), arrays["a"][0] / 255.0, atol=1e-7)
    gray = fewshot_data.load(str(tmp_path / "data"), channels=1, image_size=[3, 4])
    assert gray.x.shape == (4, 1, 3, 4)
    resized = Image.fromarray(arrays["b"][1]).convert("L").resize((4, 3), Image.BILINEAR)
    np.testing.assert_allclose(gray.x[3, 0].numpy(), np.asarray(resized) / 255.0, atol=1e-7)


def test_npz_loader_takes_string_labels_and_image_layouts(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)  # [N, H, W, C]
    y = np.array(["cat", "dog", "cat", "ant", "dog", "ant"])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = fewshot_data.load(str(tmp_path / "d.npz"))
    assert data.class_names == ["ant", "cat", "dog"] and data.y.tolist() == [1, 2, 1, 0, 2, 0]
    assert data.x.shape == (6, 3, 5, 4)
    np.testing.assert_array_equal(data.x.permute(0, 2, 3, 1).numpy(), x)
    assert fewshot_data.load(str(tmp_path / "d.npz"), channels=1, image_size=[10, 8]).x.shape == (6, 1, 10, 8)
    np.savez(tmp_path / "v.npz", x=x.reshape(6, -1), y=np.array([3, 1, 3, 1, 2, 2]))
    vectors = fewshot_data.load(str(tmp_path / "v.npz"))
    assert not vectors.is_image and vectors.x.shape == (6, 60) and vectors.class_names == ["1", "2", "3"]


def test_glyphs_command_writes_class_folders(tmp_path):
    assert run_main(["glyphs", str(tmp_path / "g"), "--classes", "3", "--per-class", "2", "--size", "9"]) == 0
    data = fewshot_data.load(str(tmp_path / "g"))
    assert data.class_names == ["glyph000", "glyph001", "glyph002"] and data.x.shape == (6, 1, 9, 9)
    assert float(data.x.max()) > 0.5  # strokes were drawn


def test_split_shares_out_every_class_once_by_seed():
    names = [f"c{i}" for i in range(30)]
    split = fewshot_data.split_classes(names, 0.2, 0.1, seed=3)
    assert [len(split[k]) for k in ("train", "validation", "test")] == [21, 3, 6]
    assert sorted(split["train"] + split["validation"] + split["test"]) == list(range(30))
    assert split == fewshot_data.split_classes(names, 0.2, 0.1, seed=3)
    assert split["test"] != fewshot_data.split_classes(names, 0.2, 0.1, seed=4)["test"]
    named = fewshot_data.split_classes(names, ["c5", "c7"], ["c1"], seed=0)
    assert named["test"] == [5, 7] and named["validation"] == [1] and 5 not in named["train"]
    with pytest.raises(UsageError, match="no class named 'c99'"):
        fewshot_data.split_classes(names, ["c99"], 0.1, seed=0)
    with pytest.raises(UsageError, match="'c5' is in --test-classes too"):
        fewshot_data.split_classes(names, ["c5"], ["c5"], seed=0)


def test_the_default_split_gives_every_split_ways_classes_or_skips_validation():
    ten = [f"c{i}" for i in range(10)]
    split = fewshot_data.split_classes(ten, None, None, seed=0, ways=3)  # a fifth and a tenth would be 2 and 1
    assert [len(split[k]) for k in ("train", "validation", "test")] == [7, 0, 3]  # 3 more would leave 4 < 2 x 3
    twelve = fewshot_data.split_classes([f"c{i}" for i in range(12)], None, None, seed=0, ways=3)
    assert [len(twelve[k]) for k in ("train", "validation", "test")] == [6, 3, 3]
    seven = fewshot_data.split_classes(ten[:7], None, None, seed=0, ways=3)
    assert [len(seven[k]) for k in ("train", "validation", "test")] == [4, 0, 3]
    counted = fewshot_data.split_classes(ten, 2, 0, seed=0, ways=3)
    assert [len(counted[k]) for k in ("train", "validation", "test")] == [8, 0, 2]
    assert fewshot_data.split_classes([f"c{i}" for i in range(30)], None, None, seed=3, ways=2) == \
        fewshot_data.split_classes([f"c{i}" for i in range(30)], 0.2, 0.1, seed=3)  # many classes: the fractions
    assert [fewshot_data.parse_classes(t) for t in ("3", "0", "0.25")] == [3, 0, 0.25]


def test_a_run_says_what_it_validated_and_when_training_did_not_help(tmp_path, capsys):
    """Seven classes of 3-way tasks leave none for validation (skipped, said); a meta-learning rate too small to
    move the weights leaves the initial weights as the best checkpoint (said, no claim about MAML's gain); the
    table's first adapted column is the inner-step count MAML is trained for."""
    fewshot_data.write_glyphs(tmp_path / "glyphs", classes=7, per_class=6, size=12, seed=1)
    common = ["fewshot", str(tmp_path / "glyphs"), "--model", "mlp:16", "--ways", "3", "--query", "1", "--quick",
              "--inner-steps", "2", "--eval-steps", "3"]
    assert run_main([*common, "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "validation is skipped" in printed and "no meta-validation classes" in printed
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert {r["inner_steps"] for r in results["results"]} == {0, 2, 3}
    assert results["validation"]["tasks"] == 0 and results["validation"]["untrained"] == []
    assert "after 2 steps (what MAML is meta-trained for) MAML is" in printed

    assert run_main([*common, "--val-classes", "2", "--test-classes", "3", "--ways", "2", "--meta-lr", "1e-12",
                     "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["validation"]["inner_steps"] == 2 and "maml" in results["validation"]["untrained"]
    # validation measured after the 2 trained steps: the random init's recorded score, recomputed
    config = fewshot.Config(**results["config"])
    job = fewshot.Run(config, *fewshot.prepare(config))
    tasks = fewshot.sample_tasks(job.sets["validation"], config, config.validation_tasks, fewshot.VALIDATION_SEED)
    assert float(fewshot.accuracy(job.learners()["random_init"], tasks, 2).mean()) == \
        results["validation"]["random_init"]
    assert "MAML: its best meta-validation checkpoint is its initial weights" in printed
    assert "points against" not in printed


def test_normalisation_comes_from_the_meta_train_classes_only(tmp_path):
    write_images(tmp_path / "data", {f"k{i}": 4 for i in range(9)})
    config = fewshot.config_from_options({"data": str(tmp_path / "data"), "ways": 2, "shots": 1, "query": 1,
                                          "test_classes": 0.3, "val_classes": 0.3, "quick": True})
    data, split = fewshot.prepare(config)
    job = fewshot.Run(config, data, split)
    train_pixels = np.concatenate([data.x[data.y == c].numpy().ravel() for c in split["train"]])
    # MAML's tasks and the baseline's examples come from the meta-train classes only
    in_train = torch.isin(data.y, torch.tensor(split["train"]))
    assert torch.equal(job.tasks.x, data.x[in_train]) and torch.equal(job.train_x, data.x[in_train])
    standardize = job.maml.model[0]
    assert float(standardize.mean) == pytest.approx(train_pixels.mean(), abs=1e-6)
    assert float(standardize.std) == pytest.approx(train_pixels.std(ddof=1), abs=1e-6)
    # the test classes' images leave the statistics alone
    data.x[torch.isin(data.y, torch.tensor(split["test"]))] = 1.0
    assert torch.equal(fewshot.Run(config, data, split).maml.model[0].mean, standardize.mean)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_each_methods_learning_rate_follows_the_schedule_over_its_own_steps(tmp_path, schedule):
    """--lr-schedule cosine (the default) anneals MAML's and the baseline's Adam rates to zero over their own
    step counts, lr_t = lr (1 + cos(pi t / T)) / 2, written out here; constant leaves them."""
    write_images(tmp_path / "data", {f"k{i}": 4 for i in range(9)})
    options = {"data": str(tmp_path / "data"), "ways": 2, "shots": 1, "query": 1, "meta_steps": 6,
               "meta_lr": 0.01, "quick": True}
    if schedule == "constant":
        options["lr_schedule"] = "constant"
    config = fewshot.config_from_options(options)
    assert config.lr_schedule == schedule
    data, split = fewshot.prepare(config)
    job = fewshot.Run(config, data, split)
    for name, step, next_batch, optimizer, total in (
            ("maml", job.meta_step, lambda: job.tasks.sample(config.meta_batch), job.maml_optimizer, 6),
            ("pretrain", job.pretrain_step, job.next_examples, job.pretrain_optimizer, config.pretrain_steps())):
        before = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
        for t in range(1, total + 1):
            step(next_batch())
            expected = 0.01 * (1 + math.cos(math.pi * t / total)) / 2 if schedule == "cosine" else 0.01
            assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), (name, t)
        after = [p for group in optimizer.param_groups for p in group["params"]]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the steps trained


ERRORS = {  # a case: (what to write into tmp_path, extra options, the words the one-line error must hold)
    "missing": (lambda root: None, [], "DATA {root}/data: no such file or folder"),
    "empty": (lambda root: (root / "data").mkdir(), [], "holds no class folders with images"),
    "short class": (lambda root: write_images(root / "data", {**{f"k{i}": 4 for i in range(9)}, "tiny": 1}),
                    [], "class 'tiny' has 1 example(s), fewer than --shots + --query = 2"),
    "few classes": (lambda root: write_images(root / "data", {f"k{i}": 4 for i in range(5)}), ["--ways", "3"],
                    "split has 1 class(es), fewer than --ways 3"),
    "unreadable": (lambda root: (write_images(root / "data", {f"k{i}": 4 for i in range(9)}),
                                 (root / "data" / "k3" / "9.png").write_bytes(b"not a png")), [],
                   "cannot read image {root}/data/k3/9.png"),
    "lengths": (lambda root: np.savez(root / "data", x=np.zeros((5, 3)), y=np.zeros(4, np.int64)), [],
                "x must be [N, ...] and y [N] with the same N"),
    "nan": (lambda root: np.savez(root / "data", x=np.array([[0.0, np.nan]] * 4), y=np.arange(4)), [],
            "x holds NaN or infinite values (example 0 first)"),
    "conv4 on vectors": (lambda root: np.savez(root / "data", x=np.zeros((40, 3)), y=np.arange(40) % 10),
                         ["--model", "conv4"],
                         "--model conv4 needs images"),
    "bad model": (lambda root: write_images(root / "data", {f"k{i}": 4 for i in range(9)}), ["--model", "mlp:0"],
                  "--model must be conv4 or mlp:H1,H2,..."),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_gets_one_line_and_exit_status_2(tmp_path, capsys, case):
    write, extra, words = ERRORS[case]
    write(tmp_path)
    data = tmp_path / ("data.npz" if case in ("lengths", "nan", "conv4 on vectors") else "data")
    status = run_main(["fewshot", str(data), "--ways", "2", "--shots", "1", "--query", "1", "--quick",
                       "--test-classes", "0.3", "--val-classes", "0.3", "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and words.format(root=tmp_path) in err, err


def test_maml_beats_random_init_and_the_saved_model_reproduces_its_score(tmp_path, capsys):
    """A short run on generated glyphs. The check on model.pt is independent of the run's own evaluation: the
    loaded learner adapts to the test tasks drawn again from the recorded split and must score what results.json
    says."""
    fewshot_data.write_glyphs(tmp_path / "glyphs", classes=40, per_class=8, size=16, seed=1)
    out = tmp_path / "out"
    status = run_main(["fewshot", str(tmp_path / "glyphs"), "--model", "conv4", "--ways", "3", "--query", "3",
                       "--meta-steps", "200", "--test-tasks", "200", "--eval-steps", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0 and "pretrain + fine-tune" in printed
    results = json.loads((out / "results.json").read_text())
    score = {(r["method"], r["inner_steps"]): r for r in results["results"]}
    assert len(score) == 9 and all(r["tasks"] == 200 for r in score.values())
    print({key: round(r["mean"], 3) for key, r in score.items()})
    assert score["maml", 1]["mean"] > score["random_init", 1]["mean"] + 0.1
    split = results["data"]["split"]
    assert not set(split["test"]) & (set(split["train"]) | set(split["validation"]))
    for name in results["figures"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    learner = metalearn_fast.load_fewshot(str(out / "model.pt"))
    data = fewshot_data.load(str(tmp_path / "glyphs"))
    test = data.subset([data.class_names.index(name) for name in learner.saved["split"]["test"]])
    tasks = metalearn_fast.FewShotTasks(test.x, test.y, 3, 1, 3, seed=fewshot.TEST_SEED).sample(200)
    adapted = learner.adapt(tasks.x_support, tasks.y_support, steps=5)
    with torch.no_grad():
        accuracy = (learner.predict(adapted, tasks.x_query).argmax(-1) == tasks.y_query).double().mean()
    assert float(accuracy) == pytest.approx(score["maml", 5]["mean"], abs=1e-9)


def test_the_run_uses_threads_and_restores_the_callers_count(tmp_path, capsys, monkeypatch):
    """--threads: torch's thread count inside training and scoring is the option's (default 1: two threads on
    small matrices collapse on a busy machine), and the caller's count is back afterwards."""
    fewshot_data.write_glyphs(tmp_path / "glyphs", classes=7, per_class=6, size=8, seed=1)
    seen = []
    scored = fewshot.accuracy

    def recording_accuracy(*args):
        seen.append(torch.get_num_threads())
        return scored(*args)

    monkeypatch.setattr(fewshot, "accuracy", recording_accuracy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for extra, expected in (([], 1), (["--threads", "2"], 2)):
            seen.clear()
            assert run_main(["fewshot", str(tmp_path / "glyphs"), "--model", "mlp:8", "--ways", "3", "--query", "1",
                             "--quick", "--out", str(tmp_path / "out"), *extra]) == 0
            assert seen and set(seen) == {expected}
            assert torch.get_num_threads() == 2
            assert f"{expected} thread(s)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def test_tiny_images_keep_two_by_two_feature_maps():
    """The job's conv4 for 8x8 images halves them down to 2x2 only (8 -> 4 -> 2 -> 2 -> 2), and 28x28 keeps the paper's
    stride 2 in every layer."""
    mean, std = torch.zeros(1, 1, 1), torch.ones(1, 1, 1)

    def strides(side):
        model = fewshot.build_model("conv4", (1, side, side), 3, mean, std)
        return [m.stride for m in model if isinstance(m, torch.nn.Conv2d)]

    assert strides(8) == [(2, 2), (2, 2), (1, 1), (1, 1)]
    assert strides(28) == [(2, 2)] * 4


def test_maml_plus_plus_runs_and_its_saved_learner_carries_the_options(tmp_path, capsys):
    fewshot_data.write_glyphs(tmp_path / "glyphs", classes=7, per_class=6, size=8, seed=1)
    out = tmp_path / "out"
    assert run_main(["fewshot", str(tmp_path / "glyphs"), "--model", "mlp:8", "--ways", "3", "--query", "1",
                     "--quick", "--maml++", "--out", str(out)]) == 0
    assert "fewshot: MAML++, 3-way" in capsys.readouterr().out
    learner = metalearn_fast.load_fewshot(str(out / "model.pt"))
    plus = learner.plus
    assert plus is not None and plus.step_inner_lrs is not None and plus.step_norms is not None
    assert plus.taken == 30 and plus.first_order_meta_steps == 10 and plus.anneal_steps == 10  # a third of 30
    saved = torch.load(out / "model.pt", weights_only=True)["maml"]
    for name, value in learner.state_dict().items():
        assert value == saved[name] if name.endswith("_extra_state") else torch.equal(value, saved[name]), name
    assert run_main(["fewshot", str(tmp_path / "glyphs"), "--maml++", "--meta-sgd", "--quick", "--ways", "3",
                     "--out", str(out)]) == 2
    assert "choose one" in capsys.readouterr().err
