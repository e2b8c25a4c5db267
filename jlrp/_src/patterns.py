"""PatternNet and PatternAttribution (Kindermans et al. 2017): signal patterns fitted from data.

For a dense or conv layer with weight ``W`` and output unit ``j``, ``y_j = w_j^T x`` (bias excluded). The
weight is a *filter*: it cancels distractors, and so is a poor guide to where the signal is. The *pattern*
``a_j`` is the direction the signal takes in the input, estimated from data:

* linear:        ``a_j = cov(x, y_j) / (w_j^T cov(x, y_j))``
* two-component: ``a_+ = (E_+[x y] - E_+[x] E[y]) / (w^T E_+[x y] - w^T E_+[x] E[y])``, ``E_+`` over the
  samples with ``y_j > 0`` and ``E[y]`` over all samples; ``a_-`` likewise over ``y_j <= 0``.

Both satisfy ``w_j^T a_j = 1``. Statistics are streamed: one jitted forward pass per batch, running means.
For a conv layer every output position is a sample of the unit and ``x`` is the (zero-padded) input patch.
The weight-shaped sums ``sum_samples x y_j`` are the VJP of ``w -> op(x, w)`` at the cotangent ``y``, and
``sum_samples x`` its VJP at ``1`` (or at the mask ``y > 0``), so dense and conv layers share one code path.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import rules
from .api import _explain, transform
from .composites import Composite
from .geometry import weight_unit_axes
from .layers import LayerInfo
from .util import eval_shape_arrays, jit_arrays

Kind = Literal["two_component", "linear"]
_LINEAR = ("dense", "conv")
_STATS = {"linear": ("xy", "x"), "two_component": ("xy", "x", "xy+", "x+")}


# --------------------------------------------------------------------------------------------------------
# Layer geometry


def _contract(w, s, units: tuple[int, ...]):
    """``w_j^T s_j`` for every unit j, kept in the weight's layout (size 1 on the contracted axes)."""
    return jnp.sum(w * s, axis=tuple(a for a in range(w.ndim) if a not in units), keepdims=True)


def _acc_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _batch_moments(x, op, w, units, kind: str) -> tuple[int, dict]:
    """Means over this batch's samples (examples x positions) of ``x y``, ``x`` (and the same times
    ``1[y > 0]``), each weight-shaped: entry (i, j) belongs to input i of unit j."""
    dt = _acc_dtype()
    x, w = x.astype(dt), w.astype(dt)
    y, pullback = jax.vjp(lambda v: op(x, v), w)
    n = y.size // int(np.prod([w.shape[a] for a in units]))  # samples per unit
    sums = {"xy": y, "x": jnp.ones_like(y)}
    if kind == "two_component":
        pos = (y > 0).astype(dt)
        sums.update({"xy+": y * pos, "x+": pos})
    return n, {k: pullback(ct)[0] / n for k, ct in sums.items()}


# --------------------------------------------------------------------------------------------------------
# Patterns


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Patterns:
    """Signal patterns of every top-level dense and conv layer, keyed by ``LayerInfo.index``.

    Attributes:
      a: the pattern used by PatternNet / PatternAttribution, weight-shaped: ``a`` (linear) or ``a_+``
        (two-component). ``w_j^T a_j = 1`` for every unit j.
      a_minus: ``a_-`` for the two-component kind (empty for the linear kind).
      fallback: per unit (weight layout, size 1 on contracted axes), True where the estimate of ``a``
        was degenerate (the unit never fired, or its output had no variance in the component: a
        denominator at rounding level) and the filter direction ``w_j / (w_j^T w_j)`` was used instead;
        it also satisfies ``w_j^T a_j = 1``. ``a_minus`` falls back the same way (not flagged).
      count: number of samples (examples x output positions) per unit the statistics were taken over.
      kind: 'linear' or 'two_component'.
      layers: the LayerInfo of each fitted layer (its shapes are those of the last batch traced).
    """
    a: dict[int, jax.Array]
    a_minus: dict[int, jax.Array]
    fallback: dict[int, jax.Array]
    count: dict[int, jax.Array]
    kind: str = dataclasses.field(metadata=dict(static=True))
    layers: tuple[LayerInfo, ...] = dataclasses.field(metadata=dict(static=True))

    def as_params(self, params: Any, which: str = "a") -> Any:
        """The patterns arranged like ``params``: a pytree of ``params``' structure whose weight leaves
        (those of the fitted layers) hold their pattern (``which``: 'a' or 'a_minus') and whose other
        leaves are None. A weight is found by its path among the layer's parameters and its shape (BatchNorm
        folded in, the pattern has the kernel's shape).

            pats.as_params(params)["params"]["Dense_0"]["kernel"]   # the pattern of that Dense layer
        """
        chosen = getattr(self, which)
        where: dict[str, jax.Array] = {}
        shapes = {jax.tree_util.keystr(p, simple=True, separator="/"): jnp.shape(leaf)
                  for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
        for layer in self.layers:
            if layer.index in chosen:
                match = [p for p in layer.params if shapes.get(p) == chosen[layer.index].shape]
                if len(match) == 1:
                    where[match[0]] = chosen[layer.index]
        if not where:
            raise ValueError("as_params: no fitted layer's weight was found in `params`; pass the same "
                             "parameter pytree that `fit` received as an argument (e.g. the full linen variables, "
                             "not params['params']; patterns fitted on a closure know no parameter paths)")
        return jax.tree_util.tree_map_with_path(
            lambda p, _: where.get(jax.tree_util.keystr(p, simple=True, separator="/")), params)

    def save(self, path: str) -> None:
        """Write to a numpy ``.npz`` file (arrays plus JSON metadata, no pickling)."""
        arrays = {f"{field}/{k}": np.asarray(v) for field in ("a", "a_minus", "fallback", "count")
                  for k, v in getattr(self, field).items()}
        meta = {"kind": self.kind, "layers": [dataclasses.asdict(l) for l in self.layers]}
        np.savez(path, __meta__=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str) -> "Patterns":
        """Read patterns written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["__meta__"]))
            fields: dict[str, dict] = {"a": {}, "a_minus": {}, "fallback": {}, "count": {}}
            for name in f.files:
                if name != "__meta__":
                    field, k = name.split("/")
                    fields[field][int(k)] = jnp.asarray(f[name])
        layers = tuple(LayerInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in l.items()})
                       for l in meta["layers"])
        return cls(**fields, kind=meta["kind"], layers=layers)


def load(path: str) -> Patterns:
    """Read patterns written by :meth:`Patterns.save`."""
    return Patterns.load(path)


def _direction(w, xy, x, ey, ey2, units):
    """``(E[x y] - E[x] E[y]) / w^T(...)`` over one component, or the filter direction where degenerate.

    The denominator is the component's ``E[y^2 1_c] - E[y 1_c] E[y] >= 0``; it vanishes when the unit never
    falls in the component or its output there is constant. Means over all samples are used instead of
    means over the component: the component's sample count cancels in the normalisation ``w^T a = 1``.
    """
    num = xy - x * ey
    den = _contract(w, num, units)
    ok = den > 100 * jnp.finfo(den.dtype).eps * ey2  # false for rounding-level denominators (and ey2 == 0)
    ww = _contract(w, w, units)
    filt = w / jnp.where(ww > 0, ww, 1)  # a dead unit (w_j = 0) gets a zero pattern, not NaN
    return jnp.where(ok, num / jnp.where(ok, den, 1), filt), ~ok


def _finish(w, m: dict, units, kind: str):
    ey, ey2 = _contract(w, m["x"], units), _contract(w, m["xy"], units)  # E[y], E[y^2]
    if kind == "linear":
        a, bad = _direction(w, m["xy"], m["x"], ey, ey2, units)
        return a, None, bad
    a_plus, bad = _direction(w, m["xy+"], m["x+"], ey, ey2, units)
    a_minus, _ = _direction(w, m["xy"] - m["xy+"], m["x"] - m["x+"], ey, ey2, units)
    return a_plus, a_minus, bad


def _replace(args: tuple, argnums: int, value) -> tuple:
    args = list(args)
    args[argnums] = value
    return tuple(args)


def _with_tap(fn: Callable, argnums: int) -> Callable:
    """``run(args, tap)``: ``fn`` through the interpreter, ``tap`` called at every top-level dense/conv
    layer (loop bodies are skipped: their values live in an inner trace)."""
    transformed = transform(fn, Composite([("*", rules.gradient())], "forward"), argnums=argnums)

    def run(args, tap):
        def layer_tap(info, x, view, y):
            if info.scope == "":
                tap(info, x, view.op, view.weight, view.bias, y)
        transformed.run(transformed.plan(args, {}), args, tap=layer_tap)
    return run


def _moments(fn: Callable, args: tuple, batches: Iterable, argnums: int, kind: str):
    """Streamed means of the statistics of every dense/conv layer: ``{index: {name: mean, 'n': count,
    'w': weight}}`` and the layers' infos. Running means, ``m += (m_batch - m) * n_batch / n_total``, keep
    the accumulation stable over many samples."""
    if kind not in _STATS:
        raise ValueError(f"kind must be 'two_component' or 'linear', got {kind!r}")
    infos: dict[int, tuple[LayerInfo, tuple]] = {}
    forward = _with_tap(fn, argnums)

    def batch_stats(args):
        out = {}

        def tap(info, x, op, w, bias, y):
            units = weight_unit_axes(op, x, w)
            if units is None:
                raise NotImplementedError(
                    "patterns: cannot find the output-unit axes of this layer's weight (grouped batch "
                    "convolutions and weights used as the convolved input are not supported)")
            infos[info.index] = (info, units)
            n, m = _batch_moments(x, op, w, units, kind)
            out[info.index] = dict(m, n=jnp.asarray(n, _acc_dtype()), w=w.astype(_acc_dtype()))
        forward(args, tap)
        return out

    def step(state, args):
        new = batch_stats(args)
        merged = {}
        for k, b in new.items():
            s = state[k]
            total = s["n"] + b["n"]
            frac = b["n"] / total
            merged[k] = {name: s[name] + (b[name] - s[name]) * frac for name in _STATS[kind]}
            merged[k].update(n=total, w=b["w"])
        return merged

    step = jit_arrays(step)  # non-array leaves (an Equinox module's functions) stay static
    state = None
    for batch in batches:
        batch_args = _replace(args, argnums, batch)
        if state is None:
            state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), eval_shape_arrays(batch_stats, batch_args))
            if not state:
                raise ValueError("patterns: the function has no dense or conv layer on the explained input")
        state = step(state, batch_args)
    if state is None:
        raise ValueError("patterns: `batches` yielded no batch")
    return state, infos


def fit(fn: Callable, args: Sequence, batches: Iterable, *, argnums: int = 0,
        kind: Kind = "two_component") -> Patterns:
    """Fit the signal pattern of every dense and conv layer of ``fn`` from data.

    Args:
      fn: the model, called as ``fn(*args)``.
      args: ``fn``'s positional arguments; ``args[argnums]`` is replaced by each batch in turn.
      batches: an iterable of input batches (e.g. a generator over a data set); one jitted forward pass
        per batch (one compilation per distinct batch shape).
      kind: 'two_component' (``a_+`` / ``a_-``, for ReLU networks) or 'linear' (``a``), see the module
        docstring for the formulas.

    Statistics use ``y = op(x, W)`` without the bias, with BatchNorm folded into ``W``, accumulated in
    float32 (float64 when ``jax_enable_x64`` is on). Layers inside ``lax.scan`` / ``lax.cond`` bodies are
    not fitted. Units whose estimate is degenerate get the filter direction (see :class:`Patterns`).
    """
    if not isinstance(argnums, int):
        raise TypeError(f"patterns explain one argument: argnums must be an int, got {argnums!r}")
    return _patterns(*_moments(fn, tuple(args), batches, argnums, kind), kind)


def _patterns(state: dict, infos: dict, kind: str) -> Patterns:
    """Patterns of ``kind`` from streamed moments (two-component moments also give the linear kind)."""
    a, a_minus, fallback, count = {}, {}, {}, {}
    for k, m in state.items():
        a[k], neg, fallback[k] = _finish(m["w"], m, infos[k][1], kind)
        if neg is not None:
            a_minus[k] = neg
        count[k] = m["n"]
    return Patterns(a, a_minus, fallback, count, kind, tuple(infos[k][0] for k in sorted(infos)))


# --------------------------------------------------------------------------------------------------------
# Explanations


def _pattern_composite(patterns: Patterns, weight: Callable, name: str) -> Composite:
    """Gradient everywhere; every dense/conv layer's weight replaced by ``weight(W, a)``."""
    def unfitted(layer: LayerInfo) -> bool:
        if layer.kind in _LINEAR and (layer.scope or layer.index not in patterns.a):
            raise ValueError(f"{name}: no pattern for layer {layer.index} ({layer.kind}, {layer.primitive}"
                             f"{', in a ' + layer.scope + ' body' if layer.scope else ''}); fit the patterns "
                             f"on this function with the same argnums (loop bodies are not fitted)")
        return False

    def substitute(index: int, a) -> rules.Substitute:
        def replace(w):
            if w.shape != a.shape:
                raise ValueError(f"{name}: the pattern of layer {index} has shape {a.shape} but the layer's "
                                 f"weight has shape {w.shape}; were the patterns fitted on this model?")
            return weight(w, a.astype(w.dtype))
        return rules.Substitute(f"{name}[{index}]", replace)

    entries: list = [("*", rules.gradient()), (unfitted, rules.gradient())]
    for k, a in patterns.a.items():
        entries.append((lambda l, k=k: l.kind in _LINEAR and not l.scope and l.index == k, substitute(k, a)))
    return Composite(entries, name)


def _method(fn: Callable, composite: Composite, argnums: int, seed: str) -> Callable:
    if not isinstance(argnums, int):
        raise TypeError(f"patterns explain one argument: argnums must be an int, got {argnums!r}")
    transformed = transform(fn, composite, argnums=argnums)

    def explain(*args, target: Any = None, relevance: Any = None, **kwargs):
        return _explain(transformed, args, kwargs, target, relevance, True, report=False, seed=seed)

    explain.transformed = transformed  # type: ignore[attr-defined]
    return explain


def patternnet(fn: Callable, patterns: Patterns, *, argnums: int = 0) -> Callable:
    """PatternNet: the signal ``s`` of the target class, projected back to the input.

    The gradient backward pass, started from the one-hot target, with each dense/conv layer's weight
    ``W`` replaced by its pattern ``a`` (``a_+`` for the two-component kind); ReLU gates and max-pooling
    switches of the forward pass are kept. Same calling convention as :func:`jlrp.lrp`:
    ``explain(*args, target=None, relevance=None)`` returns an array shaped like ``args[argnums]``.
    """
    return _method(fn, _pattern_composite(patterns, lambda w, a: a, "patternnet"), argnums, seed="mask")


def patternattribution(fn: Callable, patterns: Patterns, *, argnums: int = 0) -> Callable:
    """PatternAttribution: the gradient backward pass with each weight replaced by ``W * a_+``
    (elementwise; ``W * a`` for the linear kind), started from the target's output value ``y``
    (``out * one_hot(target)``, like LRP). Equivalently deep Taylor decomposition with the root point
    ``x0 = x - a_+ w^T x``. Same calling convention as :func:`jlrp.lrp`.
    """
    return _method(fn, _pattern_composite(patterns, lambda w, a: w * a, "patternattribution"), argnums,
                   seed="logit")


# --------------------------------------------------------------------------------------------------------
# Signal quality


def _dense_layout(op, x, w) -> bool | None:
    """For a dense layer computing ``x[..., i] w[i, j]`` False, ``x[..., i] w[j, i]`` True (a transposed
    weight, e.g. Equinox's ``W @ x``), None for anything else (not scored). Decided by evaluating the
    layer's op on random inputs of its shapes (at trace time), so any jaxpr spelling of it is recognised."""
    if w.ndim != 2 or x.ndim < 1:
        return None
    rng = np.random.default_rng(0)
    with jax.ensure_compile_time_eval():
        xp = rng.normal(size=x.shape).astype(np.float32)
        wp = rng.normal(size=w.shape).astype(np.float32)
        y = np.asarray(op(jnp.asarray(xp), jnp.asarray(wp)), np.float64)
    flat = xp.reshape(-1, x.shape[-1]).astype(np.float64)
    for transposed, m in ((False, wp), (True, wp.T)):
        if m.shape[0] == x.shape[-1] and y.shape[:-1] == x.shape[:-1] and y.shape[-1] == m.shape[1]:
            if np.allclose(y.reshape(-1, m.shape[1]), flat @ m, rtol=1e-4, atol=1e-4 * np.abs(y).max()):
                return transposed
    return None


def rho(fn: Callable, args: Sequence, patterns_or_estimator: Patterns | str, batches: Iterable, *,
        argnums: int = 0, holdout: float = 0.5, seed: int = 0, by_sign: bool = False) -> dict[int, float]:
    """Signal-estimator quality per dense layer, averaged over its output units (higher is better):

        rho(S) = 1 - max_v corr(w^T x, v^T (x - S(x)))

    An estimator ``S`` is good when the distractor it leaves, ``x - S(x)``, carries no information about
    the output ``y = w^T x``. ``v`` is fitted by least squares (with intercept) on the first
    ``1 - holdout`` of the samples and the correlation measured on the rest.

    ``by_sign=True`` lets ``v`` depend on the sign of ``y = w^T x`` (bias excluded, as in :func:`fit`): one
    ``v`` for ``y > 0``, one for ``y <= 0``, a shared intercept; the read-out of a ReLU unit, whose firing
    is a function of ``y``. Why it matters: on the data they were fitted on, both fitted patterns leave
    ``cov(x - S(x), y) = 0`` exactly (the two-component formula uses ``E[y]`` over all samples so that its
    two components add up to that), so with one ``v`` both score 1 up to estimation noise and tie. Only
    the two-component pattern also zeroes ``cov((x - S(x)) 1[y > 0], y)`` and ``cov((x - S(x)) 1[y <= 0],
    y)``: with ``by_sign`` it is the optimum (exactly so on its fitting data) and the linear pattern is
    not, which gives Kindermans et al.'s ordering S_w < S_a < S_a+- on ReLU layers.

    Held-out correlations can come out slightly negative, so rho can exceed 1 by a little.

    Estimators: a :class:`Patterns` (its kind: 'linear' ``S(x) = a y``; 'two_component'
    ``S(x) = a_+ y`` if ``y > 0`` else ``a_- y``), 'filter' (``S(x) = w y / (w^T w)``) or 'random' (a
    random direction ``r`` with ``w^T r = 1``, drawn with ``seed``). Units whose output is constant are
    skipped. Only dense layers with 2-D weights are scored (conv layers are not).

    An input that is constant on the data (a dead ReLU) makes every estimator that puts signal on it
    degenerate: there ``x - S(x) = const - s_i y`` reveals ``y`` exactly and rho is ~0. The filter and
    random estimators do this; fitted patterns are ~0 on constant inputs.
    """
    est = patterns_or_estimator
    if isinstance(est, str) and est not in ("filter", "random"):
        raise ValueError(f"estimator must be a Patterns (fit one for 'linear' / 'two_component'), 'filter' "
                         f"or 'random', got {est!r}")

    forward = _with_tap(fn, argnums)
    transposed: dict[int, bool] = {}  # static, filled while tracing

    def collect(args):
        out = {}

        def tap(info, x, op, w, bias, y):
            if info.kind == "dense" and (t := _dense_layout(op, x, w)) is not None:
                transposed[info.index] = t
                out[info.index] = (x.reshape(-1, x.shape[-1]), w)
        forward(args, tap)
        return out

    collect = jit_arrays(collect)
    flip = lambda k, a: a.T if transposed[k] else a  # to the (inputs, units) layout
    xs: dict[int, list] = {}
    weights: dict[int, np.ndarray] = {}
    for batch in batches:
        for k, (x, w) in collect(_replace(tuple(args), argnums, batch)).items():
            xs.setdefault(k, []).append(np.asarray(x, np.float64))
            weights[k] = flip(k, np.asarray(w, np.float64))
    rng = np.random.default_rng(seed)
    result = {}
    for k in sorted(xs):
        x, w = np.concatenate(xs[k]), weights[k]
        if isinstance(est, Patterns):
            if k not in est.a:
                continue
            pos = flip(k, np.asarray(est.a[k], np.float64))
            neg = flip(k, np.asarray(est.a_minus.get(k, est.a[k]), np.float64))
        elif est == "filter":
            pos = neg = w / np.maximum((w * w).sum(0), np.finfo(np.float64).tiny)
        else:
            r = rng.normal(size=w.shape)
            pos = neg = r / (w * r).sum(0)
        cut = int(round(len(x) * (1 - holdout)))
        if not 0 < cut < len(x):
            raise ValueError(f"rho: {len(x)} samples cannot be split with holdout={holdout}")
        result[k] = _rho_layer(x[:cut], x[cut:], w, pos, neg, by_sign)
    return result


def _rho_layer(x, x_eval, w, pos, neg, by_sign: bool, chunk: int = 16) -> float:
    """Mean over units of ``1 - corr(y, v^T d)`` on ``x_eval``, ``v`` fitted on ``x`` by least squares.

    The distractor of unit j is ``d = x - a y_+ - b y_-`` (``y_+ = max(y, 0)``, ``y_- = min(y, 0)``, ``a``
    and ``b`` the estimator's directions for either sign); with ``by_sign`` the regressors are
    ``[d 1[y > 0], d 1[y <= 0]] = [x 1[y > 0] - a y_+, x 1[y <= 0] - b y_-]``, whose cross products vanish
    (disjoint rows). The normal equations follow from sums of products of ``x``, ``y_+`` and ``y_-``
    (plus ``x^T diag(1[y > 0]) x`` per unit with ``by_sign``), without a per-unit design matrix. A ridge
    of 1e-9 of the mean eigenvalue makes rank-deficient inputs (dead relus) solvable; it gives zero weight
    to directions without variance and does not change the fit otherwise.
    """
    n = len(x)
    y, y_eval = x @ w, x_eval @ w
    yp, ym = np.maximum(y, 0), np.minimum(y, 0)
    fires = (y > 0).astype(x.dtype)
    sxx, sxp, sxm = x.T @ x, x.T @ yp, x.T @ ym
    spp, smm = (yp * yp).sum(0), (ym * ym).sum(0)  # sum y_+ y_- = 0
    sx_pos, sx = x.T @ fires, x.sum(0)
    col = lambda m, u: m[:, u].T[:, :, None]  # (in, units) -> (units, in, 1)
    t = lambda m: np.swapaxes(m, 1, 2)
    scores = []
    for lo in range(0, w.shape[1], chunk):  # chunks of units bound the (units, in, in) memory
        u = slice(lo, lo + chunk)
        a, b, cp, cm = col(pos, u), col(neg, u), col(sxp, u), col(sxm, u)
        p_, m_ = spp[u, None, None], smm[u, None, None]
        sum_p, sum_m = yp[:, u].sum(0)[:, None, None], ym[:, u].sum(0)[:, None, None]
        if by_sign:
            k, dim = a.shape[0], x.shape[1]
            gated = (x[:, None, :] * fires[:, u, None]).reshape(n, k * dim)  # one GEMM for the chunk
            xx_pos = np.transpose((x.T @ gated).reshape(dim, k, dim), (1, 0, 2))  # x^T diag(1[y > 0]) x
            g_pos = xx_pos - cp @ t(a) - a @ t(cp) + p_ * a @ t(a)
            g_neg = (sxx - xx_pos) - cm @ t(b) - b @ t(cm) + m_ * b @ t(b)
            zero = np.zeros_like(g_pos)
            gram = np.block([[g_pos, zero], [zero, g_neg]])
            x_pos = col(sx_pos, u)  # sum of x over the rows where the unit fires
            sums = np.concatenate([x_pos - a * sum_p, (sx[None, :, None] - x_pos) - b * sum_m], 1)
            rhs = np.concatenate([cp - a * p_, cm - b * m_], 1)
        else:
            gram = sxx - cp @ t(a) - a @ t(cp) - cm @ t(b) - b @ t(cm) + p_ * a @ t(a) + m_ * b @ t(b)
            sums = sx[None, :, None] - a * sum_p - b * sum_m
            rhs = (cp + cm) - a * p_ - b * m_
        sum_y = y[:, u].sum(0)[:, None, None]
        gram = gram - sums @ t(sums) / n  # centred: the intercept
        rhs = rhs - sums * sum_y / n
        ridge = 1e-9 * np.trace(gram, axis1=1, axis2=2)[:, None, None] / gram.shape[1]
        v = np.linalg.solve(gram + ridge * np.eye(gram.shape[1]), rhs)[:, :, 0]  # (units, features)
        ye = y_eval[:, u]
        ep, em = np.maximum(ye, 0), np.minimum(ye, 0)
        if by_sign:
            vp, vm = v[:, :x.shape[1]], v[:, x.shape[1]:]
            pred = np.where(ye > 0, x_eval @ vp.T, x_eval @ vm.T) - ep * (a[:, :, 0] * vp).sum(1) \
                - em * (b[:, :, 0] * vm).sum(1)
        else:
            pred = x_eval @ v.T - ep * (a[:, :, 0] * v).sum(1) - em * (b[:, :, 0] * v).sum(1)
        for j in range(ye.shape[1]):
            if np.std(ye[:, j]) == 0 or np.std(y[:, lo + j]) == 0:
                continue  # a constant unit has no signal to separate
            corr = 0.0 if np.std(pred[:, j]) == 0 else np.corrcoef(ye[:, j], pred[:, j])[0, 1]
            scores.append(1.0 - corr)
    return float(np.mean(scores)) if scores else float("nan")
