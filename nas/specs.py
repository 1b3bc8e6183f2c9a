"""Search spaces and pipelines: YAML in, validated frozen dataclasses out.

Nothing here imports TensorFlow. Every problem raises `SpecError`, whose message
names the file, the field path, the value received and what is allowed, e.g.
`search_spaces/x.yaml: stages.conv.padding: 'full' is not one of ['same', 'valid']`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nas.errors import InputError

__all__ = [
    "SpecError",
    "Knob",
    "SearchSpace",
    "Pipeline",
    "load_space",
    "load_pipeline",
    "builtin_spaces",
    "builtin_pipelines",
    "direction_of",
    "Constraints",
]

PADDINGS = ("same", "valid")
POOL_TYPES = ("max", "avg", "none")
# What a stage is built of (`nas.architecture`): convs in a line; convs with a shortcut
# added around them; inverted residuals (1x1 expand, depthwise, 1x1 project, a shortcut).
BLOCKS = ("plain", "residual", "mbconv")
REDUCERS = ("flatten", "global_avg", "global_max")
ACTIVATIONS = ("relu", "elu", "gelu", "selu", "swish", "tanh", "sigmoid", "leaky_relu")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "nadam")
SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "directory", "npz")
PATH_SOURCES = ("directory", "npz")  # those that need a `data.path`
# The well-known datasets (nas.datasets): a `data.path` is the first place looked in.
DATASETS = ("mnist", "fashion_mnist", "cifar10")
COLOR_MODES = ("grayscale", "rgb")
CACHES = ("auto", "memory", "none")  # where a directory's decoded images are kept (nas.data)
OBJECTIVES = ("val_accuracy", "val_loss", "accuracy", "loss")
SAMPLINGS = ("linear", "log", "reverse_log")
# Augmentation knobs (`augment:`), in the order their layers run; flip takes FLIPS, the
# others a strength in [0, 1) as Keras's Random* layers read it (0: off).
AUGMENTS = ("flip", "rotation", "translation", "zoom", "contrast")
FLIPS = ("none", "horizontal", "vertical", "horizontal_and_vertical")


class SpecError(InputError):
    """A search space or pipeline is wrong; the message says where and why."""

    def __init__(self, source: str, field: str, message: str):
        self.source = source
        self.field = field
        prefix = f"{source}: {field}: " if field else f"{source}: "
        super().__init__(prefix + message)


@dataclasses.dataclass(frozen=True)
class Knob:
    """One searchable setting: a fixed value, a choice, or a range.

    Attributes:
        choices: The values to choose from (one value when fixed); None for a range.
        min, max, step, sampling: The range, when `choices` is None.
        type: "int", "float", "str" or "bool".
    """

    type: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    sampling: str = "linear"

    @property
    def is_fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    @property
    def fixed(self) -> Any:
        return self.choices[0]

    def values(self) -> list | None:
        """Every value the knob can take, or None for a continuous range."""
        if self.choices is not None:
            return list(self.choices)
        cast = int if self.type == "int" else (lambda v: round(v, 10))
        if self.sampling != "linear" and self.step:
            # KerasTuner's rule: on a log scale the step multiplies.
            values, value = [], self.min
            while value <= self.max * (1 + 1e-9):
                values.append(value)
                value *= self.step
            if self.sampling == "reverse_log":
                values = [self.min + self.max - v for v in values]
            return [cast(v) for v in values]
        if self.type == "int":
            return list(range(int(self.min), int(self.max) + 1, int(self.step or 1)))
        if self.step:
            count = int(math.floor((self.max - self.min) / self.step + 1e-9)) + 1
            return [cast(self.min + i * self.step) for i in range(count)]
        return None

    def lowest(self) -> Any:
        return min(self.choices) if self.choices is not None else self.min

    def highest(self) -> Any:
        return max(self.choices) if self.choices is not None else self.max


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Budgets a candidate must meet to be trained (None: no budget)."""

    max_params: int | None = None
    max_flops: int | None = None

    @classmethod
    def tightest(cls, *budgets: "Constraints") -> "Constraints":
        """The tightest of several budgets (None where none sets a limit)."""

        def low(key):
            given = [getattr(b, key) for b in budgets if getattr(b, key) is not None]
            return min(given) if given else None

        return cls(max_params=low("max_params"), max_flops=low("max_flops"))


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A declared space of CNNs: a trunk of conv stages, a head and an optimizer."""

    name: str
    source: str
    depth: Knob
    filters: Knob
    kernel_size: Knob
    stride: Knob
    padding: Knob
    activation: Knob
    batch_norm: Knob
    pointwise: Knob
    pool_type: Knob
    pool_size: Knob
    pool_stride: Knob | None
    reduce: Knob
    dense_layers: Knob
    dense_units: Knob
    dropout: Knob
    optimizer: Knob
    learning_rate: Knob
    constraints: Constraints
    # (name, knob) of each augmentation the space names, in `AUGMENTS` order
    augment: tuple[tuple[str, Knob], ...] = ()
    # how many convs a stage stacks (each with its batch norm and activation)
    convs: Knob = Knob("int", (1,))
    # depthwise-separable convs (a depthwise conv, then a 1x1 across channels)
    separable: Knob = Knob("bool", (False,))
    # what a stage is built of (`BLOCKS`); an mbconv block's expansion of its input's
    # channels; squeeze-and-excitation's squeeze, a share of the block's input channels
    # (0: none), in residual and mbconv blocks
    block: Knob = Knob("str", ("plain",))
    expand_ratio: Knob = Knob("int", (1,))
    se: Knob = Knob("float", (0.0,))
    # model-wide: every stage's filters multiplied (rounded, at least 1); the size the
    # images are resized to inside the model (None: as they come)
    width: Knob = Knob("float", (1.0,))
    resolution: Knob | None = None
    text: str = dataclasses.field(default="", repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Where the data comes from and how candidates are trained."""

    name: str
    source_file: str
    data_source: str
    path: str | None  # absolute; for mnist, fashion_mnist, cifar10 the first place looked in
    image_size: tuple[int, int] | None
    color_mode: str
    cache: str  # a directory's decoded images: "auto", "memory" or "none" (nas.data)
    validation_split: float
    test_split: float | None  # None: 0.2 unless the data holds a test set of its own
    pixel_scale: float | None
    seed: int
    epochs: int
    batch_size: int
    early_stopping_patience: int | None
    objective: str
    constraints: Constraints
    # (name, value) of each augmentation the data allows (`train.augment`), in `AUGMENTS`
    # order: what a search's trainings on all the training data apply (`nas.tuning`)
    augment: tuple[tuple[str, str | float], ...] = ()
    # the share of each label's probability spread over the other classes in the loss
    # (`train.label_smoothing`; 0: none), in every trial's training
    label_smoothing: float = 0.0
    # the final model averages its probabilities for each image and its mirror image
    # (`train.test_time_flips`; `nas.final_model.ensemble_of`)
    test_time_flips: bool = False
    text: str = dataclasses.field(default="", repr=False, compare=False)

    @property
    def direction(self) -> str:
        return direction_of(self.objective)


def direction_of(objective: str) -> str:
    """Whether the tuner minimizes ("min": a loss) or maximizes ("max") `objective`."""
    return "min" if objective.endswith("loss") else "max"


# --- reading --------------------------------------------------------------


class _Reader:
    """Walks a parsed YAML mapping, turning each problem into a SpecError."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, message: str):
        raise SpecError(self.source, field, message)

    def mapping(self, value, field: str, allowed: tuple[str, ...], required=()) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"{_show(value)} is not a mapping")
        for key in value:
            if key not in allowed:
                where = f"{field}.{key}" if field else str(key)
                self.fail(where, f"unknown key; allowed keys are {sorted(allowed)}")
        for key in required:
            if key not in value:
                self.fail(f"{field}.{key}" if field else key, "is required")
        return value

    def scalar(self, value, field: str, type_: str, *, low=None, high=None,
               high_open=False, allowed=None):
        if type_ == "bool":
            if not isinstance(value, bool):
                self.fail(field, f"{_show(value)} is not true or false")
            return value
        if type_ == "str":
            if not isinstance(value, str):
                self.fail(field, f"{_show(value)} is not a string")
            if allowed is not None and value not in allowed:
                self.fail(field, f"{_show(value)} is not one of {list(allowed)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"{_show(value)} is not a number")
        if type_ == "int":
            if isinstance(value, float) and not value.is_integer():
                self.fail(field, f"{_show(value)} is not a whole number")
            value = int(value)
        else:
            value = float(value)
        if low is not None and value < low:
            self.fail(field, f"{_show(value)} is below the minimum {low}")
        if high is not None and high_open and value >= high:
            self.fail(field, f"{_show(value)} is not in [{low}, {high})")
        if high is not None and not high_open and value > high:
            self.fail(field, f"{_show(value)} is above the maximum {high}")
        return value

    def knob(self, value, field: str, type_: str, **limits) -> Knob:
        if isinstance(value, list):
            if not value:
                self.fail(field, "the list of choices is empty")
            choices = tuple(self.scalar(v, field, type_, **limits) for v in value)
            if len(set(choices)) != len(choices):
                self.fail(field, f"{_show(value)} lists a choice twice")
            return Knob(type_, choices=choices)
        if isinstance(value, dict):
            if type_ not in ("int", "float"):
                self.fail(field, f"a range needs a numeric knob; give a value or a list of {type_} choices")
            self.mapping(value, field, ("min", "max", "step", "sampling"), required=("min", "max"))
            low = self.scalar(value["min"], f"{field}.min", type_, **limits)
            high = self.scalar(value["max"], f"{field}.max", type_, **limits)
            if low > high:
                self.fail(field, f"min {_show(low)} is greater than max {_show(high)}")
            step = value.get("step")
            if step is not None:
                step = self.scalar(step, f"{field}.step", type_)
                if step <= 0:
                    self.fail(f"{field}.step", f"{_show(step)} must be greater than 0")
            sampling = self.scalar(value.get("sampling", "linear"), f"{field}.sampling", "str",
                                   allowed=SAMPLINGS)
            if sampling != "linear" and low <= 0:
                self.fail(f"{field}.min", f"{_show(low)} must be greater than 0 for {sampling} sampling")
            if low == high:
                return Knob(type_, choices=(low,))
            return Knob(type_, min=low, max=high, step=step, sampling=sampling)
        return Knob(type_, choices=(self.scalar(value, field, type_, **limits),))


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def _parse_yaml(path: Path, display: str) -> tuple[dict, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(display, "", "no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise SpecError(display, "", f"cannot be read ({error.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(display, "", f"{where}not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise SpecError(display, "", "must be a YAML mapping of settings")
    return data, text


def _resolve(ref: str, kind: str) -> tuple[Path, str]:
    """A NAME of a built-in, or a PATH to a YAML file -> (path, name shown in errors)."""
    ref = os.fspath(ref)
    candidate = Path(ref)
    if candidate.suffix in (".yaml", ".yml") or os.sep in ref or candidate.exists():
        return candidate, ref
    builtins = _builtins(kind)
    if ref in builtins:
        return builtins[ref], f"{kind}/{ref}.yaml"
    raise SpecError(ref, "", f"no such file, and not a built-in; built-ins are {sorted(builtins)}")


def _builtins(kind: str) -> dict[str, Path]:
    folder = resources.files(f"nas.{kind}")
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    }


def builtin_spaces() -> list[str]:
    """Names of the search spaces that ship with nas."""
    return sorted(_builtins("search_spaces"))


def builtin_pipelines() -> list[str]:
    """Names of the pipelines that ship with nas."""
    return sorted(_builtins("pipelines"))


def _constraints(reader: _Reader, value, field="constraints") -> Constraints:
    if value is None:
        return Constraints()
    reader.mapping(value, field, ("max_params", "max_flops"))
    limits = {
        key: reader.scalar(value[key], f"{field}.{key}", "int", low=1)
        for key in ("max_params", "max_flops")
        if value.get(key) is not None
    }
    return Constraints(**limits)


def load_space(ref: str) -> SearchSpace:
    """Load a search space from a built-in name or a YAML path.

    Raises:
        SpecError: the file is missing, not YAML, or breaks a rule of the format.
    """
    path, display = _resolve(ref, "search_spaces")
    data, text = _parse_yaml(path, display)
    r = _Reader(display)
    r.mapping(data, "", ("name", "resolution", "stages", "head", "optimizer", "augment",
                         "constraints"),
              required=("stages", "head", "optimizer"))
    name = r.scalar(data.get("name", path.stem), "name", "str")

    stages = r.mapping(data["stages"], "stages",
                       ("depth", "block", "width", "conv", "expand_ratio", "se", "pointwise",
                        "pool"),
                       required=("depth", "conv"))
    conv = r.mapping(stages["conv"], "stages.conv",
                     ("filters", "convs", "kernel_size", "stride", "padding", "activation",
                      "batch_norm", "separable"),
                     required=("filters", "kernel_size"))
    pool = r.mapping(stages.get("pool", {"type": "none"}), "stages.pool", ("type", "size", "stride"))
    head = r.mapping(data["head"], "head", ("reduce", "dense"))
    dense = r.mapping(head.get("dense", {"layers": 0}), "head.dense", ("layers", "units", "dropout"))
    opt = r.mapping(data["optimizer"], "optimizer", ("name", "learning_rate"),
                    required=("name", "learning_rate"))

    pool_stride = None
    if stages.get("pool", {}).get("stride") is not None:
        pool_stride = r.knob(pool["stride"], "stages.pool.stride", "int", low=1)

    blocks = _blocks(r, stages, conv)
    return SearchSpace(
        name=name,
        source=display,
        block=blocks,
        expand_ratio=r.knob(stages.get("expand_ratio", 1), "stages.expand_ratio", "int", low=1),
        se=r.knob(stages.get("se", 0.0), "stages.se", "float", low=0.0, high=1.0),
        width=r.knob(stages.get("width", 1.0), "stages.width", "float", low=1e-3),
        resolution=(r.knob(data["resolution"], "resolution", "int", low=1)
                    if data.get("resolution") is not None else None),
        depth=r.knob(stages["depth"], "stages.depth", "int", low=1),
        filters=r.knob(conv["filters"], "stages.conv.filters", "int", low=1),
        convs=r.knob(conv.get("convs", 1), "stages.conv.convs", "int", low=1),
        separable=r.knob(conv.get("separable", False), "stages.conv.separable", "bool"),
        kernel_size=r.knob(conv["kernel_size"], "stages.conv.kernel_size", "int", low=1),
        stride=r.knob(conv.get("stride", 1), "stages.conv.stride", "int", low=1),
        padding=r.knob(conv.get("padding", "same"), "stages.conv.padding", "str", allowed=PADDINGS),
        activation=r.knob(conv.get("activation", "relu"), "stages.conv.activation", "str",
                          allowed=ACTIVATIONS),
        batch_norm=r.knob(conv.get("batch_norm", False), "stages.conv.batch_norm", "bool"),
        pointwise=r.knob(stages.get("pointwise", False), "stages.pointwise", "bool"),
        pool_type=r.knob(pool.get("type", "max"), "stages.pool.type", "str", allowed=POOL_TYPES),
        pool_size=r.knob(pool.get("size", 2), "stages.pool.size", "int", low=1),
        pool_stride=pool_stride,
        reduce=r.knob(head.get("reduce", "flatten"), "head.reduce", "str", allowed=REDUCERS),
        dense_layers=r.knob(dense.get("layers", 0), "head.dense.layers", "int", low=0),
        dense_units=r.knob(dense.get("units", 64), "head.dense.units", "int", low=1),
        dropout=r.knob(dense.get("dropout", 0.0), "head.dense.dropout", "float",
                       low=0.0, high=1.0, high_open=True),
        optimizer=r.knob(opt["name"], "optimizer.name", "str", allowed=OPTIMIZERS),
        learning_rate=r.knob(opt["learning_rate"], "optimizer.learning_rate", "float", low=1e-12),
        constraints=_constraints(r, data.get("constraints")),
        augment=_augment(r, data.get("augment")),
        text=text,
    )


def _blocks(reader: _Reader, stages: dict, conv: dict) -> Knob:
    """The `stages.block` knob, after checking that every knob given applies to one of
    its blocks: `expand_ratio` to mbconv, `se` to residual and mbconv, `separable` to plain
    and residual, `padding` "valid" and `pointwise` to plain (a shortcut needs the map's
    size kept, so the other blocks pad "same")."""
    block = reader.knob(stages.get("block", "plain"), "stages.block", "str", allowed=BLOCKS)
    kinds = set(block.values())

    def needs(field: str, given, allowed: tuple[str, ...]) -> None:
        if given and not kinds & set(allowed):
            reader.fail(field, f"applies to {' and '.join(allowed)} blocks only, and "
                        f"stages.block is {_show(list(block.values()))}")

    def listed(value) -> list:
        return value if isinstance(value, list) else [value]

    needs("stages.expand_ratio", "expand_ratio" in stages, ("mbconv",))
    needs("stages.se", "se" in stages, ("residual", "mbconv"))
    needs("stages.conv.separable", True in listed(conv.get("separable", False)),
          ("plain", "residual"))
    needs("stages.conv.padding", "valid" in listed(conv.get("padding", "same")), ("plain",))
    needs("stages.pointwise", True in listed(stages.get("pointwise", False)), ("plain",))
    return block


def _augment(reader: _Reader, value, field: str = "augment", read=None) -> tuple:
    """(name, what `read` makes of it) for each augmentation `value` names: a knob each
    (a space's `augment`), or a value each (a pipeline's `train.augment`, `reader.scalar`)."""
    if value is None:
        return ()
    read = read or reader.knob
    reader.mapping(value, field, AUGMENTS)
    return tuple(
        (name, read(value[name], f"{field}.{name}", "str", allowed=FLIPS)
         if name == "flip" else
         read(value[name], f"{field}.{name}", "float", low=0.0, high=1.0, high_open=True))
        for name in AUGMENTS if name in value)


def load_pipeline(ref: str) -> Pipeline:
    """Load a pipeline from a built-in name or a YAML path.

    Relative `data.path` values are taken relative to the pipeline's own folder.

    Raises:
        SpecError: the file is missing, not YAML, or breaks a rule of the format.
    """
    path, display = _resolve(ref, "pipelines")
    data, text = _parse_yaml(path, display)
    r = _Reader(display)
    r.mapping(data, "", ("name", "data", "train", "objective", "constraints"), required=("data",))
    name = r.scalar(data.get("name", path.stem), "name", "str")
    d = r.mapping(data["data"], "data",
                  ("source", "path", "image_size", "color_mode", "cache", "validation_split",
                   "test_split", "pixel_scale", "seed"),
                  required=("source",))
    train = r.mapping(data.get("train", {}), "train",
                      ("epochs", "batch_size", "early_stopping_patience", "augment",
                       "label_smoothing", "test_time_flips"))
    source = r.scalar(d["source"], "data.source", "str", allowed=SOURCES)

    data_path = None
    if source in PATH_SOURCES and "path" not in d:
        r.fail("data.path", f"is required for source {source!r}")
    if "path" in d:
        if source not in PATH_SOURCES + DATASETS:
            *names, last = PATH_SOURCES + DATASETS
            r.fail("data.path", f"only applies to the {', '.join(names)} and {last} sources, "
                   f"not {source!r}")
        data_path = r.scalar(d["path"], "data.path", "str")
        data_path = str((path.parent / os.path.expanduser(data_path)).resolve())

    image_size = None
    if "image_size" in d:
        size = d["image_size"]
        if isinstance(size, int) and not isinstance(size, bool):
            size = [size, size]
        if not (isinstance(size, list) and len(size) == 2):
            r.fail("data.image_size", f"{_show(d['image_size'])} is not [height, width] or a single size")
        image_size = tuple(r.scalar(v, "data.image_size", "int", low=1) for v in size)
    elif source == "directory":
        image_size = (32, 32)
    if "cache" in d and source != "directory":
        r.fail("data.cache", f"only applies to the directory source, not {source!r}")

    patience = train.get("early_stopping_patience", 3)
    if patience is not None:
        patience = r.scalar(patience, "train.early_stopping_patience", "int", low=1)
    validation_split = r.scalar(d.get("validation_split", 0.2), "data.validation_split",
                                "float", low=0.0, high=1.0, high_open=True)
    test_split = d.get("test_split")
    if test_split is not None:
        test_split = r.scalar(test_split, "data.test_split", "float", low=0.0, high=1.0,
                              high_open=True)
        if validation_split + test_split >= 1:
            r.fail("data.test_split", f"{test_split} with validation_split "
                   f"{validation_split} leaves no training data (their sum must be below 1)")
    pixel_scale = d.get("pixel_scale")
    if pixel_scale is not None:
        pixel_scale = r.scalar(pixel_scale, "data.pixel_scale", "float", low=1e-12)

    return Pipeline(
        name=name,
        source_file=display,
        data_source=source,
        path=data_path,
        image_size=image_size,
        color_mode=r.scalar(d.get("color_mode", "grayscale"), "data.color_mode", "str",
                            allowed=COLOR_MODES),
        cache=r.scalar(d.get("cache", "auto"), "data.cache", "str", allowed=CACHES),
        validation_split=validation_split,
        test_split=test_split,
        pixel_scale=pixel_scale,
        seed=r.scalar(d.get("seed", 0), "data.seed", "int", low=0),
        epochs=r.scalar(train.get("epochs", 10), "train.epochs", "int", low=1),
        batch_size=r.scalar(train.get("batch_size", 64), "train.batch_size", "int", low=1),
        early_stopping_patience=patience,
        objective=r.scalar(data.get("objective", "val_accuracy"), "objective", "str",
                           allowed=OBJECTIVES),
        constraints=_constraints(r, data.get("constraints")),
        augment=_augment(r, train.get("augment"), "train.augment", r.scalar),
        label_smoothing=r.scalar(train.get("label_smoothing", 0.0), "train.label_smoothing",
                                 "float", low=0.0, high=1.0, high_open=True),
        test_time_flips=r.scalar(train.get("test_time_flips", False), "train.test_time_flips",
                                 "bool"),
        text=text,
    )
