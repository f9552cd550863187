"""The few-shot job: N-way K-shot MAML on the user's own classes, against pretrain-then-fine-tune and random init.

The classes of DATA (a folder of class folders of images, or an .npz) are split into meta-train,
meta-validation and meta-test (fewshot_data). The model (the MAML paper's conv4 or its BatchNorm MLP) starts
with a Standardize layer holding the meta-train classes' mean and std, so it takes raw inputs. MAML
meta-trains it with Adam on tasks of meta-train classes; the baseline trains the same network from the same
weights as a classifier over all meta-train classes with the same budget of per-example gradients, then gets a
new head for each test task; the random init is the untrained network. All three adapt to each test task
with the same inner SGD and are scored by query accuracy on the same test tasks of unseen classes, after 0, 1
and N inner steps. ``run`` writes results.json, the figures and model.pt, which ``load`` turns back into a
MAML learner.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import MAML, backend_info
from ..algorithms.maml_plus import job_options
from ..nn import Standardize, batchnorm_mlp, conv4
from ..tasks import FewShotTasks, TaskBatch
from . import fewshot_data, options, runs
from .fewshot_data import Dataset

TEST_SEED = 2017  # fixed whatever --seed is: the test tasks depend on the split only
VALIDATION_SEED = 2018
VALIDATION_POINTS = 10  # validation checkpoints along training
EVAL_CHUNK = 50  # test tasks adapted at once
FIGURE_TASKS = 3
METHOD_NAMES = {"maml": "MAML", "pretrained": "pretrain + fine-tune", "random_init": "random init"}


@dataclasses.dataclass
class Config:
    """Everything a run depends on (model.pt and results.json keep it)."""

    data: str = ""
    ways: int = 5
    shots: int = 1
    query: int = 5
    meta_batch: int = 8
    meta_steps: int = 600
    inner_steps: int = 1
    inner_lr: float = 0.4
    meta_lr: float = 1e-3
    lr_schedule: str = "cosine"
    first_order: bool = False
    meta_sgd: bool = False
    maml_plus: bool = False
    anil: bool = False
    model: Optional[str] = None  # conv4 for images, mlp:256,128,64,64 for vectors
    channels: Optional[int] = None
    image_size: Optional[list] = None
    test_classes: object = None  # None: fewshot_data.default_counts
    val_classes: object = None
    test_tasks: int = 600
    validation_tasks: int = 100
    eval_steps: int = 10
    finetune: str = "head"
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    quick: bool = False

    def pretrain_batch(self) -> int:
        """Examples per pretraining step: those of one meta-batch's tasks."""
        return self.meta_batch * self.ways * (self.shots + self.query)

    def pretrain_steps(self) -> int:
        """The pretraining steps that compute as many per-example gradients as meta-training: a meta-step
        differentiates each task's ways*shots support examples at each inner step and its ways*query query
        examples once."""
        per_meta_step = self.meta_batch * self.ways * (self.inner_steps * self.shots + self.query)
        return max(1, round(self.meta_steps * per_meta_step / self.pretrain_batch()))


def _image_size(text: str) -> list:
    height, _, width = text.partition("x")
    return [options.positive_int(height), options.positive_int(width or height)]


OPTIONS = [  # flag, type (None: a switch), default, help
    ("--ways", options.positive_int, 5, "classes per task (default 5)"),
    ("--shots", options.positive_int, 1, "support examples per class (default 1)"),
    ("--query", options.positive_int, 5, "query examples per class (default 5)"),
    ("--meta-batch", options.positive_int, 8, "tasks per meta-step (default 8)"),
    ("--meta-steps", options.positive_int, None, "meta-training steps (default 600, 30 with --quick)"),
    ("--inner-steps", options.positive_int, 1, "inner SGD steps during meta-training (default 1)"),
    ("--inner-lr", options.positive_float, 0.4, "inner SGD learning rate, for every method (default 0.4)"),
    ("--meta-lr", options.positive_float, 1e-3, "Adam learning rate of meta-training and pretraining (default 0.001)"),
    ("--lr-schedule", options.choice("cosine", "constant"), "cosine", "that learning rate over training: cosine "
     "annealing to zero (torch's CosineAnnealingLR, the last weights are then not a noisy late step's) or constant "
     "(default cosine)"),
    ("--first-order", None, False, "first-order MAML (no second derivatives)"),
    ("--meta-sgd", None, False, "Meta-SGD: also learn one inner rate per weight"),
    ("--anil", None, False, "ANIL: the inner loop adapts the last layer only"),
    options.MAML_PLUS,
    ("--model", str, None, "conv4 (images: 4 x [conv 3x3, 64, stride 2, BatchNorm, ReLU]) or mlp:H1,H2,... "
     "(Linear-BatchNorm-ReLU layers of those widths) (default: conv4 for images, the paper's mlp:256,128,64,64 for "
     "vectors)"),
    ("--channels", options.choice("1", "3"), None, "images as 1 (grayscale) or 3 (RGB) channels (default: as the "
     "first image is)"),
    ("--image-size", _image_size, None, "resize images to N or HxW pixels (default: the first image's size)"),
    ("--test-classes", fewshot_data.parse_classes, None, "meta-test classes: a count, a fraction of the classes or "
     "a comma-separated list of class names (default: a fifth of the classes, at least --ways)"),
    ("--val-classes", fewshot_data.parse_classes, None, "meta-validation classes, the same way; 0 for none "
     "(default: a tenth of the classes, at least --ways; none when meta-training would keep fewer than 2 x --ways "
     "classes)"),
    ("--test-tasks", options.positive_int, None, "test tasks scored (default 600, 100 with --quick)"),
    ("--eval-steps", options.positive_int, 10, "N of the table: inner steps after which every method is scored, "
     "besides 0 and --inner-steps (default 10)"),
    ("--finetune", options.choice("head", "all"), "head", "what the pretrained baseline fine-tunes on a test task: "
     "its new head, or all layers (default head)"),
    ("--seed", options.non_negative_int, 0, "seed of the class split, the weights and the training tasks"),
    ("--device", str, "cpu", "cpu, cuda, cuda:N or mps (default cpu)"),
    options.THREADS,
    ("--out", str, "fewshot-results", "folder for results.json, the figures and model.pt (default fewshot-results)"),
    ("--quick", None, False, "a run of seconds: few meta-steps and test tasks"),
]
QUICK = {"meta_steps": 30, "test_tasks": 100, "validation_tasks": 20}  # what --quick changes


def config_from_options(values: dict) -> Config:
    """A run's configuration from the command line's options (None: the default, or --quick's); UsageError for
    options that cannot work."""
    values = options.given(values, QUICK)
    if "channels" in values:
        values["channels"] = int(values["channels"])
    config = Config(**values)
    config.device = runs.check_device(config.device)
    if config.model is not None:
        model_spec(config.model)
    options.check_variant(config.meta_sgd, config.maml_plus)
    if config.test_tasks < 2:
        raise runs.UsageError(f"--test-tasks must be at least 2 (for the 95% interval), got {config.test_tasks}")
    return config


def model_spec(text: str) -> Optional[list]:
    """--model as None (conv4) or the MLP's hidden widths; UsageError otherwise."""
    if text == "conv4":
        return None
    kind, _, widths = text.partition(":")
    try:
        hidden = [int(w) for w in widths.split(",")]
    except ValueError:
        hidden = []
    if kind != "mlp" or not hidden or min(hidden) < 1:
        raise runs.UsageError(f"--model must be conv4 or mlp:H1,H2,... with positive widths, got {text!r}")
    return hidden


def build_model(spec: str, input_shape, outputs: int, mean: Tensor, std: Tensor) -> nn.Sequential:
    """The network of --model for inputs of ``input_shape`` (one example's), standardized by mean and std first."""
    hidden = model_spec(spec)
    if hidden is None:
        body = list(conv4(input_shape[0], outputs, image_size=input_shape[1:]))
    else:
        body = [nn.Flatten(), *batchnorm_mlp([math.prod(input_shape), *hidden, outputs])]
    return nn.Sequential(Standardize(mean, std), *body)


def statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of images [N, C, H, W] ([C, 1, 1] each), one mean and std for vectors."""
    dims = (0, 2, 3) if x.dim() == 4 else tuple(range(x.dim()))
    mean, std = x.mean(dims, keepdim=True)[0], x.std(dims, keepdim=True)[0]
    return mean, std.clamp_min(1e-6)


def prepare(config: Config) -> tuple[Dataset, dict]:
    """DATA loaded and its classes split; UsageError for data the job cannot use."""
    data = fewshot_data.load(config.data, config.channels, config.image_size)
    split = fewshot_data.split_classes(data.class_names, config.test_classes, config.val_classes, config.seed,
                                       config.ways)
    fewshot_data.check_split(data, split, config.ways, config.shots + config.query)
    if data.is_image:
        config.channels, config.image_size = data.x.shape[1], list(data.x.shape[2:])
    if config.model is None:
        config.model = "conv4" if data.is_image else "mlp:256,128,64,64"
    if model_spec(config.model) is None and not data.is_image:
        raise runs.UsageError(f"--model conv4 needs images, but DATA holds vectors of {data.x.shape[1]} numbers")
    return data, split


def _learner(model: nn.Module, config: Config, **kwargs) -> MAML:
    return MAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps, loss="cross_entropy", **kwargs)


def _meta_learner(model: nn.Module, config: Config) -> MAML:
    """The meta-learner the run trains (and load rebuilds): MAML with the variant's options."""
    plus = job_options(config.meta_steps, batchnorm=True) if config.maml_plus else {}
    return _learner(model, config, first_order=config.first_order, learn_inner_lr=config.meta_sgd,
                    adapt_head_only=config.anil, **plus)


def _with_new_head(model: nn.Sequential, ways: int) -> nn.Sequential:
    """A copy of ``model`` whose last Linear is a new one of ``ways`` outputs, all zero (every class equally
    likely until fine-tuned)."""
    model = copy.deepcopy(model)
    head = nn.Linear(model[-1].in_features, ways, device=model[-1].weight.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model[-1] = head
    return model


class Run:
    """One run's models, optimizers, task streams and training progress."""

    def __init__(self, config: Config, data: Dataset, split: dict) -> None:
        self.config, self.device = config, torch.device(config.device)
        self.sets = {name: data.subset(classes) for name, classes in split.items()}
        train = self.sets["train"]
        torch.manual_seed(config.seed)
        self.mean, self.std = statistics(train.x)  # the meta-train classes' only
        self.start_model = build_model(config.model, train.x.shape[1:], config.ways, self.mean, self.std).to(self.device)
        self.maml = _meta_learner(copy.deepcopy(self.start_model), config)
        self.pretrained = copy.deepcopy(self.start_model)  # a classifier over every meta-train class
        self.pretrained[-1] = nn.Linear(self.pretrained[-1].in_features, len(train.class_names), device=self.device)
        self.maml_optimizer = torch.optim.Adam(self.maml.parameters(), lr=config.meta_lr)
        self.pretrain_optimizer = torch.optim.Adam(self.pretrained.parameters(), lr=config.meta_lr)
        # --lr-schedule cosine: each method's Adam learning rate annealed to zero over its own steps
        phases = (("maml", self.maml_optimizer, config.meta_steps),
                  ("pretrain", self.pretrain_optimizer, config.pretrain_steps()))
        self.schedulers = {name: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
                           for name, optimizer, steps in phases} if config.lr_schedule == "cosine" else {}
        self.train_x, self.train_y = train.x.to(self.device), train.y.to(self.device)
        self.tasks = FewShotTasks(self.train_x, train.y, config.ways, config.shots, config.query, seed=config.seed)
        self.examples = torch.Generator().manual_seed(config.seed)
        self.phases = {"maml": runs.Phase.start(config.meta_steps, self.device),
                       "pretrain": runs.Phase.start(config.pretrain_steps(), self.device)}

    def split_names(self) -> dict:
        """{"train", "validation", "test"}: the names of each split's classes."""
        return {name: subset.class_names for name, subset in self.sets.items()}

    def learners(self) -> dict:
        """Each method as a MAML learner whose adapt() is its fine-tuning on a test task."""
        config = self.config
        return {"maml": self.maml,
                "pretrained": _learner(_with_new_head(self.pretrained, config.ways), config,
                                       adapt_head_only=config.finetune == "head"),
                "random_init": _learner(self.start_model, config)}

    def meta_step(self, batch: TaskBatch) -> Tensor:
        loss = self.maml.meta_step(batch, self.maml_optimizer)
        self._scheduled("maml")
        return loss

    def pretrain_step(self, index: Tensor) -> Tensor:
        optimizer = self.pretrain_optimizer
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.pretrained(self.train_x[index]), self.train_y[index])
        loss.backward()
        optimizer.step()
        self._scheduled("pretrain")
        return loss.detach()

    def _scheduled(self, phase: str) -> None:
        if phase in self.schedulers:
            self.schedulers[phase].step()

    def next_examples(self) -> Tensor:
        count = len(self.train_y)
        return torch.randint(count, (self.config.pretrain_batch(),), generator=self.examples).to(self.device)


def accuracy(learner: MAML, tasks: TaskBatch, steps: int) -> Tensor:
    """Each task's query accuracy after ``steps`` inner steps on its support set: [T], float64 on the CPU."""
    scores = []
    for chunk in tasks.chunks(EVAL_CHUNK):
        adapted = learner.adapt(chunk.x_support, chunk.y_support, steps=steps)
        with torch.no_grad():
            predicted = learner.predict(adapted, chunk.x_query).argmax(-1)
        scores.append((predicted == chunk.y_query).double().mean(1).cpu())
    return torch.cat(scores)


def sample_tasks(data: Dataset, config: Config, count: int, seed: int) -> TaskBatch:
    """``count`` tasks of the run's shape (ways, shots, query) from ``data``'s classes, drawn with ``seed``."""
    return FewShotTasks(data.x, data.y, config.ways, config.shots, config.query, seed=seed).sample(
        count, device=config.device)


def run(config: Config, data: Dataset, split: dict, out: Path, command: Optional[list] = None) -> dict:
    """Trains, evaluates, writes results.json, the figures and model.pt into ``out``; returns the results."""
    with runs.threads(config.threads):
        return _run(config, data, split, out, command)


def _run(config: Config, data: Dataset, split: dict, out: Path, command: Optional[list]) -> dict:
    started = time.perf_counter()
    job = Run(config, data, split)
    validating = bool(split["validation"])
    validation_tasks = sample_tasks(job.sets["validation"], config, config.validation_tasks, VALIDATION_SEED) \
        if validating else None
    learners = job.learners
    models = {"maml": job.maml, "pretrained": job.pretrained}  # the trained methods
    best = {}  # method: (validation accuracy, state_dict) of its best checkpoint

    def validate(method: str):  # the method's mean accuracy on the validation tasks after the trained inner steps
        def score() -> float:
            value = float(accuracy(learners()[method], validation_tasks, config.inner_steps).mean())
            if method in models and value > best.get(method, (-1.0,))[0]:
                best[method] = (value, copy.deepcopy(models[method].state_dict()))
            return value

        return score if validating else None

    for name, method, step, next_batch, desc, label in (
        ("maml", "maml", job.meta_step,
         lambda: job.tasks.sample(config.meta_batch), "meta-training MAML", "meta-loss"),
        ("pretrain", "pretrained", job.pretrain_step, job.next_examples, "pretraining the baseline", "loss"),
    ):
        phase = job.phases[name]
        runs.train(phase, runs.each(step, runs.one_at_a_time(next_batch)), validate=validate(method), desc=desc,
                   label=label, validate_after=runs.validation_steps(phase.steps, VALIDATION_POINTS),
                   log_every=max(1, phase.steps // 100), x_per_step=config.meta_steps / phase.steps)
    for method, model in models.items():  # each method is scored at its best validation checkpoint
        if method in best:
            model.load_state_dict(best[method][1])
    random_init_validation = validate("random_init")() if validating else None

    evaluation_started = time.perf_counter()
    test = sample_tasks(job.sets["test"], config, config.test_tasks, TEST_SEED)
    rows, adapted = evaluate(learners(), test, config)
    evaluation_seconds = time.perf_counter() - evaluation_started
    figures = {"learning_curve": "fewshot_learning_curve.png"}
    plot_learning_curve(job, random_init_validation, config, out / figures["learning_curve"])
    if data.is_image:
        figures["tasks"] = "fewshot_tasks.png"
        plot_tasks(test, adapted, config, out / figures["tasks"])
    save(job, out / "model.pt")
    maml_phase, pretrain_phase = job.phases["maml"], job.phases["pretrain"]
    results = {
        "config": dataclasses.asdict(config),
        "backend": backend_info()["active"],
        "torch": torch.__version__,
        "data": {"examples": len(data.y), "classes": len(data.class_names), "input_shape": list(data.x.shape[1:]),
                 "split": job.split_names(),
                 "mean": job.mean.flatten().tolist(), "std": job.std.flatten().tolist()},
        "seconds": {"total": time.perf_counter() - started, "maml": maml_phase.seconds,
                    "pretrain": pretrain_phase.seconds, "evaluation": evaluation_seconds},
        "ms_per_meta_step": 1000 * maml_phase.seconds / config.meta_steps,
        "budget": {"maml_meta_steps": config.meta_steps, "pretrain_steps": pretrain_phase.steps,
                   "pretrain_batch": config.pretrain_batch()},
        "validation": {"tasks": config.validation_tasks if validating else 0, "inner_steps": config.inner_steps,
                       "best": {method: value for method, (value, _) in best.items()},
                       "untrained": untrained_choices(job),
                       "maml": maml_phase.validation, "pretrained": pretrain_phase.validation,
                       "random_init": random_init_validation},
        "training_loss": {name: phase.losses.cpu().tolist() for name, phase in job.phases.items()},
        "results": rows,
        "figures": figures,
        "command": command,
    }
    runs.write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    return results


def table_steps(config: Config) -> list:
    """The table's inner-step counts: none, the count MAML is meta-trained for, and --eval-steps."""
    return sorted({0, config.inner_steps, config.eval_steps})


def chosen_checkpoint(points: list) -> tuple:
    """The validation point (x, accuracy) whose weights the test table scores: the first best."""
    return max(points, key=lambda p: p[1])


def untrained_choices(job: Run) -> list:
    """The trained methods whose best validation checkpoint is their initial weights (training did not help)."""
    names = {"maml": "maml", "pretrain": "pretrained"}
    return [names[name] for name, phase in job.phases.items()
            if phase.validation and chosen_checkpoint(phase.validation)[0] == 0]


def evaluate(learners: dict, test: TaskBatch, config: Config) -> tuple[list, dict]:
    """Rows {method, inner_steps, mean, ci95, tasks} of query accuracy on the test tasks, and each method's
    predictions after N steps on the first tasks (for the figure)."""
    rows, shown = [], {}
    with runs.progress_bar(total=len(table_steps(config)) * len(learners), desc="scoring on test tasks",
                           unit="column") as bar:
        for method, learner in learners.items():
            for steps in table_steps(config):
                scores = accuracy(learner, test, steps)
                ci95 = 1.96 * float(scores.std()) / math.sqrt(len(scores))  # normal approximation over tasks
                rows.append({"method": method, "inner_steps": steps, "mean": float(scores.mean()), "ci95": ci95,
                             "tasks": len(scores)})
                bar.update()
            first = test.select(0, min(FIGURE_TASKS, test.num_tasks))
            with torch.no_grad():
                shown[method] = learner.predict(learner.adapt(first.x_support, first.y_support,
                                                              steps=config.eval_steps), first.x_query).argmax(-1)
    return rows, shown


def save(job: Run, path: Path) -> None:
    """model.pt: the meta-trained learner's state and what rebuilds it (``load``)."""
    state = {"job": "fewshot", "config": dataclasses.asdict(job.config),
             "input_shape": list(job.sets["train"].x.shape[1:]), "split": job.split_names(),
             "maml": {name: value.cpu() if isinstance(value, Tensor) else value  # MAML++'s count is an int
                      for name, value in job.maml.state_dict().items()}}
    runs.write_atomically(path, lambda partial: torch.save(state, partial))


def load(path: str, device: str = "cpu") -> MAML:
    """The MAML learner a ``metalearn-fast fewshot`` run saved in ``path`` (its model.pt), on ``device``.

    Its model takes raw inputs as the job read them ([T, K, C, H, W] images with values in [0, 1], see
    ``fewshot_data.load_images``), standardized inside by the meta-train classes' statistics. ``adapt(x_support,
    y_support, steps)`` then ``predict(adapted, x_query)`` classify a new task's examples (labels 0..ways-1);
    predict the query set as one batch: BatchNorm uses its statistics, as in training. ``learner.saved`` holds
    the run's config, input shape and class split."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("job") != "fewshot":
        raise ValueError(f"{path} is not a model.pt of metalearn-fast fewshot")
    config = Config(**state["config"])
    shape = state["input_shape"]
    ones = torch.ones(shape[0] if len(shape) == 3 else 1, *([1, 1] if len(shape) == 3 else []))
    model = build_model(config.model, shape, config.ways, ones, ones)
    learner = _meta_learner(model, config)
    learner.load_state_dict(state["maml"])
    learner.saved = {key: state[key] for key in ("config", "input_shape", "split")}
    return learner.to(device)


def format_table(rows: list, config: Config) -> str:
    """The results as aligned text: one line per method, one column per inner-step count."""
    cell = {(r["method"], r["inner_steps"]): r for r in rows}
    steps = table_steps(config)
    headers = ["method"] + [f"{n} step{'s' if n != 1 else ''}" for n in steps]
    lines = [[METHOD_NAMES[method]] + [f"{100 * cell[method, n]['mean']:.1f} ± {100 * cell[method, n]['ci95']:.1f}%"
                                      for n in steps] for method in METHOD_NAMES]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

    def render(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([render(headers), "-" * len(render(headers))] + [render(line) for line in lines])


def introduction(config: Config, data: Dataset, split: dict) -> str:
    variant = options.variant_name(config.first_order, config.meta_sgd, config.maml_plus)
    variant += " (ANIL)" if config.anil else ""
    shape = "x".join(map(str, data.x.shape[1:]))
    sizes = ", ".join(f"{len(split[name])} meta-{name}" for name in ("train", "validation", "test"))
    if not split["validation"]:
        sizes += " (too few classes to spare --ways of them for meta-validation: validation is skipped, the last " \
                 "weights are scored)"
    schedule = " (cosine-annealed)" if config.lr_schedule == "cosine" else ""
    return (f"metalearn-fast fewshot: {variant}, {config.ways}-way {config.shots}-shot ({config.query} query per class) "
            f"on {config.data}\n{len(data.y)} examples ({shape}) of {len(data.class_names)} classes: {sizes}; "
            f"model {config.model}, {config.inner_steps} inner step(s) of SGD lr {config.inner_lr}, Adam lr "
            f"{config.meta_lr}{schedule}, {config.meta_batch} tasks per meta-batch, {config.meta_steps} meta-steps; "
            f"backend {backend_info()['active']}, device {config.device}"
            f"{'' if config.device != 'cpu' else f', {config.threads} thread(s)'}, seed {config.seed}")


def summary(results: dict, config: Config) -> str:
    seconds, budget = results["seconds"], results["budget"]
    cell = {(r["method"], r["inner_steps"]): r["mean"] for r in results["results"]}
    n, trained = config.eval_steps, config.inner_steps
    counts = ", ".join(map(str, table_steps(config)))
    lines = [
        "",
        f"meta-training: {config.meta_steps} meta-steps in {seconds['maml']:.1f} s ({results['ms_per_meta_step']:.1f} "
        f"ms per meta-step of {config.meta_batch} tasks)",
        f"pretrained baseline: {budget['pretrain_steps']} Adam steps of {budget['pretrain_batch']} examples over all "
        f"meta-train classes in {seconds['pretrain']:.1f} s (the same number of per-example gradients), then a new "
        f"head fine-tuned ({config.finetune}) on each test task",
        "",
        f"query accuracy on {config.test_tasks} test tasks of unseen classes (mean ± 95% interval) after {counts} "
        f"inner SGD steps on {config.shots} example(s) per class, lr {config.inner_lr}:",
        format_table(results["results"], config),
        "",
    ]
    validation = results["validation"]
    if not validation["tasks"]:
        lines.append("no meta-validation classes: each method was scored with its last weights")
    for method in validation["untrained"]:
        lines.append(f"{METHOD_NAMES[method]}: its best meta-validation checkpoint is its initial weights (training "
                     "did not raise validation accuracy): its row is the untrained network")
    if "maml" in validation["untrained"]:
        return "\n".join(lines)
    lines.append(
        f"after {trained} step{'s' if trained != 1 else ''} (what MAML is meta-trained for) MAML is "
        f"{100 * (cell['maml', trained] - cell['pretrained', trained]):+.1f} points against pretrain + fine-tune and "
        f"{100 * (cell['maml', trained] - cell['random_init', trained]):+.1f} against a random init; after {n}: "
        f"{100 * (cell['maml', n] - cell['pretrained', n]):+.1f} and {100 * (cell['maml', n] - cell['random_init', n]):+.1f}")
    return "\n".join(lines)


def plot_learning_curve(job: Run, random_init_accuracy: float, config: Config, path: Path) -> None:
    """Left: the training losses against the budget spent; right: validation accuracy at checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, method, color in (("maml", "maml", "tab:blue"), ("pretrain", "pretrained", "tab:orange")):
        phase = job.phases[name]
        every = max(1, phase.steps // 100)
        losses = phase.losses.cpu()[: phase.steps // every * every].view(-1, every).mean(1)
        x_axis = (torch.arange(len(losses)) + 1) * every * config.meta_steps / phase.steps
        label = "MAML meta-loss (query loss after adaptation)" if name == "maml" else "pretraining loss"
        left.plot(x_axis.tolist(), losses.tolist(), color=color, label=label)
        points = phase.validation
        if not points:  # no validation classes
            continue
        right.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", markersize=3.5, color=color,
                   label=METHOD_NAMES[method])
        chosen = chosen_checkpoint(points)  # the checkpoint the test table scores
        right.plot([chosen[0]], [100 * chosen[1]], marker="*", markersize=14, color=color, linestyle="none")
    if random_init_accuracy is not None:
        right.axhline(100 * random_init_accuracy, color="tab:gray", linestyle="--", label="random init")
    right.axhline(100 / config.ways, color="black", linestyle=":", linewidth=1, label="chance")
    left.set(xlabel="training budget spent (MAML meta-steps)", ylabel="cross-entropy", title="Training losses")
    right.set(xlabel="training budget spent (MAML meta-steps)", ylabel="query accuracy (%)",
              title=f"Meta-validation: {config.validation_tasks} tasks, {config.inner_steps} inner step(s) (★ tested)"
              if random_init_accuracy is not None else "No meta-validation classes: the last weights are tested")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    figure.suptitle(f"{config.ways}-way {config.shots}-shot on {Path(config.data).name}: MAML vs pretraining, "
                    "same gradient budget", fontsize=13)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    runs.save_figure(figure, path)


def plot_tasks(test: TaskBatch, predicted: dict, config: Config, path: Path) -> None:
    """A few test tasks: the support images with their classes, then query images with MAML's prediction after
    N steps (green: right, red: wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = len(predicted["maml"])
    support, shown_query = config.ways * config.shots, min(config.ways * config.query, 2 * config.ways)
    columns = support + shown_query
    figure, axes = plt.subplots(tasks, columns, figsize=(1.3 * columns, 1.6 * tasks), squeeze=False)
    query_index = torch.linspace(0, config.ways * config.query - 1, shown_query).round().long()
    for row in range(tasks):
        images = torch.cat([test.x_support[row], test.x_query[row, query_index]]).cpu()
        for col, ax in enumerate(axes[row]):
            image = images[col].permute(1, 2, 0)
            image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-6)
            ax.imshow(image.squeeze(-1).numpy() if image.shape[-1] == 1 else image.numpy(), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if col < support:
                ax.set_title(f"class {int(test.y_support[row, col])}", fontsize=8)
            else:
                q = query_index[col - support]
                guess, truth = int(predicted["maml"][row, q]), int(test.y_query[row, q])
                ax.set_title(f"→ {guess}", fontsize=8, color="tab:green" if guess == truth else "tab:red")
        axes[row, 0].set_ylabel(f"task {row + 1}", fontsize=9)
    figure.suptitle(f"Test tasks (unseen classes): {support} support images, then query images with MAML's "
                    f"prediction after {config.eval_steps} steps", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    runs.save_figure(figure, path)
