"""A candidate network as plain data: layers, output shapes, parameters, FLOPs.

Nothing here imports TensorFlow, so deciding that a candidate is impossible (a feature
map shrinks below 1x1) or over a budget costs microseconds and builds no graph. A
stage's arithmetic is written once, branch-free, so that `Builder` runs it on one
option's numbers and `conv_costs` / `pool_costs` on numpy arrays of many (for
`nas.space`, which weighs every option of a space's stages at once).

FLOPs count a multiply-add as two operations for conv and dense layers, one
operation per input element read by a pooling window, two per element for batch
normalization, one per element for an activation, a sum (a shortcut's) or a product
(squeeze-and-excitation's), one per input element for a global average, and eight per
output element for a bilinear resize.

A stage is a block (`nas.specs.BLOCKS`): plain convs in a line, a residual block (the
convs, a shortcut, the sum) or mbconv blocks (expand, depthwise, project, a shortcut).
Layers that take other inputs than the layer before them name them (`Layer.inputs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from nas.specs import Constraints, Knob, SearchSpace

__all__ = ["Architecture", "Builder", "INPUT", "Impossible", "Layer", "HyperparameterSpec",
           "hyperparameter_specs", "CONV_SHAPE_KNOBS", "POOL_KNOBS", "ConvKnobs", "PoolKnobs",
           "at_width", "conv_costs", "pool_costs", "scaled_filters"]


@dataclasses.dataclass(frozen=True)
class HyperparameterSpec:
    """One knob of a space as KerasTuner sees it.

    `conditions` lists (parent name, parent values): the knob is active only when
    every parent takes one of its values.
    """

    name: str
    knob: Knob
    conditions: tuple[tuple[str, tuple], ...] = ()


def hyperparameter_specs(space: SearchSpace) -> list[HyperparameterSpec]:
    """The whole space as named hyperparameters, parents before children."""
    depths = space.depth.values()
    specs = [HyperparameterSpec("depth", space.depth)]
    # A space that names no newer knob (stacked convs, blocks, a width, a resolution)
    # declares what it did before they existed: its searches resume, and propose the
    # same candidates, as they did.
    if space.width.values() != [1.0]:
        specs.append(HyperparameterSpec("width", space.width))
    if space.resolution is not None:
        specs.append(HyperparameterSpec("resolution", space.resolution))
    pooled = tuple(t for t in space.pool_type.values() if t != "none")
    blocks = tuple(space.block.values())
    for stage in range(1, max(depths) + 1):
        active = (("depth", tuple(d for d in depths if d >= stage)),)
        prefix = f"stage_{stage}/"
        for name, knob in (
            ("block", space.block),
            ("filters", space.filters),
            ("convs", space.convs),
            ("separable", space.separable),
            ("kernel_size", space.kernel_size),
            ("stride", space.stride),
            ("padding", space.padding),
            ("activation", space.activation),
            ("batch_norm", space.batch_norm),
            ("pointwise", space.pointwise),
            ("expand_ratio", space.expand_ratio),
            ("se", space.se),
            ("pool", space.pool_type),
        ):
            if name in _NEWER_KNOBS and knob.values() == [_NEWER_KNOBS[name]]:
                continue  # as it was before the knob existed
            kinds = tuple(b for b in blocks if b in _BLOCKS_OF.get(name, blocks))
            if not kinds:
                continue  # no block of the space has it (its value is the default)
            block = (((prefix + "block", kinds),) if kinds != blocks else ())
            specs.append(HyperparameterSpec(prefix + name, knob, active + block))
        if pooled:
            pool_active = active + ((prefix + "pool", pooled),)
            specs.append(HyperparameterSpec(prefix + "pool_size", space.pool_size, pool_active))
            if space.pool_stride is not None:
                specs.append(
                    HyperparameterSpec(prefix + "pool_stride", space.pool_stride, pool_active)
                )
    specs.append(HyperparameterSpec("reduce", space.reduce))
    specs.append(HyperparameterSpec("dense_layers", space.dense_layers))
    dense_counts = space.dense_layers.values()
    for layer in range(1, max(dense_counts) + 1):
        active = (("dense_layers", tuple(n for n in dense_counts if n >= layer)),)
        specs.append(HyperparameterSpec(f"dense_{layer}/units", space.dense_units, active))
        specs.append(HyperparameterSpec(f"dense_{layer}/dropout", space.dropout, active))
    specs.append(HyperparameterSpec("optimizer", space.optimizer))
    specs.append(HyperparameterSpec("learning_rate", space.learning_rate))
    specs.extend(HyperparameterSpec(f"augment/{name}", knob) for name, knob in space.augment)
    return specs


# The knobs newer than the first spaces, and the value that leaves them out (a space
# whose knob takes only that value declares no hyperparameter for it).
_NEWER_KNOBS = {"block": "plain", "convs": 1, "separable": False, "expand_ratio": 1,
                "se": 0.0}
# The blocks each per-stage knob applies to (the others, to every block): a shortcut
# needs the feature map's size kept, so residual and mbconv blocks pad "same".
_BLOCKS_OF = {"separable": ("plain", "residual"), "padding": ("plain",),
              "pointwise": ("plain",), "expand_ratio": ("mbconv",),
              "se": ("residual", "mbconv")}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of a candidate: what it is, its output shape and its cost.

    `inputs` names the layers whose outputs it takes (a shortcut's, an `Add`'s); empty,
    it takes the output of the layer before it.
    """

    name: str
    kind: str
    config: dict
    output_shape: tuple[int, ...]
    params: int
    flops: int
    inputs: tuple[str, ...] = ()

    def describe(self) -> str:
        c = self.config
        source = f" of {' + '.join(self.inputs)}" if self.inputs else ""
        if self.kind in ("Conv2D", "SeparableConv2D"):
            return (f"{c['filters']} {c['kernel_size']}x{c['kernel_size']} "
                    f"stride {c['strides']} {c['padding']}{source}")
        if self.kind == "DepthwiseConv2D":
            return (f"{c['kernel_size']}x{c['kernel_size']} stride {c['strides']} "
                    f"{c['padding']}")
        if self.kind in ("Add", "Multiply"):
            return " + ".join(self.inputs) if self.kind == "Add" else " x ".join(self.inputs)
        if self.kind == "Resizing":
            return f"to {c['height']}x{c['width']}"
        if self.kind in ("MaxPooling2D", "AveragePooling2D"):
            return f"{c['pool_size']}x{c['pool_size']} stride {c['strides']}"
        if self.kind == "Dense":
            return f"{c['units']} {c['activation']}"
        if self.kind == "Dropout":
            return f"rate {c['rate']}"
        if self.kind == "Activation":
            return c["activation"]
        if self.kind == "Rescaling":
            return f"x {c['scale']:.6g}"
        if self.kind.startswith("Random"):
            return f"{c['factor']} (training only)"
        return ""


@dataclasses.dataclass(frozen=True)
class Rejection:
    """Why a candidate must not be trained: `kind` is "impossible" (its feature map
    vanishes at `stage`), "max_params" or "max_flops" (it breaks that budget), or
    "max_latency_ms" (its per-layer latency table predicts it over that budget:
    `nas.latency_table.LatencyGuard`). Reads as its `reason`."""

    kind: str
    reason: str
    stage: int | None = None

    def __str__(self) -> str:
        return self.reason

    @property
    def over_budget(self) -> bool:
        return self.kind != "impossible"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A candidate CNN as data. Build one with `Architecture.from_values`.

    Attributes:
        values: The chosen value of every active hyperparameter.
        layers: The layers up to the point the candidate became impossible, if it did.
        impossible: Why no model can be built (None when it can).
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    values: dict
    layers: tuple[Layer, ...]
    impossible: str | None = None

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def depth(self) -> int:
        return self.values["depth"]

    def over_budget(self, constraints: Constraints) -> str | None:
        """Why this candidate breaks a budget, or None when it fits."""
        broken = self._budget_broken(constraints)
        return None if broken is None else broken.reason

    def _budget_broken(self, constraints: Constraints) -> Rejection | None:
        if constraints.max_params is not None and self.params > constraints.max_params:
            return Rejection("max_params", f"{self.params:,} parameters > max_params "
                                           f"{constraints.max_params:,}")
        if constraints.max_flops is not None and self.flops > constraints.max_flops:
            return Rejection("max_flops", f"{self.flops:,} FLOPs > max_flops "
                                          f"{constraints.max_flops:,}")
        return None

    def rejection(self, constraints: Constraints) -> Rejection | None:
        """Why this candidate must not be trained (impossible or over budget), or None."""
        if self.impossible:
            stage = self.impossible.split(":", 1)[0].removeprefix("stage ")  # "stage N: ..."
            return Rejection("impossible", self.impossible,
                             int(stage) if stage.isdigit() else None)
        return self._budget_broken(constraints)

    def for_serving(self) -> "Architecture":
        """This network without its training-only layers (the augmentations): what is
        exported and logged. Keras's `model.export` traces a model's call without
        `training=False`, where Keras's Random* layers default to acting; the weights are
        the same (those layers have none)."""
        return dataclasses.replace(self, layers=tuple(
            layer for layer in self.layers if layer.kind not in _AUGMENT_LAYERS.values()))

    def to_dict(self) -> dict:
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "params": self.params,
            "flops": self.flops,
            "impossible": self.impossible,
            "values": dict(self.values),
            "layers": [
                {
                    "name": layer.name,
                    "type": layer.kind,
                    "config": layer.config,
                    "output_shape": list(layer.output_shape),
                    "params": layer.params,
                    "flops": layer.flops,
                    **({"inputs": list(layer.inputs)} if layer.inputs else {}),
                }
                for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Architecture":
        """The architecture `to_dict` wrote (e.g. a trial run's `architecture.json`)."""
        layers = tuple(Layer(d["name"], d["type"], d["config"], tuple(d["output_shape"]),
                             d["params"], d["flops"], tuple(d.get("inputs", ())))
                       for d in data["layers"])
        return cls(tuple(data["input_shape"]), data["num_classes"], data["values"], layers,
                   data.get("impossible"))

    def table(self) -> str:
        """The layer table as text: name, type, output shape, parameters, FLOPs."""
        rows = [("layer", "type", "output shape", "params", "FLOPs")]
        for layer in self.layers:
            kind = f"{layer.kind} {layer.describe()}".strip()
            shape = "x".join(str(d) for d in layer.output_shape)
            rows.append((layer.name, kind, shape, f"{layer.params:,}", f"{layer.flops:,}"))
        rows.append(("total", "", "", f"{self.params:,}", f"{self.flops:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = []
        for n, row in enumerate(rows):
            cells = [row[i].ljust(widths[i]) if i < 3 else row[i].rjust(widths[i]) for i in range(5)]
            lines.append("  ".join(cells).rstrip())
            if n == 0 or n == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        if self.impossible:
            lines.append(f"impossible: {self.impossible}")
        return "\n".join(lines)

    @classmethod
    def from_values(
        cls,
        space: SearchSpace,
        values: dict[str, Any],
        input_shape: tuple[int, int, int],
        num_classes: int,
        pixel_scale: float = 1.0,
    ) -> "Architecture":
        """The candidate that `values` picks from `space`, for inputs of `input_shape`.

        Missing values of fixed knobs are filled in; inactive values are ignored, but for
        augmentations the space has no knob of (a pipeline's, `nas.tuning`).
        """
        chosen = _active_values(space, values)
        chosen.update((name, value) for name, value in values.items()
                      if name.startswith("augment/") and name not in chosen)
        builder = Builder(tuple(input_shape))
        builder.add("rescaling", "Rescaling", {"scale": 1.0 / pixel_scale, "offset": 0.0},
                    builder.shape, 0, 0)
        builder.resize(chosen.get("resolution"))
        builder.augment(chosen)
        try:
            for stage in range(1, chosen["depth"] + 1):
                builder.stage(stage, chosen)
            builder.head(chosen, num_classes)
        except Impossible as why:
            return cls(tuple(input_shape), num_classes, chosen, tuple(builder.layers), str(why))
        return cls(tuple(input_shape), num_classes, chosen, tuple(builder.layers))


# The name of a model's input, as a layer's `inputs` name it.
INPUT = "image"


class Impossible(Exception):
    """Raised while building layers: the candidate cannot exist (the message says why)."""

    pass


def _active_values(space: SearchSpace, values: dict) -> dict:
    """The value of every hyperparameter active under `values`, in declaration order."""
    chosen: dict[str, Any] = {}
    for spec in hyperparameter_specs(space):
        if all(chosen.get(parent) in allowed for parent, allowed in spec.conditions):
            if spec.name in values and values[spec.name] is not None:
                chosen[spec.name] = values[spec.name]
            elif spec.knob.is_fixed:
                chosen[spec.name] = spec.knob.fixed
            else:
                raise KeyError(f"no value for the hyperparameter {spec.name!r}")
    return chosen


# The Keras layer of each augmentation knob (`nas.specs.AUGMENTS`), in the order they run.
_AUGMENT_LAYERS = {"flip": "RandomFlip", "rotation": "RandomRotation",
                   "translation": "RandomTranslation", "zoom": "RandomZoom",
                   "contrast": "RandomContrast"}


# The stage knobs the feature map's height and width after a stage's convolutions
# depend on, and its pool's knobs (each also says why a stage does not fit); the other
# knobs change only channels and costs. No condition joins the pool's to the others.
CONV_SHAPE_KNOBS = ("block", "convs", "kernel_size", "stride", "padding")
POOL_KNOBS = ("pool", "pool_size", "pool_stride")
# The blocks as the arithmetic numbers them (`ConvKnobs.block`).
_BLOCK_NUMBERS = {"plain": 0, "residual": 1, "mbconv": 2}
# Squeeze-and-excitation's share, in millionths: its squeeze is computed in whole numbers.
_SE_UNIT = 1_000_000


def scaled_filters(filters: int, width: float) -> int:
    """A stage's filters under the model-wide width multiplier: rounded, at least 1."""
    return max(1, int(filters * width + 0.5))


def at_width(space: SearchSpace, width: float) -> SearchSpace:
    """`space` with `width` applied: every stage's filters scaled (values that coincide,
    1 and 2 at width 0.5, kept once), no width multiplier and no resolution left; what
    `nas.space` and `nas.latency_table` walk, one width (and resolution) at a time."""
    filters = tuple(dict.fromkeys(scaled_filters(f, width) for f in space.filters.values()))
    return dataclasses.replace(space, filters=Knob("int", filters),
                               width=Knob("float", (1.0,)), resolution=None)


class ConvKnobs(NamedTuple):
    """The numbers a stage's convolutions read from its knobs (flags are 0 or 1).

    `Builder.stage` reads one option's; `conv_costs` reads numpy arrays of many
    options'. The activation only names layers: it changes no number.
    """

    filters: Any  # under the width multiplier
    kernel: Any
    stride: Any
    same: Any  # 1: same padding, 0: valid
    batch_norm: Any
    pointwise: Any
    convs: Any = 1  # stacked convs (mbconv: blocks): the first strides, the others do not
    separable: Any = 0  # 1: depthwise-separable convs
    block: Any = 0  # `_BLOCK_NUMBERS`
    expand: Any = 1  # mbconv: the expanded channels, as a multiple of the input's
    se: Any = 0  # squeeze-and-excitation's share of the input channels, in `_SE_UNIT`s

    @classmethod
    def of(cls, values: dict, prefix: str = "") -> "ConvKnobs":
        """The numbers of the stage whose knobs are named `prefix` + knob in `values`
        (a knob inactive for its stage's block takes its default)."""
        return cls(scaled_filters(values[prefix + "filters"], values.get("width", 1.0)),
                   values[prefix + "kernel_size"], values[prefix + "stride"],
                   int(values.get(prefix + "padding", "same") == "same"),
                   int(values[prefix + "batch_norm"]),
                   int(values.get(prefix + "pointwise", False)),
                   values.get(prefix + "convs", 1),
                   int(values.get(prefix + "separable", False)),
                   _BLOCK_NUMBERS[values.get(prefix + "block", "plain")],
                   values.get(prefix + "expand_ratio", 1),
                   int(round(values.get(prefix + "se", 0.0) * _SE_UNIT)))


class PoolKnobs(NamedTuple):
    """The numbers a stage's pool reads from its knobs, as `ConvKnobs` (the pool's type,
    beyond whether there is one, changes no number)."""

    pooled: Any
    size: Any  # 1 when the stage does not pool
    stride: Any

    @classmethod
    def of(cls, values: dict, prefix: str = "") -> "PoolKnobs":
        if values[prefix + "pool"] == "none":
            return cls(0, 1, 1)
        size = values[prefix + "pool_size"]
        return cls(1, size, values.get(prefix + "pool_stride", size))


# The arithmetic of a stage's layers, on numbers and numpy arrays alike (no branches).


def _conv_size(size, k: ConvKnobs):
    """A conv's output size along one side; below 1 when the kernel does not fit."""
    valid = (size - k.kernel) // k.stride + 1
    return valid + k.same * (-(-size // k.stride) - valid)


def _next_conv_size(size, k: ConvKnobs):
    """The output size of a stage's second (or later) conv: stride 1, the stage's padding."""
    return size - (1 - k.same) * (k.kernel - 1)


def _pooled_size(size, k: PoolKnobs):
    """A pool's output size along one side; below 1 when the window does not fit."""
    return (size - k.size) // k.stride + 1


def _conv_cost(k: ConvKnobs, channels, pixels):
    # Batch norm's shift makes the conv bias redundant. A separable conv is a depthwise
    # k x k conv per channel, then a 1x1 conv across them (Keras's SeparableConv2D).
    full = k.kernel * k.kernel * channels * k.filters
    separable = k.kernel * k.kernel * channels + channels * k.filters
    weights = full + k.separable * (separable - full)
    return weights + k.filters * (1 - k.batch_norm), 2 * weights * pixels


def _batch_norm_cost(k: ConvKnobs, pixels, channels=None):
    channels = k.filters if channels is None else channels
    return 4 * channels, 2 * pixels * channels


def _activation_flops(k: ConvKnobs, pixels, channels=None):
    return pixels * (k.filters if channels is None else channels)


def _pointwise_cost(k: ConvKnobs, pixels):
    return k.filters * k.filters + k.filters, 2 * k.filters * k.filters * pixels


def _pool_flops(k: PoolKnobs, channels, pixels):
    return k.size * k.size * pixels * channels


def _normalized_1x1_cost(k: ConvKnobs, channels, out, pixels):
    """A 1x1 conv from `channels` to `out` with the stage's batch norm (a shortcut's
    projection, an mbconv's expansion or projection): (parameters, FLOPs)."""
    params = channels * out + out * (1 - k.batch_norm) + k.batch_norm * 4 * out
    return params, 2 * channels * out * pixels + k.batch_norm * 2 * pixels * out


def _projects(k: ConvKnobs, channels, stride, shortcut: str):
    """1 where a block's shortcut needs a 1x1 conv (it strides, or changes the channels).

    `shortcut` "low" or "high" counts it only where it strides, or everywhere: for
    bounds on feature maps whose channels are not known (`nas.costs`), as they must be
    (no more, no fewer, parameters and FLOPs than with the real channels)."""
    if shortcut == "low":
        return (stride > 1) * 1
    if shortcut == "high":
        return 1 + 0 * k.filters
    return ((stride > 1) | (channels != k.filters)) * 1


def _squeeze(k: ConvKnobs, channels):
    """A squeeze-and-excitation's squeezed channels: the share of the block's input
    channels, at least 1 (EfficientNet's rule)."""
    return np.maximum(1, channels * k.se // _SE_UNIT)


def _se_cost(k: ConvKnobs, channels, squeezed, pixels):
    """Squeeze-and-excitation on `channels` (where `k.se` > 0): average over the map, a
    1x1 conv to `squeezed` and its activation, one back and a sigmoid, the product."""
    on = (k.se > 0) * 1
    params = 2 * channels * squeezed + squeezed + channels
    flops = (2 * pixels * channels + 4 * channels * squeezed + squeezed + channels)
    return on * params, on * flops


def conv_costs(shape, k: ConvKnobs, shortcut: str = "exact"):
    """(height, width, channels, parameters, FLOPs) after a stage's convolutions.

    The layers of `Builder.stage` but the pool, summed, for many options at once: `k`'s
    fields (and the channels of `shape`) may be numpy arrays that broadcast together. A
    height or width below 1 means the option does not fit (`Builder.stage` raises
    `Impossible`, saying why); its costs then mean nothing. `shortcut`: see `_projects`.
    """
    h, w, c = shape
    oh, ow = _conv_size(h, k), _conv_size(w, k)
    params, flops = _conv_unit_costs(k, c, oh * ow)
    for extra in range(1, int(np.max(k.convs))):  # the stacked convs, where there are
        on = (k.convs > extra) * 1
        nh, nw = _next_conv_size(oh, k), _next_conv_size(ow, k)  # never larger
        more_params, more_flops = _conv_unit_costs(k, k.filters, nh * nw)
        params, flops = params + on * more_params, flops + on * more_flops
        oh, ow = oh + on * (nh - oh), ow + on * (nw - ow)
    pixels = oh * ow
    pointwise_params, pointwise_flops = _pointwise_cost(k, pixels)
    params = params + k.pointwise * pointwise_params
    flops = flops + k.pointwise * (pointwise_flops + _activation_flops(k, pixels))
    # A residual block is those convs, squeeze-and-excitation, a shortcut and the sum.
    se_params, se_flops = _se_cost(k, k.filters, _squeeze(k, c), pixels)
    shortcut_params, shortcut_flops = _shortcut_cost(k, c, k.stride, pixels, shortcut)
    residual = (k.block == 1) * 1
    params = params + residual * (se_params + shortcut_params)
    flops = flops + residual * (se_flops + shortcut_flops)
    mb_params, mb_flops = _mbconv_costs(h * w, pixels, c, k, shortcut)
    mbconv = (k.block == 2) * 1
    return (oh, ow, k.filters, params + mbconv * (mb_params - params),
            flops + mbconv * (mb_flops - flops))


def _shortcut_cost(k: ConvKnobs, channels, stride, pixels, shortcut: str):
    """A block's shortcut (a 1x1 conv where `_projects`) and the sum: (parameters, FLOPs)."""
    projects = _projects(k, channels, stride, shortcut)
    params, flops = _normalized_1x1_cost(k, channels, k.filters, pixels)
    return projects * params, projects * flops + pixels * k.filters


def _mbconv_costs(pixels_in, pixels, channels, k: ConvKnobs, shortcut: str):
    """(parameters, FLOPs) of a stage of `k.convs` mbconv blocks, the first taking
    `channels` on `pixels_in` pixels and leaving `pixels`; the others stride 1."""
    params, flops = _mbconv_block_costs(pixels_in, pixels, channels, k.stride, k, shortcut)
    for extra in range(1, int(np.max(k.convs))):
        on = (k.convs > extra) * 1
        more_params, more_flops = _mbconv_block_costs(pixels, pixels, k.filters, 1, k,
                                                      shortcut)
        params, flops = params + on * more_params, flops + on * more_flops
    return params, flops


def _mbconv_block_costs(pixels_in, pixels, channels, stride, k: ConvKnobs, shortcut: str):
    """One mbconv block: a 1x1 expansion (none at ratio 1) with batch norm and
    activation, a depthwise conv with both, squeeze-and-excitation, a 1x1 projection with
    batch norm and no activation, the shortcut and the sum."""
    expanded = channels * k.expand
    expands = (k.expand > 1) * 1
    expand_params, expand_flops = _normalized_1x1_cost(k, channels, expanded, pixels_in)
    expand_flops = expand_flops + _activation_flops(k, pixels_in, expanded)
    depthwise_params = (k.kernel * k.kernel * expanded + expanded * (1 - k.batch_norm)
                        + k.batch_norm * 4 * expanded)
    depthwise_flops = (2 * k.kernel * k.kernel * expanded * pixels
                       + k.batch_norm * 2 * pixels * expanded + pixels * expanded)
    se_params, se_flops = _se_cost(k, expanded, _squeeze(k, channels), pixels)
    project_params, project_flops = _normalized_1x1_cost(k, expanded, k.filters, pixels)
    shortcut_params, shortcut_flops = _shortcut_cost(k, channels, stride, pixels, shortcut)
    return (expands * expand_params + depthwise_params + se_params + project_params
            + shortcut_params,
            expands * expand_flops + depthwise_flops + se_flops + project_flops
            + shortcut_flops)


def _conv_unit_costs(k: ConvKnobs, channels, pixels):
    """One conv of a stage with its batch norm and activation: (parameters, FLOPs)."""
    conv_params, conv_flops = _conv_cost(k, channels, pixels)
    bn_params, bn_flops = _batch_norm_cost(k, pixels)
    return (conv_params + k.batch_norm * bn_params,
            conv_flops + k.batch_norm * bn_flops + _activation_flops(k, pixels))


def pool_costs(shape, k: PoolKnobs):
    """(height, width, channels, parameters, FLOPs) after a stage's pool, as `conv_costs`
    (no pool: the feature map unchanged, at no cost)."""
    h, w, c = shape
    ph, pw = _pooled_size(h, k), _pooled_size(w, k)
    no_params = 0 * ph  # zeros shaped like the other results
    return (h + k.pooled * (ph - h), w + k.pooled * (pw - w), c, no_params,
            k.pooled * _pool_flops(k, c, ph * pw))


class Builder:
    """Adds layers one at a time, tracking the feature map's shape; `stage` and `head`
    raise `Impossible` when a layer does not fit."""

    def __init__(self, input_shape: tuple[int, int, int]):
        self.shape = self.input_shape = input_shape
        self.layers: list[Layer] = []

    def add(self, name, kind, config, shape, params, flops, inputs: tuple = ()):
        self.layers.append(Layer(name, kind, config, tuple(int(d) for d in shape),
                                 int(params), int(flops), tuple(inputs)))
        self.shape = tuple(int(d) for d in shape)

    def augment(self, v: dict) -> None:
        """The augmentation layers `v` turns on (after the rescaling, so on [0, 1] pixels).

        They act in training only: at inference, and in an exported model, each passes
        its input through unchanged, so they cost nothing there (0 FLOPs).
        """
        for name, kind in _AUGMENT_LAYERS.items():
            factor = v.get(f"augment/{name}", 0.0)
            if factor not in (0.0, "none"):
                self.add(f"augment_{name}", kind, {"factor": factor}, self.shape, 0, 0)

    def resize(self, resolution: int | None) -> None:
        """Resize the images to `resolution` x `resolution` (bilinear) inside the model, so
        a served model takes them as they come. A resize reads four pixels for each it
        writes: 8 FLOPs (four multiply-adds) per output element. None, or the size they
        have: nothing."""
        h, w, c = self.shape
        if resolution is None or (h, w) == (resolution, resolution):
            return
        self.add("resizing", "Resizing", {"height": resolution, "width": resolution},
                 (resolution, resolution, c), 0, 8 * resolution * resolution * c)

    def stage(self, stage: int, v: dict) -> None:
        p = f"stage_{stage}/"
        h, w, c = self.shape
        k = ConvKnobs.of(v, p)
        padding, activation = v.get(p + "padding", "same"), v[p + "activation"]
        oh, ow = _conv_size(h, k), _conv_size(w, k)
        if oh < 1 or ow < 1:
            raise Impossible(
                f"stage {stage}: a {k.kernel}x{k.kernel} conv with {padding} padding and "
                f"stride {k.stride} does not fit the {h}x{w} feature map"
            )
        if k.block == _BLOCK_NUMBERS["mbconv"]:
            for n in range(1, k.convs + 1):
                self._mbconv(p, "" if n == 1 else f"_{n}", k, activation,
                             k.stride if n == 1 else 1)
        else:
            block_input = self._last()
            residual = k.block == _BLOCK_NUMBERS["residual"]
            self._conv(p, "", k, padding, activation, c, (oh, ow), k.stride,
                       activated=not residual or k.convs > 1)
            for n in range(2, k.convs + 1):  # stacked convs: stride 1, the stage's padding
                h, w = oh, ow
                oh, ow = _next_conv_size(h, k), _next_conv_size(w, k)
                if oh < 1 or ow < 1:
                    raise Impossible(
                        f"stage {stage}: conv {n} of {k.convs}, {k.kernel}x{k.kernel} with "
                        f"{padding} padding, does not fit the {h}x{w} feature map"
                    )
                self._conv(p, f"_{n}", k, padding, activation, k.filters, (oh, ow), 1,
                           activated=not residual or n < k.convs)
            if residual:  # ResNet's: the last conv's activation comes after the sum
                self._excite(p, "", k, activation, c)
                self._shortcut(p, "", k, block_input, c, k.stride)
                self.add(p + "act_out", "Activation", {"activation": activation},
                         self.shape, 0, _activation_flops(k, oh * ow))
        pixels = oh * ow
        if k.pointwise:
            self.add(p + "pointwise", "Conv2D",
                     {"filters": k.filters, "kernel_size": 1, "strides": 1, "padding": "same",
                      "use_bias": True},
                     self.shape, *_pointwise_cost(k, pixels))
            self.add(p + "pointwise_act", "Activation", {"activation": activation}, self.shape,
                     0, _activation_flops(k, pixels))
        pool, q = v[p + "pool"], PoolKnobs.of(v, p)
        if q.pooled:
            ph, pw = _pooled_size(oh, q), _pooled_size(ow, q)
            if ph < 1 or pw < 1:
                raise Impossible(
                    f"stage {stage}: a {q.size}x{q.size} {pool} pool does not fit the "
                    f"{oh}x{ow} feature map"
                )
            kind = "MaxPooling2D" if pool == "max" else "AveragePooling2D"
            self.add(p + "pool", kind, {"pool_size": q.size, "strides": q.stride},
                     (ph, pw, k.filters), 0, _pool_flops(q, k.filters, ph * pw))

    def _conv(self, p: str, suffix: str, k: ConvKnobs, padding: str, activation: str,
              channels, size: tuple, stride, activated: bool = True) -> None:
        """One conv of a stage (`suffix` "" for its first, "_2"... for the stacked ones),
        with its batch norm and (`activated`) activation."""
        pixels = size[0] * size[1]
        self.add(p + "conv" + suffix, "SeparableConv2D" if k.separable else "Conv2D",
                 {"filters": k.filters, "kernel_size": k.kernel, "strides": stride,
                  "padding": padding, "use_bias": not k.batch_norm},
                 (*size, k.filters), *_conv_cost(k, channels, pixels))
        if k.batch_norm:
            self.add(p + "bn" + suffix, "BatchNormalization", {}, self.shape,
                     *_batch_norm_cost(k, pixels))
        if activated:
            self.add(p + "act" + suffix, "Activation", {"activation": activation}, self.shape,
                     0, _activation_flops(k, pixels))

    def _normalized_1x1(self, name: str, k: ConvKnobs, out: int, stride=1,
                        inputs: tuple = ()) -> None:
        """A 1x1 conv to `out` channels and the stage's batch norm (`name` + "_bn")."""
        h, w, channels = (self.shape if not inputs else self._shape_of(inputs[0]))
        size = (-(-h // stride), -(-w // stride))
        params, flops = _normalized_1x1_cost(k, channels, out, size[0] * size[1])
        conv_params = channels * out + out * (1 - k.batch_norm)
        self.add(name, "Conv2D", {"filters": out, "kernel_size": 1, "strides": stride,
                                  "padding": "same", "use_bias": not k.batch_norm},
                 (*size, out), conv_params, 2 * channels * out * size[0] * size[1], inputs)
        if k.batch_norm:
            self.add(name + "_bn", "BatchNormalization", {}, self.shape,
                     params - conv_params, flops - 2 * channels * out * size[0] * size[1])

    def _excite(self, p: str, suffix: str, k: ConvKnobs, activation: str, channels) -> None:
        """Squeeze-and-excitation on the feature map (where `k.se` > 0): its channels
        weighed by what a squeeze of them, `_squeeze(channels)` wide, makes of the whole."""
        if not k.se:
            return
        h, w, wide = self.shape
        squeezed = int(_squeeze(k, channels))
        excited = self._last()
        self.add(p + "se_squeeze" + suffix, "GlobalAveragePooling2D", {"keepdims": True},
                 (1, 1, wide), 0, h * w * wide)
        self.add(p + "se_reduce" + suffix, "Conv2D",
                 {"filters": squeezed, "kernel_size": 1, "strides": 1, "padding": "same",
                  "use_bias": True}, (1, 1, squeezed), wide * squeezed + squeezed,
                 2 * wide * squeezed)
        self.add(p + "se_reduce_act" + suffix, "Activation", {"activation": activation},
                 self.shape, 0, squeezed)
        self.add(p + "se_expand" + suffix, "Conv2D",
                 {"filters": wide, "kernel_size": 1, "strides": 1, "padding": "same",
                  "use_bias": True}, (1, 1, wide), squeezed * wide + wide, 2 * squeezed * wide)
        self.add(p + "se_gate" + suffix, "Activation", {"activation": "sigmoid"}, self.shape,
                 0, wide)
        self.add(p + "se_scale" + suffix, "Multiply", {}, (h, w, wide), 0, h * w * wide,
                 (excited, p + "se_gate" + suffix))

    def _shortcut(self, p: str, suffix: str, k: ConvKnobs, block_input: str, channels,
                  stride) -> None:
        """The block's input, projected (`_projects`), added to what the block made."""
        made = self._last()
        h, w, _ = self.shape
        source = block_input
        if _projects(k, channels, stride, "exact"):
            self._normalized_1x1(p + "shortcut" + suffix, k, k.filters, stride, (block_input,))
            source = self._last()
        self.add(p + "add" + suffix, "Add", {}, (h, w, k.filters), 0, h * w * k.filters,
                 (made, source))

    def _mbconv(self, p: str, suffix: str, k: ConvKnobs, activation: str, stride) -> None:
        """One mbconv block (MobileNetV2's inverted residual, EfficientNet's with
        squeeze-and-excitation): see `_mbconv_block_costs`."""
        block_input = self._last()
        h, w, channels = self.shape
        expanded = channels * k.expand
        if k.expand > 1:
            self._normalized_1x1(p + "expand" + suffix, k, expanded)
            self.add(p + "expand_act" + suffix, "Activation", {"activation": activation},
                     self.shape, 0, h * w * expanded)
        oh, ow = -(-h // stride), -(-w // stride)
        pixels = oh * ow
        weights = k.kernel * k.kernel * expanded
        self.add(p + "depthwise" + suffix, "DepthwiseConv2D",
                 {"kernel_size": k.kernel, "strides": stride, "padding": "same",
                  "use_bias": not k.batch_norm}, (oh, ow, expanded),
                 weights + expanded * (1 - k.batch_norm), 2 * weights * pixels)
        if k.batch_norm:
            self.add(p + "depthwise_bn" + suffix, "BatchNormalization", {}, self.shape,
                     4 * expanded, 2 * pixels * expanded)
        self.add(p + "depthwise_act" + suffix, "Activation", {"activation": activation},
                 self.shape, 0, pixels * expanded)
        self._excite(p, suffix, k, activation, channels)
        self._normalized_1x1(p + "project" + suffix, k, k.filters)  # linear: no activation
        self._shortcut(p, suffix, k, block_input, channels, stride)

    def _last(self) -> str:
        """The name of the last layer added ("image": the model's input, `INPUT`)."""
        return self.layers[-1].name if self.layers else INPUT

    def _shape_of(self, name: str) -> tuple:
        return next((layer.output_shape for layer in reversed(self.layers)
                     if layer.name == name), self.input_shape)

    def head(self, v: dict, num_classes: int) -> None:
        self.reduce(v)
        self.dense(v, num_classes)

    def reduce(self, v: dict) -> None:
        """The layer that turns the feature map into a vector."""
        h, w, c = self.shape
        reduce = v["reduce"]
        if reduce == "flatten":
            self.add("flatten", "Flatten", {}, (h * w * c,), 0, 0)
        else:
            kind = "GlobalAveragePooling2D" if reduce == "global_avg" else "GlobalMaxPooling2D"
            self.add(reduce, kind, {}, (c,), 0, h * w * c)

    def dense(self, v: dict, num_classes: int) -> None:
        """The dense layers on that vector, then the output layer."""
        for layer in range(1, v["dense_layers"] + 1):
            (width,) = self.shape
            units, rate = v[f"dense_{layer}/units"], v[f"dense_{layer}/dropout"]
            self.add(f"dense_{layer}", "Dense", {"units": units, "activation": "relu"},
                     (units,), width * units + units, 2 * width * units)
            if rate > 0:
                self.add(f"dropout_{layer}", "Dropout", {"rate": rate}, (units,), 0, 0)
        (width,) = self.shape
        self.add("output", "Dense", {"units": num_classes, "activation": "softmax"},
                 (num_classes,), width * num_classes + num_classes, 2 * width * num_classes)
