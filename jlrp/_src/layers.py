"""The layer IR: immutable records of what the analysis recognised, one per layer.

A :class:`Layer` is a set of graph nodes whose backward pass is replaced by one rule. Its kind says what the
nodes compute with respect to the explained values:

* ``dense`` / ``conv``: a linear primitive with one explained operand, with the zero padding before it and
  the affine chain after it (bias, foldable scales such as BatchNorm's, casts, transposes) folded into one
  canonical view ``op(x; W) + b`` (:class:`LinearView`, derived once here and evaluated by rules, the report,
  the flat shortcut and PatternNet alike).
* ``affine``: an elementwise affine map ``a * x + b`` whose ``a`` and ``b`` are constants or statistics of
  ``x`` (a BatchNorm that cannot be folded, LayerNorm's ``(x - mean) / std * g + b``, an input normalisation,
  an additive position embedding): rules see it as a diagonal linear layer, so its offset absorbs.
* ``sum`` (pooling, reductions), ``max`` (winner-take-all), ``add`` (two explained summands), ``product`` (two
  explained factors; each carries an origin: 'softmax', 'sigmoid' or ''), ``route`` (a routing op that mixes
  constants into the explained stream, e.g. a CLS token concatenated: what reaches the constant is absorbed).
* ``activation``: a maximal elementwise region grown from one root value (relu, gelu's chain, softmax);
  ``relu_like`` marks a bare ``max(x, 0)``, the only op DeconvNet and Guided BackProp modify.
* ``scan`` / ``cond`` / ``remat2``: control flow; their bodies are analysed plans of their own.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from .graph import Graph


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive on the relevance path has no LRP rule."""


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What a composite sees of a layer when it chooses its rule.

    Attributes:
      index: position among the layers of its (sub-)graph, in execution order.
      kind: 'dense', 'conv', 'affine', 'sum', 'max', 'add', 'product', 'route', 'activation', 'scan',
        'cond', 'remat2', or the primitive name for primitives with a registered rule.
      primitive: the primitive at the layer's core (e.g. 'conv_general_dilated').
      module: module path from the jaxpr's name stack (Flax linen fills it; '' when unknown).
      params: paths of the parameter leaves feeding the layer (e.g. 'params/Conv_0/kernel').
      linear_index: position among dense and conv layers in the order the input meets them, loops unrolled
        (for a layer inside a scan: its position at the step being resolved); None for other kinds.
      num_linear: number of dense and conv layers the input meets (loops unrolled).
      input_shape, output_shape: shapes of the (first) explained input and of the output.
      conv_index: position among conv layers, like ``linear_index``.
      origins: for products, each operand's origin: 'softmax' (attention weights), 'sigmoid' (a gate),
        'activation' (the output of another non-linearity: SwiGLU's / GeGLU's gate branch) or ''.
      scope: '' at the top level, e.g. 'scan' for layers inside a loop body.
      reason: why the analysis recognised the layer (shown by ``Report.table()``).
      relu_like: an activation that is exactly ``max(x, 0)``.
      step: inside scans, the step (per enclosing scan, in execution order) this info describes.
      preceding_linear: how many dense/conv layers the input meets before this layer (0: input-side
        preprocessing such as a normalisation inside the model).
    """
    index: int
    kind: str
    primitive: str
    module: str
    params: tuple[str, ...]
    linear_index: int | None
    num_linear: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    conv_index: int | None = None
    origins: tuple[str, ...] = ()
    scope: str = ""
    reason: str = ""
    relu_like: bool = False
    step: tuple[int, ...] = ()
    preceding_linear: int = 0

    @property
    def is_linear(self) -> bool:
        return self.kind in ("dense", "conv")

    @property
    def first(self) -> bool:
        """The first dense-or-conv layer (closest to the input)."""
        return self.linear_index == 0

    @property
    def last(self) -> bool:
        """The last dense-or-conv layer (closest to the output)."""
        return self.linear_index is not None and self.linear_index == self.num_linear - 1


@dataclasses.dataclass(frozen=True)
class ChainStep:
    """One step of a linear layer's chain after its linear node: ``kind`` is 'reshape' (a transpose or a
    size-1 reshape: applied to the output), 'identity' (a cast or copy: skipped, rules compute in their own
    dtype), 'scale' (multiply by the constant operand ``operand``, laid out along ``weight_axes`` of the
    weight; ``invert`` for a division, ``negate`` for ``neg``) or 'bias' (add ``sign`` times ``operand``)."""
    kind: str
    node: int
    operand: Any = None  # a value id or a Lit
    weight_axes: tuple[int, ...] = ()  # 'scale': weight axis of each non-1 axis of the operand
    invert: bool = False
    negate: bool = False
    sign: float = 1.0
    bias_sign: float = 1.0  # 'bias' for ``c - z``: the running z is negated first (-1)


@dataclasses.dataclass(frozen=True)
class LinearView:
    """How to read a dense/conv layer as ``op(x; W) + b`` (derived once, at analysis)."""
    head: int  # node index of the linear primitive
    position: int  # which operand of the head is explained (the other one is the weight)
    pad: int | None  # node index of a zero padding folded in front of the head
    steps: tuple[ChainStep, ...]


@dataclasses.dataclass(frozen=True)
class Layer:
    kind: str
    nodes: tuple[int, ...]  # node indices replayed, in order
    inputs: tuple[int, ...]  # explained (active) value ids
    output: int
    consts: tuple[int, ...] = ()  # other value ids the nodes read
    degree: int = 1
    origins: tuple[str, ...] = ()
    nonneg: tuple[bool, ...] = ()  # per input: known to be >= 0 (e.g. after a relu)
    view: LinearView | None = None
    info: LayerInfo | None = None
    rule: Any = None
    body: tuple | None = None  # control flow: the analysed sub-plan(s)
    flags: tuple[bool, ...] | None = None  # control flow: which operands the body explains
    mixing: bool = False  # an affine layer whose map mixes elements (LayerNorm's centring by the mean)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The analysis of one graph: activity, layers, and what to do at each node."""
    graph: Graph
    depends: frozenset[int]  # values computed from the explained inputs (any dtype): evaluated in order
    active: frozenset[int]  # ... that carry relevance (floating point, not behind stop_gradient)
    emit_at: dict[int, Layer]  # node index -> layer emitted there
    skip: frozenset[int]  # nodes replayed inside a layer and not evaluated on their own
    stopped_roots: dict[int, frozenset[int]]  # region node -> its inputs read through stop_gradient
    layers: tuple[Layer, ...]
    provenance: dict[int, frozenset[str]]
    roots: tuple[int, ...]  # active values with no active inputs (embedding outputs of explained token ids)
    dynamic: tuple[bool, ...] = ()  # which argument leaves are traced inputs (the rest are static)
    # the interpreter's jitted blocks of this plan (interpreter._run_block); not copied by dataclasses.replace,
    # so a plan with other rules or another graph compiles its own
    compiled: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    def all_layers(self):
        """Layers of this plan and of every control-flow body, depth first."""
        for layer in self.layers:
            yield layer
            for body in layer.body or ():
                yield from body.all_layers()

    def with_layers(self, layers) -> "Plan":
        """The same plan with its layers replaced (same order), e.g. with rules assigned."""
        layers = tuple(layers)
        swap = {id(old): new for old, new in zip(self.layers, layers)}
        emit_at = {i: swap[id(l)] for i, l in self.emit_at.items()}
        return dataclasses.replace(self, layers=layers, emit_at=emit_at)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Probes:
    """Zero arrays added along a plan's relevance path; their cotangents are the report.

    ``layers[index]``: ``(like the output, absorbed scalar)`` for a layer (a control-flow layer: a tuple with
    one array per explained output); ``bodies[index]``: one :class:`Probes` per body of a control-flow layer
    (inside a scan stacked over its steps); ``inits[index]``: ``{operand position: zeros}`` for a scan's
    constant initial carries that its body explains; ``roots[k]``: zeros added to the k-th embedding root
    (the relevance of explained token ids is read there); ``gates[index]``: a mask (broadcastable to the
    layer's output) that multiplies the relevance arriving at a top-level layer's output before its rule
    runs (conditional relevance, CRP); the forward is unchanged."""
    layers: dict = dataclasses.field(default_factory=dict)
    bodies: dict = dataclasses.field(default_factory=dict)
    inits: dict = dataclasses.field(default_factory=dict)
    roots: dict = dataclasses.field(default_factory=dict)
    gates: dict = dataclasses.field(default_factory=dict)
