"""Trace a function, and re-run its graph with each layer's backward pass replaced by its rule.

The forward values are those of the original primitives (each layer replays its own equations), so the
rewritten function returns exactly what the user's function returns; only its VJP differs. The interpreter
knows no rule types: every layer's custom_vjp calls ``layer.rule.backward(context, xs, out, relevance)``.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from . import primitives as K
from .analysis import REGISTRY, _Analysis
from .graph import Graph, Lit, flatten
from .layers import Layer, Plan, Probes
from .rules import complete
from .util import is_array, varying_like, varying_over

# -------------------------------------------------------------------------------------------------------
# Tracing and its cache


def _aval_of(leaf) -> Any:
    aval = jax.typeof(leaf)
    # inside jax.shard_map a value carries the mesh axes it varies over: tracing with them makes JAX insert
    # the casts (pvary) that the traced program needs when it mixes varying and replicated values
    manual = getattr(aval, "manual_axis_type", None)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=getattr(aval, "sharding", None),
                                weak_type=aval.weak_type, **({"manual_axis_type": manual} if manual else {}))


class Tracer:
    """Traces ``fn`` once per input signature and analyses its graph; caches the (immutable) plan."""

    def __init__(self, fn: Callable, composite, argnums: tuple[int, ...]):
        self.fn = fn
        self.composite = composite
        self.argnums = argnums
        self._cache: dict = {}
        self._lock = threading.Lock()
        self.trace_count = 0  # how often fn was traced (tests assert no retrace)

    def plan(self, args: tuple, kwargs: dict) -> tuple[Plan, Any]:
        """The analysed plan for these arguments and the output's tree structure.

        Array leaves are traced (by shape and dtype); other leaves of non-explained arguments (Python
        numbers, strings, None, ...) stay static, like ``jax.grad`` leaves them concrete: their values are
        part of the cache key. ``dynamic_leaves`` picks the traced leaves to pass to :func:`run`.
        """
        leaves, treedef = jax.tree_util.tree_flatten_with_path(args)
        paths = [jax.tree_util.keystr(p[1:], simple=True, separator="/") for p, _ in leaves]
        explained = [p[0].idx in self.argnums for p, _ in leaves]
        dynamic = [e or is_array(leaf) for e, (_, leaf) in zip(explained, leaves)]
        statics = tuple(None if d else leaf for d, (_, leaf) in zip(dynamic, leaves))
        avals = tuple(_aval_of(leaf) for d, (_, leaf) in zip(dynamic, leaves) if d)
        try:
            key = (treedef, avals, tuple(dynamic), statics, tuple(sorted(kwargs.items())),
                   tuple(sorted(((str(k), id(v)) for k, v in REGISTRY.items()))))
            hash(key)
        except TypeError:
            key = None
        with self._lock:
            if key is not None and key in self._cache:
                return self._cache[key]

        def flat_fn(*flat):
            it = iter(flat)
            full = [next(it) if d else v for d, v in zip(dynamic, statics)]
            return self.fn(*jax.tree_util.tree_unflatten(treedef, full), **kwargs)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
        self.trace_count += 1
        analysed = _Analysis(flatten(closed), [e for e, d in zip(explained, dynamic) if d],
                             [p for p, d in zip(paths, dynamic) if d],
                             const_paths=getattr(self.fn, "param_paths", {})).run()
        plan = dataclasses.replace(assign_rules(analysed, self.composite), dynamic=tuple(dynamic))
        result = (plan, jax.tree_util.tree_structure(out_shape))
        if key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
            with self._lock:
                self._cache[key] = result
        return result


def dynamic_leaves(plan: Plan, args: tuple) -> list:
    """The leaves of ``args`` that the plan's graph takes as inputs (the traced ones)."""
    return [leaf for leaf, d in zip(jax.tree_util.tree_leaves(args), plan.dynamic) if d]


# -------------------------------------------------------------------------------------------------------
# Rule assignment: positions counted as the input meets the layers, loops unrolled


@dataclasses.dataclass(frozen=True)
class _Position:
    """A layer's position among dense/conv (and conv) layers as an affine function of the steps of its
    enclosing scans: ``base + sum(step_k * stride_k)``."""
    linear: int | None
    conv: int | None
    before: int  # dense/conv layers met before this one (at step 0)
    strides: tuple[tuple[int, int], ...]  # per enclosing scan: (linear stride, conv stride)
    lengths: tuple[int, ...]


def _count(plan: Plan) -> tuple[int, int]:
    """Dense/conv and conv layers the input meets in one pass of ``plan`` (loops unrolled)."""
    n = c = 0
    for layer in plan.layers:
        if layer.body is not None:
            counts = [_count(b) for b in layer.body]
            times = _node(plan, layer).params["length"] if layer.kind == "scan" else 1
            n += times * max(k[0] for k in counts)
            c += times * max(k[1] for k in counts)
        else:
            n += layer.kind in ("dense", "conv")
            c += layer.kind == "conv"
    return n, c


def _node(plan: Plan, layer: Layer):
    return plan.graph.nodes[layer.nodes[0]]


def _positions(plan: Plan, n: int, c: int, strides=(), lengths=(), out=None) -> dict[int, _Position]:
    out = {} if out is None else out
    for layer in plan.layers:
        if layer.body is None:
            lin, conv = layer.kind in ("dense", "conv"), layer.kind == "conv"
            out[id(layer)] = _Position(n if lin else None, c if conv else None, n, strides, lengths)
            n, c = n + lin, c + conv
            continue
        per = [_count(b) for b in layer.body]
        step = (max(k[0] for k in per), max(k[1] for k in per))
        if layer.kind == "scan":
            length = _node(plan, layer).params["length"]
            for b in layer.body:
                _positions(b, n, c, strides + (step,), lengths + (length,), out)
            n, c = n + length * step[0], c + length * step[1]
        else:
            for b in layer.body:
                _positions(b, n, c, strides, lengths, out)
            n, c = n + step[0], c + step[1]
        out[id(layer)] = _Position(None, None, n, strides, lengths)
    return out


def assign_rules(plan: Plan, composite) -> Plan:
    """The plan with every layer's rule chosen by ``composite``. A layer inside scans is resolved at every
    step (as if the loop were unrolled); where steps get different rules it gets a per-step table."""
    num_linear, _ = _count(plan)
    positions = _positions(plan, 0, 0)

    def assign(p: Plan) -> Plan:
        layers = []
        for layer in p.layers:
            body = tuple(assign(b) for b in layer.body) if layer.body is not None else None
            pos = positions[id(layer)]
            rules_by_step, first = [], None
            for steps in itertools.product(*(range(n) for n in pos.lengths)):
                lin = None if pos.linear is None else pos.linear + sum(s * st[0] for s, st in zip(steps, pos.strides))
                conv = None if pos.conv is None else pos.conv + sum(s * st[1] for s, st in zip(steps, pos.strides))
                before = pos.before + sum(s * st[0] for s, st in zip(steps, pos.strides))
                info = dataclasses.replace(layer.info, linear_index=lin, conv_index=conv, num_linear=num_linear,
                                           step=steps, preceding_linear=before)
                first = first or info
                rules_by_step.append(composite.resolve(info))
            distinct = list(dict.fromkeys(rules_by_step))
            if len(distinct) == 1:
                rule = distinct[0]
            else:
                from .rules import PerStep
                table = np.array([distinct.index(r) for r in rules_by_step], np.int32).reshape(pos.lengths)
                rule = PerStep(tuple(distinct), table)
            layers.append(dataclasses.replace(layer, info=first, rule=rule, body=body))
            seen.append(first)
        return p.with_layers(layers)

    seen: list = []
    assigned = assign(plan)
    composite.warn_unmatched(seen)
    return assigned


# -------------------------------------------------------------------------------------------------------
# What a rule sees of a layer


def _to_rank(c, ndim: int):
    c = jnp.asarray(c)
    return c.reshape((1,) * (ndim - c.ndim) + c.shape)


def _in_weight_layout(scale, axes: tuple[int, ...], w_ndim: int):
    """A per-output scale (constant along axes the weight lacks) laid out to broadcast against the weight;
    ``axes`` (from the analysis) give the weight axis of each of its non-1 axes."""
    scale = jnp.asarray(scale)
    if not axes:  # a scalar factor
        return jnp.reshape(scale, (1,) * w_ndim)
    varying = [k for k, n in enumerate(scale.shape) if n != 1]
    values = jnp.transpose(scale.reshape([scale.shape[k] for k in varying]), np.argsort(axes))
    w_shape = [1] * w_ndim
    for k, a in zip(varying, axes):
        w_shape[a] = scale.shape[k]
    return values.reshape(w_shape)


@dataclasses.dataclass(frozen=True)
class View:
    """A layer read as ``op(*xs, weight) + bias``: ``op`` is linear (homogeneous of the layer's degree) in
    ``xs``; ``weight`` and ``bias`` are None for parameter-free layers. ``exact`` says whether the layer's
    output equals ``op(*xs, weight) + bias`` (False for a stand-in, e.g. max pooling read as sum pooling)."""
    op: Callable
    weight: Any = None
    bias: Any = None
    exact: bool = True


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a rule's ``backward`` may use: the layer's record, its constants, and views of it."""
    graph: Graph
    layer: Layer
    consts: tuple
    steps: tuple = ()  # inside scans: the current step of each enclosing scan (traced)

    def read(self, atom):
        return atom.val if isinstance(atom, Lit) else dict(zip(self.layer.consts, self.consts))[atom]

    def replay(self, *xs, dtype=None, value=None):
        """Re-run the layer's equations on ``xs`` (in ``dtype`` if given, e.g. float32 for a bf16 model); the
        layer's output, or the intermediate ``value`` of the layer (its equations up to it)."""
        value = self.layer.output if value is None else value
        env = dict(zip(self.layer.inputs, xs))
        env.update(zip(self.layer.consts, self.consts))
        for n in self.layer.nodes:
            if value in env:
                break
            node = self.graph.nodes[n]
            outs = node.bind(*[a.val if isinstance(a, Lit) else env[a] for a in node.inputs], dtype=dtype)
            env.update(zip(node.outputs, outs))
        return env[value]

    def multiplicity(self, k: int) -> int:
        """How often explained input ``k`` enters the layer's core node (x . x counts twice)."""
        return self.graph.nodes[self.layer.nodes[0]].inputs.count(self.layer.inputs[k])

    def view(self, xs) -> View:
        kind = self.layer.kind
        if self.layer.view is not None:
            return self._linear()
        if kind == "affine" and self.layer.mixing:  # x -> f(x) - f(0) is linear: its VJP is the map's
            bias = self.replay(jnp.zeros_like(xs[0]), dtype=xs[0].dtype)
            return View(lambda x, w: self.replay(x, dtype=x.dtype) - bias, None, bias)
        if kind == "affine":
            return self._affine(xs[0])
        if kind == "max":  # a rule on max pooling: propagate as if it were sum pooling
            node = self.graph.nodes[self.layer.nodes[0]]
            summing = K.SUM_OF[node.prim]
            return View(lambda x, w: summing.bind(x, **node.prim.get_bind_params(node.params)), exact=False)
        return View(lambda *a: self.replay(*a[:-1], dtype=a[0].dtype))

    def _linear(self) -> View:
        """``out = P(lin(pad(x); W)) * A + B`` -> (op, W with A folded in, B): bias and BatchNorm merged into
        the layer, following the recipe the analysis derived (:class:`~.layers.LinearView`)."""
        g, view = self.graph, self.layer.view
        head = g.nodes[view.head]
        weight = self.read(head.inputs[1 - view.position])
        shape = tuple(g.avals[head.outputs[0]].shape)
        bias, post = None, []
        for step in view.steps:
            node = g.nodes[step.node]
            if step.kind == "reshape":
                post.append(node)
                if bias is not None:
                    bias = node.bind(jnp.broadcast_to(_to_rank(bias, len(shape)), shape))[0]
            elif step.kind == "scale":
                c = -1.0 if step.negate else self.read(step.operand)
                c = 1.0 / c if step.invert else c
                weight = weight * _in_weight_layout(c, step.weight_axes, weight.ndim).astype(weight.dtype)
                bias = None if bias is None else bias * _to_rank(c, len(shape))
            elif step.kind == "bias":
                if step.bias_sign < 0:  # c - z
                    weight, bias = -weight, None if bias is None else -bias
                c = step.sign * _to_rank(self.read(step.operand), len(shape))
                bias = c if bias is None else bias + c
            shape = tuple(g.avals[node.outputs[0]].shape)
        pad = None if view.pad is None else g.nodes[view.pad]
        pos = view.position

        def op(x, w):  # computes in x's dtype (the rule's compute dtype)
            w = varying_like(w, x)
            if varying_over(w) - varying_over(x):  # casting x here would psum its cotangent over devices
                raise NotImplementedError(
                    f"inside jax.shard_map, a rule of layer {self.layer.info.index} ({self.layer.info.kind}) "
                    f"feeds a value replicated over the mesh axes {sorted(varying_over(w) - varying_over(x))} "
                    f"(e.g. z^B's bounds) into a per-device layer. Explain under jax.jit with sharded inputs "
                    f"instead (jlrp shards a batch without shard_map), or use a rule without constant inputs")
            if pad is not None:
                x = pad.prim.bind(x, jnp.zeros((), x.dtype), **pad.prim.get_bind_params(pad.params))
            out = head.bind(*((x, w) if pos == 0 else (w, x)), dtype=x.dtype)[0]
            for node in post:
                out = node.bind(out)[0]
            return out

        return View(op, weight, bias)

    def _affine(self, x) -> View:
        """``y = a * x + b`` elementwise: ``a`` is the derivative (exactly what the gradient sees; the
        layer's statistics are constants here), ``b = y - a * x``."""
        y, a = jax.jvp(lambda v: self.replay(v, dtype=v.dtype), (x,), (jnp.ones_like(x),))
        return View(lambda v, w: jnp.broadcast_to(v, w.shape) * w, a, y - jnp.broadcast_to(x, y.shape) * a)


# -------------------------------------------------------------------------------------------------------
# Running a plan


def _emit(graph: Graph, layer: Layer, xs, consts, probe, steps, tap, known=None):
    """The layer with its rule in the VJP. ``known``: its output as the model computed it (a region's exit,
    already evaluated with stopped roots): returned as the forward value, so that a replay that computes it
    another way (LayerNorm's mean recomputed inside the layer) cannot change the model's output by an ulp."""
    ctx = LayerContext(graph, layer, tuple(consts), steps)
    if tap is not None and layer.view is not None and not steps:
        tap(layer.info, xs[0], ctx.view(xs), ctx.replay(*xs))
    if layer.rule.native and probe is None:
        out = ctx.replay(*xs)
        return out if known is None else _value_of(known, out)

    def forward(xs, consts, known, steps):
        return LayerContext(graph, layer, consts, steps).replay(*xs) if known is None else known

    @jax.custom_vjp
    def f(xs, consts, probe, steps, known):
        return forward(xs, consts, known, steps)

    def fwd(xs, consts, probe, steps, known):
        # symbolic zeros: the primals arrive wrapped (value, perturbed)
        xs, consts, steps, known = jax.tree.map(lambda p: p.value, (xs, consts, steps, known))
        out = forward(xs, consts, known, steps)
        return out, (xs, out, consts, steps)

    def bwd(res, relevance):
        xs, out, consts, steps = res
        nothing = (None,) * len(xs)
        if isinstance(relevance, SymbolicZero):  # no relevance arrives (a constant operand downstream)
            return nothing, None, None, None, None
        ctx = LayerContext(graph, layer, consts, steps)
        r_in, absorbed = complete(layer.rule.backward(ctx, xs, out, relevance), relevance, xs, symbolic=True)
        probe_ct = None if probe is None else (relevance, absorbed.astype(probe[1].dtype))
        return r_in, None, probe_ct, None, None

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f(tuple(xs), tuple(consts), probe, tuple(steps), known)


@jax.custom_jvp
def _value_of(known, out):
    """``known``'s value with ``out``'s derivative (``out`` computes the same values another way)."""
    return known


@_value_of.defjvp
def _value_of_jvp(primals, tangents):
    return primals[0], tangents[1]


@jax.custom_vjp
def _gate(y, mask):
    """``y`` unchanged; the relevance flowing back through it is multiplied by ``mask`` (a condition)."""
    return y


def _gate_fwd(y, mask):
    return y, mask


def _gate_bwd(mask, relevance):
    return (relevance * mask).astype(relevance.dtype), None


_gate.defvjp(_gate_fwd, _gate_bwd)


def _control_flow(layer: Layer, node, vals: list, probes: list | None, steps: tuple, tap) -> list:
    """Run scan / cond with their bodies rewritten (each body is an analysed plan of its own).

    ``probes``: one :class:`Probes` per body or None; a scan's are stacked over its steps
    and sliced like its ``xs``, so their cotangents come back per step. Inside a scan the step (in execution
    order) is threaded to the body's layers, for rules that differ per step."""
    probes = probes or [Probes() for _ in layer.body]
    if node.prim is K.SCAN:
        p = node.params
        nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
        consts, init, xs = vals[:nc], vals[nc:nc + ncar], vals[nc + ncar:]
        order = jnp.arange(length)
        order = length - 1 - order if p["reverse"] else order

        def step(carry, inputs):
            x, probe, e = inputs
            outs = run(layer.body[0], list(consts) + list(carry) + list(x), probe, steps + (e,), tap)
            return outs[:ncar], outs[ncar:]

        carry, ys = jax.lax.scan(step, list(init), (list(xs), probes[0], order), length=length,
                                 reverse=p["reverse"], unroll=p["unroll"])
        return list(carry) + list(ys)
    if node.prim is K.COND:
        branches = [lambda ops, probes, j=j: run(layer.body[j], list(ops), probes[j], steps, tap)
                    for j in range(len(layer.body))]
        return list(jax.lax.switch(vals[0], branches, list(vals[1:]), probes))
    # jax.checkpoint: the rewritten body is checkpointed again, so its activations are recomputed in the
    # backward pass (with the rules' custom_vjps inside) instead of being stored
    body = jax.checkpoint(lambda ops, probe: run(layer.body[0], list(ops), probe, steps, tap),
                          prevent_cse=node.params["prevent_cse"], policy=node.params["policy"])
    return list(body(list(vals), probes[0]))


def _add_probe(node, value, probe):
    """``value + probe`` (a zero whose cotangent is the relevance at ``value``) in the context ``value`` was
    computed in; a probe made under another mesh (a model that switches to Auto axes) is resharded first."""
    mesh = lambda a: getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
    if mesh(probe) != mesh(value) and not getattr(mesh(value), "empty", True):
        probe = jax.sharding.reshard(probe, jax.typeof(value).sharding)
    with node.context():
        return value + probe


def control_outputs(plan: Plan, node) -> list[int]:
    """The explained outputs of a control-flow node."""
    return [v for v in node.outputs if v in plan.active]


def constant_inits(plan: Plan, layer: Layer, node) -> list[int]:
    """Operand positions of a scan's initial carries that are constant outside but explained in the body."""
    if node.prim is not K.SCAN:
        return []
    nc, ncar = node.params["num_consts"], node.params["num_carry"]
    return [k for k in range(nc, nc + ncar)
            if layer.flags[k] and (isinstance(node.inputs[k], Lit) or node.inputs[k] not in plan.active)]


def run(plan: Plan, flat_args: list, probes: Probes | None = None, steps: tuple = (), tap=None) -> list:
    """Evaluate the plan's graph on ``flat_args``; layers carry their rules in the VJP.

    ``probes`` (:class:`~.layers.Probes`): zero arrays whose cotangents become each layer's relevance and
    absorbed share (the report). ``tap(info, x, view, out)``, if given, is called
    for every top-level dense/conv layer with its input, canonical view and output (PatternNet).

    A ``jax.jit`` block of the model runs as one jitted program again (its explained part), so that the
    forward values equal the model's to the last bit also when it is called eagerly.
    """
    g = plan.graph
    probes = probes or Probes()
    env: dict[int, Any] = dict(zip(g.inputs, flat_args))
    env.update(g.consts)
    read = lambda a: a.val if isinstance(a, Lit) else env[a]
    deferred, later = [], set()
    blocks = tap is None and not steps
    # everything independent of the explained input first, except inside a jax.jit block: the block runs as
    # one program again, with the values it computed from constants (rotary tables...) rounded as it did
    for i, node in enumerate(g.nodes):
        if blocks and node.call or any(v in plan.depends or v in later for v in node.inputs if not isinstance(v, Lit)):
            deferred.append(i)
            later.update(node.outputs)
        else:
            env.update(zip(node.outputs, node.bind(*map(read, node.inputs))))
    internal: dict[int, Any] = {}  # region values computed from stopped roots (non-differentiable)
    state = (plan, probes, steps, tap)
    for group in _jit_blocks(g, deferred) if blocks else [[i] for i in deferred]:
        if len(group) == 1:
            _evaluate(state, group[0], env, internal)
        else:
            _run_block(state, group, env, internal)
    return [jnp.asarray(v.val) if isinstance(v, Lit) else env[v] for v in g.outputs]


def _jit_blocks(graph: Graph, deferred: list[int]) -> list[list[int]]:
    """Consecutive nodes from the same outermost ``jax.jit`` call, grouped (others alone)."""
    groups: list[list[int]] = []
    for i in deferred:
        call = graph.nodes[i].call[:1]
        if groups and call and graph.nodes[groups[-1][0]].call[:1] == call:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _block_io(plan: Plan, group: list[int]) -> tuple[list[int], list[int]]:
    """Values a block of nodes reads from outside, and values it produces."""
    produced, reads = set(), []
    for i in group:
        node = plan.graph.nodes[i]
        layer = plan.emit_at.get(i)
        needed = [a for a in node.inputs if not isinstance(a, Lit)]
        if layer is not None:
            needed += list(layer.inputs) + list(layer.consts)
        reads += [v for v in needed if v not in produced]
        produced.update(node.outputs)
    return list(dict.fromkeys(reads)), sorted(produced)


def _read_outside(plan: Plan, group: list[int]) -> set:
    """Values read by nodes (and layers) outside ``group``, and the outputs."""
    members, read = set(group), {v for v in plan.graph.outputs if not isinstance(v, Lit)}
    for i, node in enumerate(plan.graph.nodes):
        if i not in members:
            read.update(_block_io(plan, [i])[0])
    return read


def _run_block(state, group: list[int], env: dict, internal: dict) -> None:
    plan = state[0]
    reads, produced = _block_io(plan, group)
    # only what is read later leaves the block: more outputs would change XLA's fusion, hence the rounding
    later = _read_outside(plan, group)
    produced = [v for v in produced if v in later]
    # a region's exit is in both: its layer's output in env (relevance flows), its stopped copy in internal
    # (read by later nodes of the same region only)
    inside = [v for v in reads if v in internal]
    outside = [v for v in reads if v in env]

    def block(outer, inner, probes):
        env_b, internal_b = dict(zip(outside, outer)), dict(zip(inside, inner))
        for i in group:
            _evaluate((plan, probes, (), None), i, env_b, internal_b)
        return ({v: env_b[v] for v in produced if v in env_b},
                {v: internal_b[v] for v in produced if v in internal_b})

    # one jax.jit per plan and block: a new one per call would compile the block again at every eager call
    key = (tuple(group), tuple(outside), tuple(inside))
    if key not in plan.compiled:
        plan.compiled[key] = jax.jit(block)
    env_out, internal_out = plan.compiled[key]([env[v] for v in outside], [internal[v] for v in inside], state[1])
    env.update(env_out)
    internal.update(internal_out)


def _evaluate(state, i: int, env: dict, internal: dict) -> None:
    """Evaluate deferred node ``i`` (or the layer emitted there) into ``env``."""
    plan, probes, steps, tap = state
    g = plan.graph
    read = lambda a: a.val if isinstance(a, Lit) else env[a]
    node = g.nodes[i]
    layer = plan.emit_at.get(i)
    if i in plan.stopped_roots:  # inside an elementwise region
        stopped = plan.stopped_roots[i]
        vals = [a.val if isinstance(a, Lit) else internal[a] if a in internal
                else jax.lax.stop_gradient(env[a]) if a in stopped else env[a] for a in node.inputs]
        outs = node.bind(*vals)
        internal.update(zip(node.outputs, outs))
        env.update(zip(node.outputs, outs))
    elif layer is not None and layer.body is not None:
        vals = [read(a) for a in node.inputs]
        index = layer.info.index
        for k, probe in probes.inits.get(index, {}).items():
            vals[k] = vals[k] + probe  # a constant initial carry that the body explains
        env.update(zip(node.outputs, _control_flow(layer, node, vals, probes.bodies.get(index), steps, tap)))
        if index in probes.layers:
            for v, probe in zip(control_outputs(plan, node), probes.layers[index][0]):
                env[v] = env[v] + probe
        return
    elif i in plan.skip and layer is None:
        return
    elif layer is not None and len(node.outputs) > 1:  # e.g. a registered sort with its indices
        env.update(zip(node.outputs, node.bind(*map(read, node.inputs))))
    elif layer is None:
        env.update(zip(node.outputs, node.bind(*map(read, node.inputs))))
        for v in node.outputs:
            if v in plan.roots and plan.roots.index(v) in probes.roots:
                env[v] = _add_probe(node, env[v], probes.roots[plan.roots.index(v)])
    if layer is not None:
        # statistics an activation treats as constants (1/std, softmax's sum) must not carry relevance
        consts = [jax.lax.stop_gradient(env[v]) if v in plan.active else read(v) for v in layer.consts]
        known = jax.lax.stop_gradient(internal[layer.output]) if layer.output in internal else None
        env[layer.output] = _emit(g, layer, [env[v] for v in layer.inputs], consts,
                                  probes.layers.get(layer.info.index), steps, tap, known)
        if layer.info.index in probes.gates:
            env[layer.output] = _gate(env[layer.output], probes.gates[layer.info.index])
