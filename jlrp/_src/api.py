"""The public transforms: ``transform``, ``vjp``, ``lrp`` and ``report``, modelled on ``jax.grad``/``jax.vjp``."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import rules
from .composites import Composite, as_composite, gradient_composite
from .interpreter import Tracer, constant_inits, control_outputs, dynamic_leaves, run
from .graph import Lit
from .layers import LayerInfo, Probes
from .util import as_function, is_array
from .targets import initial_relevance, target_mask, warn_if_ambiguous


def _is_int(a) -> bool:
    return isinstance(a, (int, np.integer)) and not isinstance(a, bool)


def _argnums_tuple(argnums: int | Sequence[int] | None) -> tuple[int, ...]:
    if argnums is None:
        return (0,)
    if _is_int(argnums):
        return (int(argnums),)
    if not isinstance(argnums, (tuple, list)) or not argnums or not all(_is_int(a) for a in argnums):
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints (which positional arguments to "
                        f"explain, like jax.grad's), got {argnums!r}")
    if len(set(argnums)) != len(argnums):
        raise ValueError(f"argnums {tuple(argnums)} names an argument twice; name each explained argument once")
    return tuple(int(a) for a in argnums)


def _check_fn(fn, name: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name} explains a function (e.g. model.apply or a jitted model), got "
                        f"{type(fn).__name__}")


def _check_keywords(fn) -> None:
    """``target`` and ``relevance`` are the explanation's keywords; a model taking them would lose them."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    for word in ("target", "relevance"):
        p = params.get(word)
        if p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            raise ValueError(f"the model has its own '{word}' parameter, but the explanation takes target= and "
                             f"relevance= for itself; bind the model's value first, e.g. "
                             f"functools.partial(model, {word}=...), or rename the parameter")


def _check_default_argnums(args: tuple, name: str) -> None:
    """Without argnums, argument 0 is explained; when that is a parameter pytree beside an array input, the
    user almost surely forgot ``argnums`` (``model.apply(params, x)``)."""
    first = jax.tree_util.tree_leaves(args[0]) if args else []
    if len(args) > 1 and not is_array(args[0]) and first and any(is_array(a) for a in args[1:]):
        raise ValueError(f"{name}: argnums was not given, so argument 0 (a {type(args[0]).__name__} of "
                         f"{len(first)} arrays, e.g. parameters) would be explained. Pass argnums=1 to explain "
                         f"the input of model.apply(params, x), or argnums=0 to explain argument 0 on purpose.")


def _check_args(args: tuple, argnums: tuple[int, ...], name: str) -> None:
    for a in argnums:
        if not -len(args) <= a < len(args):
            raise ValueError(f"{name}: argnums={a} is out of range for a call with {len(args)} positional "
                             f"argument(s)")
        ints = []
        for path, leaf in jax.tree_util.tree_leaves_with_path(args[a]):
            dtype = jnp.result_type(leaf)
            if jnp.issubdtype(dtype, jnp.integer):
                ints.append(jax.tree_util.keystr(path))
            elif jnp.issubdtype(dtype, jnp.complexfloating):
                raise ValueError(f"{name}: the explained argument {a}{jax.tree_util.keystr(path)} is complex "
                                 f"({dtype}); relevance is defined for real inputs: explain the real and "
                                 f"imaginary parts as two real arguments.")
            elif not jnp.issubdtype(dtype, jnp.inexact):
                raise ValueError(f"{name}: the explained argument {a}{jax.tree_util.keystr(path)} has dtype "
                                 f"{dtype}; relevance needs floating-point inputs or integer token ids.")
        if len(ints) > 1:
            raise ValueError(f"{name}: argument {a} holds several integer leaves ({', '.join(ints)}); explain "
                             f"one array of token ids at a time")


def _normalise(args: tuple, argnums: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a % len(args) for a in argnums)


class _Transformed:
    """``fn`` re-emitted with LRP rules in its VJP. Forward values are identical to ``fn``'s."""

    def __init__(self, fn: Callable, composite: Composite, argnums: tuple[int, ...], explicit: bool = True):
        self.fn, self.composite, self.argnums, self.explicit = fn, composite, argnums, explicit
        self._tracers: dict[tuple[int, ...], Tracer] = {}

    def tracer(self, args: tuple) -> Tracer:
        nums = _normalise(args, self.argnums)
        if nums not in self._tracers:
            self._tracers[nums] = Tracer(self.fn, self.composite, nums)
        return self._tracers[nums]

    def plan(self, args: tuple, kwargs: dict):
        """Check the arguments; the (cached) analysed plan and the output's tree structure."""
        if not self.explicit:
            _check_default_argnums(args, "jlrp")
        _check_args(args, self.argnums, "jlrp")
        return self.tracer(args).plan(args, kwargs)

    @staticmethod
    def run(planned, args: tuple, probes: Probes | None = None, tap=None):
        """Evaluate a plan from :meth:`plan` on ``args`` (any values with the avals it was traced for);
        ``tap`` see :func:`~jlrp._src.interpreter.run`."""
        plan, out_tree = planned
        return jax.tree_util.tree_unflatten(out_tree, run(plan, dynamic_leaves(plan, args), probes, tap=tap))

    def __call__(self, *args, **kwargs):
        return self.run(self.plan(args, kwargs), args)


def transform(fn: Callable, composite: Composite | Any = None, *,
              argnums: int | Sequence[int] | None = None) -> Callable:
    """Return ``fn`` rewritten so that its VJP with respect to ``args[argnums]`` is LRP.

    The returned function computes exactly the same outputs as ``fn``; ``jax.vjp`` / ``jax.grad`` of it
    propagate relevance with the composite's rules. It composes with ``jax.jit``, ``jax.vmap`` and sharding.
    """
    _check_fn(fn, "jlrp.transform")
    fn = as_function(fn)
    return _Transformed(fn, as_composite(composite), _argnums_tuple(argnums), explicit=argnums is not None)


def _replace(args: tuple, nums: tuple[int, ...], values: Sequence) -> tuple:
    args = list(args)
    for a, v in zip(nums, values):
        args[a] = v
    return tuple(args)


def vjp(fn: Callable, *primals, composite: Composite | Any = None,
        argnums: int | Sequence[int] | None = None, **kwargs) -> tuple[Any, Callable]:
    """Like ``jax.vjp``: returns ``(fn(*primals), relevance_fn)``.

    ``relevance_fn(R_out)`` propagates the output relevance ``R_out`` (shape of the output) back and returns
    a tuple with the relevance of each explained primal (all primals unless ``argnums`` is given).
    """
    nums = tuple(range(len(primals))) if argnums is None else _argnums_tuple(argnums)
    _check_args(primals, nums, "jlrp.vjp")
    nums = _normalise(primals, nums)
    f = transform(fn, composite, argnums=nums)
    out, pullback = jax.vjp(lambda *xs: f(*_replace(primals, nums, xs), **kwargs), *[primals[a] for a in nums])
    return out, pullback


def lrp(fn: Callable, composite: Composite | Any = None, *, argnums: int | Sequence[int] | None = None) -> Callable:
    """Return ``explain(*args, target=None, relevance=None, **kwargs)`` computing LRP relevance.

    Args:
      fn: the model, e.g. ``model.apply`` (linen), a function of an NNX state, or any JAX function.
      composite: a :class:`Composite`, a single rule (for every dense and conv layer), or None for
        :func:`jlrp.composites.epsilon_plus_flat`.
      argnums: which positional argument(s) to explain (like ``jax.grad``); e.g. 1 for ``apply(params, x)``.
        Without it argument 0 is explained, except that a parameter pytree in position 0 beside an array
        argument is refused (a forgotten ``argnums=1`` would silently explain the parameters).

    The returned function takes ``fn``'s arguments plus ``target`` (an int, an int array with one class per
    row, or None for the argmax) or ``relevance`` (a custom initial relevance with the output's shape), and
    returns relevance shaped like ``args[argnums]`` (a tuple for a tuple argnums). The initial relevance is
    the selected logit ``out * one_hot(target)``.

    Integer token ids can be explained directly: their relevance is read at the embedding output (the first
    floating-point values computed from the ids) and summed over the embedding axis, so it has the ids' shape.
    """
    _check_fn(fn, "jlrp.lrp")
    fn = as_function(fn)
    _check_keywords(fn)
    transformed = transform(fn, composite, argnums=argnums)
    single = not isinstance(argnums, (tuple, list))

    def explain(*args, target: Any = None, relevance: Any = None, **kwargs):
        return _explain(transformed, args, kwargs, target, relevance, single, report=False)

    explain.transformed = transformed  # type: ignore[attr-defined]
    return explain


def _token_relevance(ids, root_cts: list) -> jax.Array:
    """Sum the relevance at each embedding output over its axes beyond the ids' shape."""
    shape = jnp.shape(ids)
    total = jnp.zeros(shape, jnp.result_type(*root_cts) if root_cts else jnp.float32)
    for ct in root_cts:
        # the ids' axes are consecutive in an embedding output ((N, T, D) or, e.g., penzai's (D, N, T))
        starts = [k for k in range(ct.ndim - len(shape) + 1) if ct.shape[k:k + len(shape)] == shape]
        if len(starts) != 1:
            raise ValueError(f"cannot map relevance at an embedding output of shape {ct.shape} back to token "
                             f"ids of shape {shape} ({'no' if not starts else 'more than one'} block of "
                             f"consecutive axes matches): explain the embedded sequence instead")
        k = starts[0]
        total = total + jnp.sum(ct, axis=tuple(range(k)) + tuple(range(k + len(shape), ct.ndim)))
    return total


def _explain(transformed: "_Transformed", args: tuple, kwargs: dict, target, relevance, single: bool,
             report: bool, seed: str = "logit", gates: dict | None = None):
    """``gates``: ``{layer index: mask}`` conditions on top-level layers' outputs (see :class:`Probes`)."""
    planned = transformed.plan(args, kwargs)
    plan = planned[0]
    nums = _normalise(args, transformed.argnums)
    probes = _layer_probes(plan) if report else Probes()
    probes.roots = {k: jnp.zeros(plan.graph.avals[v].shape, plan.graph.avals[v].dtype)
                    for k, v in enumerate(plan.roots)}
    probes.gates = dict(gates or {})

    def f(xs, probes):  # the explained arguments are replaced by values of the same avals: same plan
        return transformed.run(planned, _replace(args, nums, xs), probes)

    out, pullback = jax.vjp(f, tuple(args[a] for a in nums), probes)
    warn_if_ambiguous(jnp.shape(_single_output(out)), [args[a] for a in nums], target, relevance,
                      seeds_with_output=seed == "logit")
    if seed == "mask" and relevance is None:  # gradient-type methods: d f_target / d x
        r0 = target_mask(_single_output(out), target)
    else:
        r0 = initial_relevance(_single_output(out), target, relevance)
    r_in, probe_ct = pullback(r0)
    roots = [probe_ct.roots[k] for k in range(len(plan.roots))]

    def fix(x, r):  # integer leaves: relevance of token ids, read at the embedding outputs
        return _token_relevance(x, roots) if jnp.issubdtype(jnp.result_type(x), jnp.integer) else r

    r_in = tuple(jax.tree.map(fix, args[a], r) for a, r in zip(nums, r_in))
    r_in = r_in[0] if single else r_in
    if not report:
        return r_in
    return Report(r_in, out, r0, _layer_rows(plan, probe_ct))


def _layer_probes(plan, steps: tuple[int, ...] = ()) -> Probes:
    """Zero probes for every layer of ``plan`` and, recursively, of its control-flow bodies; inside a scan
    they get the scan's length as a leading axis (one probe per step). A control-flow layer gets one probe
    per explained output, and a scan one per constant initial carry that its body makes explained (the
    relevance reaching that constant is absorbed, like a bias's)."""
    probes = Probes()
    def zeros(v):  # a value id or a literal operand
        aval = jax.typeof(v.val) if isinstance(v, Lit) else plan.graph.avals[v]
        return jnp.zeros(steps + aval.shape, aval.dtype)

    for l in plan.layers:
        dtype = plan.graph.avals[l.output].dtype
        absorbed = jnp.zeros(steps, jnp.promote_types(dtype, jnp.float32))
        if not l.body:
            probes.layers[l.info.index] = (zeros(l.output), absorbed)
            continue
        node = plan.graph.nodes[l.nodes[0]]
        probes.layers[l.info.index] = (tuple(zeros(v) for v in control_outputs(plan, node)), absorbed)
        probes.inits[l.info.index] = {k: zeros(node.inputs[k]) for k in constant_inits(plan, l, node)}
        inner = steps + ((node.params["length"],) if node.prim.name == "scan" else ())
        probes.bodies[l.info.index] = [_layer_probes(b, inner) for b in l.body]
    return probes


def _layer_rows(plan, cts: Probes) -> list["LayerRelevance"]:
    """The report's rows from the probes' cotangents; a control-flow layer absorbs what its bodies do and
    what reaches its constant initial carries."""
    rows = []
    for l in plan.layers:
        r_out, absorbed = cts.layers[l.info.index]
        if not l.body:
            rows.append(LayerRelevance(r_out, jnp.sum(r_out), jnp.sum(absorbed), [], l.info, repr(l.rule)))
            continue
        body = [_layer_rows(b, c) for b, c in zip(l.body, cts.bodies[l.info.index])]
        lost = [jnp.sum(ct) for ct in cts.inits[l.info.index].values()]
        absorbed = sum([r.absorbed for rows_ in body for r in rows_] + lost, jnp.zeros((), absorbed.dtype))
        total = sum((jnp.sum(r) for r in r_out), jnp.zeros((), absorbed.dtype))
        rows.append(LayerRelevance(tuple(r_out), total, absorbed, body, l.info, "body"))
    return rows


def _single_output(out):
    if not isinstance(out, jax.Array) and not hasattr(out, "shape"):
        raise ValueError(f"jlrp.lrp explains a function with one array output; got {type(out).__name__}. "
                         f"Wrap the model to return its logits, or use jlrp.vjp with your own cotangent.")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"the model output has dtype {out.dtype}; relevance starts from a real floating-point "
                         f"output (logits, scores): return those instead of e.g. argmax class ids")
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerRelevance:
    """Relevance at one layer: at its output, its total, and what its rule absorbed (bias, stabilizer).

    A ``scan`` / ``cond`` / ``jax.checkpoint`` layer reports ``relevance`` as a tuple, one array per explained
    output (``total`` sums them all), absorbs what its body layers absorb plus the relevance that reaches
    a constant initial carry (like a bias), and lists its body layers in ``body`` (one list per branch).
    Inside a scan every array has the number of steps as a leading axis, indexed like the scan's ``xs``
    (also with ``reverse=True``); ``total`` and ``absorbed`` are summed over the steps.
    """
    relevance: jax.Array  # at the layer's output, shape of the output
    total: jax.Array  # sum of relevance at the output
    absorbed: jax.Array  # sum(R_out) - sum(R_in): the bias and stabilizer share of this layer
    body: list  # control flow: the rows of each body (list of lists of LayerRelevance)
    info: LayerInfo = dataclasses.field(metadata=dict(static=True))
    rule: str = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Report:
    """An explanation with its per-layer relevance and conservation figures."""
    relevance: Any  # at the explained input(s)
    output: jax.Array  # model output
    initial: jax.Array  # the initial relevance put on the output
    layers: list[LayerRelevance]

    def table(self) -> str:
        """A markdown table: per layer, total relevance at the output and the share absorbed."""
        lines = ["| # | kind | rule | module / params | sum R_out | absorbed |", "|---|---|---|---|---|---|"]

        def add(rows, prefix):
            for l in rows:
                where = l.info.module or ", ".join(l.info.params) or "-"
                label = f"{prefix}{l.info.index}"
                lines.append(f"| {label} | {l.info.kind} | {l.rule} | {where} | {float(l.total):.6g} | "
                             f"{float(l.absorbed):.6g} |")
                for j, body in enumerate(l.body):
                    add(body, f"{label}{'' if len(l.body) == 1 else f'[{j}]'}.")
        add(self.layers, "")
        total_in = sum(float(jnp.sum(r)) for r in jax.tree_util.tree_leaves(self.relevance))
        lines.append(f"\nsum R_out = {float(jnp.sum(self.initial)):.6g}, sum R_in = {total_in:.6g}, "
                     f"absorbed by layers = {sum(float(l.absorbed) for l in self.layers):.6g}")
        return "\n".join(lines)


def report(fn: Callable, composite: Composite | Any = None, *,
           argnums: int | Sequence[int] | None = None) -> Callable:
    """Like :func:`lrp`, but returns a :class:`Report` with relevance at every layer's output and the share
    of relevance each layer absorbs (bias and stabilizer), computed from the rule's own denominators.

    With a conserving rule set, ``sum(R_out) - sum(R_in) == sum(layer.absorbed)``; activations, structural
    ops and max pooling conserve relevance. The report is a pytree: it works under ``jax.jit``/``jax.vmap``.
    """
    _check_fn(fn, "jlrp.report")
    fn = as_function(fn)
    _check_keywords(fn)
    transformed = transform(fn, composite, argnums=argnums)
    single = not isinstance(argnums, (tuple, list))

    def explain(*args, target: Any = None, relevance: Any = None, **kwargs) -> Report:
        return _explain(transformed, args, kwargs, target, relevance, single, report=True)

    explain.transformed = transformed  # type: ignore[attr-defined]
    return explain


def _modified_gradient(activation_rule, name: str, doc: str):
    def method(fn: Callable, *, argnums: int | Sequence[int] | None = None) -> Callable:
        _check_fn(fn, name)
        fn = as_function(fn)
        _check_keywords(fn)
        transformed = transform(fn, gradient_composite(activation_rule, name), argnums=argnums)
        single = not isinstance(argnums, (tuple, list))

        def explain(*args, target: Any = None, relevance: Any = None, **kwargs):
            return _explain(transformed, args, kwargs, target, relevance, single, report=False, seed="mask")

        return explain

    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc + """

    Same calling convention as :func:`jlrp.lrp`: ``explain(*args, target=None, relevance=None)``; the
    backward pass starts from the one-hot target (a gradient, not the logit), and runs through the same
    interpreter, so it works on every model the LRP transform handles.
    """
    return method


deconvnet = _modified_gradient(rules.deconvnet(), "deconvnet", "DeconvNet (Zeiler & Fergus 2014): the gradient, "
                               "except that activations pass only positive signal and ignore the forward mask.")
guided_backprop = _modified_gradient(rules.guided_backprop(), "guided_backprop",
                                     "Guided BackProp (Springenberg et al. 2015): the gradient, with the "
                                     "forward relu mask AND only positive backward signal at every activation.")


def register_rule(primitive, rule) -> None:
    """Give every occurrence of ``primitive`` on the relevance path a rule (a layer of kind ``primitive``).

    ``primitive`` is a primitive object (``jax.extend.core.Primitive``, e.g. ``jax.lax.sort_p``, or your own);
    a name string also works and matches every primitive of that name.

    ``rule`` is any jlrp rule: a :class:`~jlrp.rules.Rule` (e.g. ``jlrp.rules.epsilon()`` for an op that is
    linear in its explained operands: relevance split in proportion to each operand's contribution),
    ``jlrp.rules.gradient()`` (keep the ordinary VJP), ``jlrp.rules.pass_()``, or a
    :class:`~jlrp.rules.Custom` backward function. Composites can still override it by kind::

        jlrp.register_rule("cumsum", jlrp.rules.norm())
        jlrp.register_rule("sort", jlrp.rules.gradient())

    Pass ``rule=None`` to remove a registration. Registrations apply to functions traced afterwards.
    """
    from .analysis import REGISTRY
    from .composites import check_rule
    from jax.extend.core import Primitive
    if not isinstance(primitive, (Primitive, str)):
        raise TypeError(f"register_rule takes a primitive object or its name, got {type(primitive).__name__}")
    if rule is not None:
        check_rule(rule, "register_rule's rule")
    if rule is None:
        REGISTRY.pop(primitive, None)
    else:
        REGISTRY[primitive] = rule
