"""Concept Relevance Propagation (CRP; Achtibat et al. 2023) and relevance / activation maximisation.

A concept is a channel of a layer's output, a unit of a dense layer, or any mask on a layer's output (soft
channel weights, a region). Conditioning on it multiplies the relevance arriving at that output by the mask
before the layer's rule runs (the interpreter's gates, :class:`~jlrp._src.layers.Probes`); the forward pass
is unchanged. Masks enter only the backward pass, so under ``vmap`` the forward is computed once and many
conditions are one batched backward pass.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from . import image as _image
from .api import _check_fn, _explain, _normalise, _replace, transform
from .composites import _match
from .interpreter import dynamic_leaves, run
from .layers import Layer, LayerInfo
from .stream import _pad, _per_row, _split
from .util import is_array

# ------------------------------------------------------------------------------------------------------
# layers and masks


def _gateable(plan) -> list[Layer]:
    """Layers a condition can act on: the top-level ones (control-flow layers and their bodies cannot)."""
    return [l for l in plan.layers if l.body is None]


def _shape(plan, layer: Layer) -> tuple[int, ...]:
    return tuple(plan.graph.avals[layer.output].shape)


def _listing(plan) -> str:
    return "\n".join(f"  #{l.info.index} {l.info.kind} {_where(l.info)} output {_shape(plan, l)}"
                     for l in _gateable(plan))


def _where(info: LayerInfo) -> str:
    return info.module or ", ".join(info.params) or "-"


def _resolve(plan, selector) -> Layer:
    """The one layer ``selector`` names: a LayerInfo index, a kind, 'first'/'last', a ``jlrp.module_path`` /
    ``jlrp.param_path`` selector or a callable on LayerInfo."""
    layers = _gateable(plan)
    if isinstance(selector, (int, np.integer)) and not isinstance(selector, bool):
        hits = [l for l in layers if l.info.index == selector]
    else:
        try:
            hits = [l for l in layers if _match(selector, l.info)]
        except ValueError as e:
            raise ValueError(f"{e}. The layers a concept can live in:\n{_listing(plan)}") from None
    if len(hits) != 1:
        found = "no layer" if not hits else f"{len(hits)} layers (#{', #'.join(str(l.info.index) for l in hits)})"
        raise ValueError(f"the layer selector {selector!r} matches {found}; a concept lives in exactly one "
                         f"layer: pass its index or a narrower selector (e.g. jlrp.module_path('Conv_1')). "
                         f"The layers a concept can live in:\n{_listing(plan)}")
    return hits[0]


def _masks(spec, shape: tuple[int, ...], axis: int, where: str) -> jax.Array:
    """Concepts as a stack of masks ``(K, ...)`` broadcastable to a layer output of ``shape``: channel ids
    (an int, ints, or 'all') along ``axis``, or float/bool masks with a leading concept axis."""
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis={axis} is out of range for the output {shape} of {where}")
    axis %= len(shape)
    n = shape[axis]
    if isinstance(spec, str):
        if spec != "all":
            raise ValueError(f"concepts at {where}: 'all', channel ids or masks, got {spec!r}")
        spec = np.arange(n)
    a = spec if isinstance(spec, jax.Array) else np.asarray(spec)
    if jnp.issubdtype(a.dtype, jnp.integer):
        if a.ndim > 1 or a.size == 0:
            raise ValueError(f"channel ids at {where}: an int or a non-empty 1-D sequence, got shape {a.shape}")
        try:  # checked when known; traced ids (under jit) cannot be
            known = np.asarray(a)
        except jax.errors.TracerArrayConversionError:
            known = None
        if known is not None and (known.min() < 0 or known.max() >= n):
            raise ValueError(f"channel ids {known.tolist()} out of range: {where} has {n} channels (axis "
                             f"{axis} of its output {shape})")
        onehot = jax.nn.one_hot(jnp.atleast_1d(a), n, dtype=jnp.float32)
        return onehot.reshape(onehot.shape + (1,) * (len(shape) - 1 - axis))
    if not (jnp.issubdtype(a.dtype, jnp.floating) or a.dtype == bool) or a.ndim == 0 or a.shape[0] == 0:
        raise ValueError(f"masks at {where}: a float or bool array with a leading concept axis (K, ...), got "
                         f"dtype {a.dtype} and shape {a.shape}")
    try:
        ok = np.broadcast_shapes(a.shape[1:], shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"masks of shape {a.shape} at {where}: after the leading concept axis they must "
                         f"broadcast to the layer's output {shape}")
    return jnp.asarray(a)


def _per_concept(r: jax.Array, axis: int) -> jax.Array:
    """Sum a layer output's relevance over every axis but the batch (first) and concept axes: ``(N, C)``."""
    r = jnp.moveaxis(r, axis, -1)
    return r.reshape(r.shape[0], -1, r.shape[-1]).sum(1)


def _map(f: Callable, tree, chunk: int | None):
    """``vmap`` over the leading axis of ``tree``, ``chunk`` at a time in a scan (inside a trace: bounds memory)."""
    k = jax.tree.leaves(tree)[0].shape[0]
    if chunk is None or k <= chunk:
        return jax.vmap(f)(tree)
    return jax.lax.map(f, tree, batch_size=chunk)


def _chunks(f: Callable, tree, chunk: int | None):
    """``f`` (compiled, vmapped) on chunks of ``chunk`` conditions from a Python loop, the last chunk padded to
    the same shape: XLA runs convolutions inside a loop (``lax.map``) several times slower on CPU."""
    k = jax.tree.leaves(tree)[0].shape[0]
    if chunk is None or k <= chunk:
        return f(tree)
    tree = jax.tree.map(lambda a: _pad(jnp.asarray(a), -(-k // chunk) * chunk), tree)
    outs = [f(jax.tree.map(lambda a: a[i:i + chunk], tree)) for i in range(0, k, chunk)]
    return jax.tree.map(lambda *o: jnp.concatenate(o)[:k], *outs)


def _traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------------
# conditional relevance


class Conditional:
    """Conditional relevance (Concept Relevance Propagation) of a model; build it with
    :func:`jlrp.concepts.conditional`.

    Every method takes the model's arguments like ``jlrp.lrp``'s explain function (``cond(params, x, ...)``) plus
    keywords. Called with concrete arrays, a method compiles its work once per argument signature and runs the
    conditions in chunks of ``chunk_size`` from a Python loop; inside ``jax.jit`` / ``jax.vmap`` it is traced
    like any JAX function (chunks then run in ``lax.map``, slower on CPU).
    """

    def __init__(self, fn: Callable, composite=None, *, argnums: int | tuple[int, ...] | None = None,
                 axis: int = -1, chunk_size: int | None = 64):
        _check_fn(fn, "jlrp.concepts.conditional")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.transformed = transform(fn, composite, argnums=argnums)
        self.single = not isinstance(argnums, (tuple, list))
        self.axis, self.chunk_size = axis, chunk_size
        self._compiled: dict = {}

    def _plan(self, args: tuple, kwargs: dict):
        return self.transformed.plan(args, kwargs)[0]

    def layers(self, *args, **kwargs) -> list[LayerInfo]:
        """The layers concepts can live in (the top-level layers) for these arguments, in execution order."""
        return [l.info for l in _gateable(self._plan(args, kwargs))]

    def layer(self, *args, layer, **kwargs) -> LayerInfo:
        """The ``LayerInfo`` of the one layer ``layer`` selects; a ValueError listing the layers if no layer or
        several match."""
        return _resolve(self._plan(args, kwargs), layer).info

    def _gates(self, plan, conditions: Mapping) -> dict[int, jax.Array]:
        """``{layer index: masks (K, ...)}`` with one K for all layers (a layer with one mask is broadcast)."""
        if not isinstance(conditions, Mapping) or not conditions:
            raise TypeError(f"conditions must be a non-empty dict {{layer selector: concepts}}, got "
                            f"{conditions!r}")
        gates = {}
        for selector, spec in conditions.items():
            layer = _resolve(plan, selector)
            if layer.info.index in gates:
                raise ValueError(f"two selectors of conditions name layer #{layer.info.index}: merge them")
            gates[layer.info.index] = _masks(spec, _shape(plan, layer), self.axis,
                                             f"layer #{layer.info.index} ({layer.info.kind})")
        ks = {g.shape[0] for g in gates.values()}
        k = max(ks)
        if ks - {1, k}:
            raise ValueError(f"conditions at several layers pair their concepts one to one (or one with all), "
                             f"got {sorted(ks)} concepts")
        return {i: jnp.broadcast_to(g, (k,) + g.shape[1:]) for i, g in gates.items()}

    def _run(self, name: str, one: Callable, args: tuple, kwargs: dict, target, relevance, gates: dict,
             chunk: int | None):
        """``one(args, target, relevance, gates)`` for every condition (the leading axis of ``gates``; once
        without conditions when ``gates`` is empty).

        ``one`` may depend only on ``name``, ``kwargs``, the gated layers and its arguments: its compiled form
        is cached under those."""
        target = target if target is None or isinstance(target, jax.Array) else jnp.asarray(target)
        if gates:
            each = lambda a, t, r, g: jax.vmap(lambda gi: one(a, t, r, gi))(g)  # noqa: E731
            over = lambda f: _chunks(f, gates, chunk)  # noqa: E731
        else:
            each, over = one, lambda f: f({})  # noqa: E731
        if _traced((args, target, relevance, gates)):  # inside the user's jit / vmap: trace as called
            return _map(lambda g: one(args, target, relevance, g), gates, chunk) if gates else \
                one(args, target, relevance, {})
        leaves, tree = jax.tree.flatten(args)
        dynamic = tuple(is_array(leaf) for leaf in leaves)
        statics = tuple(None if d else leaf for d, leaf in zip(dynamic, leaves))  # static, as in jlrp's tracer
        key = (name, tree, dynamic, statics, tuple(sorted(kwargs.items())), tuple(sorted(gates)))
        try:
            hash(key)
        except TypeError:  # unhashable static arguments: run as called (eagerly)
            return over(lambda g: each(args, target, relevance, g))
        if key not in self._compiled:
            def compiled(arrays, t, r, g):
                it = iter(arrays)
                return each(jax.tree.unflatten(tree, [next(it) if d else s for d, s in zip(dynamic, statics)]),
                            t, r, g)

            self._compiled[key] = jax.jit(compiled)
        arrays = [leaf for d, leaf in zip(dynamic, leaves) if d]
        return over(lambda g: self._compiled[key](arrays, target, relevance, g))

    def __call__(self, *args, conditions: Mapping, target=None, relevance=None, chunk_size: int | None = None,
                 **kwargs) -> jax.Array:
        """Relevance at the explained input(s) conditioned on each concept: shape ``(K, *x.shape)``.

        Args:
          *args: the model's arguments.
          conditions: ``{layer selector: concepts}``. A selector is a ``LayerInfo.index``, a kind matching one
            layer ('last', 'dense', ...), ``jlrp.module_path(...)``, ``jlrp.param_path(...)`` or a callable on
            ``LayerInfo``. Concepts: a channel id along ``axis``, a 1-D sequence of K ids, ``"all"``, or a float /
            bool array of K masks ``(K, ...)``, each broadcastable to the layer's output (soft channel weights
            ``(K, C)``, regions ``(K, 1, H, W, 1)``, ...). Conditions at several layers pair their concepts
            one to one (a layer with one concept pairs with all): relevance through all of them.
          target: the explained class, as in ``jlrp.lrp`` (an int, one per row, or None for the argmax).
          relevance: a custom initial relevance at the output instead of ``target``.
          chunk_size: conditions per vmapped chunk (default: the one given to :func:`conditional`).
          **kwargs: keyword arguments of the model.
        """
        plan = self._plan(args, kwargs)
        gates = self._gates(plan, conditions)
        one = lambda a, t, r, g: _explain(self.transformed, a, kwargs, t, r, self.single, False, gates=g)  # noqa
        return self._run("explain", one, args, kwargs, target, relevance, gates, chunk_size or self.chunk_size)

    def concept_relevance(self, *args, layer, target=None, conditions: Mapping | None = None, relevance=None,
                          chunk_size: int | None = None, **kwargs) -> jax.Array:
        """The relevance of every concept (channel) of ``layer``: the relevance at its output summed over all
        axes but the batch axis (first) and ``axis``: ``(N, C)``; a row sums to the layer's total relevance.

        With ``conditions`` (at other layers, closer to the output) the relevance that flows through them:
        ``(K, N, C)``. Other arguments as in :meth:`__call__`.
        """
        plan = self._plan(args, kwargs)
        lay = _resolve(plan, layer)
        row = plan.layers.index(lay)  # the report's rows follow the plan's layers

        def one(a, t, r, g):
            report = _explain(self.transformed, a, kwargs, t, r, self.single, True, gates=g)
            return _per_concept(report.layers[row].relevance, self.axis)

        gates = {} if conditions is None else self._gates(plan, conditions)
        return self._run(f"relevance {row}", one, args, kwargs, target, relevance, gates,
                         chunk_size or self.chunk_size)

    def top_concepts(self, *args, layer, k: int, target=None, conditions: Mapping | None = None, relevance=None,
                     chunk_size: int | None = None, **kwargs) -> tuple[jax.Array, jax.Array]:
        """The ``k`` most relevant concepts of ``layer`` per sample: ``(values, ids)``, each ``(N, k)``
        (``(K, N, k)`` with ``conditions``), as ``jax.lax.top_k`` of :meth:`concept_relevance`."""
        plan = self._plan(args, kwargs)
        n = _shape(plan, _resolve(plan, layer))[self.axis]
        if not 1 <= k <= n:
            raise ValueError(f"k={k}: the layer has {n} concepts")
        return jax.lax.top_k(self.concept_relevance(*args, layer=layer, target=target, conditions=conditions,
                                                    relevance=relevance, chunk_size=chunk_size, **kwargs), k)

    def attribution_graph(self, *args, upper, lower, concepts="all", target=None, relevance=None,
                          chunk_size: int | None = None, **kwargs) -> jax.Array:
        """How much of the relevance of each concept ``j`` of layer ``upper`` flows through each concept ``i`` of
        layer ``lower`` (closer to the input): ``(K, N, C_lower)`` for the K ``concepts`` of ``upper``
        (default all of its channels). Summed over ``j`` it is ``concept_relevance`` at ``lower``."""
        plan = self._plan(args, kwargs)
        up, low = _resolve(plan, upper), _resolve(plan, lower)
        if low.info.index >= up.info.index:
            raise ValueError(f"attribution_graph: lower (#{low.info.index}) must come before upper "
                             f"(#{up.info.index}) in the model: relevance flows from upper down to lower")
        return self.concept_relevance(*args, layer=low.info.index, target=target, relevance=relevance,
                                      conditions={up.info.index: concepts}, chunk_size=chunk_size, **kwargs)

    def _at_layer(self, args: tuple, kwargs: dict, layer: Layer) -> tuple[jax.Array, Callable]:
        """``(a, pullback)``: the layer's output ``a``, and ``pullback(R)`` the relevance at the explained input
        when relevance ``R`` is put on that output (none on the model's output)."""
        plan = self._plan(args, kwargs)
        # the plan with the layer's output as its only output: its VJP starts at the layer, through its rule
        cut = dataclasses.replace(plan, graph=dataclasses.replace(plan.graph, outputs=[layer.output]))
        nums = _normalise(args, self.transformed.argnums)

        def f(x):
            return run(cut, dynamic_leaves(cut, _replace(args, nums, [x])))[0]

        a, pull = jax.vjp(f, args[nums[0]])
        return a, lambda r: pull(r)[0]


def conditional(fn: Callable, composite=None, *, argnums: int | tuple[int, ...] | None = None, axis: int = -1,
                chunk_size: int | None = 64) -> Conditional:
    """Conditional relevance (Concept Relevance Propagation, Achtibat et al. 2023) of ``fn``.

    Args:
      fn: the model, e.g. ``model.apply``.
      composite: a :class:`jlrp.Composite`, a rule, or None (``epsilon_plus_flat``), as in :func:`jlrp.lrp`.
      argnums: the explained argument(s), as in :func:`jlrp.lrp`.
      axis: the channel axis of layer outputs (-1: NHWC / Flax; 1 for NCHW).
      chunk_size: how many conditions are computed at once (vmapped); None: all at once.

    Returns:
      A :class:`Conditional`: ``cond(*args, conditions=..., target=...)`` gives conditional heatmaps;
      ``concept_relevance``, ``top_concepts``, ``attribution_graph`` and ``layers`` work per layer.
    """
    return Conditional(fn, composite, argnums=argnums, axis=axis, chunk_size=chunk_size)


# ------------------------------------------------------------------------------------------------------
# relevance and activation maximisation


def _box(heat: jax.Array, mass: float) -> jax.Array:
    """``(top, left, bottom, right)`` (bottom/right exclusive) of the smallest set of pixels holding ``mass``
    of the positive relevance of ``heat`` (``(H, W[, C])``; a 1-D input is one row); the whole input if none."""
    p = jnp.maximum(heat.reshape(heat.shape[:2] + (-1,)).sum(-1) if heat.ndim > 1 else heat[None], 0)
    desc = jnp.sort(p.ravel())[::-1]
    total = desc.sum()
    # the threshold is the value at which the cumulative positive mass reaches the fraction ``mass``
    cut = desc[jnp.minimum(jnp.sum(jnp.cumsum(desc) < mass * total), desc.size - 1)]
    sel = (p >= cut) & (p > 0)
    rows, cols = sel.any(1), sel.any(0)
    box = jnp.stack([jnp.argmax(rows), jnp.argmax(cols), p.shape[0] - jnp.argmax(rows[::-1]),
                     p.shape[1] - jnp.argmax(cols[::-1])])
    return jnp.where(total > 0, box, jnp.array([0, 0, p.shape[0], p.shape[1]])).astype(jnp.int32)


def _onehot_max(v: jax.Array) -> jax.Array:
    """Per sample (first axis), 1 at the largest element of ``v``, 0 elsewhere."""
    flat = v.reshape(v.shape[0], -1)
    return jax.nn.one_hot(jnp.argmax(flat, 1), flat.shape[1], dtype=v.dtype).reshape(v.shape)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison makes == meaningless
class References:
    """The top-k reference examples of the concepts of one layer, from :func:`jlrp.concepts.maximize`.

    Attributes:
      layer: the ``LayerInfo.index`` of the layer.
      layer_name: a readable description of it, e.g. ``'#5 conv CNN/Conv_2'``.
      mode: 'relevance' or 'activation'.
      mass: the share of positive relevance the crops hold.
      concepts: ``(C',)`` the concept (channel) ids, one row of the arrays below each.
      scores: ``(C', k)`` relevance or activation score, best first.
      indices: ``(C', k)`` each sample's position in the stream of batches.
      inputs: ``(C', k, *x)`` the samples.
      targets: ``(C', k)`` the class explained for each (relevance mode; 0 in activation mode without labels).
      heatmaps: ``(C', k, *x)`` each sample's heatmap conditioned on the concept.
      boxes: ``(C', k, 4)`` the crops ``(top, left, bottom, right)`` (bottom and right exclusive) on the
        first two axes of a sample: the smallest box around the pixels that hold ``mass`` of the positive
        relevance of the concept's most relevant neuron (the part of its receptive field that mattered).
    """
    layer: int
    layer_name: str
    mode: str
    mass: float
    concepts: np.ndarray
    scores: np.ndarray
    indices: np.ndarray
    inputs: np.ndarray
    targets: np.ndarray
    heatmaps: np.ndarray
    boxes: np.ndarray

    def row(self, concept: int) -> int:
        """The row of ``concept`` in the arrays; KeyError if it was not maximised."""
        hit = np.flatnonzero(self.concepts == concept)
        if hit.size == 0:
            raise KeyError(f"concept {concept} is not among the {self.concepts.size} concepts of these references")
        return int(hit[0])

    def crops(self, concept: int, heatmaps: bool = False) -> list[np.ndarray]:
        """The input-space crops (or the crops of the conditional heatmaps) of a concept's references."""
        r = self.row(concept)
        src = self.heatmaps if heatmaps else self.inputs
        return [src[r, j, t:b, l:rt] for j, (t, l, b, rt) in enumerate(self.boxes[r])]

    def save(self, path) -> None:
        """Write to a ``.npz`` file (arrays plus JSON metadata, no pickling); read back with :func:`load`."""
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in
                ("layer", "layer_name", "mode", "mass")}
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in meta}
        np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path) -> "References":
        """Read references written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["__meta__"]))
            return cls(**meta, **{k: f[k] for k in f.files if k != "__meta__"})


def load(path) -> References:
    """Read references written by :meth:`References.save`."""
    return References.load(path)


def maximize(cond: Conditional, batches: Iterable, *args, layer, mode: str = "relevance", k: int = 8,
             concepts="all", mass: float = 0.8, progress: bool = True, total: int | None = None,
             shard: bool | None = None, chunk_size: int | None = None, **kwargs) -> References:
    """Relevance or activation maximisation: the top-``k`` reference examples of every concept of ``layer`` over
    a data set streamed in batches, with their conditional heatmaps and input-space crops.

    Every batch ``x`` is explained as ``cond(*args[:argnums], x, *args[argnums:])``: pass the model's other
    arguments (the parameters) after ``batches``, as with :func:`jlrp.explain_dataset`.

    Args:
      cond: a :class:`Conditional` explaining one argument (``argnums=int``).
      batches: an iterable of arrays ``x`` or tuples ``(x, target)`` (``target``: one class per row or an int).
      *args: the model's other positional arguments.
      layer: the layer whose concepts are maximised (a selector, as in :meth:`Conditional.__call__`).
      mode: ``'relevance'`` (Achtibat et al.): a sample's score for concept c is the relevance of c for the
        explained class (the batch's target, else the predicted class); ``'activation'``: the largest
        activation of channel c over the positions of the layer's output.
      k: reference examples kept per concept.
      concepts: the channel ids to maximise, or ``'all'``.
      mass: the share of positive relevance a crop holds (see :class:`References`).
      progress: show a tqdm progress bar (in samples; ``total`` sets its length).
      shard: split every batch over the local devices (default: when there are several); batches are padded to
        a multiple of the device count (padding never enters the top k).
      chunk_size: concepts per vmapped chunk when the references' heatmaps are computed.
      **kwargs: keyword arguments of the model.

    Returns:
      :class:`References`. Batches are padded to the first batch's size, so one program is compiled; the
      reference heatmaps are computed after the stream: in relevance mode conditioned on the concept for the
      sample's target, in activation mode seeded at the layer with the concept's activation (as zennit-crp's
      ActMax does).
    """
    if mode not in ("relevance", "activation"):
        raise ValueError(f"mode must be 'relevance' or 'activation', got {mode!r}")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if not cond.single or len(cond.transformed.argnums) != 1:
        raise ValueError("maximize streams one explained argument: build the Conditional with argnums=int")
    pos = cond.transformed.argnums[0]
    pos = pos if pos >= 0 else len(args) + 1 + pos
    if not 0 <= pos <= len(args):
        raise ValueError(f"argnums={cond.transformed.argnums[0]} with {len(args)} other argument(s)")
    call = lambda rest, x: (*rest[:pos], x, *rest[pos:])  # noqa: E731  the batch goes where argnums says
    chunk = chunk_size or cond.chunk_size
    devices = jax.local_devices()
    sharding = None
    if (shard is None and len(devices) > 1) or shard:  # split every batch over the local devices
        # Auto axes: XLA places the top-k merge of sharded scores with the replicated state itself
        mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
        sharding = NamedSharding(mesh, P("batch"))
        replicated = NamedSharding(mesh, P())
        args = jax.tree.map(lambda a: jax.device_put(a, replicated) if isinstance(a, (jax.Array, np.ndarray))
                            else a, args)

    def resolve(rest, x):
        plan = cond._plan(call(rest, x), kwargs)
        lay = _resolve(plan, layer)
        shape = _shape(plan, lay)
        if not shape or shape[0] != x.shape[0]:
            raise ValueError(f"maximize needs the batch axis first at layer #{lay.info.index}, whose output is "
                             f"{shape} for a batch of {x.shape[0]}")
        ids = np.arange(shape[cond.axis]) if isinstance(concepts, str) and concepts == "all" else \
            np.atleast_1d(np.asarray(concepts))
        _masks(ids, shape, cond.axis, f"layer #{lay.info.index}")  # checks the ids
        return plan, lay, ids

    @jax.jit
    def step(state, rest, x, target, valid, offset):
        plan, lay, ids = resolve(rest, x)
        if mode == "relevance":
            report = _explain(cond.transformed, call(rest, x), kwargs, target, None, True, True)
            s = _per_concept(report.layers[plan.layers.index(lay)].relevance, cond.axis)
            target = jnp.argmax(report.output, -1) if target is None else target
        else:
            a = cond._at_layer(call(rest, x), kwargs, lay)[0]
            a = jnp.moveaxis(a, cond.axis, -1)
            s = a.reshape(a.shape[0], -1, a.shape[-1]).max(1)
            target = jnp.zeros(x.shape[0], jnp.int32) if target is None else target
        s = jnp.where(valid[:, None], s[:, ids], -jnp.inf).T.astype(state[0].dtype)  # (C', N)
        target = jnp.broadcast_to(jnp.asarray(target, jnp.int32), (x.shape[0],))
        scores, index, inputs, targets = state
        best, at = jax.lax.top_k(jnp.concatenate([scores, s], 1), k)
        new = at >= k  # taken from this batch
        b = jnp.clip(at - k, 0, x.shape[0] - 1)
        old = jnp.clip(at, 0, k - 1)
        expand = (slice(None), slice(None)) + (None,) * (x.ndim - 1)
        return (best, jnp.where(new, offset + b, jnp.take_along_axis(index, old, 1)),
                jnp.where(new[expand], x[b], jnp.take_along_axis(inputs, old[expand], 1)),
                jnp.where(new, target[b], jnp.take_along_axis(targets, old, 1)))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="sample", desc=f"{mode} maximisation")
    state, size, seen = None, None, 0
    try:
        for batch in batches:
            x, target = _split(batch)
            x = jnp.asarray(x)
            n = x.shape[0]
            rows = _per_row(target, n)
            if state is None:
                plan, lay, ids = resolve(args, x)
                dtype = jnp.promote_types(plan.graph.avals[lay.output].dtype, jnp.float32)  # the scores'
                state = (jnp.full((len(ids), k), -jnp.inf, dtype),
                         jnp.full((len(ids), k), -1, jnp.int32), jnp.zeros((len(ids), k) + x.shape[1:], x.dtype),
                         jnp.zeros((len(ids), k), jnp.int32))
                size = -(-n // len(devices)) * len(devices) if sharding else n
            padded = max(size, -(-n // len(devices)) * len(devices) if sharding else n)  # one compiled shape
            valid = np.arange(padded) < n
            x = _pad(x, padded)
            target = _pad(jnp.asarray(target), padded) if rows else target
            if sharding is not None:
                x, valid = jax.device_put((x, valid), sharding)
                target = jax.device_put(target, sharding) if rows else target
            state = step(state, args, x, target, valid, seen)
            seen += n
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if state is None or seen < k:
        raise ValueError(f"maximize keeps the top k={k} samples per concept but the batches held {seen}")

    @jax.jit
    def references(rest, chunk_of_concepts):
        plan, lay, _ = resolve(rest, chunk_of_concepts[1][0])
        shape = _shape(plan, lay)

        def one(c):
            i, x, t = c
            mask = _masks(i, shape, cond.axis, "")[0]
            if mode == "relevance":
                report = _explain(cond.transformed, call(rest, x), kwargs, t, None, True, True,
                                  gates={lay.info.index: mask})
                heat, at = report.relevance, report.layers[plan.layers.index(lay)].relevance
                neuron = _explain(cond.transformed, call(rest, x), kwargs, t, None, True, False,
                                  gates={lay.info.index: _onehot_max(jnp.where(mask > 0, at, -jnp.inf))})
            else:  # relevance seeded with the concept's activation at the layer (zennit-crp's ActMax)
                a, pull = cond._at_layer(call(rest, x), kwargs, lay)
                heat, neuron = pull(a * mask), pull(a * _onehot_max(jnp.where(mask > 0, a, -jnp.inf)))
            return heat, jax.vmap(lambda h: _box(h, mass))(neuron)  # the crop: the most relevant neuron's

        return jax.vmap(one)(chunk_of_concepts)

    scores, index, inputs, targets = state
    heat, boxes = _chunks(lambda c: references(args, c), (jnp.asarray(ids), inputs, targets), chunk)
    info = lay.info
    return References(info.index, f"#{info.index} {info.kind} {_where(info)}", mode, float(mass),
                      np.asarray(ids), *(np.asarray(a) for a in (scores, index, inputs, targets, heat, boxes)))


# ------------------------------------------------------------------------------------------------------
# pictures


def _fit(tile: np.ndarray, size: int) -> np.ndarray:
    """A uint8 RGB tile padded to a square (white) and resized to ``size`` x ``size`` (nearest pixels)."""
    h, w = tile.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), 255, np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = tile
    return np.asarray(Image.fromarray(square).resize((size, size), Image.NEAREST))


def _picture(x: np.ndarray) -> np.ndarray:
    """An input (H, W[, C]) as a display tile; channels other than grey or RGB are averaged to grey."""
    return _image.input_tile(x.mean(-1) if x.ndim == 3 and x.shape[-1] not in (1, 3) else x)


def atlas(cond: Conditional, *args, references: References, target=None, n_concepts: int = 4,
          n_references: int | None = None, tile: int = 64, overlay: bool = False, **kwargs) -> np.ndarray:
    """A concept atlas of one prediction: its ``n_concepts`` most relevant concepts among ``references``, one
    row each, with the input, the heatmap conditioned on the concept and the concept's reference crops.

    Args:
      cond: the :class:`Conditional` the references were computed with.
      *args: the model's arguments, with a batch of one sample in the explained position.
      references: from :func:`maximize` (its layer is the atlas's layer).
      target: the explained class (None: the predicted one).
      n_concepts, n_references: rows, and crops per row (default all ``k``).
      tile: side of every tile in pixels (crops are padded to a square and scaled with nearest pixels).
      overlay: draw each crop's conditional heatmap over it.
      **kwargs: keyword arguments of the model.

    Returns:
      uint8 RGB image (row labels: concept id and its share of the layer's relevance); write it with
      :func:`jlrp.image.save_png`.
    """
    nums = _normalise(args, cond.transformed.argnums)
    x = np.asarray(args[nums[0]])
    if x.shape[0] != 1:
        raise ValueError(f"atlas explains one prediction: pass a batch of one sample, got {x.shape[0]}")
    known = jnp.asarray(references.concepts)

    @jax.jit  # one compiled program, not hundreds of eager ones
    def explain(args):
        rel = cond.concept_relevance(*args, layer=references.layer, target=target, **kwargs)[0]
        ids = known[jnp.argsort(-rel[known])[:n_concepts]]
        return rel, ids, cond(*args, conditions={references.layer: ids}, target=target, **kwargs)[:, 0]

    rel, ids, heat = jax.tree.map(np.asarray, explain(args))
    m = references.boxes.shape[1] if n_references is None else min(n_references, references.boxes.shape[1])
    total = rel.sum()
    rows, labels = [], []
    for c, h in zip(ids, heat):
        refs = [_picture(r) for r in references.crops(int(c))[:m]]
        if overlay:
            refs = [_image.overlay(r, hm) for r, hm in zip(refs, references.crops(int(c), heatmaps=True))]
        rows.append([_fit(_picture(x[0]), tile), _fit(_image.heatmap(h), tile)] +
                    [_fit(r, tile) for r in refs])
        labels.append(f"concept {int(c)}\n{rel[c] / total:+.0%} of R" if total else f"concept {int(c)}")
    cols = ["input", "where (conditional heatmap)"] + [f"reference {j + 1}" for j in range(m)]
    return _image.grid(rows, row_labels=labels, col_labels=cols, pad=4)
