"""The few-shot job's data: a folder of class folders of images, or an .npz of arrays; the class split;
and a generated set of handwritten-like glyphs to try it on without a download.

``load`` gives every example as float32 ([N, C, H, W] images with values in [0, 1], or [N, D] vectors) with
an int64 label per example and the class names; ``split_classes`` shares the classes out between meta-train,
meta-validation and meta-test by a seeded shuffle, so no class is in two splits. What cannot be loaded is a
UsageError naming the file, the class or the array.
"""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .runs import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F", "P")


@dataclasses.dataclass
class Dataset:
    """x: [N, C, H, W] images (values in [0, 1]) or [N, D] vectors, float32; y: [N] int64 indices into
    class_names."""

    x: Tensor
    y: Tensor
    class_names: list
    is_image: bool

    def subset(self, classes: Sequence[int]) -> "Dataset":
        """The examples of ``classes`` (indices into class_names), relabelled 0..len(classes)-1 in that order."""
        mapping = torch.full((len(self.class_names),), -1, dtype=torch.int64)
        mapping[torch.as_tensor(list(classes), dtype=torch.int64)] = torch.arange(len(classes))
        keep = mapping[self.y] >= 0
        return Dataset(self.x[keep], mapping[self.y[keep]], [self.class_names[c] for c in classes], self.is_image)


def load(path: str, channels: Optional[int] = None, image_size: Optional[tuple] = None) -> Dataset:
    """DATA as the few-shot job reads it: an .npz file with arrays x [N, ...] and y [N], or a folder whose
    subfolders (at any depth) holding image files are the classes, named by their path inside it."""
    source = Path(path)
    if not source.exists():
        raise UsageError(f"DATA {path}: no such file or folder")
    if source.is_file():
        if source.suffix.lower() != ".npz":
            raise UsageError(f"DATA {path}: expected a folder of class folders or an .npz file")
        return _load_npz(source, channels, image_size)
    return _load_folder(source, channels, image_size)


def _load_npz(path: Path, channels: Optional[int], image_size: Optional[tuple]) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [name for name in ("x", "y") if name not in arrays.files]
            if missing:
                raise UsageError(f"DATA {path}: no array {missing[0]!r} (it holds {', '.join(arrays.files) or 'none'})")
            x, y = arrays["x"], arrays["y"]
    except UsageError:
        raise
    except Exception as error:  # not a zip, a pickled object array, a damaged file
        raise UsageError(f"DATA {path}: cannot read it as .npz ({type(error).__name__}: {error})") from None
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise UsageError(f"DATA {path}: x must be [N, ...] and y [N] with the same N, got x {list(x.shape)} and "
                         f"y {list(y.shape)}")
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise UsageError(f"DATA {path}: x must hold real numbers, got dtype {x.dtype}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype.kind in "US"):
        raise UsageError(f"DATA {path}: y must hold integer or string labels, got dtype {y.dtype}")
    x = torch.from_numpy(np.asarray(x, dtype=np.float32))
    bad = ~torch.isfinite(x.flatten(1)).all(1)
    if bad.any():
        raise UsageError(f"DATA {path}: x holds NaN or infinite values (example {int(bad.nonzero()[0])} first)")
    names, y = np.unique(y, return_inverse=True)
    x, is_image = _as_images(x, channels, path)
    if image_size is not None:
        if not is_image:
            raise UsageError(f"--image-size: DATA {path} holds vectors (x is [N, D]), not images")
        x = torch.nn.functional.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False)
    return Dataset(x, torch.from_numpy(y.reshape(-1).astype(np.int64)), [str(n) for n in names], is_image)


def _as_images(x: Tensor, channels: Optional[int], path: Path) -> tuple[Tensor, bool]:
    """[N, H, W] and [N, H, W, C] / [N, C, H, W] (C of 1 or 3) as [N, C, H, W] images; [N, D] as vectors."""
    if x.dim() == 2:
        if channels is not None:
            raise UsageError(f"--channels {channels}: DATA {path} holds vectors (x is [N, D]), not images")
        return x, False
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2).contiguous()
    elif x.dim() != 4 or x.shape[1] not in (1, 3):
        raise UsageError(f"DATA {path}: x must be [N, D] vectors or [N, H, W], [N, H, W, C] or [N, C, H, W] images "
                         f"with C = 1 or 3, got {list(x.shape)}")
    if channels is not None and channels != x.shape[1]:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, 3, -1, -1).contiguous()
    return x, True


def _class_folders(root: Path) -> list[tuple[str, list[Path]]]:
    """(name, image files) of every folder under ``root`` that holds image files, sorted by name."""
    found = []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            found.append((folder.relative_to(root).as_posix(), files))
    return found


def _load_folder(root: Path, channels: Optional[int], image_size: Optional[tuple]) -> Dataset:
    classes = _class_folders(root)
    if not classes or classes[0][0] == ".":
        what = "holds no class folders with images" if not classes else "holds images itself, not class folders"
        raise UsageError(f"DATA {root}: {what} (expected {root}/CLASS/IMAGE, with IMAGE one of "
                         f"{', '.join(IMAGE_SUFFIXES)})")
    first = _open_image(classes[0][1][0])
    if channels is None:
        channels = 1 if first.mode in GRAYSCALE_MODES else 3
    if image_size is None:
        image_size = (first.height, first.width)
    images, labels = [], []
    for label, (_, files) in enumerate(classes):
        for file in files:
            images.append(image_array(_open_image(file), channels, image_size))
            labels.append(label)
    x = torch.from_numpy(np.stack(images))
    return Dataset(x, torch.tensor(labels, dtype=torch.int64), [name for name, _ in classes], True)


def _open_image(file: Path):
    from PIL import Image

    try:
        with Image.open(file) as image:
            image.load()
            return image
    except Exception as error:  # PIL raises several kinds for a damaged or foreign file
        raise UsageError(f"cannot read image {file} ({type(error).__name__}: {error})") from None


def image_array(image, channels: int, image_size: tuple) -> np.ndarray:
    """A Pillow image as the job's input: [channels, H, W] float32 in [0, 1], resized to image_size (H, W)."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    height, width = image_size
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()


def load_images(files: Sequence[str], channels: int, image_size: tuple) -> Tensor:
    """Image files as a model saved by the few-shot job takes them: [N, channels, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.stack([image_array(_open_image(Path(f)), channels, image_size) for f in files]))


def parse_classes(text: str) -> object:
    """--test-classes / --val-classes: a count of classes (an integer, 0 for none), a fraction in (0, 1) of the
    classes, or a comma-separated list of names."""
    if text.strip().isdigit():
        return int(text)
    try:
        fraction = float(text)
    except ValueError:
        return [name.strip() for name in text.split(",") if name.strip()]
    if not 0 < fraction < 1:
        raise ValueError(f"must be a count, a fraction between 0 and 1 or a list of class names, got {text!r}")
    return fraction


DEFAULT_FRACTIONS = {"test": 0.2, "validation": 0.1}


def default_counts(classes: int, ways: int) -> dict:
    """{"test", "validation"}: the default split's class counts: a fifth and a tenth of the classes, at least
    ``ways`` each. Validation classes are taken only where meta-training keeps at least twice ``ways`` classes
    after them; else none (the caller skips validation): on small data the classes MAML meta-trains on count for
    more than checkpoint selection (digits, 10 classes, 3-way: meta-training on 4 classes instead of 7 cost MAML
    3 points of test accuracy after its trained step, measured)."""
    test = max(ways, round(DEFAULT_FRACTIONS["test"] * classes))
    validation = max(ways, round(DEFAULT_FRACTIONS["validation"] * classes))
    if classes - test - validation < 2 * ways:
        validation = 0
    return {"test": test, "validation": validation}


def split_classes(names: Sequence[str], test, validation, seed: int, ways: int = 1) -> dict:
    """{"train", "validation", "test"}: lists of class indices. ``test`` and ``validation`` are counts of classes,
    fractions of the classes (at least one class each), lists of class names, or None for the default
    (default_counts for ``ways``-way tasks); the classes left train. Drawn by a shuffle seeded with ``seed``, so a
    seed gives the same split on every machine."""
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    index = {name: i for i, name in enumerate(names)}
    defaults = default_counts(len(names), ways)
    split, taken = {}, set()
    for name, spec, flag in (("test", test, "--test-classes"), ("validation", validation, "--val-classes")):
        if spec is None:
            spec = defaults[name]
        if isinstance(spec, (int, float)):
            count = spec if isinstance(spec, int) else max(1, round(spec * len(names)))
            split[name] = [c for c in order if c not in taken][:count]
        else:
            unknown = [n for n in spec if n not in index]
            if unknown:
                raise UsageError(f"{flag}: no class named {unknown[0]!r} in DATA")
            split[name] = [index[n] for n in spec]
            clash = taken.intersection(split[name])
            if clash:
                raise UsageError(f"{flag}: class {names[min(clash)]!r} is in --test-classes too")
        taken.update(split[name])
    split["train"] = [c for c in order if c not in taken]
    return split


def check_split(dataset: Dataset, split: dict, ways: int, needed: int) -> None:
    """UsageError unless every split has at least ``ways`` classes, each with at least ``needed`` examples."""
    counts = torch.bincount(dataset.y, minlength=len(dataset.class_names))
    for name in ("train", "validation", "test"):
        classes = split[name]
        if name == "validation" and not classes:  # no validation: each method keeps its last weights
            continue
        if len(classes) < ways:
            raise UsageError(f"the meta-{name} split has {len(classes)} class(es), fewer than --ways {ways}: "
                             f"DATA has {len(dataset.class_names)} classes (change --ways, --test-classes or "
                             "--val-classes)")
        short = [c for c in classes if counts[c] < needed]
        if short:
            c = short[0]
            raise UsageError(f"class {dataset.class_names[c]!r} has {int(counts[c])} example(s), fewer than --shots + "
                             f"--query = {needed}")


# ---- glyphs: a generated stand-in for handwritten characters ----

def write_glyphs(folder: str, classes: int = 100, per_class: int = 20, size: int = 28, seed: int = 0) -> Path:
    """Writes ``classes`` folders of ``per_class`` PNG images (size x size, white strokes on black): each class
    is a character of two to four random pen strokes, each example of it drawn by another hand (the strokes
    rotated, scaled, shifted, bent and of another width). Returns the folder."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root = Path(folder)
    scale = 4  # drawn at 4x and downsampled: smooth strokes
    for c in range(classes):
        strokes = rng.uniform(0.2, 0.8, size=(rng.integers(2, 5), 3, 2))  # quadratic Bezier control points
        (root / f"glyph{c:03d}").mkdir(parents=True, exist_ok=True)
        for e in range(per_class):
            angle, zoom = rng.normal(0, 0.2), rng.uniform(0.8, 1.1)
            rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) * zoom
            shift = rng.normal(0, 0.05, size=2)
            image = Image.new("L", (size * scale, size * scale))
            draw = ImageDraw.Draw(image)
            width = int(rng.uniform(1.2, 2.4) * scale)
            for control in strokes:
                points = (control + rng.normal(0, 0.04, size=control.shape) - 0.5) @ rotate.T + 0.5 + shift
                t = np.linspace(0, 1, 16)[:, None]
                curve = (1 - t) ** 2 * points[0] + 2 * t * (1 - t) * points[1] + t ** 2 * points[2]
                draw.line([tuple(p) for p in curve * size * scale], fill=255, width=width, joint="curve")
            image.resize((size, size), Image.LANCZOS).save(root / f"glyph{c:03d}" / f"{e:02d}.png")
    return root
