"""Layer recognition over a flat graph, by what each equation computes with respect to the explained values.

One forward pass over the nodes classifies each by its algebra (tables in :mod:`primitives`): linear in one
explained operand (dense/conv, with the affine chain after it), bilinear in two (product), a sum or max
reduction, elementwise (grown into regions from one root), routing, or control flow. Three dataflow facts
drive the grouping, never shapes or spellings:

* a *statistic* is a value derived from a full reduction of a root (a mean, a variance, a softmax sum, a
  max), through any elementwise or routing steps: where it meets values of that root again it is a constant;
* a region value is *affine* in its root when only constant offsets and scales lie between them: a
  non-linearity applied to such a value cuts the region there (BatchNorm then ReLU is an affine layer and
  an activation), and so does an affine tail after a non-linearity (ReLU then BatchNorm);
* a routing op that mixes constants into the explained stream (a concatenated CLS token) is a layer, so what
  reaches the constant is counted as absorbed.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from . import primitives as K
from .geometry import chain_axis_map, fold_axes, lin_scale_axes
from .graph import Graph, Lit, Node, flatten
from .layers import ChainStep, Layer, LayerInfo, LinearView, Plan, UnsupportedPrimitiveError

#: User-registered rules, keyed by primitive object (or by name, see ``jlrp.register_rule``).
REGISTRY: dict[Any, Any] = {}


def registered(prim: jcore.Primitive):
    """The registered rule for ``prim``, if any (an object key wins over a name key)."""
    rule = REGISTRY.get(prim)
    return rule if rule is not None else REGISTRY.get(prim.name)


def _inexact(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _ids(node: Node) -> list[int]:
    return [a for a in node.inputs if not isinstance(a, Lit)]


def _shape(graph: Graph, atom) -> tuple[int, ...]:
    return np.shape(atom.val) if isinstance(atom, Lit) else tuple(graph.avals[atom].shape)


@dataclasses.dataclass
class _Proto:
    """A layer under construction (frozen into a :class:`Layer` by :meth:`_Analysis.finish`)."""
    kind: str
    nodes: list[int]
    inputs: list[int]
    output: int
    reason: str
    degree: int = 1
    origins: tuple[str, ...] = ()
    view: LinearView | None = None
    body: tuple | None = None
    flags: tuple[bool, ...] | None = None
    relu_like: bool = False
    mixing: bool = False  # an affine layer whose map mixes elements (it contains a mean)


class _Analysis:
    def __init__(self, graph: Graph, explained: list[bool], input_paths: list[str], scope: str = "",
                 const_paths: dict | None = None):
        self.g = graph
        self.scope = scope
        inputs = [v for v, e in zip(graph.inputs, explained) if e]
        self.depends: set[int] = set(inputs)
        self.active = {v for v in inputs if _inexact(graph.avals[v])}
        self.from_ids = {v for v in inputs if not _inexact(graph.avals[v])}  # explained integer inputs
        self.positional: set[int] = set()  # computed from ids across tokens: constants (see below)
        self.roots: list[int] = []
        const_paths = const_paths or {}  # id(closed-over array) -> its path (an NNX module's state)
        self.provenance: dict[int, frozenset[str]] = {
            v: frozenset([const_paths[id(c)]]) if id(c) in const_paths else frozenset()
            for v, c in graph.consts.items()}
        for v, p in zip(graph.inputs, input_paths):
            self.provenance[v] = frozenset([p]) if p else frozenset()
        self.producer = graph.producer
        self.consumers: dict[int, list[int]] = {}
        for i, node in enumerate(graph.nodes):
            ins = _ids(node)
            for v in ins:
                self.consumers.setdefault(v, []).append(i)
            # values computed from token ids other than token by token (positions by a cumsum), and what is
            # computed from those without the model's activations (RoBERTa's cumsum(mask) * mask), are
            # constants: only embeddings of the ids themselves carry the ids' relevance
            positional = any(v in self.positional for v in ins)
            positional = not any(v in self.active for v in ins) and (positional or any(
                v in self.depends for v in ins) and node.prim not in K.PER_TOKEN | K.CONTROL | {K.WHILE})
            if positional:
                self.positional.update(node.outputs)
            if not any(v in self.depends for v in ins) or positional:
                prov = frozenset().union(*(self.provenance.get(v, frozenset()) for v in ins))
                self.provenance.update((v, prov) for v in node.outputs)
                continue
            self.depends.update(node.outputs)
            floats = [v for v in node.outputs if _inexact(graph.avals[v])]
            if node.prim in K.STOP_GRADIENT:
                continue  # the user said: no gradient, hence no relevance
            if any(v in self.active for v in ins):
                self.active.update(floats)
            elif any(v in self.from_ids for v in ins):
                if floats and node.prim in K.CONTROL | {K.WHILE}:
                    raise _ids_in_body(node.prim.name)
                self.from_ids.update(v for v in node.outputs if v not in floats)
                self.active.update(floats)  # e.g. an embedding lookup of explained token ids
                self.roots.extend(floats)
        self.graph_outputs = {v for v in graph.outputs if not isinstance(v, Lit)}
        self.nonneg = self._nonnegative()
        # region bookkeeping (filled by run)
        self.root: dict[int, int] = {}  # region value -> its root
        self.alias: dict[int, int] = {}  # a root cut from a region -> the root it was affine in
        self.stat: dict[int, int] = {}  # statistic -> the source root it summarises
        self.linear_stat: set[int] = set()  # statistics linear in their root (means): part of affine maps
        self.affine: set[int] = set()  # region values affine in their root with constant coefficients
        self.tail: set[int] = set()  # region values affine (constant coefficients) in a non-linear region value
        self.markers: dict[int, frozenset[str]] = {}

    # -- facts ----------------------------------------------------------------------------------------
    def constant(self, a) -> bool:
        """Independent of the explained inputs (a parameter, a literal, a closed-over array)."""
        return isinstance(a, Lit) or a not in self.depends

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
            prim, ins = node.prim, node.inputs
            if prim in K.NONNEG_OUTPUT:
                positive = True
            elif prim is K.INTEGER_POW:
                positive = node.params["y"] % 2 == 0
            elif prim is K.MAX:
                positive = any(ok(a) for a in ins)
            elif prim is K.DIV:
                positive = ok(ins[0]) and isinstance(ins[1], Lit) and bool(np.all(np.asarray(ins[1].val) > 0))
            elif prim in K.NONNEG_PRESERVING:  # every float operand must be known >= 0 (params are unknown)
                positive = all(ok(a) for a in ins)
            else:
                positive = False
            if positive:
                known.update(outs)
        return known

    def active_inputs(self, node: Node) -> list[int]:
        return list(dict.fromkeys(v for v in _ids(node) if v in self.active))

    def sole_consumer(self, v: int) -> int | None:
        users = self.consumers.get(v, [])
        if len(users) != 1 or v in self.graph_outputs:
            return None
        return users[0]

    def source(self, v: int) -> int:
        """The root a region value (or a root cut from a region) ultimately derives from, seen through
        value-preserving steps (a cast before a LayerNorm's statistics is the same value)."""
        while True:
            r = self.root.get(v, v)
            if r in self.alias:
                v = self.alias[r]
                continue
            p = self.producer.get(r)
            ins = [] if p is None or self.g.nodes[p].prim not in K.IDENTITY else [
                a for a in _ids(self.g.nodes[p]) if a in self.depends]
            if not ins:
                return r
            v = ins[0]

    def _track_statistic(self, node: Node) -> None:
        ins = [v for v in _ids(node) if v in self.depends]
        if not ins:
            return
        if node.prim in K.REDUCTIONS:
            s = self.source(ins[0])
            # a sum of the root (or of a constant-coefficient affine value of it) is linear in the root: a mean
            linear = node.prim is K.P.reduce_sum_p and (ins[0] == self.source(ins[0]) or ins[0] in self.affine)
        elif all(v in self.stat for v in ins) and len({self.stat[v] for v in ins}) == 1:
            s = self.stat[ins[0]]
            linear = len(ins) == 1 and ins[0] in self.linear_stat and (
                node.prim in K.STRUCTURAL and node.prim not in (K.P.max_p, K.P.min_p, K.P.clamp_p)
                or self.affine_step(node, ins[0]))
        else:
            return
        self.stat.update((v, s) for v in node.outputs)
        if linear:
            self.linear_stat.update(node.outputs)

    def linear_statistic_nodes(self, stat: int, root: int) -> list[int] | None:
        """The nodes computing a linear statistic (a mean) from ``root``, or None if it is not one of it."""
        if stat not in self.linear_stat or self.stat.get(stat) != self.source(root):
            return None
        nodes, todo = set(), [stat]
        while todo:
            v = todo.pop()
            if v == root:
                continue
            p = self.producer.get(v)
            if p is None or (v not in self.stat and (self.source(v) != self.source(root)
                                                     or self.g.nodes[p].prim not in K.IDENTITY)):
                return None  # only the statistic's own steps and casts of the root belong to the layer
            nodes.add(p)
            todo += [a for a in _ids(self.g.nodes[p]) if a in self.depends]
        return sorted(nodes)

    def statistics_in(self, act: list[int]) -> list[int]:
        """Operands that are statistics of the root another operand derives from: constants here."""
        plain = [w for w in act if w not in self.stat]
        return [v for v in act if v in self.stat and any(self.source(w) == self.stat[v] for w in plain)]

    def affine_step(self, node: Node, v: int) -> bool:
        """``node`` is ``a * v + b`` elementwise with ``a``, ``b`` constant (or statistics, with
        ``statistics``): an add/sub/mul/div/neg with ``v`` once (as the numerator of a division)."""
        if node.prim not in K.AFFINE or node.inputs.count(v) != 1:
            return False
        if node.prim is K.DIV and node.inputs[0] != v:
            return False
        return all(self.constant(a) or a == v for a in node.inputs)

    def affine_given_statistics(self, i: int) -> bool:
        node = self.g.nodes[i]
        act = self.active_inputs(node)
        stats = set(self.statistics_in(act))
        plain = [v for v in act if v not in stats]
        if node.prim not in K.AFFINE or len(plain) != 1 or node.inputs.count(plain[0]) != 1:
            return False
        if node.prim is K.DIV and node.inputs[0] != plain[0]:
            return False
        return all(self.constant(a) or a == plain[0] or a in stats or a in self.stat for a in node.inputs)

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
            f"jlrp.register_rule(<the primitive object or '{node.prim.name}'>, rule), e.g. jlrp.rules.epsilon() "
            f"for an op that is linear in its inputs, or keep its ordinary gradient with jlrp.rules.gradient().")

    # -- linear layers and their affine chain ----------------------------------------------------------
    def linear_layer(self, i: int, claimed: set[int]) -> _Proto:
        """A linear node, the zero padding in front of it and the affine chain after it: bias adds,
        per-output scales (BatchNorm), casts, and the transposes / size-1 reshapes some libraries put in
        between (Equinox under vmap)."""
        head = self.g.nodes[i]
        x = self.active_inputs(head)[0]
        position = head.inputs.index(x)
        nodes, notes = [i], []
        pad = self._zero_pad(x, i)
        if pad is not None:
            nodes.insert(0, pad)
            x = self.g.nodes[pad].inputs[0]
            notes.append("zero padding folded in")
        fold = fold_axes(head, position, len(_shape(self.g, head.inputs[1 - position])),
                         len(_shape(self.g, head.outputs[0])))
        out, steps = head.outputs[0], []
        axis_map: list | None = list(range(len(_shape(self.g, out))))
        while (j := self.sole_consumer(out)) is not None:
            node = self.g.nodes[j]
            prim = node.prim
            if self.active_inputs(node) != [out] or node.inputs.count(out) != 1:
                break
            old, new = _shape(self.g, out), _shape(self.g, node.outputs[0])
            others = [a for a in node.inputs if a != out]
            if prim in K.IDENTITY:
                if not _inexact(self.g.avals[node.outputs[0]]):
                    break
                steps.append(ChainStep("identity", j))
            elif prim in K.RESHAPES:
                axis_map = chain_axis_map(axis_map, prim.name, node.params, old, new)
                steps.append(ChainStep("reshape", j))
            elif prim not in K.AFFINE or new != old or not all(self.constant(a) for a in others):
                break
            elif prim is K.NEG:
                steps.append(ChainStep("scale", j, negate=True))
            elif prim in (K.MUL, K.DIV):
                if prim is K.DIV and node.inputs[0] != out:
                    break  # c / z is not affine in z
                axes = lin_scale_axes(_shape(self.g, others[0]), axis_map, fold)
                if axes is None:
                    break  # varies along an axis the weight lacks: an affine layer of its own
                steps.append(ChainStep("scale", j, operand=others[0], weight_axes=tuple(axes),
                                       invert=prim is K.DIV))
            else:  # add / sub / add_any
                minus_z = prim is K.SUB and node.inputs[1] == out  # c - z
                sign = -1.0 if prim is K.SUB and not minus_z else 1.0
                steps.append(ChainStep("bias", j, operand=others[0], sign=sign,
                                       bias_sign=-1.0 if minus_z else 1.0))
            nodes.append(j)
            out = node.outputs[0]
        claimed.update(nodes)
        kinds = sorted({s.kind for s in steps if s.kind in ("scale", "bias")})
        if kinds:
            notes.append("folded: " + ", ".join(kinds))
        kind = "dense" if head.prim is K.P.dot_general_p else "conv"
        reason = f"{head.prim.name} linear in its explained operand" + (f" ({'; '.join(notes)})" if notes else "")
        return _Proto(kind, nodes, [x], out, reason, view=LinearView(i, position, pad, tuple(steps)))

    def _zero_pad(self, x: int, head: int) -> int | None:
        """The ``pad`` node producing ``x`` if it pads an explained value with zeros for ``head`` only."""
        p = self.producer.get(x)
        if p is None or self.sole_consumer(x) != head:
            return None
        node = self.g.nodes[p]
        if node.prim is not K.PAD or self.active_inputs(node) != [node.inputs[0]]:
            return None
        value = self.known_value(node.inputs[1])
        return p if value is not None and np.all(value == 0) else None

    def scalar_like(self, a) -> bool:
        """A constant with one value everywhere: a scalar, or a broadcast of one."""
        while not isinstance(a, Lit) and np.prod(_shape(self.g, a)) > 1:
            p = self.producer.get(a)
            if p is None or self.g.nodes[p].prim not in K.RESHAPES | K.IDENTITY | {K.P.broadcast_in_dim_p}:
                return False
            a = self.g.nodes[p].inputs[0]
        return isinstance(a, Lit) and np.size(a.val) == 1 or np.prod(_shape(self.g, a)) == 1

    def known_value(self, a, limit: int = 16):
        """The concrete value of a small constant (a literal, a closed-over array, or computed from those,
        e.g. ``convert_element_type(0)``), or None when it is not known before the program runs."""
        if isinstance(a, Lit) or a in self.g.consts:
            try:  # a closed-over array is a tracer when the explanation itself is traced (jax.jit): unknown
                return np.asarray(a.val if isinstance(a, Lit) else self.g.consts[a])
            except jax.errors.TracerArrayConversionError:
                return None
        p = self.producer.get(a)
        if p is None or limit == 0 or a in self.depends or int(np.prod(_shape(self.g, a))) > 16:
            return None
        node = self.g.nodes[p]
        vals = [self.known_value(v, limit - 1) for v in node.inputs]
        if any(v is None for v in vals):
            return None
        with jax.ensure_compile_time_eval():  # under an outer jax.jit too
            return np.asarray(node.bind(*vals)[node.outputs.index(a)])

    def sum_layer(self, i: int, act: list[int], claimed: set[int]) -> _Proto:
        """A sum (pooling, reduction) and the scalar scales after it: average pooling is one layer, so the
        norm rule's stabilizer acts on the average (as Zennit's Norm on AvgPool does)."""
        nodes, out = [i], self.g.nodes[i].outputs[0]
        while (j := self.sole_consumer(out)) is not None:
            node = self.g.nodes[j]
            other = [a for a in node.inputs if a != out]
            if (node.prim not in (K.MUL, K.DIV) or len(other) != 1 or not self.constant(other[0])
                    or (node.prim is K.DIV and node.inputs[0] != out)
                    or int(np.prod(_shape(self.g, other[0]), dtype=np.int64)) != 1):
                break
            nodes.append(j)
            out = node.outputs[0]
        claimed.update(nodes)
        return _Proto("sum", nodes, act, out, f"{self.g.nodes[i].prim.name}: a sum of explained values")

    # -- elementwise regions ---------------------------------------------------------------------------
    def region_root(self, node: Node, act: list[int]) -> int | None:
        """The root if ``node`` extends an elementwise region (cutting a region at an affine value that a
        non-linearity consumes), else None."""
        stats = self.statistics_in(act)
        plain = [v for v in act if v not in stats]
        distinct = {self.root.get(v, v) for v in plain}
        if len(distinct) != 1:
            return None
        r = next(iter(distinct))
        if len(plain) == 1:
            v = plain[0]
            if v != r and v in self.affine and not self.affine_step(node, v):
                self.root[v] = v  # BatchNorm then ReLU: the affine part ends here and becomes a layer
                self.alias[v] = r
                r = v
            elif v in self.tail and not self.affine_step(node, v):
                self.root[v] = v  # ReLU, BatchNorm, ReLU: the affine tail becomes a layer of its own
                r = v
        r_shape, out = _shape(self.g, r), _shape(self.g, node.outputs[0])
        if len(r_shape) != len(out) or np.broadcast_shapes(r_shape, out) != out:
            return None
        return r

    def grow_region(self, node: Node, act: list[int], r: int) -> None:
        y = node.outputs[0]
        stats = self.statistics_in(act)
        plain = [v for v in act if v not in stats]
        self.root[y] = r
        if len(plain) == 1 and self.affine_step(node, plain[0]):
            if plain[0] == r or plain[0] in self.affine:
                self.affine.add(y)
            elif plain[0] in self.tail or any(
                    self.constant(a) and not self.scalar_like(a) for a in node.inputs):
                # per-unit coefficients after a non-linearity (BatchNorm): a layer, not the activation's own
                # scalar constants (tanh-GELU's 0.5 * (1 + tanh(.)) stays one activation)
                self.tail.add(y)
        mark = frozenset().union(*(self.markers.get(v, frozenset()) for v in plain))
        if node.prim in K.EXP:
            mark |= {"exp"}
        if node.prim in K.GATE:
            mark |= {"logistic"}
        if node.prim in K.ELEMENTWISE - K.AFFINE - {K.P.select_n_p} or (
                node.prim in (K.MUL, K.DIV) and len(plain) >= 2):
            mark |= {"nonlinear"}  # gelu, silu, tanh, relu, ...: the gate branch of SwiGLU / GeGLU
        if stats:
            mark |= {"normalised"}
        if node.prim in (K.MUL, K.DIV) and len(plain) >= 2:
            mark -= {"logistic"}  # z * sigmoid(z) (silu, swish) is an activation, not a gate
        if {"exp", "normalised"} <= mark:
            mark |= {"softmax"}  # exp(x - stat) / sum, however it is written (log_softmax, exp, ...)
        self.markers[y] = mark

    def run(self) -> Plan:
        g = self.g
        region_nodes: dict[int, int] = {}  # node -> its region's root
        claimed: set[int] = set()
        protos: list[_Proto] = []
        for i, node in enumerate(g.nodes):
            self._track_statistic(node)
            if i in claimed:
                continue
            act = self.active_inputs(node)
            outs = [v for v in node.outputs if v in self.active]
            if not act or not outs:
                continue
            prim = node.prim
            positions = sum(1 for a in _ids(node) if a in self.active)
            if registered(prim) is not None:
                proto = _Proto(prim.name, [i], act, outs[0], f"registered rule for '{prim.name}'", degree=len(act))
            elif prim in K.ELEMENTWISE and (r := self.region_root(node, act)) is not None:
                self.grow_region(node, act, r)
                region_nodes[i] = r
                continue
            elif prim in K.LINEAR and len(act) == 1 and positions == 1:
                proto = self.linear_layer(i, claimed)
            elif prim in K.LINEAR | {K.MUL} and positions >= 2:  # incl. x . x (a Gram matrix): degree 2
                origins = tuple(self._origin(self.markers.get(v, frozenset())) for v in act)
                proto = _Proto("product", [i], act, outs[0], f"{prim.name} of {positions} explained operands "
                               f"(bilinear)", degree=positions, origins=origins)
            elif prim in K.SUMS:
                proto = self.sum_layer(i, act, claimed)
            elif prim in K.MAXES and len(act) == 1:
                proto = _Proto("max", [i], act, outs[0], f"{prim.name}: winner-take-all")
            elif prim in K.ADDITIVE:
                proto = _Proto("add", [i], act, outs[0], f"{prim.name} of explained values from different roots")
            elif prim in K.STRUCTURAL:
                if any(not isinstance(a, Lit) and a in self.active for a in node.inputs) and any(
                        self.constant(a) and jnp.issubdtype(jnp.result_type(
                            a.val if isinstance(a, Lit) else g.avals[a].dtype), jnp.inexact) for a in node.inputs):
                    proto = _Proto("route", [i], act, outs[0], f"{prim.name} mixes constants into explained values")
                else:
                    if len(act) == 1 and act[0] in self.markers:  # a transposed softmax is still attention
                        self.markers[outs[0]] = self.markers[act[0]]
                    continue
            elif prim is K.DIV and len(act) == 2 and not isinstance(node.inputs[1], Lit):
                # a / b of two explained values (linear attention's and SSMs' normalisers): the denominator
                # is a normalising statistic, a constant like LayerNorm's std; relevance goes to a
                proto = _Proto("affine", [i], [node.inputs[0]], outs[0], "div of two explained values: the "
                               "denominator is a normaliser (a constant), the layer scales the numerator")
            elif prim in K.CONTROL:
                proto = self.control_flow(i, act)
            else:
                raise self.node_error(i, _why(prim, len(act)))
            protos.append(proto)
        protos += self._region_layers(region_nodes)
        protos.sort(key=lambda p: p.nodes[-1])
        return self.finish(protos, region_nodes)

    def _region_layers(self, region_nodes: dict[int, int]) -> list[_Proto]:
        """Region exits (values used outside their region, or returned) become activation or affine layers;
        an affine tail after a non-linearity (ReLU then BatchNorm) becomes an affine layer of its own."""
        g, protos = self.g, []
        for i, r in region_nodes.items():
            y = g.nodes[i].outputs[0]
            outside = [u for u in self.consumers.get(y, []) if region_nodes.get(u) != r
                       and any(o in self.active for o in g.nodes[u].outputs)]
            if not outside and y not in self.graph_outputs:
                continue
            nodes = self._region_slice(y, r, region_nodes)
            if all(self.affine_given_statistics(n) for n in nodes):
                protos.append(self._affine_layer(nodes, r, y))
                continue
            tail, w = [], y
            while w != r and self.affine_given_statistics(self.producer[w]):
                j = self.producer[w]
                v = next(a for a in self.active_inputs(g.nodes[j]) if a not in self.statistics_in(
                    self.active_inputs(g.nodes[j])))
                if self.sole_consumer(v) != j:
                    break
                tail.insert(0, j)
                w = v
            if tail and w != r:
                protos.append(_Proto("affine", tail, [w], y, "elementwise affine map after an activation"))
                y, nodes = w, [n for n in nodes if n not in tail]
            prims = sorted({g.nodes[n].prim.name for n in nodes})
            relu = len(nodes) == 1 and g.nodes[nodes[0]].prim is K.MAX and any(
                isinstance(a, Lit) and np.all(np.asarray(a.val) == 0) for a in g.nodes[nodes[0]].inputs)
            protos.append(_Proto("activation", nodes, [r], y, "elementwise region (" + ", ".join(prims) + ")",
                                 relu_like=bool(relu)))
        return protos

    def _affine_layer(self, nodes: list[int], r: int, y: int) -> _Proto:
        """An affine region; its means of the root (LayerNorm's centring) are recomputed inside the layer, so
        rules see the centring as part of the linear map and only nonlinear statistics (1/std) as constants."""
        read = {a for n in nodes for a in _ids(self.g.nodes[n])} - {v for n in nodes for v in self.g.nodes[n].outputs}
        means = [self.linear_statistic_nodes(v, r) for v in read if v in self.linear_stat]
        means = [m for m in means if m is not None]
        if not means:
            return _Proto("affine", nodes, [r], y, "elementwise affine map (constants and statistics of its "
                          "input as coefficients)")
        mixed = sorted(set(nodes).union(*means))
        return _Proto("affine", mixed, [r], y, "affine map: centring by the mean is linear, other statistics "
                      "of the input are constants", mixing=True)

    @staticmethod
    def _origin(mark: frozenset[str]) -> str:
        return "softmax" if "softmax" in mark else "sigmoid" if "logistic" in mark else \
            "activation" if "nonlinear" in mark else ""

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
    def control_flow(self, i: int, act: list[int]) -> _Proto:
        node = self.g.nodes[i]
        flags = [not isinstance(a, Lit) and (a in self.active or a in self.from_ids) for a in node.inputs]
        scope = "/".join(p for p in (self.scope, node.prim.name) if p)
        if node.prim is K.SCAN:
            nc, ncar = node.params["num_consts"], node.params["num_carry"]
            body = node.params["jaxpr"]
            while True:  # a carry is explained if its initial value is, or if the body makes it so
                sub = _Analysis(flatten(body), flags, [""] * len(flags), scope).run()
                carry_out = [not isinstance(v, Lit) and v in sub.active for v in sub.graph.outputs[:ncar]]
                new = flags[:nc] + [a or b for a, b in zip(flags[nc:nc + ncar], carry_out)] + flags[nc + ncar:]
                if new == flags:
                    break
                flags = new
            bodies = (sub,)
        elif node.prim is K.COND:  # operands after the branch index
            bodies = tuple(_Analysis(flatten(b), flags[1:], [""] * (len(flags) - 1), scope).run()
                           for b in node.params["branches"])
        else:  # remat: an open jaxpr without constants
            body = jcore.ClosedJaxpr(node.params["jaxpr"], [])
            bodies = (_Analysis(flatten(body), flags, [""] * len(flags), scope).run(),)
        if any(b.roots for b in bodies):
            raise _ids_in_body(node.prim.name)
        outs = [v for v in node.outputs if v in self.active]
        return _Proto(node.prim.name, [i], act, outs[0] if outs else node.outputs[0],
                      f"{node.prim.name}: its body is rewritten recursively", body=bodies, flags=tuple(flags))

    def _carrying(self, protos: list[_Proto]) -> list[_Proto]:
        """The layers relevance can reach: a layer whose output only feeds statistics (LayerNorm's variance,
        a softmax's sum: constants of the layers that read them) is no layer; its nodes run as they are."""
        g, at = self.g, {p.nodes[-1]: p for p in protos}
        inside = {n for p in protos for n in p.nodes}
        live, kept = set(self.graph_outputs), set()
        for i in reversed(range(len(g.nodes))):
            p = at.get(i)
            if p is not None:
                if p.output in live or live.intersection(g.nodes[i].outputs):
                    kept.add(id(p))
                    live.update(p.inputs)
            elif i not in inside and live.intersection(g.nodes[i].outputs):
                live.update(self.active_inputs(g.nodes[i]))
        return [p for p in protos if id(p) in kept]

    def finish(self, protos: list[_Proto], region_nodes: dict[int, int]) -> Plan:
        """Freeze the layers: consts, sign facts and LayerInfo (positions among dense/conv layers are
        numbered over the whole program, loop bodies included, by the tracer afterwards)."""
        g = self.g
        protos = self._carrying(protos)
        region_nodes = {i: r for i, r in region_nodes.items() if any(i in p.nodes for p in protos)}
        layers, emit_at = [], {}
        for k, p in enumerate(protos):
            head = g.nodes[p.view.head if p.view else p.nodes[0]]
            produced = {v for n in p.nodes for v in g.nodes[n].outputs}
            consts = tuple(sorted({v for n in p.nodes for v in _ids(g.nodes[n])
                                   if v not in produced and v not in p.inputs}))
            params = sorted(set().union(*(self.provenance.get(v, frozenset()) for v in consts
                                          if v not in self.active)))
            info = LayerInfo(index=k, kind=p.kind, primitive=head.prim.name, module=head.name,
                             params=tuple(params), linear_index=None, num_linear=0,
                             input_shape=_shape(g, p.inputs[0]), output_shape=_shape(g, p.output),
                             origins=p.origins, scope=self.scope, reason=p.reason, relu_like=p.relu_like)
            layer = Layer(p.kind, tuple(p.nodes), tuple(p.inputs), p.output, consts, p.degree, p.origins,
                          tuple(v in self.nonneg for v in p.inputs), p.view, info, body=p.body, flags=p.flags,
                          mixing=p.mixing)
            layers.append(layer)
            emit_at[p.nodes[-1]] = layer
        stopped = {}
        for i, r in region_nodes.items():
            node = g.nodes[i]
            stopped[i] = frozenset(v for v in _ids(node) if v == r or (v in self.active and self.root.get(v, v) != r))
        skip = frozenset(n for l in layers if l.nodes[-1] not in region_nodes for n in l.nodes)
        return Plan(g, frozenset(self.depends), frozenset(self.active), emit_at, skip, stopped, tuple(layers),
                    self.provenance, tuple(self.roots))


def _ids_in_body(prim: str) -> NotImplementedError:
    return NotImplementedError(
        f"explained token ids are embedded inside a {prim} body; their relevance would be read at an embedding "
        f"jlrp cannot see from outside the loop. Embed before the loop (e.g. vectors = emb[ids], then scan "
        f"over the vectors) or explain the embedded vectors instead of the ids.")


def _why(prim, n_active: int) -> str:
    if prim in K.ELEMENTWISE:
        return (f"it combines {n_active} activations that neither share an elementwise root nor are a "
                f"statistic of one another")
    if prim is K.WHILE:
        return "while loops with a dynamic trip count cannot be reverse-differentiated; use lax.scan or " \
               "lax.fori_loop with static bounds"
    return "it is not a known linear, elementwise, pooling, control-flow or structural primitive"
