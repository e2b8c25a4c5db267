"""A seeded generator of small random models, for the property-based tests (tests/test_properties.py).

``generate(seed)`` returns a model as plain data: a *structure* (a family: plain ``jax.numpy``, Flax linen,
Flax NNX or Equinox, and a tuple of frozen op records: conv, dense, norms, pooling, residuals,
concatenations, tokens, FiLM, scans, jitted blocks, bf16 blocks) and its *values* (parameters as numpy
arrays, inputs, a target class per row). Nothing touches JAX until ``Model.build()`` turns the records into
that family's idiomatic code (``nn.Conv``, ``nnx.BatchNorm``, ``eqx.nn.Conv``, ``lax.conv_general_dilated``,
...): every family runs the same ops on the same numbers, so a seed always reproduces the same model.

Models come in groups of VALUE_SETS: seeds ``k * VALUE_SETS ... k * VALUE_SETS + VALUE_SETS - 1`` share
structure ``k`` and differ in their values, one group member per VARIANTS entry (random values, large
negative biases that kill ReLUs, all-zero inputs). The tests explain a group in one vmapped pass: eager jlrp
pays an XLA compile for every new (primitive, shape, parameters), which dominates the cost of a model, and a
group pays it once. For the same reason the shapes are regular (batch 2, 3 input and 4 hidden channels,
dense width 8, one base size per dimensionality, convs that mostly keep it): structurally different models
then share compiled kernels too. The randomness goes into the structure, the layer options and the values.

    python -c "import sys; sys.path.insert(0, 'tests'); import modelgen; print(modelgen.generate(17))"
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from typing import Any, Callable

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

F64, BF16 = "float64", "bfloat16"
BATCH = 2
CLASSES = 3
IN_CHANNELS = 3
CHANNELS = 4  # every hidden conv layer
IN_FEATURES = 5  # input width of the dense-only models
FEATURES = 8  # every hidden dense layer
META = 3  # width of the FiLM conditioning input
BASE_SIZE = {1: (8,), 2: (6, 6), 3: (4, 4, 4)}
BOUNDS = (-3.0, 3.0)  # inputs are clipped to these (the z^B rule's box)
EPS = 1e-5  # every normalisation's epsilon
FAMILIES = ("jnp", "linen", "nnx", "equinox")
# the value sets of one structure: random values, large negative biases (dead ReLUs), all-zero inputs
VARIANTS = ("random", "dead", "random", "zeros", "random", "random", "dead", "random", "zeros", "random")
VALUE_SETS = len(VARIANTS)
DEAD_BIAS = -30.0  # kills a ReLU for any input the generator draws


# --------------------------------------------------------------------------------------------------------
# Ops: frozen (hashable) records, so they can be static arguments of jax.jit and attributes of NNX modules.
# Parameter values live outside them, in Model.values[name][key] (shapes: value_shapes); names are unique
# within a structure.

def _padding_code(padding) -> str:
    if padding == "SAME":
        return ""
    if padding == "VALID":
        return "v"
    return f"p{padding[0]}{padding[1]}"


@dataclasses.dataclass(frozen=True)
class Conv:
    """A convolution, channel-last in canonical layout; 'padding' is SAME, VALID or one explicit (low, high)
    pair used for every spatial axis."""
    name: str
    dims: int
    cin: int
    cout: int
    kernel: int = 3
    stride: int = 1
    padding: Any = "SAME"
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    dtype: str = F64

    def __str__(self):
        return (f"conv{self.kernel}{_padding_code(self.padding)}" + (f"s{self.stride}" if self.stride > 1 else "")
                + (f"d{self.dilation}" if self.dilation > 1 else "") + (f"g{self.groups}" if self.groups > 1 else "")
                + ("" if self.bias else "nb"))


@dataclasses.dataclass(frozen=True)
class Dense:
    name: str
    fin: int
    fout: int
    bias: bool = True
    dtype: str = F64

    def __str__(self):
        return f"dense{self.fout}" + ("" if self.bias else "nb")


@dataclasses.dataclass(frozen=True)
class Norm:
    """Over the channel axis: 'batch' (inference mode: frozen statistics), 'group' or 'layer'."""
    name: str
    kind: str
    channels: int
    groups: int = 2

    def __str__(self):
        return {"batch": "bn", "group": "gn", "layer": "ln"}[self.kind]


@dataclasses.dataclass(frozen=True)
class Relu:
    def __str__(self):
        return "relu"


@dataclasses.dataclass(frozen=True)
class Pool:
    kind: str  # 'max' or 'avg' (the window sum over the window size, padding included)
    dims: int
    window: int = 2
    stride: int = 2
    padding: str = "VALID"

    def __str__(self):
        return (f"{self.kind}{self.window}" + (f"s{self.stride}" if self.stride != self.window else "")
                + ("same" if self.padding == "SAME" else ""))


@dataclasses.dataclass(frozen=True)
class Pad:
    """Explicit zero padding of every spatial axis (Keras' ZeroPadding), before a VALID conv."""
    dims: int
    low: int
    high: int

    def __str__(self):
        return f"pad{self.low}{self.high}"


@dataclasses.dataclass(frozen=True)
class Residual:
    body: tuple

    def __str__(self):
        return f"res({_describe(self.body)})"


@dataclasses.dataclass(frozen=True)
class Branches:
    """Two branches concatenated along the channel axis."""
    left: tuple
    right: tuple

    def __str__(self):
        return f"cat({_describe(self.left)}|{_describe(self.right)})"


@dataclasses.dataclass(frozen=True)
class Token:
    """A value that does not depend on the inputs, concatenated into the activation stream: a CLS-like token
    along a sequence ('sequence', shape (1, channels)), a coordinate map as an extra channel ('channel',
    shape (*spatial, 1)) or extra features ('feature', shape (2,)); a parameter or a constant (its value
    is then part of the structure: Structure.constants)."""
    name: str
    where: str
    learned: bool
    shape: tuple

    def __str__(self):
        return f"tok{self.where[:3]}{'P' if self.learned else 'C'}"


@dataclasses.dataclass(frozen=True)
class ScaleBias:
    """h * S + B with S of 'shape' (*spatial, channels), varying over space: it cannot be folded into the
    conv before it."""
    name: str
    shape: tuple

    def __str__(self):
        return "xS+B"


@dataclasses.dataclass(frozen=True)
class Film:
    """FiLM-style additive conditioning on the second explained input: h + (meta @ V) broadcast over space."""
    name: str
    dims: int
    channels: int

    def __str__(self):
        return "+film"


@dataclasses.dataclass(frozen=True)
class AddInput:
    """h + c, the second explained input c of shape (features,) broadcast over the batch."""

    def __str__(self):
        return "+c"


@dataclasses.dataclass(frozen=True)
class Scan:
    """'length' copies of a shape-preserving layer (then a ReLU) with stacked weights, run by the family's
    scan (lax.scan, nn.scan, nnx.scan); the values carry the steps on a leading axis."""
    name: str
    cell: Any  # Conv or Dense
    length: int

    def __str__(self):
        return f"scan{self.length}({self.cell})"


@dataclasses.dataclass(frozen=True)
class Jit:
    """A sub-block run under the family's jit (jax.jit, nn.jit, jax.jit of NNX's split/merge, eqx.filter_jit)."""
    name: str
    body: tuple

    def __str__(self):
        return f"jit({_describe(self.body)})"


@dataclasses.dataclass(frozen=True)
class Bf16:
    """The body runs in bfloat16: a cast in, layers computing in bfloat16, a cast back."""
    body: tuple

    def __str__(self):
        return f"bf16({_describe(self.body)})"


@dataclasses.dataclass(frozen=True)
class Flatten:
    def __str__(self):
        return "flat"


@dataclasses.dataclass(frozen=True)
class GlobalPool:
    dims: int

    def __str__(self):
        return "gap"


def _describe(ops) -> str:
    return "-".join(str(op) for op in ops)


def _children(op) -> tuple:
    if isinstance(op, (Residual, Jit, Bf16)):
        return op.body
    if isinstance(op, Branches):
        return op.left + op.right
    return ()


def walk(ops):
    """Every op, depth first (bodies included, scan cells not: a Scan owns its cell's values)."""
    for op in ops:
        yield op
        yield from walk(_children(op))


def step_name(name: str, t: int) -> str:
    """The name of step t of an unrolled scan (its weights are the stacked ones at index t)."""
    return f"{name}_{t}"


def value_shapes(op) -> dict:
    """The shapes of an op's parameter arrays, by key (empty for ops without parameters)."""
    match op:
        case Conv():
            shapes = {"kernel": (op.kernel,) * op.dims + (op.cin // op.groups, op.cout)}
            return shapes | ({"bias": (op.cout,)} if op.bias else {})
        case Dense():
            return {"kernel": (op.fin, op.fout)} | ({"bias": (op.fout,)} if op.bias else {})
        case Norm():
            shapes = {"scale": (op.channels,), "bias": (op.channels,)}
            return shapes | ({"mean": (op.channels,), "var": (op.channels,)} if op.kind == "batch" else {})
        case Token(learned=True):
            return {"token": op.shape}
        case ScaleBias():
            return {"scale": op.shape, "bias": op.shape[-1:]}
        case Film():
            return {"proj": (META, op.channels)}
        case Scan():
            return {key: (op.length,) + shape for key, shape in value_shapes(op.cell).items()}
    return {}


# --------------------------------------------------------------------------------------------------------
# Structures and models

class Frozen:
    """Constant arrays by name, as a static attribute of modules and pytrees: hashed and compared by identity,
    so the models of one structure (which share this object) have equal tree structures and NNX graphs."""

    def __init__(self, values: dict):
        self.values = values

    def __getitem__(self, key):
        return self.values[key]


@dataclasses.dataclass(frozen=True, eq=False)
class Structure:
    index: int
    family: str
    dims: int  # 0 for dense-only models
    ops: tuple
    constants: Frozen  # constant tokens: name -> {"token": array}
    extra_shape: tuple | None  # the second explained input: FiLM's meta (BATCH, META) or c (features,)
    tags: frozenset  # features, for coverage counts and failure grouping

    @property
    def description(self) -> str:
        return f"{self.family}-{self.dims}d-{_describe(self.ops)}"

    @property
    def input_shape(self) -> tuple:
        return (BATCH,) + (BASE_SIZE[self.dims] + (IN_CHANNELS,) if self.dims else (IN_FEATURES,))

    @property
    def float64(self) -> bool:
        return "bf16" not in self.tags

    @property
    def piecewise_linear(self) -> bool:
        """ReLU, pooling, adds, concatenation and affine maps with frozen statistics only (LayerNorm and
        GroupNorm compute their statistics from the activations: not piecewise linear)."""
        return self.float64 and not self.tags & {"groupnorm", "layernorm"}

    @property
    def has_twin(self) -> bool:
        """Scans and jitted blocks have a twin: the same model unrolled / inlined."""
        return bool(self.tags & {"scan", "jit"})


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    seed: int
    structure: Structure
    variant: str  # 'random', 'dead' (large negative biases) or 'zeros' (all-zero inputs)
    values: dict  # name -> key -> np.ndarray, canonical (channel-last) layouts
    x: np.ndarray  # canonical layout (batch, *spatial, channels) or (batch, features)
    extra: np.ndarray | None  # the second explained input, if any
    target: np.ndarray  # one class per row

    family = property(lambda self: self.structure.family)
    dims = property(lambda self: self.structure.dims)
    ops = property(lambda self: self.structure.ops)

    @property
    def tags(self) -> frozenset:
        return self.structure.tags | {self.variant}

    @property
    def id(self) -> str:
        return model_id(self.seed)

    def build(self, unroll: bool = False) -> "Built":
        """The model as ``fn(params, *inputs)`` in its family's idiom. unroll=True gives the twin: scans as
        Python loops over the stacked weights, jitted blocks inlined; it computes the same function."""
        return _BUILDERS[self.family](self, unroll)

    def __str__(self):
        return f"Model({self.id}, tags={sorted(self.tags)})"


@dataclasses.dataclass(frozen=True)
class Built:
    fn: Callable
    args: tuple  # (params, x) or (params, x, extra)
    argnums: tuple  # the explained inputs: (1,) or (1, 2)


def model_id(seed: int) -> str:
    """the readable id of a seed's model (without drawing its values): seed, structure, variant"""
    return f"{seed}-{generate_structure(seed // VALUE_SETS).description}-{VARIANTS[seed % VALUE_SETS]}"


def generate(seed: int) -> Model:
    """The model of ``seed``: same seed, same model (structure, values, inputs and target)."""
    structure = generate_structure(seed // VALUE_SETS)
    variant = VARIANTS[seed % VALUE_SETS]
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the values never shift the structure
    values = {op.name: _draw_values(op, rng) for op in walk(structure.ops) if value_shapes(op)}
    if variant == "dead":  # about half the units of every bias get a large negative bias
        for group in values.values():
            if "bias" in group:
                group["bias"] = np.where(rng.random(group["bias"].shape) < 0.5, DEAD_BIAS, group["bias"])
    x = np.clip(rng.normal(size=structure.input_shape), *BOUNDS)
    extra = None if structure.extra_shape is None else np.clip(rng.normal(size=structure.extra_shape), *BOUNDS)
    if variant == "zeros":
        x = np.zeros_like(x)
        extra = None if extra is None else np.zeros_like(extra)
    target = rng.integers(0, CLASSES, BATCH)
    return Model(seed, structure, variant, values, x, extra, target)


def _draw_values(op, rng) -> dict:
    """Parameter values: He-scaled weights, biases of 0.3, norms with non-trivial statistics and scales
    (negative ones included)."""
    shapes = value_shapes(op)
    match op:
        case Conv() | Dense() | Scan():
            kernel = shapes["kernel"]
            fan_in = math.prod(kernel[:-1]) // (op.length if isinstance(op, Scan) else 1)
            values = {"kernel": rng.normal(size=kernel) * math.sqrt(2.0 / fan_in)}
            return values | ({"bias": rng.normal(size=shapes["bias"]) * 0.3} if "bias" in shapes else {})
        case Norm():
            c = op.channels
            values = {"scale": rng.uniform(-1.5, 1.5, c), "bias": rng.normal(size=c) * 0.3}
            return values | ({"mean": rng.normal(size=c) * 0.5, "var": rng.uniform(0.5, 2.0, c)}
                             if op.kind == "batch" else {})
        case ScaleBias():
            return {"scale": rng.uniform(-1.5, 1.5, shapes["scale"]), "bias": rng.normal(size=shapes["bias"]) * 0.3}
        case Film():
            return {"proj": rng.normal(size=shapes["proj"]) / math.sqrt(META)}
    return {key: rng.normal(size=shape) for key, shape in shapes.items()}  # learned tokens


# --------------------------------------------------------------------------------------------------------
# The structure generator

def _out_size(size: int, kernel: int, stride: int, padding, dilation: int = 1) -> int:
    extent = dilation * (kernel - 1) + 1
    if padding == "SAME":
        return -(-size // stride)
    low, high = (0, 0) if padding == "VALID" else padding
    return (size + low + high - extent) // stride + 1


# Structure k is built around FOCUS[k % len(FOCUS)] (stratified sampling): every feature turns up every
# len(FOCUS) structures, so even the default run's few dozen structures cover them all.
FOCUS = [("conv", kind) for kind in ("conv", "preact", "pool", "branches", "pad", "token", "scale_bias", "jit",
                                     "bf16", "film", "residual", "scan")]
FOCUS += [("dense", kind) for kind in ("token", "input", "residual", "scan", "jit", "bf16")]


@functools.lru_cache(maxsize=None)
def generate_structure(index: int) -> Structure:
    """Structure ``index`` (cached: all models of a group share one Structure object)."""
    draw = _Draw(index)
    stage, focus = FOCUS[index % len(FOCUS)]
    draw.extra_reserved = focus in ("film", "input")  # random blocks leave the second input to the focus
    # families rotate, shifted by one every FOCUS cycle, so that every focus meets every family
    family = FAMILIES[(index + index // len(FOCUS)) % len(FAMILIES)]
    dims = draw.pick([1, 2, 3], [3, 3, 2]) if stage == "conv" else draw.pick([0, 1, 2, 3], [4, 2, 2, 1])
    draw.dims = dims
    ops = []
    if dims:
        draw.spatial, draw.channels = BASE_SIZE[dims], IN_CHANNELS
        ops = draw.conv_stage(draw.pick([1, 2, 3], [4, 3, 1]), focus if stage == "conv" else None)
        ops.append(GlobalPool(dims) if draw.chance(0.4) else Flatten())
        if isinstance(ops[-1], Flatten):
            draw.channels *= math.prod(draw.spatial)
    else:
        draw.channels = IN_FEATURES
    ops += draw.dense_stage(draw.pick([0, 1, 2], [4, 3, 1]), focus if stage == "dense" else None)
    ops += draw.head()
    tags = frozenset(draw.tags | {family, f"{dims}d"})
    return Structure(index, family, dims, tuple(ops), Frozen(draw.constants), draw.extra_shape, tags)


class _Draw:
    """The random choices of one structure. Blocks are appended while the stream's shape (channels and
    spatial size, or features) is tracked, so every choice is valid where it is made."""

    def __init__(self, index: int):
        self.rng = np.random.default_rng([index, 0])
        self.constants: dict[str, dict[str, np.ndarray]] = {}
        self.tags: set[str] = set()
        self.count = 0
        self.extra_shape: tuple | None = None  # set once a block uses the second explained input
        self.extra_reserved = False
        self.dims = 0
        self.spatial: tuple[int, ...] = ()
        self.channels = 0  # channels, or features in the dense stage
        self.dtype = F64

    # ------------------------------------------------------------------ helpers
    def pick(self, options, weights=None):
        weights = None if weights is None else np.asarray(weights, float) / np.sum(weights)
        return options[self.rng.choice(len(options), p=weights)]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def name(self) -> str:
        self.count += 1
        return f"l{self.count}"

    # ------------------------------------------------------------------ layers
    def conv(self, cout: int, free: bool = True, cin: int | None = None, valid: bool = False) -> Conv:
        """A conv from the current stream. Most convs are 3-wide, SAME, stride 1; a 'free' conv deviates in
        one option (sometimes two): kernel 1 or 2, stride 2, VALID or an explicit padding pair, dilation 2,
        or feature groups. free=False keeps the shape."""
        cin = self.channels if cin is None else cin
        options = dict(kernel=3, stride=1, padding="VALID" if valid else "SAME", dilation=1, groups=1)
        for _ in range((1 + self.chance(0.25)) if free and self.chance(0.6) else 0):
            self.deviate(options, cin, cout)
        sizes = [_out_size(s, options["kernel"], options["stride"], options["padding"], options["dilation"])
                 for s in self.spatial]
        if min(sizes) < 1:  # does not fit: fall back to a shape-keeping conv
            options.update(stride=1, padding="SAME", dilation=1)
            sizes = list(self.spatial)
        op = Conv(self.name(), self.dims, cin, cout, bias=self.chance(0.85), dtype=self.dtype, **options)
        self.tags.update({f"conv{self.dims}d",
                          f"padding-{op.padding}" if isinstance(op.padding, str) else "padding-explicit"})
        self.tags.update(tag for tag, on in [("stride", op.stride > 1), ("dilation", op.dilation > 1),
                                             ("groups", op.groups > 1), (f"kernel{op.kernel}", op.kernel != 3)] if on)
        self.spatial, self.channels = tuple(sizes), cout
        return op

    def deviate(self, options: dict, cin: int, cout: int):
        """change one conv option away from the common 3-wide SAME stride-1 conv"""
        kinds = ["kernel", "stride", "valid", "explicit", "dilation"] + (["groups"] * 2 if cin % 2 == cout % 2 == 0 else [])
        match self.pick(kinds):
            case "kernel":
                options.update(kernel=self.pick([1, 2]), dilation=1)
            case "stride":
                options["stride"] = 2
            case "valid":
                options["padding"] = "VALID"
            case "explicit":
                options["padding"] = self.pick([(1, 0), (0, 2), (2, 2)])
            case "dilation":
                options["dilation"] = 2 if options["kernel"] > 1 else 1
            case "groups":
                options["groups"] = cin if cin == cout and self.chance(0.5) else 2

    def dense(self, fout: int) -> Dense:
        op = Dense(self.name(), self.channels, fout, bias=self.chance(0.85), dtype=self.dtype)
        self.channels = fout
        self.tags.add("dense")
        return op

    def norm(self, kind: str) -> Norm:
        self.tags.add({"batch": "batchnorm", "group": "groupnorm", "layer": "layernorm"}[kind])
        return Norm(self.name(), kind, self.channels)

    # ------------------------------------------------------------------ conv-stage blocks
    def conv_block(self) -> list:
        """conv [-> BatchNorm / GroupNorm / LayerNorm] -> relu"""
        ops = [self.conv(CHANNELS)]
        post = self.pick([None, "batch", "group", "layer"], [5, 3, 1, 1]) if self.dtype == F64 else None
        if post:
            ops.append(self.norm(post))
            self.tags.add("norm-after-conv")
        return ops + [Relu()]

    def preact_block(self) -> list:
        """BatchNorm -> relu -> conv (pre-activation, as in DenseNet): the BN cannot be folded into a conv"""
        self.tags.add("batchnorm-before-conv")
        return [self.norm("batch"), Relu(), self.conv(CHANNELS, free=self.chance(0.5))]

    def residual_block(self) -> list:
        self.tags.add("residual")
        body = [self.conv(CHANNELS, free=False), Relu(), self.conv(CHANNELS, free=False)]
        if self.chance(0.3):
            body.append(self.norm("batch"))
        return [Residual(tuple(body)), Relu()]

    def branches_block(self) -> list:
        """two convs (the right one sometimes after a 3-wide max pool with stride 1) concatenated"""
        self.tags.add("concat-branches")
        cin = self.channels
        left = (self.conv(CHANNELS // 2, free=False, cin=cin),)
        right = ()
        if self.chance(0.3):
            right = (Pool("max", self.dims, 3, 1, "SAME"),)
            self.tags.add("maxpool")
        right += (self.conv(CHANNELS // 2, free=False, cin=cin),)
        self.channels = CHANNELS
        return [Branches(left, right), Relu()]

    def pool_block(self) -> list:
        """2-wide, stride 2, VALID pooling; sometimes 3-wide, stride 1 or SAME"""
        kind = self.pick(["max", "avg"])
        window, stride, padding = 2, 2, "VALID"
        if self.chance(0.4):
            window, stride, padding = self.pick([(3, 2, "VALID"), (2, 1, "VALID"), (3, 2, "SAME"), (2, 2, "SAME")])
        sizes = [_out_size(s, window, stride, padding) for s in self.spatial]
        if min(sizes) < 1:
            return []
        self.spatial = tuple(sizes)
        self.tags.add(f"{kind}pool")
        return [Pool(kind, self.dims, window, stride, padding)]

    def pad_block(self) -> list:
        """jnp.pad zero padding, then a VALID conv (Keras' ZeroPadding2D + Conv2D)"""
        low, high = self.pick([(1, 1), (1, 0), (2, 1)], [3, 1, 1])
        self.tags.add("explicit-pad")
        self.spatial = tuple(s + low + high for s in self.spatial)
        return [Pad(self.dims, low, high), self.conv(CHANNELS, valid=True), Relu()]

    def token_block(self) -> list:
        """a constant or learned value concatenated into the stream, then a conv back to CHANNELS"""
        learned = self.chance(0.5)
        if self.dims == 1:  # a CLS-like token: one more position
            op = Token(self.name(), "sequence", learned, (1, self.channels))
            constant = self.rng.normal(size=op.shape)
            self.spatial = (self.spatial[0] + 1,)
        else:  # a coordinate map: one more channel
            op = Token(self.name(), "channel", learned, self.spatial + (1,))
            grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in self.spatial], indexing="ij")
            constant = sum(grid)[..., None] * self.rng.uniform(0.5, 1.5)
            self.channels += 1
        if not learned:
            self.constants[op.name] = {"token": constant}
        self.tags.add("token-learned" if learned else "token-constant")
        return [op, self.conv(CHANNELS, free=False), Relu()]

    def film_block(self) -> list:
        self.extra_shape = (BATCH, META)
        conv = self.conv(CHANNELS, free=self.chance(0.5))
        self.tags.add("film")
        return [conv, Film(self.name(), self.dims, CHANNELS), Relu()]

    def scale_bias_block(self) -> list:
        """relu(conv(x) * S + B), S varying over space: not foldable into the conv"""
        conv = self.conv(CHANNELS, free=self.chance(0.5))
        self.tags.add("scale-then-bias")
        return [conv, ScaleBias(self.name(), self.spatial + (CHANNELS,)), Relu()]

    def scan_block(self, conv: bool) -> list:
        name = self.name()
        cell = self.conv(self.channels, free=False) if conv else self.dense(self.channels)
        self.tags.add("scan")
        return [Scan(name, cell, self.pick([2, 3]))]

    def jit_block(self, body: list) -> list:
        self.tags.add("jit")
        return [Jit(self.name(), tuple(body))]

    def bf16_block(self, body_fn) -> list:
        self.dtype = BF16
        body = body_fn()
        self.dtype = F64
        self.tags.add("bf16")
        return [Bf16(tuple(body))]

    # ------------------------------------------------------------------ dense-stage blocks
    def dense_block(self) -> list:
        ops = [self.dense(FEATURES)]
        if self.dtype == F64 and self.chance(0.25):
            ops.append(self.norm("batch"))
        return ops + [Relu()]

    def dense_residual_block(self) -> list:
        self.tags.add("residual")
        return [Residual((self.dense(FEATURES), Relu(), self.dense(FEATURES))), Relu()]

    def feature_token_block(self) -> list:
        learned = self.chance(0.5)
        op = Token(self.name(), "feature", learned, (2,))
        if not learned:
            self.constants[op.name] = {"token": self.rng.normal(size=op.shape)}
        self.channels += 2
        self.tags.add("token-learned" if learned else "token-constant")
        return [op] + self.dense_block()

    def add_input_block(self) -> list:
        """x @ W + c with c a second explained input of shape (features,), broadcast over the batch"""
        self.extra_shape = (FEATURES,)
        self.tags.add("broadcast-input")
        return [self.dense(FEATURES), AddInput(), Relu()]

    # ------------------------------------------------------------------ stages
    def stage(self, blocks: int, focus: str | None, menu_fn, block_fn, width: int) -> list:
        """'blocks' random blocks, one of them the focus block (after a plain block if the focus needs the
        stream to have 'width' channels / features and it has not yet)"""
        kinds = [None] * blocks
        if focus:
            kinds[self.rng.integers(0, blocks)] = focus
            if focus in ("residual", "scan") and self.channels != width and kinds[0] == focus:
                kinds.insert(0, "conv" if width == CHANNELS else "dense")
        ops = []
        for kind in kinds:
            if kind is None:
                menu = menu_fn()
                kind = self.pick(list(menu), list(menu.values()))
            ops += block_fn(kind)
        return ops

    def conv_stage(self, blocks: int, focus: str | None = None) -> list:
        def menu():
            free_extra = self.extra_shape is None and not self.extra_reserved
            return {"conv": 8, "preact": 2, "pool": 3, "branches": 2, "pad": 2, "token": 1.5, "scale_bias": 1.5,
                    "jit": 1.5, "bf16": 1.5, "film": 1.5 if free_extra else 0,
                    "residual": 2.5 if self.channels == CHANNELS else 0,
                    "scan": 2 if self.channels == CHANNELS else 0}
        return self.stage(blocks, focus, menu, self.conv_stage_block, CHANNELS)

    def conv_stage_block(self, kind: str) -> list:
        if kind == "jit":  # a plain block (or a residual one) under jit
            inner = "residual" if self.channels == CHANNELS and self.chance(0.4) else "conv"
            return self.jit_block(self.conv_stage_block(inner))
        if kind == "bf16":
            return self.bf16_block(lambda: [self.conv(CHANNELS), Relu()])
        if kind == "scan":
            return self.scan_block(conv=True)
        return {"conv": self.conv_block, "preact": self.preact_block, "pool": self.pool_block,
                "branches": self.branches_block, "pad": self.pad_block, "token": self.token_block,
                "scale_bias": self.scale_bias_block, "film": self.film_block,
                "residual": self.residual_block}[kind]()

    def dense_stage(self, blocks: int, focus: str | None = None) -> list:
        def menu():
            free_extra = self.extra_shape is None and not self.extra_reserved
            return {"dense": 5, "token": 1, "jit": 1, "bf16": 0.7, "input": 1.5 if free_extra else 0,
                    "residual": 1.5 if self.channels == FEATURES else 0,
                    "scan": 2 if self.channels == FEATURES else 0}
        return self.stage(max(blocks, 1) if focus else blocks, focus, menu, self.dense_stage_block, FEATURES)

    def dense_stage_block(self, kind: str) -> list:
        if kind == "jit":
            inner = "residual" if self.channels == FEATURES and self.chance(0.4) else "dense"
            return self.jit_block(self.dense_stage_block(inner))
        if kind == "bf16":
            return self.bf16_block(lambda: [self.dense(FEATURES), Relu()])
        if kind == "scan":
            return self.scan_block(conv=False)
        return {"dense": self.dense_block, "token": self.feature_token_block, "input": self.add_input_block,
                "residual": self.dense_residual_block}[kind]()

    def head(self) -> list:
        """the logits: x @ W (+ b) (+ c, the second explained input, sometimes)"""
        ops = [self.dense(CLASSES)]
        if self.extra_shape is None and not self.extra_reserved and self.chance(0.08):
            self.extra_shape = (CLASSES,)
            self.tags.add("broadcast-input")
            ops.append(AddInput())
        return ops


# --------------------------------------------------------------------------------------------------------
# Layouts: jnp, linen and NNX models run on batched channel-last arrays; Equinox models on one example
# at a time, channel-first (as Equinox expects), under jax.vmap.

@dataclasses.dataclass(frozen=True)
class Layout:
    batched: bool  # True: (batch, *spatial, channels); False: one example, (channels, *spatial)

    @property
    def channel(self) -> int:
        return -1 if self.batched else 0

    def per_channel(self, v, dims: int):
        """a (channels,) vector, broadcastable against the stream"""
        return v if self.batched else v.reshape(v.shape + (1,) * dims)

    def spatial_map(self, v):
        """a canonical (*spatial, channels) array in this layout"""
        return v if self.batched else jnp.moveaxis(v, -1, 0)

    def pad_widths(self, op: Pad):
        pads = [(op.low, op.high)] * op.dims
        return [(0, 0)] + pads + [(0, 0)] if self.batched else [(0, 0)] + pads

    def token(self, h, op: Token, value):
        """concatenate a token, broadcast over the batch, into the stream"""
        value = value if self.batched else jnp.moveaxis(value, -1, 0)
        axis = 1 if op.where == "sequence" else self.channel
        shape = list(h.shape)
        shape[axis] = value.shape[axis - 1 if self.batched and axis > 0 else axis]
        return jnp.concatenate([h, jnp.broadcast_to(value, shape)], axis=axis)

    def film(self, shift, dims: int):
        """(meta @ V)[:, None, None, :] in the batched layout"""
        if self.batched:
            return shift.reshape(shift.shape[:1] + (1,) * dims + shift.shape[1:])
        return shift.reshape(shift.shape + (1,) * dims)

    def flatten(self, h):
        # channel-last order in both layouts, so the dense weights after it are the same
        return h.reshape(h.shape[0], -1) if self.batched else jnp.moveaxis(h, 0, -1).reshape(-1)

    def global_pool(self, h, dims: int):
        return h.mean(axis=tuple(range(1, dims + 1)))


BATCHED, UNBATCHED = Layout(True), Layout(False)


@dataclasses.dataclass(frozen=True)
class Ctx:
    layers: Any  # the family's layer provider: conv, dense, norm, pool, scan, jit, array
    layout: Layout
    extra: Any = None  # the second explained input
    constants: Any = None  # Structure.constants: the values of constant tokens
    unroll: bool = False


def run(ops, h, ctx: Ctx):
    """The forward pass shared by all families; the family provides the layers with parameters."""
    for op in ops:
        h = _apply(op, h, ctx)
    return h


def _apply(op, h, ctx: Ctx):
    layers, layout = ctx.layers, ctx.layout
    match op:
        case Conv():
            return layers.conv(op, h)
        case Dense():
            return layers.dense(op, h)
        case Norm():
            return layers.norm(op, h)
        case Relu():
            return jax.nn.relu(h)
        case Pool():
            return layers.pool(op, h)
        case Pad():
            return jnp.pad(h, layout.pad_widths(op))
        case Residual():
            return h + run(op.body, h, ctx)
        case Branches():
            return jnp.concatenate([run(op.left, h, ctx), run(op.right, h, ctx)], axis=layout.channel)
        case Token():
            value = layers.array(op, "token") if op.learned else jnp.asarray(ctx.constants[op.name]["token"])
            return layout.token(h, op, value.astype(h.dtype))
        case ScaleBias():
            return (h * layout.spatial_map(layers.array(op, "scale"))
                    + layout.per_channel(layers.array(op, "bias"), h.ndim - 1 - layout.batched))
        case Film():
            return h + layout.film(ctx.extra @ layers.array(op, "proj"), op.dims)
        case AddInput():
            return h + ctx.extra
        case Scan() if ctx.unroll:
            for t in range(op.length):
                h = jax.nn.relu(_apply(dataclasses.replace(op.cell, name=step_name(op.name, t)), h, ctx))
            return h
        case Scan():
            return layers.scan(op, h)
        case Jit() if ctx.unroll:
            return run(op.body, h, ctx)
        case Jit():
            return layers.jit(op, h)
        case Bf16():
            return run(op.body, h.astype(jnp.bfloat16), ctx).astype(h.dtype)
        case Flatten():
            return layout.flatten(h)
        case GlobalPool():
            return layout.global_pool(h, op.dims)
    raise TypeError(f"unknown op {op!r}")


def _unrolled_values(model: Model, unroll: bool) -> dict:
    """Model.values, plus one entry per step of every scan when unrolled (an unrolled step has the name
    step_name(scan, t) and the scan's values at index t)."""
    values = dict(model.values)
    if unroll:
        for op in walk(model.ops):
            if isinstance(op, Scan):
                for t in range(op.length):
                    values[step_name(op.name, t)] = {k: v[t] for k, v in model.values[op.name].items()}
    return values


def _dtype(op):
    return jnp.bfloat16 if getattr(op, "dtype", F64) == BF16 else None


def _inputs(model: Model, layout_fn=lambda a: a) -> tuple:
    """the explained inputs as JAX arrays (x in the family's layout)"""
    x = jnp.asarray(layout_fn(model.x))
    return (x,) if model.extra is None else (x, jnp.asarray(model.extra))


def _argnums(model: Model) -> tuple:
    return (1,) if model.extra is None else (1, 2)


# --------------------------------------------------------------------------------------------------------
# Family 1: plain jax.numpy / lax, parameters in a dict

_DIMENSION_NUMBERS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _jnp_conv(op: Conv, p: dict, h):
    padding = op.padding if isinstance(op.padding, str) else (op.padding,) * op.dims
    y = jax.lax.conv_general_dilated(h, p["kernel"].astype(h.dtype), (op.stride,) * op.dims, padding,
                                     rhs_dilation=(op.dilation,) * op.dims, feature_group_count=op.groups,
                                     dimension_numbers=_DIMENSION_NUMBERS[op.dims])
    return y + p["bias"].astype(h.dtype) if op.bias else y


def _jnp_dense(op: Dense, p: dict, h):
    y = h @ p["kernel"].astype(h.dtype)
    return y + p["bias"].astype(h.dtype) if op.bias else y


def _jnp_linear(op, p, h):
    return _jnp_conv(op, p, h) if isinstance(op, Conv) else _jnp_dense(op, p, h)


@dataclasses.dataclass(frozen=True)
class _JnpLayers:
    params: dict

    def conv(self, op, h):
        return _jnp_conv(op, self.params[op.name], h)

    def dense(self, op, h):
        return _jnp_dense(op, self.params[op.name], h)

    def array(self, op, key):
        return self.params[op.name][key]

    def norm(self, op: Norm, h):
        p = self.params[op.name]
        if op.kind == "batch":
            return (h - p["mean"]) / jnp.sqrt(p["var"] + EPS) * p["scale"] + p["bias"]
        if op.kind == "layer":
            mean = h.mean(-1, keepdims=True)
            y = (h - mean) / jnp.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + EPS)
        else:  # group: statistics over space and the channels of each group
            g = h.reshape(h.shape[:-1] + (op.groups, op.channels // op.groups))
            axes = tuple(range(1, h.ndim - 1)) + (h.ndim,)
            mean = g.mean(axes, keepdims=True)
            y = ((g - mean) / jnp.sqrt(((g - mean) ** 2).mean(axes, keepdims=True) + EPS)).reshape(h.shape)
        return y * p["scale"] + p["bias"]

    def pool(self, op: Pool, h):
        window = (1,) + (op.window,) * op.dims + (1,)
        strides = (1,) + (op.stride,) * op.dims + (1,)
        if op.kind == "max":
            return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, window, strides, op.padding)
        return jax.lax.reduce_window(h, 0.0, jax.lax.add, window, strides, op.padding) / op.window ** op.dims

    def scan(self, op: Scan, h):
        def step(h, p):
            return jax.nn.relu(_jnp_linear(op.cell, p, h)), None
        return jax.lax.scan(step, h, self.params[op.name])[0]

    def jit(self, op: Jit, h):
        return _jnp_block(self.params, h, op.body)


@functools.partial(jax.jit, static_argnums=2)
def _jnp_block(params, h, ops):
    return run(ops, h, Ctx(_JnpLayers(params), BATCHED))


def _build_jnp(model: Model, unroll: bool) -> Built:
    params = jax.tree.map(jnp.asarray, _unrolled_values(model, unroll))
    ops, constants = model.ops, model.structure.constants

    def fn(params, x, *extra):
        ctx = Ctx(_JnpLayers(params), BATCHED, extra[0] if extra else None, constants, unroll)
        return run(ops, x, ctx)

    return Built(fn, (params,) + _inputs(model), _argnums(model))


# --------------------------------------------------------------------------------------------------------
# Family 2: Flax linen (submodules created inline in a compact __call__, values loaded after init)

def _linen_linear(op, name: str):
    if isinstance(op, Conv):
        padding = op.padding if isinstance(op.padding, str) else (op.padding,) * op.dims
        return nn.Conv(op.cout, (op.kernel,) * op.dims, strides=op.stride, padding=padding,
                       kernel_dilation=op.dilation, feature_group_count=op.groups, use_bias=op.bias,
                       dtype=_dtype(op), param_dtype=jnp.float64, name=name)
    return nn.Dense(op.fout, use_bias=op.bias, dtype=_dtype(op), param_dtype=jnp.float64, name=name)


class _LinenCell(nn.Module):
    cell: Any

    @nn.compact
    def __call__(self, h, _):
        return nn.relu(_linen_linear(self.cell, "linear")(h)), None


class LinenNet(nn.Module):
    ops: tuple
    unroll: bool = False
    constants: Any = None

    @nn.compact
    def __call__(self, x, *extra):
        return run(self.ops, x, Ctx(self, BATCHED, extra[0] if extra else None, self.constants, self.unroll))

    # the layer provider (called from the compact __call__, so submodules can be created here)
    def conv(self, op, h):
        return _linen_linear(op, op.name)(h)

    dense = conv

    def array(self, op, key):
        return self.param(f"{op.name}_{key}", nn.initializers.zeros, value_shapes(op)[key], jnp.float64)

    def norm(self, op: Norm, h):
        if op.kind == "batch":
            return nn.BatchNorm(use_running_average=True, epsilon=EPS, param_dtype=jnp.float64, name=op.name)(h)
        if op.kind == "group":
            return nn.GroupNorm(num_groups=op.groups, epsilon=EPS, param_dtype=jnp.float64, name=op.name)(h)
        return nn.LayerNorm(epsilon=EPS, param_dtype=jnp.float64, name=op.name)(h)

    def pool(self, op: Pool, h):
        pool = nn.max_pool if op.kind == "max" else nn.avg_pool
        return pool(h, (op.window,) * op.dims, (op.stride,) * op.dims, op.padding)

    def scan(self, op: Scan, h):
        stack = nn.scan(_LinenCell, variable_axes={"params": 0}, split_rngs={"params": True}, length=op.length)
        return stack(op.cell, name=op.name)(h, None)[0]

    def jit(self, op: Jit, h):
        return nn.jit(LinenNet)(op.body, name=op.name)(h)


_NAME = re.compile(r"^(l\d+)(?:_(\d+))?$")  # a layer, or step t of an unrolled scan
_ARRAY = re.compile(r"^(l\d+)_([a-z]+)$")  # a free parameter array of a layer


def _lookup(values: dict, name: str, key: str) -> np.ndarray:
    op, step = _NAME.match(name).groups()
    value = values[op][key]
    return value if step is None else value[int(step)]


def _load(abstract, values: dict):
    """Fill an abstract variable tree (linen variables, an NNX state) with the model's values. A leaf's layer
    is the innermost layer name on its path (scan cells and jitted sub-networks nest their own modules);
    building abstractly and filling avoids running the libraries' random initialisers (XLA compiles)."""
    def load(path, leaf):
        keys = [str(k.key) if hasattr(k, "key") else k.name for k in path]
        keys = [k for k in keys if k != "value"]  # NNX Variables
        array = _ARRAY.match(keys[-1])
        if array:
            value = _lookup(values, array.group(1), array.group(2))
        else:
            owner = [k for k in keys[:-1] if _NAME.match(k)][-1]
            value = _lookup(values, owner, keys[-1])
        return jnp.asarray(value)
    return jax.tree_util.tree_map_with_path(load, abstract)


def _build_linen(model: Model, unroll: bool) -> Built:
    net = LinenNet(model.ops, unroll, model.structure.constants)
    inputs = _inputs(model)
    variables = _load(jax.eval_shape(net.init, jax.random.key(0), *inputs), _unrolled_values(model, unroll))

    def fn(variables, x, *extra):
        return net.apply(variables, x, *extra)

    return Built(fn, (variables,) + inputs, _argnums(model))


# --------------------------------------------------------------------------------------------------------
# Family 3: Flax NNX (modules built in __init__ and given the model's values, applied through split/merge)

def _nnx_linear(op, rngs):
    if isinstance(op, Conv):
        padding = op.padding if isinstance(op.padding, str) else (op.padding,) * op.dims
        return nnx.Conv(op.cin, op.cout, (op.kernel,) * op.dims, strides=op.stride, padding=padding,
                        kernel_dilation=op.dilation, feature_group_count=op.groups, use_bias=op.bias,
                        dtype=_dtype(op), param_dtype=jnp.float64, rngs=rngs)
    return nnx.Linear(op.fin, op.fout, use_bias=op.bias, dtype=_dtype(op), param_dtype=jnp.float64, rngs=rngs)


def _nnx_norm(op: Norm, rngs):
    if op.kind == "batch":
        return nnx.BatchNorm(op.channels, use_running_average=True, epsilon=EPS, param_dtype=jnp.float64, rngs=rngs)
    if op.kind == "group":
        return nnx.GroupNorm(op.channels, num_groups=op.groups, epsilon=EPS, param_dtype=jnp.float64, rngs=rngs)
    return nnx.LayerNorm(op.channels, epsilon=EPS, param_dtype=jnp.float64, rngs=rngs)


@functools.partial(jax.jit, static_argnums=0)
def _nnx_jit(graphdef, state, h):
    """a jitted sub-block, NNX's functional way (split outside, merge inside)"""
    return nnx.merge(graphdef, state)(h)


@nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
def _nnx_scan(cell, h):
    return nnx.relu(cell(h))


class NNXNet(nnx.Module):
    """Built abstractly (nnx.eval_shape) and given the model's values afterwards, by _load."""

    def __init__(self, ops: tuple, constants: Frozen, unroll: bool, rngs: nnx.Rngs):
        self.ops, self.unroll, self.constants = ops, unroll, constants
        self.layers = nnx.Dict()
        self.arrays = nnx.Dict()
        for op in ops:
            self._add(op, rngs)

    def _add(self, op, rngs):
        match op:
            case Conv() | Dense():
                self.layers[op.name] = _nnx_linear(op, rngs)
            case Norm():
                self.layers[op.name] = _nnx_norm(op, rngs)
            case Token(learned=True) | ScaleBias() | Film():
                for key, shape in value_shapes(op).items():
                    self.arrays[f"{op.name}_{key}"] = nnx.Param(jnp.zeros(shape))
            case Scan() if self.unroll:
                for t in range(op.length):
                    self._add(dataclasses.replace(op.cell, name=step_name(op.name, t)), rngs)
            case Scan():  # one cell; its parameters get the stacked values (steps on a leading axis)
                self.layers[op.name] = _nnx_linear(op.cell, rngs)
            case Jit() if not self.unroll:
                self.layers[op.name] = NNXNet(op.body, self.constants, False, rngs)
            case _:
                for child in _children(op):
                    self._add(child, rngs)

    def __call__(self, x, *extra):
        return run(self.ops, x, Ctx(self, BATCHED, extra[0] if extra else None, self.constants, self.unroll))

    # the layer provider
    def conv(self, op, h):
        return self.layers[op.name](h)

    dense = norm = conv

    def array(self, op, key):
        return self.arrays[f"{op.name}_{key}"][...]

    def pool(self, op: Pool, h):
        pool = nnx.max_pool if op.kind == "max" else nnx.avg_pool
        return pool(h, (op.window,) * op.dims, (op.stride,) * op.dims, op.padding)

    def scan(self, op: Scan, h):
        return _nnx_scan(self.layers[op.name], h)

    def jit(self, op: Jit, h):
        return _nnx_jit(*nnx.split(self.layers[op.name]), h)


def _build_nnx(model: Model, unroll: bool) -> Built:
    constants = model.structure.constants
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NNXNet(model.ops, constants, unroll, nnx.Rngs(0))))
    state = _load(abstract, _unrolled_values(model, unroll))

    def fn(state, x, *extra):
        return nnx.merge(graphdef, state)(x, *extra)

    return Built(fn, (state,) + _inputs(model), _argnums(model))


# --------------------------------------------------------------------------------------------------------
# Family 4: Equinox (one example at a time, channel-first, vmapped over the batch; eqx.partition/combine)

def _eqx_weights(op, values: dict, stacked: bool = False):
    """(weight, bias) in Equinox's layouts: conv (cout, cin / groups, *window), bias (cout, 1, ...); linear
    (fout, fin). stacked: the values carry the steps of a scan on a leading axis."""
    lead = int(stacked)
    bias = values.get("bias")
    if isinstance(op, Conv):
        d = op.dims
        weight = np.transpose(values["kernel"], tuple(range(lead)) + (lead + d + 1, lead + d)
                              + tuple(range(lead, lead + d)))
        bias = None if bias is None else bias.reshape(bias.shape + (1,) * d)
    else:
        weight = np.swapaxes(values["kernel"], -1, -2)
    return weight, bias


def _eqx_linear(op, values: dict, stacked: bool = False):
    """an eqx.nn.Conv / Linear holding the model's values (built abstractly: no random initialisation)"""
    if isinstance(op, Conv):
        padding = op.padding if isinstance(op.padding, str) else (op.padding,) * op.dims
        make = functools.partial(eqx.nn.Conv, op.dims, op.cin, op.cout, op.kernel, op.stride, padding,
                                 op.dilation, op.groups, op.bias, key=jax.random.key(0))
    else:
        make = functools.partial(eqx.nn.Linear, op.fin, op.fout, op.bias, key=jax.random.key(0))
    weight, bias = _eqx_weights(op, values, stacked)
    layer = eqx.tree_at(lambda l: l.weight, eqx.filter_eval_shape(make), jnp.asarray(weight))
    return eqx.tree_at(lambda l: l.bias, layer, jnp.asarray(bias)) if op.bias else layer


def _eqx_norm(op: Norm, values: dict):
    """(layer, state): BatchNorm keeps its running statistics in an eqx.nn.State"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'mode' defaults are being changed upstream
        if op.kind == "batch":
            bn, state = eqx.filter_eval_shape(eqx.nn.make_with_state(eqx.nn.BatchNorm), op.channels, "batch",
                                              EPS, inference=True, mode="ema")
            state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), state)
            state = state.set(bn.ema_state_index, (jnp.asarray(values["mean"]), jnp.asarray(values["var"])))
            layer = bn
        else:
            make = (functools.partial(eqx.nn.GroupNorm, op.groups, op.channels, EPS) if op.kind == "group"
                    else functools.partial(eqx.nn.LayerNorm, op.channels, EPS))
            layer, state = eqx.filter_eval_shape(make), None
    layer = eqx.tree_at(lambda l: (l.weight, l.bias), layer,
                        (jnp.asarray(values["scale"]), jnp.asarray(values["bias"])))
    return layer, state


def _cast(layer, dtype):
    """a layer computing in dtype (Equinox layers compute in their parameters' dtype)"""
    if dtype is None:
        return layer
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, layer)


@eqx.filter_jit
def _eqx_jit(net, h):
    return net(h)


def _eqx_pool(op: Pool, h):
    pool_cls = {("max", 1): eqx.nn.MaxPool1d, ("max", 2): eqx.nn.MaxPool2d, ("max", 3): eqx.nn.MaxPool3d,
                ("avg", 1): eqx.nn.AvgPool1d, ("avg", 2): eqx.nn.AvgPool2d, ("avg", 3): eqx.nn.AvgPool3d}
    window, stride = (op.window,) * op.dims, (op.stride,) * op.dims
    padding = jax.lax.padtype_to_pads(h.shape[1:], window, stride, op.padding)  # Equinox wants explicit pads
    return pool_cls[op.kind, op.dims](window, stride, padding)(h)


class EqxNet(eqx.Module):
    ops: tuple = eqx.field(static=True)
    unroll: bool = eqx.field(static=True)
    constants: Any = eqx.field(static=True)
    layers: dict
    states: dict
    arrays: dict

    def __init__(self, ops: tuple, values: dict, constants: Frozen, unroll: bool):
        self.ops, self.unroll, self.constants = ops, unroll, constants
        self.layers, self.states, self.arrays = {}, {}, {}
        for op in ops:
            self._add(op, values)

    def _add(self, op, values):
        match op:
            case Conv() | Dense():
                self.layers[op.name] = _eqx_linear(op, values[op.name])
            case Norm():
                self.layers[op.name], self.states[op.name] = _eqx_norm(op, values[op.name])
            case Token(learned=True) | ScaleBias() | Film():
                for key, value in values[op.name].items():
                    self.arrays[f"{op.name}_{key}"] = jnp.asarray(value)
            case Scan() if self.unroll:
                for t in range(op.length):
                    self._add(dataclasses.replace(op.cell, name=step_name(op.name, t)), values)
            case Scan():  # a stack of cells: one cell's structure, the stacked weights (steps leading)
                self.layers[op.name] = _eqx_linear(op.cell, values[op.name], stacked=True)
            case Jit() if not self.unroll:
                self.layers[op.name] = EqxNet(op.body, values, self.constants, False)
            case _:
                for child in _children(op):
                    self._add(child, values)

    def __call__(self, x, *extra):
        return run(self.ops, x, Ctx(self, UNBATCHED, extra[0] if extra else None, self.constants, self.unroll))

    # the layer provider
    def conv(self, op, h):
        return _cast(self.layers[op.name], _dtype(op))(h)

    dense = conv

    def norm(self, op: Norm, h):
        layer = self.layers[op.name]
        if op.kind == "batch":
            return layer(h, self.states[op.name])[0]
        if op.kind == "group":
            return layer(h)
        return jnp.moveaxis(jnp.vectorize(layer, signature="(c)->(c)")(jnp.moveaxis(h, 0, -1)), -1, 0)

    def array(self, op, key):
        return self.arrays[f"{op.name}_{key}"]

    def pool(self, op, h):
        return _eqx_pool(op, h)

    def scan(self, op: Scan, h):
        params, static = eqx.partition(self.layers[op.name], eqx.is_array)

        def step(h, p):
            return jax.nn.relu(eqx.combine(p, static)(h)), None
        return jax.lax.scan(step, h, params)[0]

    def jit(self, op: Jit, h):
        return _eqx_jit(self.layers[op.name], h)


def _build_eqx(model: Model, unroll: bool) -> Built:
    net = EqxNet(model.ops, _unrolled_values(model, unroll), model.structure.constants, unroll)
    params, static = eqx.partition(net, eqx.is_array)
    # the batch of examples is vmapped; c (features,) is shared by all rows, FiLM's meta is per row
    in_axes = (0,) if model.extra is None else (0, 0 if model.extra.ndim == 2 else None)

    def fn(params, x, *extra):
        return jax.vmap(eqx.combine(params, static), in_axes=in_axes)(x, *extra)

    channel_first = (lambda a: np.moveaxis(a, -1, 1)) if model.dims else (lambda a: a)
    return Built(fn, (params,) + _inputs(model, channel_first), _argnums(model))


_BUILDERS = {"jnp": _build_jnp, "linen": _build_linen, "nnx": _build_nnx, "equinox": _build_eqx}
