"""Validation of a training/evaluation config before any data or device is touched.

Free of TFDS (except where a mixture names person_folder, whose layout it reads), as
launch/gpu_array_train.py runs it on accelerator machines without TensorFlow.
"""
from __future__ import annotations

import math
import re
import types

from jaxseg import mixture, train_step

_CHOICES = {
    "model.norm": ("batch", "group"),
    "model.upsample": ("transpose", "resize"),
    "model.num_classes": (1, 2),
    "model.compute_dtype": ("float32", "bfloat16"),
    "optim.schedule": ("cosine", "constant", "step"),
    "optim.optimizer": ("adamw",),
}


class ConfigError(ValueError):
    """A config value that cannot work, with what to change."""


def unknown_field(error: Exception, argv: list[str]) -> tuple[str, str | None] | None:
    """(the field, the nearest field name or None) when ml_collections' AttributeError or
    KeyError is about a field that an override in ARGV (--config.a.b=..., --noconfig.a.b) names
    and the config lacks; None otherwise (an error of the config file's own code, say). An
    override below a field that is no section (--config.train.num_steps.x=1) lacks the whole
    dotted name."""
    text = str(error).replace("\\", "")
    # absl takes a flag after one dash as well as two.
    overrides = {arg.split("=", 1)[0].split(".", 1)[1] for arg in argv
                 if arg.startswith(("--config.", "--noconfig.", "-config.", "-noconfig."))}
    # ml_collections' KeyError for a lookup inside a value: "Attribute <class 'int'>.x does not
    # exist ... Attempting to lookup: train.num_steps.x".
    below = re.search(r"Attribute <class '\w+'>\.\w+ does not exist.*lookup: ([\w.]+)", text,
                      re.DOTALL)
    if below and below.group(1) in overrides:
        return below.group(1), None
    name = re.search(r"'([^']+)'", text)
    if not name or name.group(1) not in {part for o in overrides for part in o.split(".")}:
        return None
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    return name.group(1), suggestion.group(1) if suggestion else None


def config_file_problem(error: Exception, config_file: str) -> str | None:
    """Why ml_collections could not load CONFIG_FILE (the --config argument), as one line naming
    the file, or None for any other ERROR: the file missing or unreadable (OSError), not Python
    (SyntaxError), defining no get_config() (AttributeError), or its get_config() returning None
    (KeyError or AttributeError) or another type than a ConfigDict (AttributeError). An error of
    the file's own code is None: its traceback says where."""
    if isinstance(error, OSError):  # ml_collections' own lines on where it looked come first
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return lines[-1] if lines else str(error)
    if isinstance(error, SyntaxError):
        return f"{error.filename}, line {error.lineno}: {error.msg}"
    if (isinstance(error, AttributeError) and error.name == "get_config"
            and isinstance(error.obj, types.ModuleType)):
        return (f"{error.obj.__file__} defines no get_config(): a config file must define "
                "get_config(), returning the config")
    # ml_collections only logs a warning for a get_config() returning None; the None then fails
    # where first used: looking up an override's field in it, or the caller's config.to_dict().
    # (A None field deeper in a config fails the lookup by a ValueError.)
    if (isinstance(error, KeyError) and error.args and re.fullmatch(
            r"Attribute <class 'NoneType'>\.(\w+) does not exist .* lookup: \1(\..*)?",
            str(error.args[0]), re.DOTALL)) or (
            isinstance(error, AttributeError) and error.obj is None and error.name == "to_dict"):
        return (f"{config_file}: get_config() returned None, not a config (does it end in "
                "`return config`?)")
    # Another type loads, and takes overrides where it has their fields (a dict does), until the
    # caller's config.to_dict().
    if isinstance(error, AttributeError) and error.name == "to_dict":
        kind = type(error.obj).__name__
        article = "an" if kind[0].lower() in "aeiou" else "a"
        return (f"{config_file}: get_config() returned {article} {kind}, not an ml_collections "
                "ConfigDict (return ml_collections.ConfigDict(...))")
    return None


# Fields that change how validation IoU is measured (which examples, the cut, the prediction):
# runs that differ in them have IoUs that do not compare.
_MEASURED_NEUTRAL = {"eval.batch_size"}


def changes_validation(field: str) -> bool:
    """Whether a dotted config FIELD changes how validation IoU is measured."""
    return (field in ("data.eval", "data.eval_split") or field.startswith("eval.")) and (
        field not in _MEASURED_NEUTRAL)


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(config, num_devices: int) -> None:
    """Raises ConfigError naming the field and the fix for the first impossible value found."""
    problems = []
    for field, allowed in _CHOICES.items():
        if _get(config, field) not in allowed:
            problems.append(f"{field}={_get(config, field)!r} is not one of {allowed}")
    size, depth = config.data.image_size, config.model.depth
    if depth < 1:
        problems.append(f"model.depth={depth} must be >= 1")
    elif size % (2**depth):
        problems.append(
            f"data.image_size={size} must be divisible by 2**model.depth={2**depth}: "
            f"use a multiple of {2**depth}, or a smaller depth")
    for field in ("train.batch_size", "eval.batch_size"):
        batch = _get(config, field)
        if batch <= 0 or batch % num_devices:
            problems.append(
                f"{field}={batch} must be a positive multiple of the {num_devices} devices "
                f"in use (set --config.{field} to a multiple, or --config.num_devices)")
    for field in ("data.image_size", "data.num_workers", "train.num_steps", "train.log_every",
                  "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "model.base_features", "optim.learning_rate"):
        if not 0 < _get(config, field) < math.inf:  # nan passed `<= 0`: NaN weights at step 1
            problems.append(f"{field}={_get(config, field)} must be positive and finite")
    # A negative clip norm, weight decay or loss weight turns descent into ascent, silently.
    # (eval.max_examples: 0 = all, and so was any negative number, without a word.)
    for field in ("seed", "data.prefetch", "train.num_logged_images", "optim.warmup_steps",
                  "optim.weight_decay", "optim.final_lr_fraction", "optim.step_decay",
                  "loss.ce_weight", "loss.dice_weight", "eval.max_examples"):
        if not 0 <= _get(config, field) < math.inf:
            problems.append(f"{field}={_get(config, field)} must be >= 0 and finite")
    for field in ("optim.b1", "optim.b2"):
        if not 0 <= _get(config, field) < 1:
            problems.append(f"{field}={_get(config, field)} must be in [0, 1)")
    if config.model.norm == "group":
        widths = [config.model.base_features * 2**level for level in range(depth + 1)]
        uneven = [w for w in widths if w > 0 and w % min(8, w)]
        if uneven:
            problems.append(
                f"model.norm='group' splits each width into min(8, width) groups, and widths "
                f"{uneven} of {widths} (model.base_features x 2**level) do not split evenly: use "
                f"a model.base_features of 1, 2, 4 or a multiple of 8")
    # ml_collections reads a tuple override's items as Python literals: a word stays a string.
    numeric = {field: all(_is_number(v) for v in _get(config, field))
               for field in ("model.output_shift", "optim.step_fractions")}
    for field in (f for f, ok in numeric.items() if not ok):
        problems.append(f"{field}={tuple(_get(config, field))} must hold numbers only")
    if numeric["model.output_shift"] and (
            problem := output_shift_problem(config.model.output_shift, size)):
        problems.append(problem)
    if not 0 <= config.model.dropout < 1:
        problems.append(f"model.dropout={config.model.dropout} must be in [0, 1)")
    aug = config.data.aug
    # An infinite or nan bound (nan passed `< 0`) stopped the first batch with numpy's
    # OverflowError, raised in a worker thread.
    if not 0 < aug.scale_min <= aug.scale_max < math.inf:
        problems.append(f"data.aug.scale_min={aug.scale_min}, scale_max={aug.scale_max}: the zoom "
                        "range needs 0 < scale_min <= scale_max < inf (1, 1 = no zoom)")
    for field in ("rotate_degrees", "max_shift"):
        if not 0 <= aug[field] < math.inf:
            problems.append(f"data.aug.{field}={aug[field]} must be >= 0 and finite (0 = off; the "
                            "draw is symmetric about 0)")
    for field in ("brightness", "contrast", "saturation"):
        # A jitter of 1 or more can scale a photo by 0 or less: black or inverted.
        if not 0 <= aug[field] < 1:
            problems.append(f"data.aug.{field}={aug[field]} must be in [0, 1) (0 = off): the "
                            "factor is drawn from [1 - it, 1 + it]")
    if not 0 <= config.data.aug.get("copy_paste", 0.0) <= 1:
        problems.append(f"data.aug.copy_paste={config.data.aug.copy_paste} must be in [0, 1] (0 = off)")
    if not 0 <= train_step.ema_decay(config) < 1:
        problems.append(f"train.ema_decay={train_step.ema_decay(config)} must be in [0, 1) (0 = no EMA)")
    for field in ("optim.grad_clip_norm", "loss.boundary_weight", "loss.lovasz_weight"):
        if not 0 <= _get(config, field) < math.inf:
            problems.append(f"{field}={_get(config, field)} must be >= 0 and finite (0 = off)")
    # boundary_weight only scales the cross-entropy: with these three at 0 the loss is 0 and the
    # whole run trains nothing (weight decay alone shrinks the weights), without a word.
    if not any(_get(config, f) for f in ("loss.ce_weight", "loss.dice_weight", "loss.lovasz_weight")):
        problems.append("loss.ce_weight, loss.dice_weight and loss.lovasz_weight are all 0: the "
                        "loss is 0 and nothing is learnt; give at least one a weight above 0")
    if config.loss.boundary_radius < 1:
        problems.append(f"loss.boundary_radius={config.loss.boundary_radius} must be >= 1")
    for field in SPLIT_FIELDS:
        if problem := split_problem(field, _get(config, field)):
            problems.append(problem)
    if numeric["optim.step_fractions"] and not all(0 < f <= 1 for f in config.optim.step_fractions):
        problems.append(f"optim.step_fractions={tuple(config.optim.step_fractions)}: each must be "
                        "in (0, 1], a fraction of train.num_steps")
    if not 0 < config.eval.threshold < 1:
        problems.append(f"eval.threshold={config.eval.threshold} must be in (0, 1)")
    try:
        names = [n for n, _ in mixture.parse_mixture(config.data.train)]
        if 0 < config.train.batch_size < len(names):
            problems.append(f"train.batch_size={config.train.batch_size} is smaller than the "
                            f"{len(names)} datasets of data.train, each of which needs a row")
        names += [n for n, _ in mixture.parse_mixture(config.data.eval)]
    except ValueError as e:
        problems.append(f"data.train / data.eval: {e}")
        names = []
    for name in names:
        if name not in mixture.DATASETS:
            problems.append(f"unknown dataset {name!r} in data.train/data.eval; known: {mixture.DATASETS}")
        if name == "person_folder" and not config.data.folder:
            problems.append("person_folder needs --config.data.folder=PATH")
    if names and config.data.folder and "person_folder" not in names:
        # Else a forgotten --config.data.train=person_folder trains on the default datasets.
        problems.append(f"data.folder={config.data.folder!r} is set, but neither data.train nor "
                        "data.eval names person_folder, so nothing would read it: add it "
                        "(--config.data.train=person_folder --config.data.eval=person_folder, or "
                        "person_folder:1 beside other datasets), or leave data.folder out")
    if "person_folder" in names and config.data.folder:
        problems += _folder_split_problems(config, train="person_folder" in config.data.train,
                                           evaluated="person_folder" in config.data.eval)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def output_shift_problem(shift, image_size: int) -> str | None:
    """Why numbers SHIFT cannot be model.output_shift at IMAGE_SIZE, or None: (dy, dx), model
    pixels of at most half the image (nan and inf are not: they stop the model's first call)."""
    shift = tuple(shift)
    if len(shift) != 2 or not all(abs(v) <= image_size / 2 for v in shift):
        return (f"model.output_shift={shift} must be (dy, dx), model pixels of at most half the "
                f"image size ({image_size / 2:g})")
    return None


SPLIT_FIELDS = ("data.train_split", "data.eval_split")


def split_names(split) -> set[str]:
    """The splits a TFDS split string reads, slices and sums undone: 'train[:90%]+validation'
    -> {'train', 'validation'}."""
    return {part.split("[")[0].strip() for part in str(split).split("+")}


def split_problem(field: str, split) -> str | None:
    """Why FIELD (one of SPLIT_FIELDS) cannot name SPLIT, or None: only train and validation,
    whole or as TFDS slices and sums ('train[:90%]+validation'), may train or choose checkpoints."""
    names = split_names(split)
    if "test" in names:
        return (f"{field}={split!r}: the test split is kept for the final score (python -m "
                "jaxseg.evaluate --split test); training on it or choosing checkpoints by it "
                "would inflate that score: use 'validation'")
    if not names <= {"train", "validation"}:
        return (f"{field}={split!r} is not a split: use 'train' or 'validation' (or TFDS slices "
                "of them, e.g. 'train[:90%]')")
    return None


def _folder_split_problems(config, *, train: bool, evaluated: bool) -> list[str]:
    """The splits that data.train_split / data.eval_split ask of a person_folder and it lacks."""
    import pathlib

    from jaxseg.datasets import person_folder

    try:
        splits = person_folder.layout(pathlib.Path(config.data.folder).expanduser())
    except (ValueError, OSError) as e:
        return [f"data.folder: {e}"]
    wanted = {"data.train_split": config.data.train_split} if train else {}
    if evaluated:
        wanted["data.eval_split"] = config.data.eval_split
    problems = []
    for field, split in wanted.items():
        # By the splits it reads: a slice of a single-split folder ('train[80%:]') is its train.
        if missing := sorted(split_names(split) - splits.keys()):
            slices = (", or slices of it such as data.train_split='train[:80%]' "
                      "data.eval_split='train[80%:]'" if "train" in splits else "")
            problems.append(
                f"{field}={split!r}: {config.data.folder} has only {sorted(splits)} (a folder with "
                f"images/ and masks/ is the single split 'train'; add a {missing[0]}/ folder "
                f"holding them, or set {field}={next(iter(splits))}{slices})")
    return problems
