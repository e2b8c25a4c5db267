"""Layer recognition over a flat graph: which equations depend on the explained input, and how they group.

A *layer* is a set of nodes whose backward pass is replaced by one rule:

* ``dense`` / ``conv``: a ``dot_general`` / ``conv_general_dilated`` with one explained operand, fused with
  the elementwise affine chain that follows it (bias add, and an inference BatchNorm's scale and shift:
  canonization happens here, at the jaxpr level, whatever the module order).
* ``sum``: sum reductions and sum/average pooling (``reduce_sum``, ``reduce_window_sum``, ``cumsum``).
* ``max``: max reductions and max pooling (winner-take-all by default).
* ``add``: an add/sub of two activations that do not share an elementwise root (residual connections).
* ``product``: a product of two activations (``mul``, ``dot_general``, conv of two activations: attention,
  gates). Each operand carries an *origin* ('softmax', 'sigmoid' or '') so rules can treat attention
  weights or gates as constants.
* ``activation``: a maximal elementwise region grown from one root value (relu, gelu's inlined chain,
  silu's ``x * sigmoid(x)``, softmax, a standalone scale/shift); its exit values get the activation rule.
  A *statistic* of the activations (a value broadcast along an axis where the other operand varies: the
  mean and 1/std of LayerNorm, RMSNorm's 1/rms, softmax's denominator) is treated as a constant there.
* ``scan`` / ``cond`` / ``remat2``: control flow and ``jax.checkpoint``; bodies are analysed and rewritten
  recursively (a checkpointed block stays checkpointed, rules included).

Everything else on the relevance path is structural (its ordinary VJP routes relevance) or unsupported
(a clear error naming the primitive and where it came from).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax.extend import core as jcore

from .graph import Graph, Lit, Node, flatten

LINEAR = {"dot_general", "conv_general_dilated"}
SUMS = {"reduce_sum", "reduce_window_sum", "cumsum"}
MAXES = {"reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "cummax", "cummin",
         "argmax", "argmin"}
STRUCTURAL = {"reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "rev", "slice",
              "dynamic_slice", "gather", "concatenate", "pad", "copy", "copy_p", "convert_element_type",
              "reduce_precision", "split", "dynamic_update_slice", "scatter-add", "scatter_add", "scatter",
              "sharding_constraint", "device_put", "optimization_barrier", "real", "select_n", "max", "min",
              "clamp"}
ELEMENTWISE = {"neg", "sign", "floor", "ceil", "round", "exp", "exp2", "log", "log1p", "expm1", "tanh",
               "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh",
               "atanh", "sqrt", "rsqrt", "cbrt", "integer_pow", "pow", "abs", "max", "min", "erf", "erfc",
               "erf_inv", "lgamma", "digamma", "add", "sub", "mul", "div", "rem", "select_n", "clamp",
               "atan2", "square", "nextafter", "add_any", "convert_element_type", "reduce_precision",
               "copy", "copy_p", "is_finite"}
ADDITIVE = {"add", "sub", "add_any"}
MULTIPLICATIVE = {"mul", "dot_general", "conv_general_dilated"}
NORMALISING = {"add", "sub", "mul", "div"}  # ops where a broadcast statistic is treated as a constant
RESHAPES = {"transpose", "reshape", "squeeze", "expand_dims"}
AFFINE_CHAIN = {"add", "sub", "mul", "div", "neg"} | RESHAPES
CONTROL = {"scan", "cond", "remat2", "checkpoint"}
NONNEG_PRESERVING = {"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice", "dynamic_slice",
                     "gather", "rev", "copy", "copy_p", "convert_element_type", "reduce_precision", "reduce_max",
                     "reduce_min", "reduce_window_max", "reduce_window_min", "reduce_sum", "reduce_window_sum",
                     "cumsum", "cummax", "cummin", "pad", "concatenate", "select_n", "add", "mul", "min"}
MARKERS = {"exp", "logistic"}

#: User-registered rules by primitive name (see ``jlrp.register_rule``).
REGISTRY: dict[str, Any] = {}


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive on the relevance path has no LRP rule."""


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What a composite sees of a layer when it chooses its rule.

    Attributes:
      index: position among all layers that carry a rule, in execution order.
      kind: 'dense', 'conv', 'sum', 'max', 'add', 'product', 'activation', 'scan', 'cond', or the
        primitive name for primitives with a registered rule.
      primitive: the primitive at the layer's core (e.g. 'conv_general_dilated').
      module: module path from the jaxpr's name stack (Flax linen fills it; '' when unknown).
      params: paths of the parameter leaves feeding the layer (e.g. 'params/Conv_0/kernel').
      linear_index: position among dense and conv layers (None for other kinds).
      num_linear: number of dense and conv layers in the (sub-)graph.
      input_shape, output_shape: shapes of the (first) explained input and of the output.
      conv_index: position among conv layers (None for other kinds).
      origins: for products, each operand's origin: 'softmax' (attention weights), 'sigmoid' (a gate) or ''.
      scope: '' at the top level, e.g. 'scan' for layers inside a loop body.
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


@dataclasses.dataclass(eq=False)
class Layer:
    kind: str
    nodes: list[int]  # node indices replayed, in order
    inputs: list[int]  # explained (active) value ids
    output: int
    degree: int = 1
    origins: tuple[str, ...] = ()
    consts: list[int] = dataclasses.field(default_factory=list)  # other value ids the nodes read
    nonneg: tuple[bool, ...] = ()  # per input: known to be >= 0 (e.g. after a relu)
    info: LayerInfo | None = None
    rule: Any = None
    body: Any = None  # control flow: the analysed sub-plan(s)
    flags: Any = None  # control flow: which operands the body explains


@dataclasses.dataclass
class Plan:
    """The analysis of one graph: activity, layers, and what to do at each node."""
    graph: Graph
    depends: set[int]  # values computed from the explained inputs (any dtype): evaluated in order
    active: set[int]  # ... that carry relevance (floating point, not behind stop_gradient)
    emit_at: dict[int, Layer]  # node index -> layer emitted there
    skip: set[int]  # nodes replayed inside a layer and not evaluated on their own
    stopped_roots: dict[int, set[int]]  # region node -> its inputs read through stop_gradient
    layers: list[Layer]
    provenance: dict[int, frozenset[str]]
    roots: list[int]  # active values with no active inputs (embedding outputs of explained token ids)
    dynamic: list[bool] | None = None  # which argument leaves are traced inputs (the rest are static)

    def all_layers(self):
        """Layers of this plan and of every control-flow body, depth first."""
        for layer in self.layers:
            yield layer
            for body in layer.body or ():
                yield from body.all_layers()


def _inexact(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _ids(node: Node) -> list[int]:
    return [a for a in node.inputs if not isinstance(a, Lit)]


def _shape(graph: Graph, atom) -> tuple[int, ...]:
    return np.shape(atom.val) if isinstance(atom, Lit) else tuple(graph.avals[atom].shape)


def _broadcast_smaller(shape: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """``shape`` is broadcast to ``out`` along at least one axis (a statistic over that axis)."""
    shape = (1,) * (len(out) - len(shape)) + tuple(shape)
    return any(a == 1 and b != 1 for a, b in zip(shape, out))


class _Analysis:
    def __init__(self, graph: Graph, explained: list[bool], input_paths: list[str], scope: str = ""):
        self.g = graph
        self.scope = scope
        inputs = [v for v, e in zip(graph.inputs, explained) if e]
        self.depends: set[int] = set(inputs)
        self.active = {v for v in inputs if _inexact(graph.avals[v])}
        self.from_ids = {v for v in inputs if not _inexact(graph.avals[v])}  # explained integer inputs
        self.roots: list[int] = []
        self.provenance: dict[int, frozenset[str]] = {v: frozenset() for v in graph.consts}
        for v, p in zip(graph.inputs, input_paths):
            self.provenance[v] = frozenset([p]) if p else frozenset()
        self.producer: dict[int, int] = {}
        self.consumers: dict[int, list[int]] = {}
        for i, node in enumerate(graph.nodes):
            ins = _ids(node)
            for v in ins:
                self.consumers.setdefault(v, []).append(i)
            for v in node.outputs:
                self.producer[v] = i
            if not any(v in self.depends for v in ins):
                prov = frozenset().union(*(self.provenance.get(v, frozenset()) for v in ins))
                self.provenance.update((v, prov) for v in node.outputs)
                continue
            self.depends.update(node.outputs)
            floats = [v for v in node.outputs if _inexact(graph.avals[v])]
            if node.prim.name == "stop_gradient":
                continue  # the user said: no gradient, hence no relevance
            if any(v in self.active for v in ins):
                self.active.update(floats)
            elif any(v in self.from_ids for v in ins):
                if floats and node.prim.name in _CONTROL_FLOW:
                    raise _ids_in_body(node.prim.name)
                self.from_ids.update(v for v in node.outputs if v not in floats)
                self.active.update(floats)  # e.g. an embedding lookup of explained token ids
                self.roots.extend(floats)
        self.graph_outputs = {v for v in graph.outputs if not isinstance(v, Lit)}
        self.nonneg = self._nonnegative()

    def _nonnegative(self) -> set[int]:
        """Active values provably >= 0 (relu outputs and what pooling/reshaping makes of them): the x- terms
        of sign-splitting rules (z+, alpha-beta, gamma) vanish on them and are skipped."""
        known: set[int] = set()

        def ok(a) -> bool:
            if isinstance(a, Lit):
                return bool(np.all(np.asarray(a.val) >= 0))
            return a in known or not _inexact(self.g.avals[a])

        for node in self.g.nodes:
            outs = [v for v in node.outputs if v in self.active]
            if not outs:
                continue
            name, ins = node.prim.name, node.inputs
            if name in ("abs", "exp", "exp2", "logistic", "sqrt", "rsqrt", "square"):
                positive = True
            elif name == "integer_pow":
                positive = node.params["y"] % 2 == 0
            elif name == "max":
                positive = any(ok(a) for a in ins)
            elif name == "div":
                positive = ok(ins[0]) and isinstance(ins[1], Lit) and bool(np.all(np.asarray(ins[1].val) > 0))
            elif name in NONNEG_PRESERVING:  # every float operand must be known >= 0 (params are unknown)
                positive = all(ok(a) for a in ins)
            else:
                positive = False
            if positive:
                known.update(outs)
        return known

    # -- helpers -------------------------------------------------------------------------------------------
    def active_inputs(self, node: Node) -> list[int]:
        return list(dict.fromkeys(v for v in _ids(node) if v in self.active))

    def sole_consumer(self, v: int) -> int | None:
        users = self.consumers.get(v, [])
        if len(users) != 1 or v in self.graph_outputs:
            return None
        return users[0]

    def node_error(self, i: int, why: str) -> UnsupportedPrimitiveError:
        node = self.g.nodes[i]
        params = sorted(set().union(*(self.provenance.get(v, frozenset()) for v in _ids(node)
                                      if v not in self.active)))
        where = []
        if node.name:
            where.append(f"module '{node.name}'")
        if params:
            where.append("parameters " + ", ".join(params))
        shapes = [str(_shape(self.g, a)) for a in node.inputs]
        return UnsupportedPrimitiveError(
            f"jlrp has no LRP rule for primitive '{node.prim.name}' (operand shapes {', '.join(shapes)}) "
            f"on the relevance path{' in ' + ' and '.join(where) if where else ''}: {why}. Register one with "
            f"jlrp.register_rule('{node.prim.name}', rule), e.g. jlrp.rules.epsilon() for an op that is "
            f"linear in its inputs, or keep its ordinary gradient with "
            f"jlrp.register_rule('{node.prim.name}', jlrp.rules.gradient()).")

    # -- linear layers and their affine chain ----------------------------------------------------------
    def linear_layer(self, i: int, claimed: set[int]) -> Layer:
        """A linear node and the affine chain after it: bias adds, per-output scales (BatchNorm) and the
        transposes / singleton reshapes some libraries put in between (Equinox under vmap)."""
        head = self.g.nodes[i]
        x = self.active_inputs(head)[0]
        active_pos = head.inputs.index(x)
        fold = fold_axes(head, active_pos, len(_shape(self.g, head.inputs[1 - active_pos])),
                         len(_shape(self.g, head.outputs[0])))
        nodes, out = [i], head.outputs[0]
        axis_map: list | None = list(range(len(_shape(self.g, out))))
        while True:
            j = self.sole_consumer(out)
            if j is None:
                break
            node = self.g.nodes[j]
            name = node.prim.name
            if name not in AFFINE_CHAIN or self.active_inputs(node) != [out]:
                break
            new_shape = _shape(self.g, node.outputs[0])
            if name in RESHAPES:
                axis_map = chain_axis_map(axis_map, name, node.params, _shape(self.g, out), new_shape)
            elif new_shape != _shape(self.g, out):
                break  # the bias or scale must not broadcast z itself
            elif name in ("mul", "div"):
                if name == "div" and node.inputs[0] != out:
                    break  # c / z is not affine in z
                other = [a for a in node.inputs if a != out][0]
                if lin_scale_axes(_shape(self.g, other), axis_map, fold) is None:
                    break
            nodes.append(j)
            out = node.outputs[0]
        claimed.update(nodes)
        return Layer("dense" if head.prim.name == "dot_general" else "conv", nodes, [x], out)

    def sum_layer(self, i: int, act: list[int], claimed: set[int]) -> Layer:
        """A sum (pooling, reduction) and the scalar scales after it: average pooling is one layer, so the
        norm rule's stabilizer acts on the average (as Zennit's Norm on AvgPool does)."""
        nodes, out = [i], self.g.nodes[i].outputs[0]
        while (j := self.sole_consumer(out)) is not None:
            node = self.g.nodes[j]
            other = [a for a in node.inputs if a != out]
            if (node.prim.name not in ("mul", "div") or len(other) != 1
                    or (not isinstance(other[0], Lit) and other[0] in self.active)
                    or (node.prim.name == "div" and node.inputs[0] != out)
                    or int(np.prod(_shape(self.g, other[0]), dtype=np.int64)) != 1):
                break
            nodes.append(j)
            out = node.outputs[0]
        claimed.update(nodes)
        return Layer("sum", nodes, act, out)

    # -- elementwise regions ---------------------------------------------------------------------------
    def _region_root(self, node: Node, act: list[int], root: dict[int, int]) -> tuple[int | None, list[int]]:
        """The root if ``node`` extends an elementwise region, and the statistics it treats as constants."""
        out = _shape(self.g, node.outputs[0])
        roots = {v: root.get(v, v) for v in act}
        distinct = set(roots.values())
        statistics: list[int] = []
        if len(distinct) > 1 and node.prim.name in NORMALISING:
            statistics = [v for v in act if _broadcast_smaller(_shape(self.g, roots[v]), out)]
            if len(statistics) != len(act) - 1:
                return None, []
            distinct = {roots[v] for v in act if v not in statistics}
        if len(distinct) != 1:
            return None, []
        r = next(iter(distinct))
        r_shape = _shape(self.g, r)
        if len(r_shape) != len(out) or np.broadcast_shapes(r_shape, out) != out:
            return None, []
        return r, statistics

    def run(self) -> Plan:
        g = self.g
        root: dict[int, int] = {}  # region value -> its root
        markers: dict[int, frozenset[str]] = {}  # region value -> notable primitives on its path
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
            positions = sum(1 for a in _ids(node) if a in self.active)
            if name in REGISTRY:
                layer = Layer(name, [i], act, outs[0], degree=len(act))
            elif name in ELEMENTWISE and (found := self._region_root(node, act, root))[0] is not None:
                r, statistics = found
                root[outs[0]] = r
                region_nodes[i] = r
                mark = frozenset().union(*(markers.get(v, frozenset()) for v in act if v not in statistics))
                if name in MARKERS:
                    mark |= {name}
                if name in ("mul", "div") and len(act) - len(statistics) >= 2:
                    mark -= {"logistic"}  # z * sigmoid(z) (silu, swish) is an activation, not a gate
                if name == "div" and statistics and "exp" in mark:
                    mark |= {"softmax"}
                markers[outs[0]] = mark
                continue
            elif name in LINEAR and len(act) == 1 and positions == 1:
                layer = self.linear_layer(i, claimed)
            elif name in MULTIPLICATIVE and positions >= 2:  # incl. x . x (a Gram matrix): degree 2
                origins = tuple(self._origin(markers.get(v, frozenset())) for v in act)
                layer = Layer("product", [i], act, outs[0], degree=positions, origins=origins)
            elif name in SUMS:
                layer = self.sum_layer(i, act, claimed)
            elif name in MAXES and len(act) == 1:
                layer = Layer("max", [i], act, outs[0])
            elif name in ADDITIVE:
                layer = Layer("add", [i], act, outs[0])
            elif name in STRUCTURAL:
                if len(act) == 1 and act[0] in markers:  # a transposed softmax is still attention weights
                    markers[outs[0]] = markers[act[0]]
                continue
            elif name in CONTROL:
                layer = self.control_flow(i, act)
            else:
                raise self.node_error(i, _why(name, len(act)))
            layers.append(layer)
            emit_at[layer.nodes[-1]] = layer
        # Region exits (region values used outside their region, or returned) become activation layers.
        stopped: dict[int, set[int]] = {}
        for i, r in region_nodes.items():
            node = g.nodes[i]
            stopped[i] = {v for v in _ids(node) if v == r or (v in self.active and root.get(v, v) != r)}
            y = node.outputs[0]
            outside = [u for u in self.consumers.get(y, []) if u not in region_nodes
                       and any(o in self.active for o in g.nodes[u].outputs)]
            if outside or y in self.graph_outputs:
                layer = Layer("activation", self._region_slice(y, r, region_nodes), [r], y)
                layers.append(layer)
                emit_at[i] = layer
        layers.sort(key=lambda l: l.nodes[-1])
        skip = {n for l in layers for n in l.nodes if l.kind != "activation"}
        self._describe(layers)
        return Plan(g, self.depends, self.active, emit_at, skip, stopped, layers, self.provenance, self.roots)

    @staticmethod
    def _origin(mark: frozenset[str]) -> str:
        return "softmax" if "softmax" in mark else "sigmoid" if "logistic" in mark else ""

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
                if v != r and p is not None and region_nodes.get(p) == r:
                    todo.append(p)
        return sorted(need)

    # -- control flow ----------------------------------------------------------------------------------
    def control_flow(self, i: int, act: list[int]) -> Layer:
        node = self.g.nodes[i]
        flags = [not isinstance(a, Lit) and (a in self.active or a in self.from_ids) for a in node.inputs]
        scope = "/".join(p for p in (self.scope, node.prim.name) if p)
        if node.prim.name == "scan":
            nc, ncar = node.params["num_consts"], node.params["num_carry"]
            body = node.params["jaxpr"]
            while True:  # a carry is explained if its initial value is, or if the body makes it so
                sub = _Analysis(flatten(body), flags, [""] * len(flags), scope).run()
                carry_out = [not isinstance(v, Lit) and v in sub.active for v in sub.graph.outputs[:ncar]]
                new = flags[:nc] + [a or b for a, b in zip(flags[nc:nc + ncar], carry_out)] + flags[nc + ncar:]
                if new == flags:
                    break
                flags = new
            bodies = [sub]
        elif node.prim.name == "cond":  # operands after the branch index
            bodies = [_Analysis(flatten(b), flags[1:], [""] * (len(flags) - 1), scope).run()
                      for b in node.params["branches"]]
        else:  # remat: an open jaxpr without constants
            body = jcore.ClosedJaxpr(node.params["jaxpr"], [])
            bodies = [_Analysis(flatten(body), flags, [""] * len(flags), scope).run()]
        if any(b.roots for b in bodies):
            raise _ids_in_body(node.prim.name)
        outs = [v for v in node.outputs if v in self.active]
        return Layer(node.prim.name, [i], act, outs[0] if outs else node.outputs[0], body=bodies, flags=flags)

    def _describe(self, layers: list[Layer]) -> None:
        """Fill each layer's consts, sign facts and LayerInfo (positions among dense/conv layers are numbered
        over the whole program, loop bodies included, by the tracer afterwards)."""
        for k, layer in enumerate(layers):
            head = self.g.nodes[layer.nodes[0]]
            produced = {v for n in layer.nodes for v in self.g.nodes[n].outputs}
            layer.consts = sorted({v for n in layer.nodes for v in _ids(self.g.nodes[n])
                                   if v not in produced and v not in layer.inputs})
            layer.nonneg = tuple(v in self.nonneg for v in layer.inputs)
            params = sorted(set().union(*(self.provenance.get(v, frozenset()) for v in layer.consts
                                          if v not in self.active)))
            layer.info = LayerInfo(
                index=k, kind=layer.kind, primitive=head.prim.name, module=head.name, params=tuple(params),
                linear_index=None, num_linear=0,
                input_shape=_shape(self.g, layer.inputs[0]), output_shape=_shape(self.g, layer.output),
                origins=layer.origins, scope=self.scope)


_CONTROL_FLOW = ("scan", "cond", "while", "remat2")


def _ids_in_body(prim: str) -> NotImplementedError:
    return NotImplementedError(
        f"explained token ids are embedded inside a {prim} body; their relevance would be read at an embedding "
        f"jlrp cannot see from outside the loop. Embed before the loop (e.g. vectors = emb[ids], then scan "
        f"over the vectors) or explain the embedded vectors instead of the ids.")


def weight_unit_axes(op: Callable, x, w) -> tuple[int, ...] | None:
    """Axes of the weight that index output units (conv: output features, when the explained input is the
    convolved one; dense: the weight's non-contracted axes), read from the linear primitive at the head of
    ``op(x, w)``; None when there is none (e.g. the weight is the convolved input)."""
    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    jaxpr = jax.make_jaxpr(op)(spec(x), spec(w)).jaxpr
    w_var = jaxpr.invars[1]
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            pos_w = next((k for k, v in enumerate(eqn.invars) if v is w_var), None)
            if pos_w is None:
                continue
            head = types.SimpleNamespace(prim=eqn.primitive, params=eqn.params)
            fold = fold_axes(head, 1 - pos_w, jnp.ndim(w), len(eqn.outvars[0].aval.shape))
            return tuple(sorted(set(fold.values()))) or None if fold is not None else None
    return None


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


def chain_axis_map(axis_map: list | None, name: str, params: dict, old: tuple, new: tuple) -> list | None:
    """Track which axis of the linear op's output each axis of the chain's current value comes from.

    Transposes permute axes; reshapes that only insert or drop size-1 axes keep the others in order;
    any other reshape loses track (None), after which only scalar scales can be folded.
    """
    if axis_map is None:
        return None
    if name == "transpose":
        return [axis_map[k] for k in params["permutation"]]
    kept_old = [k for k, n in enumerate(old) if n != 1]
    if [old[k] for k in kept_old] != [n for n in new if n != 1]:
        return None
    it = iter(axis_map[k] for k in kept_old)
    return [next(it) if n != 1 else None for n in new]


def lin_scale_axes(scale_shape: tuple, axis_map: list | None, fold: dict | None) -> list | None:
    """For a scale on the chain's current value: the weight axis of each of its non-1 axes, or None when
    it cannot be folded into the weight (it varies along an axis the weight does not have)."""
    if int(np.prod(scale_shape, dtype=np.int64)) == 1:
        return []
    if axis_map is None or fold is None:
        return None
    shape = (1,) * (len(axis_map) - len(scale_shape)) + tuple(scale_shape)
    out = []
    for k, n in enumerate(shape):
        if n != 1:
            if axis_map[k] is None or axis_map[k] not in fold:
                return None
            out.append(fold[axis_map[k]])
    return out


def _why(name: str, n_active: int) -> str:
    if name in ELEMENTWISE:
        return (f"it combines {n_active} activations that neither share an elementwise root nor are a "
                f"broadcast statistic of one another")
    if name == "while":
        return "while loops with a dynamic trip count cannot be reverse-differentiated; use lax.scan or " \
               "lax.fori_loop with static bounds"
    return "it is not a known linear, elementwise, pooling, control-flow or structural primitive"
