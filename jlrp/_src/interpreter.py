"""Trace a function, and re-run its graph with each layer's backward pass replaced by its LRP rule.

The forward values are those of the original primitives (each layer replays its own equations), so the
rewritten function returns exactly what the user's function returns; only its VJP differs.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from . import rules as R
from .graph import Graph, Lit, flatten
from .layers import Layer, Plan, _Analysis, _ids, fold_axes

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
        leaves, treedef = jax.tree_util.tree_flatten_with_path(args)
        paths = [jax.tree_util.keystr(p[1:], simple=True, separator="/") for p, _ in leaves]
        explained = [p[0].idx in self.argnums for p, _ in leaves]
        avals = tuple(_aval_of(leaf) for _, leaf in leaves)
        try:
            key = (treedef, avals, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:
            key = None
        with self._lock:
            if key is not None and key in self._cache:
                return self._cache[key]
        tree = jax.tree_util.tree_structure(args)

        def flat_fn(*flat):
            return self.fn(*jax.tree_util.tree_unflatten(tree, flat), **kwargs)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
        self.trace_count += 1
        graph = flatten(closed)
        plan = _Analysis(graph, explained, paths).run()
        for layer in plan.layers:
            layer.rule = self.composite.resolve(layer.info)
        result = (plan, jax.tree_util.tree_structure(out_shape))
        if key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
            with self._lock:
                self._cache[key] = result
        return result


# -------------------------------------------------------------------------------------------------------
# Running a plan


def _zero_cotangent(x):
    x = jnp.asarray(x) if not hasattr(x, "dtype") else x
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def _replay(graph: Graph, layer: Layer, xs, consts) -> jax.Array:
    env = dict(zip(layer.inputs, xs))
    env.update(zip(layer.consts, consts))
    for n in layer.nodes:
        node = graph.nodes[n]
        outs = node.bind(*[a.val if isinstance(a, Lit) else env[a] for a in node.inputs])
        env.update(zip(node.outputs, outs))
    return env[layer.output]


def _to_rank(c, ndim: int):
    c = jnp.asarray(c)
    return c.reshape((1,) * (ndim - c.ndim) + c.shape)


def _canonical_linear(graph: Graph, layer: Layer, x, consts):
    """``out = A * T(lin(x; W)) + B`` -> (op, W * A folded, B): BatchNorm and bias merged into the layer."""
    env = dict(zip(layer.consts, consts))
    read = lambda a: a.val if isinstance(a, Lit) else env[a]
    head = graph.nodes[layer.nodes[0]]
    pos = head.inputs.index(layer.inputs[0])
    weight = read(head.inputs[1 - pos])
    out_ndim = len(graph.avals[head.outputs[0]].shape)
    scale, bias, perm = None, None, tuple(range(out_ndim))
    z = head.outputs[0]
    for n in layer.nodes[1:]:
        node = graph.nodes[n]
        name = node.prim.name
        if name == "transpose":
            p = tuple(node.params["permutation"])
            perm = tuple(perm[k] for k in p)
            scale = None if scale is None else jnp.transpose(scale, p)
            bias = None if bias is None else jnp.transpose(bias, p)
        elif name == "neg":
            scale = -1.0 if scale is None else -scale
            bias = None if bias is None else -bias
        else:
            z_first = node.inputs[0] == z
            c = _to_rank(read(node.inputs[1] if z_first else node.inputs[0]), out_ndim)
            if name == "add":
                bias = c if bias is None else bias + c
            elif name == "sub" and z_first:
                bias = -c if bias is None else bias - c
            elif name == "sub":
                scale = -1.0 if scale is None else -scale
                bias = c if bias is None else c - bias
            elif name == "mul":
                scale = c if scale is None else scale * c
                bias = None if bias is None else bias * c
            else:  # div (z / c)
                scale = 1.0 / c if scale is None else scale / c
                bias = None if bias is None else bias / c
        z = node.outputs[0]
    if scale is not None:
        scale = _to_rank(scale, out_ndim)
        scale = jnp.transpose(scale, np.argsort(perm))  # back to lin's output layout
        axes = fold_axes(head, pos, weight.ndim, out_ndim)
        keep = sorted(axes)
        w_shape = [1] * weight.ndim
        for k in keep:
            w_shape[axes[k]] = scale.shape[k]
        s = scale.reshape([scale.shape[k] for k in keep])
        s = jnp.transpose(s, np.argsort([axes[k] for k in keep])).reshape(w_shape)
        weight = weight * s.astype(weight.dtype)
    transposed = perm != tuple(range(out_ndim))

    def op(x, w):
        args = (x, w) if pos == 0 else (w, x)
        out = head.bind(*args)[0]
        return jnp.transpose(out, perm) if transposed else out

    return op, weight, bias


def _rule_backward(graph: Graph, layer: Layer, xs, consts, out, relevance):
    """R_in for each explained input of ``layer``, and the relevance it absorbs."""
    rule = layer.rule
    if isinstance(rule, R.Rule):
        if layer.kind in ("dense", "conv"):
            op, weight, bias = _canonical_linear(graph, layer, xs[0], consts)
        else:
            op = lambda *a: _replay(graph, layer, a[:-1], consts)
            weight = bias = None
        r_in, absorbed = R.propagate(rule, op, xs, weight, bias, relevance, out, layer.degree)
    elif isinstance(rule, R.Pass):
        r_in = tuple(_reduce_to(relevance, x) / len(xs) for x in xs)
        absorbed = None
    elif isinstance(rule, R.Custom):
        r_in = tuple(rule.backward(lambda *a: _replay(graph, layer, a, consts), tuple(xs), out, relevance))
        absorbed = None
    else:  # Native, only reached when reporting
        _, pullback = jax.vjp(lambda *a: _replay(graph, layer, a, consts), *xs)
        r_in = pullback(relevance)
        absorbed = None
    r_in = tuple(r.astype(x.dtype) for r, x in zip(r_in, xs))
    if absorbed is None:
        absorbed = jnp.sum(relevance.astype(jnp.float32)) - sum(jnp.sum(r.astype(jnp.float32)) for r in r_in)
    return r_in, absorbed


def _reduce_to(r, x):
    """Sum ``r`` over the axes along which ``x`` was broadcast to r's shape."""
    axes = tuple(k for k, (a, b) in enumerate(zip(x.shape, r.shape)) if a == 1 and b != 1)
    return jnp.sum(r, axis=axes, keepdims=True) if axes else r


def _emit(graph: Graph, layer: Layer, xs, consts, probe):
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


def run(plan: Plan, flat_args: list, probes: dict | None = None) -> list:
    """Evaluate the plan's graph on ``flat_args``; layers carry their rules in the VJP.

    ``probes`` maps a layer index to zero arrays ``(like output, scalar)`` whose cotangents become that
    layer's relevance and absorbed share (the conservation report).
    """
    g = plan.graph
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
        elif i in plan.skip and layer is None:
            continue
        elif layer is None:
            env.update(zip(node.outputs, node.bind(*map(read, node.inputs))))
        if layer is not None:
            probe = None if probes is None else probes.get(layer.info.index)
            env[layer.output] = _emit(g, layer, [env[v] for v in layer.inputs],
                                      [read(v) for v in layer.consts], probe)
    return [read(v) for v in g.outputs]
