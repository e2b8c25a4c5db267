"""Layer recognition over a flat graph: which equations depend on the explained input, and how they group.

A *layer* is a set of nodes whose backward pass is replaced by one rule:

* ``dense`` / ``conv``: a ``dot_general`` / ``conv_general_dilated`` with one explained operand, fused with
  the elementwise affine chain that follows it (bias add, and an inference BatchNorm's scale and shift:
  canonization happens here, at the jaxpr level, whatever the module order).
* ``sum``: sum reductions and sum/average pooling (``reduce_sum``, ``reduce_window_sum``, ``cumsum``).
* ``add``: an add/sub of two activations that do not share an elementwise root (residual connections).
* ``product``: a product of two activations (``mul``, ``dot_general``, conv of two activations: attention).
* ``activation``: a maximal elementwise region grown from one root value (relu, gelu's inlined chain,
  silu's ``x * sigmoid(x)``, a standalone scale/shift); its exit values get the activation rule.

Everything else on the relevance path is structural (its ordinary VJP routes relevance), winner-take-all
(``max``-like: ordinary VJP), or unsupported (a clear error).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import jax.numpy as jnp
import numpy as np

from .graph import Graph, Lit, Node

LINEAR = {"dot_general", "conv_general_dilated"}
SUMS = {"reduce_sum", "reduce_window_sum", "cumsum"}
WINNER_TAKES_ALL = {"reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "cummax",
                    "cummin", "max", "min", "select_n", "clamp"}
STRUCTURAL = {"reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "rev", "slice",
              "dynamic_slice", "gather", "concatenate", "pad", "copy", "copy_p", "convert_element_type",
              "reduce_precision", "split", "dynamic_update_slice", "scatter-add", "scatter_add",
              "sharding_constraint", "device_put", "optimization_barrier", "squeeze", "real",
              "reduce_and", "reduce_or", "stop_gradient"}
ELEMENTWISE = {"neg", "sign", "floor", "ceil", "round", "exp", "exp2", "log", "log1p", "expm1", "tanh",
               "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh",
               "atanh", "sqrt", "rsqrt", "cbrt", "integer_pow", "pow", "abs", "max", "min", "erf", "erfc",
               "erf_inv", "lgamma", "digamma", "add", "sub", "mul", "div", "rem", "select_n", "clamp",
               "atan2", "square", "nextafter", "add_any", "convert_element_type", "reduce_precision",
               "copy", "copy_p", "tan", "is_finite", "not"}
ADDITIVE = {"add", "sub", "add_any"}
MULTIPLICATIVE = {"mul", "dot_general", "conv_general_dilated"}
AFFINE_CHAIN = {"add", "sub", "mul", "div", "neg", "transpose"}


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive on the relevance path has no LRP rule."""


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What a composite sees of a layer when it chooses its rule.

    Attributes:
      index: position among all layers that carry a rule, in execution order.
      kind: 'dense', 'conv', 'sum', 'add', 'product' or 'activation'.
      primitive: the primitive at the layer's core (e.g. 'conv_general_dilated').
      module: module path from the jaxpr's name stack (Flax linen fills it; '' when unknown).
      params: paths of the parameter leaves feeding the layer (e.g. 'params/Conv_0/kernel').
      linear_index: position among dense and conv layers (None for other kinds).
      num_linear: number of dense and conv layers in the model.
      input_shape, output_shape: shapes of the (first) explained input and of the output.
      conv_index: position among conv layers (None for other kinds).
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

    def matches_param(self, pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(p, pattern) for p in self.params)


@dataclasses.dataclass
class Layer:
    kind: str
    nodes: list[int]  # node indices replayed, in order
    inputs: list[int]  # explained (active) value ids
    output: int
    degree: int = 1
    consts: list[int] = dataclasses.field(default_factory=list)  # non-explained value ids the nodes read
    info: LayerInfo | None = None
    rule: Any = None


@dataclasses.dataclass
class Plan:
    """The analysis of one graph: activity, layers, and what to do at each node."""
    graph: Graph
    depends: set[int]  # values that depend on the explained inputs (any dtype)
    active: set[int]  # ... and are floating point: they carry relevance
    emit_at: dict[int, Layer]  # node index -> layer emitted there
    skip: set[int]  # nodes replayed inside a layer and not evaluated on their own
    stopped_roots: dict[int, set[int]]  # region node -> its inputs that are region roots (read stopped)
    layers: list[Layer]
    provenance: dict[int, frozenset[str]]


def _inexact(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _ids(node: Node) -> list[int]:
    return [a for a in node.inputs if not isinstance(a, Lit)]


def _shape(graph: Graph, atom) -> tuple[int, ...]:
    return np.shape(atom.val) if isinstance(atom, Lit) else tuple(graph.avals[atom].shape)


class _Analysis:
    def __init__(self, graph: Graph, explained: list[bool], input_paths: list[str]):
        self.g = graph
        self.depends: set[int] = {v for v, e in zip(graph.inputs, explained) if e}
        self.active = {v for v in self.depends if _inexact(graph.avals[v])}
        self.provenance: dict[int, frozenset[str]] = {}
        for v, p in zip(graph.inputs, input_paths):
            self.provenance[v] = frozenset([p]) if p else frozenset()
        for v in graph.consts:
            self.provenance[v] = frozenset()
        self.producer: dict[int, int] = {}
        self.consumers: dict[int, list[int]] = {}
        for i, node in enumerate(graph.nodes):
            ins = _ids(node)
            for v in ins:
                self.consumers.setdefault(v, []).append(i)
            for v in node.outputs:
                self.producer[v] = i
            if any(v in self.depends for v in ins):
                self.depends.update(node.outputs)
                self.active.update(v for v in node.outputs if _inexact(graph.avals[v]))
            else:
                prov = frozenset().union(*(self.provenance.get(v, frozenset()) for v in ins))
                for v in node.outputs:
                    self.provenance[v] = prov
        self.graph_outputs = {v for v in graph.outputs if not isinstance(v, Lit)}

    # -- helpers -------------------------------------------------------------------------------------------
    def active_inputs(self, node: Node) -> list[int]:
        return [v for v in _ids(node) if v in self.active]

    def sole_consumer(self, v: int) -> int | None:
        users = self.consumers.get(v, [])
        if len(users) != 1 or v in self.graph_outputs:
            return None
        return users[0]

    def node_error(self, i: int, why: str) -> UnsupportedPrimitiveError:
        node = self.g.nodes[i]
        params = sorted(set().union(*(self.provenance.get(v, frozenset()) for v in _ids(node)
                                      if v not in self.active))) if _ids(node) else []
        where = []
        if node.name:
            where.append(f"module '{node.name}'")
        if params:
            where.append("parameters " + ", ".join(params))
        shapes = [str(_shape(self.g, a)) for a in node.inputs]
        return UnsupportedPrimitiveError(
            f"jlrp has no LRP rule for primitive '{node.prim.name}' (operand shapes {', '.join(shapes)}) "
            f"on the relevance path{' in ' + ' and '.join(where) if where else ''}: {why}. Register one with "
            f"jlrp.register_rule('{node.prim.name}', ...) or keep its ordinary gradient with "
            f"jlrp.register_rule('{node.prim.name}', jlrp.rules.gradient()).")

    # -- linear layers and their affine chain ----------------------------------------------------------
    def _scale_foldable(self, head: Node, active_pos: int, scale_shape: tuple[int, ...],
                        perm: tuple[int, ...] | None) -> bool:
        out_ndim = len(self.g.avals[head.outputs[0]].shape)
        shape = (1,) * (out_ndim - len(scale_shape)) + tuple(scale_shape)
        if perm is not None:  # the chain transposed z; map the scale's axes back
            inv = np.argsort(perm)
            shape = tuple(shape[j] for j in inv)
        axes = fold_axes(head, active_pos, len(_shape(self.g, head.inputs[1 - active_pos])), out_ndim)
        if axes is None:
            return False
        return all(n == 1 or k in axes for k, n in enumerate(shape))

    def linear_layer(self, i: int, claimed: set[int]) -> Layer:
        head = self.g.nodes[i]
        x = self.active_inputs(head)[0]
        active_pos = [a for a in head.inputs].index(x)
        nodes, out, perm = [i], head.outputs[0], None
        while True:
            j = self.sole_consumer(out)
            if j is None:
                break
            node = self.g.nodes[j]
            if node.prim.name not in AFFINE_CHAIN or len(self.active_inputs(node)) != 1:
                break
            if _shape(self.g, node.outputs[0]) != _shape(self.g, out):
                break
            if node.prim.name == "transpose":
                p = tuple(node.params["permutation"])
                perm = p if perm is None else tuple(perm[k] for k in p)
            elif node.prim.name in ("mul", "div"):
                other = [a for a in node.inputs if a != out][0]
                if node.prim.name == "div" and node.inputs[0] != out:
                    break  # c / z is not affine in z
                if not self._scale_foldable(head, active_pos, _shape(self.g, other), perm):
                    break
            nodes.append(j)
            out = node.outputs[0]
        claimed.update(nodes)
        kind = "dense" if head.prim.name == "dot_general" else "conv"
        return Layer(kind, nodes, [x], out)

    # -- elementwise regions ---------------------------------------------------------------------------
    def run(self) -> Plan:
        g = self.g
        root: dict[int, int] = {}
        region_nodes: dict[int, int] = {}  # node -> root
        emit_at: dict[int, Layer] = {}
        claimed: set[int] = set()
        layers: list[Layer] = []
        for i, node in enumerate(g.nodes):
            if i in claimed:
                continue
            act = self.active_inputs(node)
            outs = [v for v in node.outputs if v in self.active]
            if not act or not outs:
                continue
            name = node.prim.name
            if name in ELEMENTWISE and self._same_root(node, act, root):
                r = root.get(act[0], act[0])  # one more step of an elementwise function of r
                root[outs[0]] = r
                region_nodes[i] = r
                continue
            if name in LINEAR and len(act) == 1:
                layer = self.linear_layer(i, claimed)
            elif name in MULTIPLICATIVE and len(act) >= 2:
                layer = Layer("product", [i], act, outs[0], degree=len(act))
            elif name in SUMS:
                layer = Layer("sum", [i], act, outs[0])
            elif name in ADDITIVE:
                layer = Layer("add", [i], act, outs[0])
            elif name in WINNER_TAKES_ALL or name in STRUCTURAL:
                continue
            elif name in _registry_names():
                layer = Layer(name, [i], act, outs[0], degree=len(act))
            else:
                raise self.node_error(i, _why(name, len(act)))
            layers.append(layer)
            emit_at[layer.nodes[-1]] = layer
        # Region exits: region values used outside their region (or returned) become activation layers.
        stopped: dict[int, set[int]] = {}
        for i, r in region_nodes.items():
            node = g.nodes[i]
            stopped[i] = {v for v in _ids(node) if v == r}
            y = node.outputs[0]
            users = self.consumers.get(y, [])
            outside = [u for u in users if u not in region_nodes
                       and any(o in self.active for o in g.nodes[u].outputs)]
            if outside or y in self.graph_outputs:
                layer = Layer("activation", self._region_slice(y, r, region_nodes), [r], y)
                layers.append(layer)
                emit_at[i] = layer
        layers.sort(key=lambda l: l.nodes[-1])
        skip = {n for l in layers for n in l.nodes if l.kind != "activation"}
        self._describe(layers)
        return Plan(g, self.depends, self.active, emit_at, skip, stopped, layers, self.provenance)

    def _same_root(self, node: Node, act: list[int], root: dict[int, int]) -> bool:
        roots = {root.get(v, v) for v in act}
        if len(roots) != 1:
            return False
        out_shape = _shape(self.g, node.outputs[0])
        r_shape = _shape(self.g, next(iter(roots)))
        return np.broadcast_shapes(r_shape, out_shape) == out_shape and len(r_shape) == len(out_shape)

    def _region_slice(self, y: int, r: int, region_nodes: dict[int, int]) -> list[int]:
        """The region nodes needed to compute ``y`` from its root ``r`` (in order)."""
        need, todo = set(), [self.producer[y]]
        while todo:
            i = todo.pop()
            if i in need:
                continue
            need.add(i)
            for v in _ids(self.g.nodes[i]):
                p = self.producer.get(v)
                if v != r and p is not None and p in region_nodes and region_nodes[p] == r:
                    todo.append(p)
        return sorted(need)

    def _describe(self, layers: list[Layer]) -> None:
        linear = [l for l in layers if l.kind in ("dense", "conv")]
        convs = [l for l in layers if l.kind == "conv"]
        for k, layer in enumerate(layers):
            head = self.g.nodes[layer.nodes[0]]
            produced = {v for n in layer.nodes for v in self.g.nodes[n].outputs}
            layer.consts = sorted({v for n in layer.nodes for v in _ids(self.g.nodes[n])
                                   if v not in produced and v not in layer.inputs})
            consts = [v for v in layer.consts if v not in self.active]
            params = sorted(set().union(*(self.provenance.get(v, frozenset()) for v in consts)))
            layer.info = LayerInfo(
                index=k, kind=layer.kind, primitive=head.prim.name, module=head.name, params=tuple(params),
                linear_index=linear.index(layer) if layer in linear else None, num_linear=len(linear),
                input_shape=_shape(self.g, layer.inputs[0]), output_shape=_shape(self.g, layer.output),
                conv_index=convs.index(layer) if layer in convs else None)


def fold_axes(head: Node, active_pos: int, w_ndim: int, out_ndim: int) -> dict[int, int] | None:
    """Output axes of a linear node that come from its weight, mapped to the weight's axes.

    A per-output scale (e.g. BatchNorm's) varying only along these axes can be folded into the weight.
    """
    if head.prim.name == "conv_general_dilated":
        if active_pos != 0 or head.params["batch_group_count"] != 1:
            return None
        dn = head.params["dimension_numbers"]
        return {dn.out_spec[1]: dn.rhs_spec[0]}
    (lc, rc), (lb, rb) = head.params["dimension_numbers"]
    contract, batch = (rc, rb) if active_pos == 0 else (lc, lb)
    axes = {k: int(b) for k, b in enumerate(batch)}
    w_free = [a for a in range(w_ndim) if a not in contract and a not in batch]
    # dot_general's output axes are (batch..., lhs free..., rhs free...)
    start = out_ndim - len(w_free) if active_pos == 0 else len(batch)
    for k, a in enumerate(w_free):
        axes[start + k] = a
    return axes


_REGISTRY: dict[str, Any] = {}


def _registry_names() -> set[str]:
    return set(_REGISTRY)


def _why(name: str, n_active: int) -> str:
    if name in ELEMENTWISE:
        return (f"it combines {n_active} activations that do not share an elementwise root "
                f"(e.g. a normalisation dividing by a statistic of its input)")
    if name in ("scan", "while", "cond"):
        return "control flow is not supported yet"
    return "it is not a known linear, elementwise, pooling or structural primitive"
