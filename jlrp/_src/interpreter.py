"""Trace a function, and re-run its graph with each layer's backward pass replaced by its LRP rule.

The forward values are those of the original primitives (each layer replays its own equations), so the
rewritten function returns exactly what the user's function returns; only its VJP differs.
"""
from __future__ import annotations

import contextvars
import dataclasses
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import rules as R
from .graph import Graph, Lit, flatten
from .layers import REGISTRY, RESHAPES, Layer, Plan, _Analysis, _ids, chain_axis_map, fold_axes, lin_scale_axes
from .util import is_array

# -------------------------------------------------------------------------------------------------------
# Tracing and its cache


def _aval_of(leaf) -> Any:
    aval = jax.typeof(leaf)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=getattr(aval, "sharding", None),
                                weak_type=aval.weak_type)


class Tracer:
    """Traces ``fn`` once per input signature and analyses its graph; caches the result."""

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
                   tuple(sorted((k, id(v)) for k, v in REGISTRY.items())))
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
        graph = flatten(closed)
        plan = _Analysis(graph, [e for e, d in zip(explained, dynamic) if d],
                         [p for p, d in zip(paths, dynamic) if d]).run()
        plan.dynamic = dynamic
        _number_globally(plan)
        for layer in plan.all_layers():
            layer.rule = self.composite.resolve(layer.info)
        result = (plan, jax.tree_util.tree_structure(out_shape))
        if key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
            with self._lock:
                self._cache[key] = result
        return result


def dynamic_leaves(plan: Plan, args: tuple) -> list:
    """The leaves of ``args`` that the plan's graph takes as inputs (the traced ones)."""
    return [leaf for leaf, d in zip(jax.tree_util.tree_leaves(args), plan.dynamic) if d]


def _number_globally(plan: Plan) -> None:
    """Number dense/conv layers over the whole program, loop bodies included, so 'first' means the first
    dense-or-conv layer the input meets."""
    layers = list(plan.all_layers())
    linear = {id(l): k for k, l in enumerate(l for l in layers if l.kind in ("dense", "conv"))}
    convs = {id(l): k for k, l in enumerate(l for l in layers if l.kind == "conv")}
    for l in layers:
        l.info = dataclasses.replace(l.info, linear_index=linear.get(id(l)), num_linear=len(linear),
                                     conv_index=convs.get(id(l)))


# -------------------------------------------------------------------------------------------------------
# Running a plan


def _zero_cotangent(x):
    x = jnp.asarray(x) if not hasattr(x, "dtype") else x
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def _replay(graph: Graph, layer: Layer, xs, consts, dtype=None) -> jax.Array:
    """Re-run the layer's equations on ``xs`` (in ``dtype`` if given, e.g. float32 for a bf16 model)."""
    env = dict(zip(layer.inputs, xs))
    env.update(zip(layer.consts, consts))
    for n in layer.nodes:
        node = graph.nodes[n]
        outs = node.bind(*[a.val if isinstance(a, Lit) else env[a] for a in node.inputs], dtype=dtype)
        env.update(zip(node.outputs, outs))
    return env[layer.output]


def _to_rank(c, ndim: int):
    c = jnp.asarray(c)
    return c.reshape((1,) * (ndim - c.ndim) + c.shape)


def _canonical_linear(graph: Graph, layer: Layer, x, consts):
    """``out = P(lin(x; W)) * A + B`` -> (op, W with A folded in, B): bias and BatchNorm merged into the
    layer. P is the chain's structural ops (transposes, singleton reshapes). Each scale is folded into the
    weight where it occurs (the analysis checked it varies only along axes that come from the weight, so
    ``A * lin(x; W) = lin(x; W * A)``); only the bias is carried through later reshapes."""
    env = dict(zip(layer.consts, consts))
    read = lambda a: a.val if isinstance(a, Lit) else env[a]
    head = graph.nodes[layer.nodes[0]]
    pos = head.inputs.index(layer.inputs[0])
    weight = read(head.inputs[1 - pos])
    shape = tuple(graph.avals[head.outputs[0]].shape)
    fold = fold_axes(head, pos, weight.ndim, len(shape))
    axis_map = list(range(len(shape)))
    bias, post, z = None, [], head.outputs[0]

    def scale_by(c):
        nonlocal weight, bias
        c = _to_rank(c, len(shape))
        weight = weight * _scale_in_weight_layout(c, axis_map, fold, weight.ndim).astype(weight.dtype)
        bias = None if bias is None else bias * c

    for n in layer.nodes[1:]:
        node = graph.nodes[n]
        name = node.prim.name
        new_shape = tuple(graph.avals[node.outputs[0]].shape)
        if name in RESHAPES:
            axis_map = chain_axis_map(axis_map, name, node.params, shape, new_shape)
            post.append(node)
            if bias is not None:
                bias = node.bind(jnp.broadcast_to(_to_rank(bias, len(shape)), shape))[0]
        elif name == "neg":
            scale_by(-1.0)
        else:
            z_first = node.inputs[0] == z
            c = _to_rank(read(node.inputs[1] if z_first else node.inputs[0]), len(shape))
            if name == "add":
                bias = c if bias is None else bias + c
            elif name == "sub" and z_first:
                bias = -c if bias is None else bias - c
            elif name == "sub":  # c - z
                scale_by(-1.0)
                bias = c if bias is None else c + bias
            elif name == "mul":
                scale_by(c)
            else:  # div (z / c)
                scale_by(1.0 / c)
        z, shape = node.outputs[0], new_shape

    def op(x, w):  # computes in x's dtype (the rule's compute dtype)
        out = head.bind(*((x, w) if pos == 0 else (w, x)), dtype=x.dtype)[0]
        for node in post:
            out = node.bind(out)[0]
        return out

    return op, weight, bias


def _scale_in_weight_layout(scale, axis_map, fold, w_ndim):
    """Reshape a per-output scale (constant along axes the weight lacks) to broadcast against the weight."""
    axes = lin_scale_axes(tuple(int(n) for n in np.shape(scale)), axis_map, fold)
    if axes is None:
        raise AssertionError("jlrp internal error: a scale the analysis found foldable cannot be folded")
    if not axes:  # a scalar factor
        return jnp.reshape(scale, (1,) * w_ndim)
    varying = [k for k, n in enumerate(scale.shape) if n != 1]
    values = scale.reshape([scale.shape[k] for k in varying])
    values = jnp.transpose(values, np.argsort(axes))
    w_shape = [1] * w_ndim
    for k, a in zip(varying, axes):
        w_shape[a] = scale.shape[k]
    return values.reshape(w_shape)


def _rule_backward(graph: Graph, layer: Layer, xs, consts, out, relevance):
    """R_in for each explained input of ``layer``, and the relevance it absorbs."""
    rule = layer.rule
    absorbed = None
    if isinstance(rule, R.Rule):
        if layer.kind in ("dense", "conv"):
            op, weight, bias = _canonical_linear(graph, layer, xs[0], consts)
        elif layer.kind == "max":  # a rule on max pooling: propagate as if it were sum pooling
            node = graph.nodes[layer.nodes[0]]
            summing = _SUM_OF[node.prim.name]
            op = lambda x, w: summing.bind(x, **node.prim.get_bind_params(node.params))
            weight = bias = None
        else:
            op = lambda *a: _replay(graph, layer, a[:-1], consts, dtype=a[0].dtype)
            weight = bias = None
        r_in, absorbed = R.propagate(rule, op, xs, weight, bias, relevance, out, layer.degree, layer.nonneg,
                                     z_is_op=layer.kind != "max")
    elif isinstance(rule, R.Substitute):
        if layer.kind not in ("dense", "conv"):
            raise TypeError(f"rule {rule!r} substitutes weights: it applies to dense and conv layers only")
        op, weight, _ = _canonical_linear(graph, layer, xs[0], consts)
        _, pullback = jax.vjp(lambda x: op(x, rule.weight(weight).astype(x.dtype)), xs[0])
        r_in = pullback(relevance.astype(out.dtype))
    elif isinstance(rule, R.Product):
        r_in = _product_backward(graph, layer, rule, xs, consts, out, relevance)
    elif isinstance(rule, R.Pass):
        r_in = tuple(_reduce_to(relevance, x) / len(xs) for x in xs)
    elif isinstance(rule, R.Custom):
        r_in = tuple(rule.backward(lambda *a: _replay(graph, layer, a, consts), tuple(xs), out, relevance))
    else:  # Native, only reached when reporting
        _, pullback = jax.vjp(lambda *a: _replay(graph, layer, a, consts), *xs)
        r_in = pullback(relevance)
    r_in = tuple(r.astype(x.dtype) for r, x in zip(r_in, xs))
    if absorbed is None:  # rules without denominators: measured (in at least float32, float64 under x64)
        dtype = jnp.promote_types(relevance.dtype, jnp.float32)
        absorbed = jnp.sum(relevance.astype(dtype)) - sum(jnp.sum(r.astype(dtype)) for r in r_in)
    return r_in, absorbed


_SUM_OF = {"reduce_max": jax.lax.reduce_sum_p, "reduce_window_max": jax.lax.reduce_window_sum_p,
           "reduce_min": jax.lax.reduce_sum_p, "reduce_window_min": jax.lax.reduce_window_sum_p}


def _product_backward(graph, layer, rule, xs, consts, out, relevance):
    """Products of activations: constant-origin operands get nothing, the others share uniformly."""
    live = [k for k, o in enumerate(layer.origins) if o not in rule.constant]
    if not live or len(live) == len(xs):
        live = list(range(len(xs)))

    def op(*a):
        full = [x.astype(a[0].dtype) for x in xs]
        for k, v in zip(live, a[:-1]):
            full[k] = v
        return _replay(graph, layer, full, consts, dtype=a[0].dtype)

    node = graph.nodes[layer.nodes[0]]
    degree = sum(node.inputs.count(layer.inputs[k]) for k in live)  # x . x counts twice
    epsilon = R.epsilon(rule.stabilizer)
    r_live, _ = R.propagate(epsilon, op, [xs[k] for k in live], None, None, relevance, out, degree)
    r_in = [jnp.zeros_like(x) for x in xs]
    for k, r in zip(live, r_live):
        r_in[k] = r
    return tuple(r_in)


def _reduce_to(r, x):
    """Sum ``r`` over the axes along which ``x`` was broadcast to r's shape."""
    axes = tuple(k for k, (a, b) in enumerate(zip(x.shape, r.shape)) if a == 1 and b != 1)
    return jnp.sum(r, axis=axes, keepdims=True) if axes else r


#: When set, called as ``tap(info, x, op, weight, bias, out)`` for every dense/conv layer as it runs, with the
#: canonized weight and bias (BatchNorm folded in): PatternNet gathers its statistics this way.
TAP: contextvars.ContextVar = contextvars.ContextVar("jlrp_tap", default=None)


def _emit(graph: Graph, layer: Layer, xs, consts, probe):
    out = _emit_rule(graph, layer, xs, consts, probe)
    tap = TAP.get()
    if tap is not None and layer.kind in ("dense", "conv"):
        op, weight, bias = _canonical_linear(graph, layer, xs[0], consts)
        tap(layer.info, xs[0], op, weight, bias, out)
    return out


def _emit_rule(graph: Graph, layer: Layer, xs, consts, probe):
    if isinstance(layer.rule, R.Native) and probe is None:
        return _replay(graph, layer, xs, consts)

    @jax.custom_vjp
    def f(xs, consts, probe):
        return _replay(graph, layer, xs, consts)

    def fwd(xs, consts, probe):
        out = _replay(graph, layer, xs, consts)
        return out, (xs, consts, out)

    def bwd(res, relevance):
        xs, consts, out = res
        r_in, absorbed = _rule_backward(graph, layer, xs, consts, out, relevance)
        probe_ct = None if probe is None else (relevance, absorbed.astype(probe[1].dtype))
        return r_in, jax.tree.map(_zero_cotangent, consts), probe_ct

    f.defvjp(fwd, bwd)
    return f(tuple(xs), tuple(consts), probe)


def _control_flow(layer: Layer, node, vals: list, probes: list | None) -> list:
    """Run scan / cond with their bodies rewritten (each body is an analysed plan of its own).

    ``probes``: one probe dict per body (see :func:`run`) or None; a scan's are stacked over its steps
    and sliced like its ``xs``, so their cotangents come back per step."""
    probes = probes or [None] * len(layer.body)
    if node.prim.name == "scan":
        p = node.params
        nc, ncar = p["num_consts"], p["num_carry"]
        consts, init, xs = vals[:nc], vals[nc:nc + ncar], vals[nc + ncar:]

        def step(carry, inputs):
            x, probe = inputs
            outs = run(layer.body[0], list(consts) + list(carry) + list(x), probe)
            return outs[:ncar], outs[ncar:]

        carry, ys = jax.lax.scan(step, list(init), (list(xs), probes[0]), length=p["length"],
                                 reverse=p["reverse"], unroll=p["unroll"])
        return list(carry) + list(ys)
    if node.prim.name == "cond":
        branches = [lambda ops, probes, j=j: run(layer.body[j], list(ops), probes[j])
                    for j in range(len(layer.body))]
        return list(jax.lax.switch(vals[0], branches, list(vals[1:]), probes))
    # jax.checkpoint: the rewritten body is checkpointed again, so its activations are recomputed in the
    # backward pass (with the rules' custom_vjps inside) instead of being stored
    body = jax.checkpoint(lambda ops, probe: run(layer.body[0], list(ops), probe),
                          prevent_cse=node.params["prevent_cse"], policy=node.params["policy"])
    return list(body(list(vals), probes[0]))


def control_outputs(plan: Plan, node) -> list[int]:
    """The explained outputs of a control-flow node."""
    return [v for v in node.outputs if v in plan.active]


def constant_inits(plan: Plan, layer: Layer, node) -> list[int]:
    """Operand positions of a scan's initial carries that are constant outside but explained in the body."""
    if node.prim.name != "scan":
        return []
    nc, ncar = node.params["num_consts"], node.params["num_carry"]
    return [k for k in range(nc, nc + ncar)
            if layer.flags[k] and (isinstance(node.inputs[k], Lit) or node.inputs[k] not in plan.active)]


def run(plan: Plan, flat_args: list, probes: dict | None = None) -> list:
    """Evaluate the plan's graph on ``flat_args``; layers carry their rules in the VJP.

    ``probes`` maps ``f"layer{index}"`` to zero arrays ``(like output, scalar)`` whose cotangents become
    that layer's relevance and absorbed share (the conservation report; a control-flow layer's probes,
    one per explained output, are added to its outputs), ``f"body{index}"`` to a list of such dicts, one
    per body of a control-flow layer, ``f"init{index}"`` to ``{operand position: zeros}`` added to a
    scan's constant initial carries, and ``f"root{k}"`` to a zero array added to the k-th embedding root
    (relevance of explained token ids is read there).
    """
    g = plan.graph
    probes = probes or {}
    env: dict[int, Any] = dict(zip(g.inputs, flat_args))
    env.update(g.consts)
    read = lambda a: a.val if isinstance(a, Lit) else env[a]
    deferred = []
    for i, node in enumerate(g.nodes):  # everything independent of the explained input, first
        if any(v in plan.depends for v in _ids(node)):
            deferred.append(i)
        else:
            env.update(zip(node.outputs, node.bind(*map(read, node.inputs))))
    internal: dict[int, Any] = {}  # region values computed from stopped roots (non-differentiable)
    roots = {v: k for k, v in enumerate(plan.roots)}
    for i in deferred:
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
            for k, probe in probes.get(f"init{layer.info.index}", {}).items():
                vals[k] = vals[k] + probe  # a constant initial carry that the body explains
            env.update(zip(node.outputs, _control_flow(layer, node, vals, probes.get(f"body{layer.info.index}"))))
            if f"layer{layer.info.index}" in probes:
                for v, probe in zip(control_outputs(plan, node), probes[f"layer{layer.info.index}"][0]):
                    env[v] = env[v] + probe
            continue
        elif i in plan.skip and layer is None:
            continue
        elif layer is not None and len(node.outputs) > 1:  # e.g. a registered sort with its indices
            env.update(zip(node.outputs, node.bind(*map(read, node.inputs))))
        elif layer is None:
            env.update(zip(node.outputs, node.bind(*map(read, node.inputs))))
            for v in node.outputs:
                if v in roots and f"root{roots[v]}" in probes:
                    env[v] = env[v] + probes[f"root{roots[v]}"]
        if layer is not None:
            # statistics an activation treats as constants (1/std, softmax's sum) must not carry relevance
            consts = [jax.lax.stop_gradient(env[v]) if v in plan.active else read(v) for v in layer.consts]
            env[layer.output] = _emit(g, layer, [env[v] for v in layer.inputs], consts,
                                      probes.get(f"layer{layer.info.index}"))
    return [jnp.asarray(v.val) if isinstance(v, Lit) else env[v] for v in g.outputs]
