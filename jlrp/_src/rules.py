"""LRP rules as configurations of one generic modified-VJP mechanism.

Every rule is a list of *groups* of *terms*. A term modifies the layer's input x, weight W and bias b;
its output is ``z_k = op(x_k; W_k) + b_k``. A group sums its terms' outputs (each with a sign) into one
denominator and propagates

    s      = coefficient * select(z) * R_out / stabilize(sum_k sign_k z_k)
    R_in  += sum_k sign_k * x_k * VJP_k(s) / degree

where VJP_k is the VJP of ``x -> op(x; W_k)`` and ``degree`` is the op's degree of homogeneity in its active
inputs (1 for linear layers and sums, 2 for a product of two activations). Euler's theorem for homogeneous
functions makes ``sum(x_k * VJP_k(s)) / degree = sum(s * op(x_k; W_k))``, which is what lets
:func:`propagate` report exactly how much relevance the bias and the stabilizer absorb.

This is Zennit's formulation of LRP (input modifier, parameter modifier, gradient mapper, reducer);
epsilon, gamma, alpha-beta, z+, z^B, w^2 and flat are all a few lines of configuration below.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import primitives as K
from .geometry import weight_unit_axes

Array = jax.Array
Modifier = Callable[[Array], Array]


class RuleBase:
    """The one rule protocol: ``backward(context, xs, out, relevance) -> (R_in per input, absorbed)``.

    ``context`` is the interpreter's :class:`~jlrp._src.interpreter.LayerContext` (``replay``, ``view``,
    ``layer``, ``steps``); ``xs`` are the layer's explained inputs, ``out`` its output and ``relevance`` the
    relevance at the output. ``absorbed`` is ``sum(relevance) - sum(R_in)`` computed from the rule's own
    denominators, or None to have it measured. ``native`` rules keep the layer's ordinary VJP, so the
    interpreter need not wrap the layer at all when nothing is reported.
    """
    native = False

    def backward(self, context, xs, out, relevance):
        raise NotImplementedError

    # An R_in of ``None`` says the input gets no relevance at all (e.g. attention weights held constant): the
    # interpreter passes it on as a symbolic zero, so the layers that computed that input do no work.


@dataclasses.dataclass(frozen=True)
class Affine:
    """The modifier ``a -> c0 * a + c1 * max(a, 0)``: identity, a+, a- = a - a+, W + g W+, zero, ...

    Written this way, every sign-splitting rule is a linear combination over the basis {x, x+} x {W, W+},
    so its terms can share forward passes (op(x, W) is the layer's own output) and VJPs.
    """
    c0: float
    c1: float

    def __call__(self, a: Array) -> Array:
        out = 0.0
        if self.c0:
            out = self.c0 * a
        if self.c1:
            out = out + self.c1 * jnp.maximum(a, 0)
        return out if self.c0 or self.c1 else jnp.zeros_like(a)

    def coefficients(self, nonneg: bool = False) -> tuple[float, float]:
        """(c0, c1); for an argument known to be >= 0 (a+ = a) all weight moves to c0."""
        return (self.c0 + self.c1, 0.0) if nonneg else (self.c0, self.c1)


_identity = Affine(1.0, 0.0)
_positive = Affine(0.0, 1.0)
_negative = Affine(1.0, -1.0)  # min(a, 0) = a - max(a, 0)
_zero = Affine(0.0, 0.0)


def _ones(a: Array) -> Array:
    return jnp.ones_like(a)


def _square(a: Array) -> Array:
    return a * a


def stabilize(z: Array, epsilon: float) -> Array:
    """``z + epsilon * sign(z)`` with sign(0) = +1, so the result is never 0 (and never 0/0)."""
    return z + epsilon * jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)


@dataclasses.dataclass(frozen=True)
class Term:
    """One modified copy of the layer: ``op(input(x); weight(W)) + bias(b)``, counted with ``sign``."""
    input: Modifier = _identity
    weight: Modifier = _identity
    bias: Modifier = _identity
    sign: float = 1.0


@dataclasses.dataclass(frozen=True)
class Group:
    """Terms sharing one denominator; ``select`` restricts the group to outputs with z > 0 or z < 0."""
    terms: tuple[Term, ...]
    coefficient: float = 1.0
    select: str | None = None  # None, "positive" or "negative" (sign of the unmodified output)


@dataclasses.dataclass(frozen=True)
class Rule(RuleBase):
    """An LRP rule: groups of modified layer copies and the stabilizer of their denominators.

    Rules are hashable values, so composites and cached traces can compare them.
    """
    name: str
    groups: tuple[Group, ...]
    stabilizer: float = 1e-6

    def __repr__(self) -> str:
        return self.name

    def backward(self, context, xs, out, relevance):
        view = context.view(xs)
        layer = context.layer
        return propagate(self, view.op, xs, view.weight, view.bias, relevance, out, layer.degree, layer.nonneg,
                         z_is_op=view.exact)


@dataclasses.dataclass(frozen=True)
class Native(RuleBase):
    """Keep the layer's ordinary VJP (gradient): max pooling's winner-take-all, structural ops."""
    name: str = "gradient"
    native = True

    def __repr__(self) -> str:
        return self.name

    def backward(self, context, xs, out, relevance):
        _, pullback = jax.vjp(context.replay, *xs)
        return pullback(relevance), None


@dataclasses.dataclass(frozen=True)
class Pass(RuleBase):
    """Relevance passes through unchanged (R_in = R_out), shared equally by the inputs: activations."""
    name: str = "pass"

    def __repr__(self) -> str:
        return self.name

    def backward(self, context, xs, out, relevance):
        return tuple(_reduce_to(relevance, x) / len(xs) for x in xs), None


def _reduce_to(r, x):
    """Sum ``r`` over the axes along which ``x`` was broadcast to r's shape."""
    axes = tuple(k for k, (a, b) in enumerate(zip(x.shape, r.shape)) if a == 1 and b != 1)
    return jnp.sum(r, axis=axes, keepdims=True) if axes else r


@dataclasses.dataclass(frozen=True)
class Custom(RuleBase):
    """A rule given as a function: ``fn(forward, xs, out, relevance) -> R_in for each of xs``.

    ``forward(*xs)`` recomputes the layer (use ``jax.vjp`` on it for gradient-based rules), ``xs`` are the
    layer's explained inputs, ``out`` its output and ``relevance`` the relevance arriving at the output.
    """
    name: str
    fn: Callable[..., Sequence[Array]]

    def __repr__(self) -> str:
        return self.name

    def backward(self, context, xs, out, relevance):
        return tuple(self.fn(context.replay, tuple(xs), out, relevance)), None


@dataclasses.dataclass(frozen=True, eq=False)
class Substitute(RuleBase):
    """Gradient with the layer's (canonized) weight replaced: ``R_in = VJP of x -> op(x; weight(W)) at R``.

    PatternNet (weight -> pattern) and PatternAttribution (weight -> weight * pattern) are of this form.
    """
    name: str
    weight: Callable[[Array], Array]

    def __repr__(self) -> str:
        return self.name

    def backward(self, context, xs, out, relevance):
        if context.layer.view is None:
            raise TypeError(f"rule {self!r} substitutes weights: it applies to dense and conv layers only")
        view = context.view(xs)
        _, pullback = jax.vjp(lambda x: view.op(x, self.weight(view.weight).astype(x.dtype)), xs[0])
        return pullback(relevance.astype(out.dtype)), None


def _select(z: Array, select: str | None) -> Array | float:
    if select is None:
        return 1.0
    return (z > 0 if select == "positive" else z < 0).astype(z.dtype)


def _on_known_sign(modifier: Modifier, nonneg: bool) -> Modifier | None:
    """Simplify an input modifier for an input known to be >= 0 (after a relu): x- is zero (None), x+ is x."""
    if not nonneg or not isinstance(modifier, Affine):
        return modifier
    c0, _ = modifier.coefficients(True)
    return None if c0 == 0 else _identity if c0 == 1 else Affine(c0, 0.0)


def propagate(rule: Rule, op: Callable[..., Array], xs: Sequence[Array], weight: Any, bias: Any,
              relevance: Array, z: Array, degree: int = 1,
              nonneg: Sequence[bool] | None = None, z_is_op: bool = True) -> tuple[tuple[Array, ...], Array]:
    """Apply ``rule`` to one layer.

    Args:
      op: ``op(*xs, weight) -> z without bias``, linear (homogeneous of degree ``degree``) in ``xs``.
      xs: the layer's active inputs. weight: its (canonized) parameters, or None for parameter-free ops.
      bias: the effective bias in output space (broadcastable to z), or None.
      relevance: R_out, shape of z. z: the layer's unmodified output (for ``Group.select``).
      nonneg: per input, whether it is known to be >= 0 (terms on its negative part vanish exactly).
      z_is_op: whether ``z == op(*xs, weight) + bias`` (False when the rule propagates through a stand-in
        op, e.g. max pooling treated as sum pooling), so that unmodified terms may reuse z.

    Returns:
      (R_in for each of xs, absorbed), where ``absorbed = sum(R_out) - sum(R_in)`` is computed from the
      denominators (the bias and stabilizer share), not from R_in, so it checks the propagation.

    Cost: one modified forward and one VJP per term; a term that leaves input and weight unchanged reuses
    the layer's own output instead of recomputing it (under jit the unused forward is dead code).
    """
    reuse = z_is_op and jnp.finfo(z.dtype).bits >= 32  # z - b is exact enough; in bf16, recompute in f32
    dtype = jnp.promote_types(relevance.dtype, jnp.float32)  # epsilon vanishes in bf16
    xs = tuple(x.astype(dtype) for x in xs)
    relevance = relevance.astype(dtype)
    z = z.astype(dtype)
    if weight is not None:
        weight = jax.tree.map(lambda w: w.astype(dtype), weight)
    if bias is not None:
        bias = bias.astype(dtype)
    nonneg = tuple(nonneg) if nonneg is not None else (False,) * len(xs)

    plan = _shared_plan(rule, len(xs), weight, nonneg, reuse)
    if plan is not None:
        return _propagate_shared(rule, plan, op, xs[0], weight, bias, relevance, z, reuse)
    r_in = [jnp.zeros_like(x) for x in xs]
    explained = jnp.zeros((), dtype)  # relevance that reaches the inputs
    for group in rule.groups:
        terms, outs, pullbacks, inputs = [], [], [], []
        for term in group.terms:
            mods = [_on_known_sign(term.input, n) for n in nonneg]
            if any(m is None for m in mods):
                continue  # an input factor is exactly zero: so are z_k and its relevance
            x_k = tuple(m(x) for m, x in zip(mods, xs))
            units = _unit_axes(op, x_k, weight, z) if term.weight is _ones else None
            if units is not None:  # an all-ones weight: one output unit, broadcast (no ones matrix)
                z_k, pullback = _ones_weight_vjp(op, x_k[0], units, z)
            else:
                w_k = None if weight is None else jax.tree.map(
                    term.weight, weight if term.weight is _identity else _when_needed(weight, relevance))
                z_k, pullback = jax.vjp(lambda *a, w_k=w_k: op(*a, w_k), *x_k)
            if reuse and term.weight == _identity and all(m == _identity for m in mods):
                z_k = _without_bias(z, bias)  # the layer's own output, already computed
            terms.append(term)
            outs.append(z_k)
            pullbacks.append(pullback)
            inputs.append(x_k)
        if not terms:
            continue
        x_part = sum(t.sign * z_k for t, z_k in zip(terms, outs))
        b_part = 0.0
        if bias is not None:
            b_part = sum(t.sign * t.bias(bias) for t in terms)
        denominator = stabilize(x_part + b_part, rule.stabilizer)
        signal = group.coefficient * _select(z, group.select) * relevance / denominator
        for term, x_k, pullback in zip(terms, inputs, pullbacks):
            for i, (x, ct) in enumerate(zip(x_k, pullback(signal))):
                r_in[i] = r_in[i] + (term.sign / degree) * x * ct
        explained = explained + jnp.sum(signal * x_part)
    return tuple(r_in), jnp.sum(relevance) - explained


@jax.custom_jvp
def _when_needed(weight, relevance):
    """``weight`` unchanged, but computed from ``relevance``, so that a modified weight (W+) cannot be
    computed before the backward pass reaches its layer. XLA would otherwise compute every layer's W+ at the
    start (it depends on parameters only) and keep all of them alive: at batch 1 these parameter-sized copies
    dominate memory (VGG-16 64x64, epsilon_gamma_box: 2.5x jax.grad's). An optimization barrier does not
    order them on XLA CPU (it is removed before scheduling), so the dependence is a select on a flag that
    is always false but that XLA cannot fold. Under ``jax.vmap`` the weight stays unbatched (the flag reads
    the batched relevance as a whole); its derivative is the weight's."""
    return _weight_after(weight, relevance)


@_when_needed.defjvp
def _when_needed_jvp(primals, tangents):
    return _when_needed(*primals), tangents[0]


@jax.custom_batching.custom_vmap
def _weight_after(weight, relevance):
    first = jnp.ravel(relevance)[:1]
    never = jnp.isnan(first) & (first == first)
    return jax.tree.map(lambda w: jnp.where(never.reshape((1,) * w.ndim) if w.ndim else never[0], 0, w), weight)


@_weight_after.def_vmap
def _weight_after_vmap(axis_size, in_batched, weight, relevance):
    return _weight_after(weight, relevance), in_batched[0]


def _without_bias(z, bias):
    """``op(x; W)`` recovered from the layer's output ``z = op(x; W) + b``. Where the bias is infinite (an
    additive -inf attention mask) ``z - b`` is NaN; the term is 0 there (its denominator is infinite anyway)."""
    if bias is None:
        return z
    return jnp.where(jnp.isfinite(bias), z - bias, 0.0)


def _unit_axes(op, xs, weight, z) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """For a layer with one input and an array weight: the weight axes that index output units (from the
    op's linear primitive: dense outputs, conv output features) and the output axes they become, matched
    by shape evaluation (shrinking a unit axis to 1 must shrink exactly one output axis of its size to 1;
    grouped convs reject it). None when there are none or it is unclear: the full computation is used."""
    if len(xs) != 1 or not isinstance(weight, (jax.Array, np.ndarray)):
        return None
    candidates = weight_unit_axes(op, xs[0], weight)
    if not candidates:
        return None
    x = jax.ShapeDtypeStruct(xs[0].shape, xs[0].dtype)

    def out_shape(w_shape):
        try:
            return jax.eval_shape(op, x, jax.ShapeDtypeStruct(w_shape, weight.dtype)).shape
        except Exception:  # a shape the op rejects (e.g. a grouped conv): no shortcut
            return None

    w_axes, out_axes = [], []
    for a in candidates:
        n = weight.shape[a]
        shape = out_shape(weight.shape[:a] + (1,) + weight.shape[a + 1:])
        if n == 1 or shape is None or len(shape) != z.ndim:
            continue
        changed = [k for k in range(z.ndim) if shape[k] != z.shape[k]]
        if len(changed) == 1 and shape[changed[0]] == 1 and z.shape[changed[0]] == n:
            w_axes.append(a)
            out_axes.append(changed[0])
    if not w_axes:
        return None
    reduced = tuple(1 if a in w_axes else n for a, n in enumerate(weight.shape))
    expected = tuple(1 if k in out_axes else n for k, n in enumerate(z.shape))
    return (reduced, tuple(out_axes)) if out_shape(reduced) == expected else None


def _ones_weight_vjp(op, x, units, z):
    """``op(x; ones)`` and its VJP with a single output unit instead of a full ones weight: every unit of
    an all-ones weight computes the same sum, so compute it once and broadcast (the VJP sums over units)."""
    reduced, out_axes = units
    ones = jnp.ones(reduced, x.dtype)
    z_one, pullback_one = jax.vjp(lambda a: op(a, ones), x)
    return jnp.broadcast_to(z_one, z.shape), lambda s: pullback_one(jnp.sum(s, axis=out_axes, keepdims=True))


def _shared_plan(rule: Rule, n_inputs: int, weight, nonneg: Sequence[bool], reuse: bool):
    """Per group and term, the coefficients C[a][b] of op(input_a; weight_b) over the bases a in {x, x+},
    b in {W, W+}, if every modifier is :class:`Affine` and this costs fewer passes than term by term."""
    if n_inputs != 1 or weight is None or not isinstance(weight, jax.Array):
        return None
    groups, pairs, generic = [], set(), 0  # generic: passes the term-by-term path would need
    for group in rule.groups:
        coefs = []
        for t in group.terms:
            if not all(isinstance(m, Affine) for m in (t.input, t.weight, t.bias)):
                return None
            a = t.input.coefficients(nonneg[0])
            b = t.weight.coefficients()
            c = {(i, j): t.sign * a[i] * b[j] for i in range(2) for j in range(2) if a[i] * b[j]}
            coefs.append(c)
            pairs.update(c)
            if c:
                generic += 1 + (0 if reuse and set(c) == {(0, 0)} and a[0] == 1 and b[0] == 1 else 1)
        groups.append(coefs)
    forwards = {p for p in pairs if not (reuse and p == (0, 0))}  # op(x; W) is the layer's own output
    return groups if len(forwards) + len(pairs) < generic else None  # one VJP per basis pair


def _propagate_shared(rule: Rule, plan, op, x, weight, bias, relevance, z, reuse):
    """:func:`propagate` for Affine-only rules: each basis forward op(x_a; W_b) and each basis VJP once."""
    inputs = (x, jnp.maximum(x, 0))
    weights = (weight, jnp.maximum(_when_needed(weight, relevance), 0))
    cache = {}

    def forward(pair):
        if pair not in cache:
            cache[pair] = _without_bias(z, bias) if reuse and pair == (0, 0) else \
                op(inputs[pair[0]], weights[pair[1]])
        return cache[pair]

    signals: dict = {}  # (a, b) -> linear combination of group signals fed to VJP_b, multiplied by x_a
    explained = jnp.zeros((), relevance.dtype)
    for group, coefs in zip(rule.groups, plan):
        pairs = {p for c in coefs for p in c}
        if not pairs:
            continue
        x_part = sum(sum(c[p] for c in coefs if p in c) * forward(p) for p in sorted(pairs))
        b_part = 0.0 if bias is None else sum(t.sign * t.bias(bias) for t, c in zip(group.terms, coefs) if c)
        signal = group.coefficient * _select(z, group.select) * relevance / stabilize(x_part + b_part,
                                                                                       rule.stabilizer)
        for p in pairs:
            signals[p] = signals.get(p, 0.0) + sum(c[p] for c in coefs if p in c) * signal
        explained = explained + jnp.sum(signal * x_part)
    r_in = jnp.zeros_like(x)
    for (a, b), signal in sorted(signals.items()):
        _, pullback = jax.vjp(lambda v, w=weights[b]: op(v, w), x)
        r_in = r_in + inputs[a] * pullback(signal)[0]
    return (r_in,), jnp.sum(relevance) - explained


# ---------------------------------------------------------------------------------------------------------
# Named rules. ``bias=False`` zeroes the bias in every term (the rule then ignores it).

def _bias(modifier: Modifier, bias: bool) -> Modifier:
    return modifier if bias else _zero


def epsilon(epsilon: float = 1e-6, *, bias: bool = True) -> Rule:
    """LRP-epsilon: ``R_i = sum_j z_ij / (z_j + eps sign(z_j)) R_j``; eps absorbs weak or contradictory relevance."""
    return Rule(f"epsilon({epsilon:g})", (Group((Term(bias=_bias(_identity, bias)),)),), stabilizer=epsilon)


def zero(stabilizer: float = 1e-12, *, bias: bool = True) -> Rule:
    """LRP-0 (the z-rule): epsilon with a vanishing stabilizer."""
    return dataclasses.replace(epsilon(stabilizer, bias=bias), name="zero")


def gamma(gamma: float = 0.25, stabilizer: float = 1e-6, *, bias: bool = True) -> Rule:
    """LRP-gamma (Zennit's generalised form, also for negative inputs): favours positive contributions.

    Where z > 0: terms (x+, W + g W+, b + g b+) and (x-, W + g W-, 0); where z < 0: (x+, W + g W-, b + g b-)
    and (x-, W + g W+, 0), each group with its own denominator.
    """
    up = Affine(1.0, gamma)  # W + g W+
    down = Affine(1.0 + gamma, -gamma)  # W + g W- = (1 + g) W - g W+

    pos = Group((Term(_positive, up, _bias(up, bias)), Term(_negative, down, _zero)), select="positive")
    neg = Group((Term(_positive, down, _bias(down, bias)), Term(_negative, up, _zero)), select="negative")
    return Rule(f"gamma({gamma:g})", (pos, neg), stabilizer)


def alpha_beta(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, *, bias: bool = True) -> Rule:
    """LRP-alpha-beta: ``alpha * activators - beta * inhibitors``, alpha - beta = 1.

    Activators: x+ W+ (+ b+) and x- W-; inhibitors: x+ W- (+ b-) and x- W+ (Zennit's semantics).
    """
    if abs(alpha - beta - 1.0) > 1e-9 or beta < 0:
        raise ValueError(f"alpha-beta needs alpha - beta = 1 and beta >= 0, got alpha={alpha}, beta={beta}")
    act = Group((Term(_positive, _positive, _bias(_positive, bias)), Term(_negative, _negative, _zero)), alpha)
    inh = Group((Term(_positive, _negative, _bias(_negative, bias)), Term(_negative, _positive, _zero)), -beta)
    groups = (act, inh) if beta else (act,)
    return Rule(f"alpha{alpha:g}_beta{beta:g}", groups, stabilizer)


def zplus(stabilizer: float = 1e-6, *, bias: bool = True) -> Rule:
    """Deep-Taylor z+: terms (x+, W+, b+) and (x-, W-, 0) in one denominator (Zennit's ZPlus).

    For non-negative inputs and ``bias=False`` this is the classic ``x_i w_ij+ / sum_i x_i w_ij+``.
    """
    return Rule("zplus", (Group((Term(_positive, _positive, _bias(_positive, bias)),
                                 Term(_negative, _negative, _zero))),), stabilizer)


def zbox(low: Any, high: Any, stabilizer: float = 1e-6, *, bias: bool = True) -> Rule:
    """z^B for bounded inputs in [low, high] (scalars or arrays broadcastable to the input).

    Terms (x, W, b), (low, W+, b+) and (high, W-, b-) with signs +, -, -.
    """
    def fill(value):
        return lambda x: jnp.broadcast_to(jnp.asarray(value, x.dtype), x.shape)

    terms = (Term(bias=_bias(_identity, bias)),
             Term(fill(low), _positive, _bias(_positive, bias), -1.0),
             Term(fill(high), _negative, _bias(_negative, bias), -1.0))
    return Rule("zbox", (Group(terms),), stabilizer)


def wsquare(stabilizer: float = 1e-6, *, bias: bool = False) -> Rule:
    """w^2: ``R_i = sum_j w_ij^2 / sum_i' w_i'j^2 R_j``; independent of the input."""
    return Rule("wsquare", (Group((Term(_ones, _square, _bias(_square, bias)),)),), stabilizer)


def flat(stabilizer: float = 1e-6) -> Rule:
    """Flat: relevance spread uniformly over each output's receptive field (input-independent)."""
    return Rule("flat", (Group((Term(_ones, _ones, _zero),)),), stabilizer)


def norm(stabilizer: float = 1e-6) -> Rule:
    """Proportional split for sums (residual adds, sum/average pooling): the epsilon rule without parameters."""
    return dataclasses.replace(epsilon(stabilizer), name="norm")


def gradient() -> Native:
    """Keep the ordinary gradient (e.g. winner-take-all for max pooling)."""
    return Native()


# ---------------------------------------------------------------------------------------------------------
# What an explained operand is, read from the graph (gates, self-gated activations, softmax axes)

def _node_of(graph, v):
    """The node computing value ``v``, or None for inputs and constants (``graph.producer`` is derived once
    per graph)."""
    i = graph.producer.get(v)
    return None if i is None else graph.nodes[i]


_ROUTING = K.STRUCTURAL - K.ELEMENTWISE | K.STOP_GRADIENT
_NONLINEAR = K.ELEMENTWISE - K.AFFINE - {K.P.select_n_p}


class _Upstream:
    """The elementwise and routing steps that computed a value, back to the nearest linear layers, sums
    or inputs, without entering statistics (values derived from full reductions: a norm's 1/std)."""

    def __init__(self, graph):
        self.graph = graph
        self._stat: dict[int, bool] = {}

    def _node(self, v):
        node = _node_of(self.graph, v)
        return node if node is not None and (node.prim in K.ELEMENTWISE or node.prim in _ROUTING) else None

    def statistic(self, v) -> bool:
        if v not in self._stat:
            self._stat[v] = False  # cycles cannot occur in a jaxpr; this only guards re-entry
            node = _node_of(self.graph, v)
            if node is not None and node.prim in K.REDUCTIONS:
                self._stat[v] = True
            elif self._node(v) is not None:
                flags = [self.statistic(a) for a in node.inputs if not hasattr(a, "val")]
                self._stat[v] = bool(flags) and all(flags)  # an input or parameter is not a statistic
        return self._stat[v]

    def walk(self, v) -> tuple[set, set]:
        """(values, primitives) upstream of ``v`` through elementwise and routing steps."""
        values, prims, todo = set(), set(), [v]
        while todo:
            w = todo.pop()
            if w in values or self.statistic(w):
                continue
            values.add(w)
            node = self._node(w)
            if node is not None:
                prims.add(node.prim)
                todo += [a for a in node.inputs if not hasattr(a, "val")]
        return values, prims


def operand_roles(context) -> tuple[str, ...]:
    """Per explained operand of a product layer: its origin ('softmax' for attention weights, 'sigmoid' for
    a sigmoid gate), 'activation' for the output of another elementwise non-linearity (the gate branch of
    SwiGLU / GeGLU), 'self' for a factor computed from another operand (``x * f(x)``: gelu, silu written
    out, which is one activation, not a product of two), else ''."""
    layer = context.layer
    up = _Upstream(context.graph)
    walks = [up.walk(v) for v in layer.inputs]
    roles = []
    for k, (values, prims) in enumerate(walks):
        origin = layer.origins[k] if k < len(layer.origins) else ""
        if any(j != k and v in values for j, v in enumerate(layer.inputs)):
            roles.append("self")
        elif origin:
            roles.append(origin)
        else:
            roles.append("activation" if prims & _NONLINEAR else "")
    return tuple(roles)


@dataclasses.dataclass(frozen=True)
class Product(RuleBase):
    """Rule for a product of activations: operands whose role is in ``constant`` are treated as constants
    (they get no relevance); the others share it uniformly (the epsilon rule divided by their number).

    Roles (:func:`operand_roles`): 'softmax' (attention weights), 'sigmoid' (a sigmoid gate), 'activation'
    (another non-linearity's output: SwiGLU's / GeGLU's gate branch), '' (anything else). A factor computed
    from the other one (``x * f(x)``, an activation written out) is always constant: the identity rule on
    the activation (relevance passes to ``x`` unchanged). When every operand or none would be constant,
    all share uniformly.
    """
    name: str
    constant: frozenset[str] = frozenset()
    stabilizer: float = 1e-6

    def __repr__(self) -> str:
        return self.name

    def backward(self, context, xs, out, relevance):
        """Constant operands get nothing; the others share by the epsilon rule over the product."""
        roles = operand_roles(context) if len(xs) > 1 else ("",)
        signal = [k for k, o in enumerate(roles) if o != "self"]
        if len(signal) == 1 and len(xs) > 1:  # x * f(x): an activation, the identity rule
            r_in = [None] * len(xs)  # constant operands: no relevance
            r_in[signal[0]] = _reduce_to(relevance, xs[signal[0]]).astype(xs[signal[0]].dtype)
            return tuple(r_in), None
        live = [k for k in signal if roles[k] not in self.constant]
        if not live or len(live) == len(signal):
            live = signal or list(range(len(xs)))

        def op(*a):
            full = [x.astype(a[0].dtype) for x in xs]
            for k, v in zip(live, a[:-1]):
                full[k] = v
            return context.replay(*full, dtype=a[0].dtype)

        degree = sum(context.multiplicity(k) for k in live)  # x . x counts twice
        # keep the output for the denominator only when it is smaller than the factors (A v); recompute it
        # when it is larger (q k^T: the T x T scores) or cheap (a gate): the memory of the gradient, not more
        elementwise = context.graph.nodes[context.layer.nodes[0]].prim is K.MUL
        reuse = out.size < max(x.size for x in xs) and not elementwise
        r_live, absorbed = propagate(epsilon(self.stabilizer), op, [xs[k] for k in live], None, None, relevance,
                                     out, degree, z_is_op=reuse)
        r_in = [None] * len(xs)  # constant operands: no relevance
        for k, r in zip(live, r_live):
            r_in[k] = r
        return tuple(r_in), absorbed


@dataclasses.dataclass(frozen=True)
class Scaling(RuleBase):
    """Affine layers: the identity where the map only scales its input (RMSNorm, L2 normalisation, a constant
    1/sqrt(d): its coefficients are constants or statistics, it has no offset), ``other`` where it has an offset
    or a centring (LayerNorm, an additive position embedding), other kinds of layer ``other`` too."""
    other: RuleBase
    name: str = "scaling"

    def __repr__(self) -> str:
        return f"{self.name}({self.other!r})"

    def backward(self, context, xs, out, relevance):
        layer = context.layer
        if layer.kind == "affine" and not layer.mixing and len(xs) == 1 and all(
                context.graph.nodes[n].prim in _SCALING for n in layer.nodes):
            return (_reduce_to(relevance, xs[0]).astype(xs[0].dtype),), None
        return self.other.backward(context, xs, out, relevance)


_SCALING = {K.MUL, K.DIV, K.NEG} | K.IDENTITY


def softmax_axes(context) -> tuple[int, ...] | None:
    """The axes a softmax layer normalises over (those of the sum its output is divided by), or None when the
    layer is not a softmax (no exp, or no normalising sum among its constants)."""
    graph, layer = context.graph, context.layer
    if layer.kind != "activation" or not any(graph.nodes[n].prim in K.EXP for n in layer.nodes):
        return None
    out_ndim = graph.avals[layer.output].ndim
    axes, todo, seen = set(), list(layer.consts), set()
    while todo:
        v = todo.pop()
        node = _node_of(graph, v)
        if v in seen or node is None:
            continue
        seen.add(v)
        if node.prim is K.P.reduce_sum_p:
            operand = node.inputs[0]
            if hasattr(operand, "val") or graph.avals[operand].ndim != out_ndim:
                raise ValueError(f"a softmax normalised by a sum over a value of another rank than its output "
                                 f"({graph.avals[operand].shape} vs {graph.avals[layer.output].shape}): jlrp "
                                 f"cannot tell its axes; register a rule for this layer instead")
            axes.update(int(a) for a in node.params["axes"])
        elif node.prim in K.ELEMENTWISE or node.prim in _ROUTING:
            todo += [a for a in node.inputs if not hasattr(a, "val")]
    return tuple(sorted(axes)) or None


def softmax_logits(context):
    """The value a softmax layer exponentiates, before the shift by its (stopped) maximum: the logits. It is
    the layer's input unless an elementwise map comes first (e.g. Gemma 2's soft-capping ``c tanh(z / c)``),
    whose output is then the softmax's input (and the map itself gets the identity rule)."""
    graph, layer = context.graph, context.layer
    exp = next(graph.nodes[n] for n in layer.nodes if graph.nodes[n].prim in K.EXP)
    logits = exp.inputs[0]
    shift = _node_of(graph, logits)
    if shift is not None and shift.prim is K.P.sub_p and not hasattr(shift.inputs[1], "val") \
            and shift.inputs[1] in layer.consts:  # z - stop_gradient(max z): the shift cancels in the softmax
        logits = shift.inputs[0]
    return logits


@dataclasses.dataclass(frozen=True)
class Softmax(RuleBase):
    """AttnLRP's softmax rule (Achtibat et al. 2024, Prop. 3.1: a Taylor decomposition at x with the bias
    absorbed): ``R_in = x * (R - s * sum(R))`` over the softmax axes, with masked (non-finite) logits taken
    as 0. ``x`` are the logits (after scaling, masking and any soft-capping: :func:`softmax_logits`), ``s``
    the output. Activation
    layers that are not a softmax get ``other`` (the identity rule by default)."""
    other: RuleBase = Pass()
    name: str = "softmax"

    def __repr__(self) -> str:
        return self.name

    def backward(self, context, xs, out, relevance):
        axes = softmax_axes(context)
        if axes is None:
            return self.other.backward(context, xs, out, relevance)
        dtype = jnp.promote_types(relevance.dtype, jnp.float32)
        logits = softmax_logits(context)
        z = xs[0] if logits == context.layer.inputs[0] else context.replay(*xs, dtype=dtype, value=logits)
        x, s, r = (a.astype(dtype) for a in (z, out, relevance))
        x = jnp.where(jnp.isfinite(x), x, 0.0)
        r_in = x * (r - s * jnp.sum(r, axis=axes, keepdims=True))
        return (_reduce_to(r_in, xs[0]),), None  # absorbed (the Taylor bias): measured


@dataclasses.dataclass(frozen=True, eq=False)
class PerLayer(RuleBase):
    """A rule chosen per layer: a composite resolves it to ``fn(info)`` for each layer's
    :class:`~jlrp.LayerInfo` (inside a scan, for each step), e.g. a gamma tuned per layer."""
    fn: Callable[[Any], RuleBase]
    name: str = "per-layer"

    def __repr__(self) -> str:
        return self.name

    def backward(self, context, xs, out, relevance):
        raise TypeError(f"{self!r} is resolved by a Composite: use it as a composite entry's rule")


@dataclasses.dataclass(frozen=True, eq=False)
class PerStep(RuleBase):
    """Different rules at different steps of the enclosing scans (a composite's 'first' layer inside a
    scanned stack of blocks is first only at step 0): ``table[steps]`` picks the rule."""
    rules: tuple
    table: np.ndarray

    @property
    def native(self) -> bool:
        return all(r.native for r in self.rules)

    def __repr__(self) -> str:
        return "per-step(" + ", ".join(map(repr, self.rules)) + ")"

    def backward(self, context, xs, out, relevance):
        index = jnp.asarray(self.table)[tuple(context.steps)]
        branches = [lambda xs, out, relevance, r=r: complete(r.backward(context, xs, out, relevance), relevance, xs)
                    for r in self.rules]
        return jax.lax.switch(index, branches, tuple(xs), out, relevance)


def complete(result, relevance, xs, *, symbolic: bool = False):
    """A rule's ``(R_in, absorbed)`` made whole: each R_in in its input's dtype, an input with no relevance
    (``None``) kept as ``None`` when ``symbolic`` (a custom_vjp's symbolic zero: nothing upstream of it is
    computed) or else zeros (every branch of a switch must return the same structure), and the absorbed
    share measured when the rule left it out (in at least float32)."""
    r_in, absorbed = result
    r_in = tuple(r.astype(x.dtype) if r is not None else None if symbolic else jnp.zeros_like(x)
                 for r, x in zip(r_in, xs))
    dtype = jnp.promote_types(relevance.dtype, jnp.float32)
    if absorbed is None:
        absorbed = jnp.sum(relevance.astype(dtype)) - sum(jnp.sum(r.astype(dtype)) for r in r_in if r is not None)
    return r_in, jnp.asarray(absorbed).astype(dtype)


def uniform(stabilizer: float = 1e-6, *, gates: bool = True) -> Product:
    """Products of n activations (q.k, attention.v, SwiGLU): each factor gets 1/n of the relevance (AttnLRP).

    With ``gates=True`` a sigmoid gate times a signal (LSTM, GRU, GLU) gives all relevance to the signal
    and none to the gate (the LSTM-LRP convention); ``gates=False`` splits those uniformly too (AttnLRP).
    """
    return Product("uniform" if gates else "uniform(gates=False)",
                   frozenset({"sigmoid"}) if gates else frozenset(), stabilizer)


def cp(stabilizer: float = 1e-6) -> Product:
    """Conservative propagation (CP-LRP, Ali et al. 2022): attention weights (softmax outputs) and gates
    (sigmoid gates, the activated branch of SwiGLU / GeGLU) are constants, so relevance flows only along
    the value path and the non-gate branch."""
    return Product("cp", frozenset({"sigmoid", "softmax", "activation"}), stabilizer)


def scaling(other: RuleBase | None = None) -> Scaling:
    """Affine layers: the identity on pure scalings (RMSNorm, L2 normalisation: AttnLRP's identity rule), and
    ``other`` (default LRP-0, :func:`zero`) on maps with an offset or a centring (LayerNorm, positions)."""
    return Scaling(zero() if other is None else other)


def softmax(other: RuleBase | None = None) -> Softmax:
    """AttnLRP's softmax rule ``R_in = x * (R - s * sum(R))`` on softmax layers; ``other`` (default: the
    identity rule :func:`pass_`) on every other activation layer."""
    return Softmax(Pass() if other is None else other)


def _positive_part(forward, xs, out, relevance):
    return [jnp.maximum(relevance, 0).astype(x.dtype) for x in xs]


def _guided(forward, xs, out, relevance):
    _, pullback = jax.vjp(forward, *xs)
    return pullback(jnp.maximum(relevance, 0).astype(out.dtype))


AnyRule = RuleBase


def deconvnet() -> Custom:
    """DeconvNet's activation rule: only positive relevance passes, the forward mask is ignored."""
    return Custom("deconvnet", _positive_part)


def guided_backprop() -> Custom:
    """Guided BackProp's activation rule: the forward gradient (relu mask) applied to the positive part."""
    return Custom("guided_backprop", _guided)


def pass_() -> Pass:
    """Identity rule R_in = R_out (elementwise activations, normalisations treated as constant)."""
    return Pass()
