"""Randomisation and axiomatic metrics: the model parameter randomisation test as one compiled program,
smooth MPRT, the random logit test, completeness, non-sensitivity and input invariance, against loop-based
numpy references (float64, 1e-10)."""
import contextlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlrp import evaluation as E
from test_metrics_common import (C, H, IDS, N, R_TOK, R_VAL, W, X, Y, explain_jax, grad_np, model_jax, model_np,
                                 spearman, token_model_jax, token_model_np)

TOL = dict(rtol=1e-10, atol=1e-10)
RNG = np.random.default_rng(13)


@contextlib.contextmanager
def compilations():
    """The names of the functions XLA compiles inside the block (from jax's compile log)."""
    names = []

    class Handler(logging.Handler):
        def emit(self, record):
            match = re.match(r"Finished XLA compilation of jit\((\w+)\)", record.getMessage())
            if match:
                names.append(match.group(1))

    handler, logger = Handler(), logging.getLogger("jax._src.dispatch")
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        yield names
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(handler)


# an MLP with named modules: params["l0"], params["l1"], params["l2"]
PARAMS = {f"l{i}": {"w": RNG.normal(size=s) * 0.5, "b": RNG.normal(size=s[1:]) * 0.1}
          for i, s in enumerate([(H * W * C, 8), (8, 6), (6, 3)])}


def mlp(p, x):
    h = x.reshape(x.shape[0], -1)
    for name in ("l0", "l1"):
        h = jnp.tanh(h @ p[name]["w"] + p[name]["b"])
    return h @ p["l2"]["w"] + p["l2"]["b"]


def mlp_grad(p, x, y):
    return jax.vmap(jax.grad(lambda xi, yi: mlp(p, xi[None])[0, yi]))(x, y)


def explain_p(p, x):  # one function object: the compiled program is reused
    return mlp_grad(p, x, jnp.asarray(Y))


def test_mprt_against_a_loop_over_the_steps():
    draws = jax.tree.map(lambda v: RNG.normal(size=v.shape), PARAMS)
    res = E.parameter_randomization(explain_p, PARAMS, X, None, draws=draws)
    assert res["modules"] == ["l2", "l1", "l0"]  # output first
    reference = np.asarray(explain_p(PARAMS, X))
    for step, cascade in ((0, ["l2"]), (1, ["l2", "l1"]), (2, ["l2", "l1", "l0"])):
        mixed = {k: (draws[k] if k in cascade else PARAMS[k]) for k in PARAMS}
        r = np.asarray(explain_p(mixed, X))
        want = [spearman(reference[n].ravel(), r[n].ravel()) for n in range(N)]
        want_abs = [spearman(np.abs(reference[n]).ravel(), np.abs(r[n]).ravel()) for n in range(N)]
        np.testing.assert_allclose(res["spearman"][step], want, **TOL)
        np.testing.assert_allclose(res["spearman_abs"][step], want_abs, **TOL)
    single = E.parameter_randomization(explain_p, PARAMS, X, None, draws=draws, cascade=False)
    mixed = {k: (draws[k] if k == "l1" else PARAMS[k]) for k in PARAMS}
    r = np.asarray(explain_p(mixed, X))
    np.testing.assert_allclose(single["spearman"][1], [spearman(reference[n].ravel(), r[n].ravel())
                                                       for n in range(N)], **TOL)


def test_mprt_compiles_once():
    key = jax.random.key(3)
    explain = lambda p, x: mlp_grad(p, x, jnp.asarray(Y))
    with compilations() as first:
        a = E.parameter_randomization(explain, PARAMS, X, key)
    with compilations() as again:
        b = E.parameter_randomization(explain, PARAMS, X + 1.0, jax.random.key(4), order=["l0", "l1", "l2"],
                                      cascade=False)
    assert first == ["mprt_program"], first  # every step, the draws and the ranks: one program, nothing else
    assert "mprt_program" not in again, again  # another input, key and order: no compilation
    assert a["spearman"].shape == b["spearman"].shape == (3, N)
    # with a traced target, every batch of a data set shares one program
    explain_t = lambda p, x, y: mlp_grad(p, x, y)
    c = E.parameter_randomization(explain_t, PARAMS, X, key, target=Y)
    np.testing.assert_allclose(c["spearman"], a["spearman"], **TOL)  # the same target: the same check
    with compilations() as third:
        d = E.parameter_randomization(explain_t, PARAMS, X, key, target=Y[::-1])
    assert "mprt_program" not in third
    assert not np.allclose(d["spearman"], a["spearman"])  # another target: other maps


def test_smooth_mprt():
    draws = jax.tree.map(lambda v: RNG.normal(size=v.shape), PARAMS)
    key = jax.random.key(0)
    plain = E.parameter_randomization(explain_p, PARAMS, X, key, draws=draws)
    # no noise: every copy is x, so the mean explanation is the explanation
    same = E.smooth_mprt(explain_p, PARAMS, X, key, samples=3, noise_magnitude=0.0, draws=draws)
    np.testing.assert_allclose(same["spearman"], plain["spearman"], **TOL)
    noisy = E.smooth_mprt(explain_p, PARAMS, X, key, samples=3, noise_magnitude=0.5, draws=draws)
    assert not np.allclose(noisy["spearman"], plain["spearman"])


# ----------------------------------------------------------------------------------------------------------
# random logit
# ----------------------------------------------------------------------------------------------------------

def ssim_np(a, b, win=7, k1=0.01, k2=0.03):
    """SSIM written out with explicit windows (the positions whose window lies inside the map)."""
    lr = max(a.max(), b.max()) - min(a.min(), b.min())
    c1, c2 = (k1 * lr) ** 2, (k2 * lr) ** 2
    starts = [range(s - win + 1) for s in a.shape]
    values = []
    for corner in np.ndindex(*[len(r) for r in starts]):
        sl = tuple(slice(c, c + win) for c in corner)
        wa, wb = a[sl].ravel(), b[sl].ravel()
        ua, ub = wa.mean(), wb.mean()
        va, vb = wa.var(ddof=1), wb.var(ddof=1)
        cov = ((wa - ua) * (wb - ub)).sum() / (wa.size - 1)
        values.append((2 * ua * ub + c1) * (2 * cov + c2) / ((ua ** 2 + ub ** 2 + c1) * (va + vb + c2)))
    return np.mean(values)


def test_ssim_reference():
    a = RNG.normal(size=(2, 9, 8))
    b = a + RNG.normal(size=a.shape) * 0.5
    np.testing.assert_allclose(E.ssim(a, b), [ssim_np(a[n], b[n]) for n in range(2)], **TOL)
    np.testing.assert_allclose(E.ssim(a, a), 1.0, **TOL)
    flat = RNG.normal(size=(2, 20))
    np.testing.assert_allclose(E.ssim(flat, flat[::-1]), [ssim_np(flat[0], flat[1]), ssim_np(flat[1], flat[0])],
                               **TOL)


def test_random_logit_reference():
    other = np.array([1, 0, 2])
    other[1] = 0
    other = np.where(other == Y, (Y + 1) % 3, other)
    r = grad_np(X, Y)
    r_other = grad_np(X, other)
    got = E.random_logit(explain_jax, X, Y, other=other, similarity="spearman")
    np.testing.assert_allclose(got, [spearman(r[n].ravel(), r_other[n].ravel()) for n in range(N)], **TOL)
    want = [ssim_np(r[n].sum(-1), r_other[n].sum(-1), win=3) for n in range(N)]
    with pytest.raises(ValueError, match="win_size"):  # SSIM on 5 x 4 maps: smaller than the 7 x 7 window
        E.random_logit(explain_jax, X, Y, other=other)
    got = E.random_logit(explain_jax, X, Y, other=other, similarity=lambda a, b: E.ssim(a.sum(-1), b.sum(-1),
                                                                                         win_size=3))
    np.testing.assert_allclose(got, want, **TOL)
    # drawn classes are never the target
    draws = [E.random_logit(lambda x, t: jnp.broadcast_to(t[:, None, None, None] * 1.0, x.shape), X, Y,
                            num_classes=3, key=jax.random.key(k), similarity=lambda a, b: b.reshape(N, -1)[:, 0])
             for k in range(8)]
    draws = np.array(draws)
    assert np.all(draws != Y[None]) and len(np.unique(draws)) == 3


# ----------------------------------------------------------------------------------------------------------
# axiomatic
# ----------------------------------------------------------------------------------------------------------

def test_completeness_reference():
    base = RNG.normal(size=X.shape)
    got = E.completeness(model_jax, X, R_VAL, Y, baseline=base)
    want = [R_VAL[n].sum() - (model_np(X[n:n + 1])[0, Y[n]] - model_np(base[n:n + 1])[0, Y[n]]) for n in range(N)]
    np.testing.assert_allclose(got, want, **TOL)
    # a linear model explained by input x weight with a zero baseline is complete
    w = RNG.normal(size=(1, H, W, C))
    lin = lambda v: (v * w).sum((1, 2, 3))[:, None]
    np.testing.assert_allclose(E.completeness(lin, X, X * w, 0), 0.0, atol=1e-12)
    gap = E.completeness(lin, X, X * w, 0, baseline="min")  # min baseline: f(x) - f(min) != sum(w x)
    np.testing.assert_allclose(gap, [(X[n] * w).sum() - ((X[n] - X[n].min()) * w).sum() for n in range(N)], **TOL)


def test_non_sensitivity_reference():
    # a model that ignores the last two token positions; relevance zero on some tokens
    rel = R_TOK.copy()
    rel[:, 1] = 0.0
    rel[0, 4] = 0.0
    ignore = lambda ids: token_model_jax(ids.at[:, 4:].set(1))
    ignore_np = lambda ids: token_model_np(np.concatenate([ids[:, :4], np.ones_like(ids[:, 4:])], 1))
    for step in (1, 2):
        got = E.non_sensitivity(ignore, IDS, rel, Y, baseline=0, eps=1e-5, features_in_step=step)
        want = []
        for n in range(N):
            f0 = ignore_np(IDS[n:n + 1])[0, Y[n]]
            count = 0
            for i in range(IDS.shape[1]):
                group = range(i // step * step, min(i // step * step + step, IDS.shape[1]))
                ids = IDS[n:n + 1].copy()
                ids[0, list(group)] = 0
                insensitive = abs(ignore_np(ids)[0, Y[n]] - f0) < 1e-5
                count += insensitive != (abs(rel[n, i]) < 1e-5)
            want.append(count)
        np.testing.assert_array_equal(got, want)
    # hand case: positions 4, 5 are ignored; row 0 has zero relevance at 1 (sensitive) and 4 (ignored),
    # nonzero at 5 (ignored): symmetric difference {1, 5}
    assert int(E.non_sensitivity(ignore, IDS, rel, Y, baseline=0)[0]) == 2


def test_input_invariance():
    # first layer with a bias; shifting x by c and the bias by -W c gives the same function
    w1, b1 = RNG.normal(size=(H * W * C, 4)), RNG.normal(size=4)
    w2 = RNG.normal(size=(4, 3))
    shift = 0.7
    f = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2
    f_shift = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + (b1 - shift * w1.sum(0))) @ w2
    grad = lambda fn: (lambda x, y: jax.vmap(jax.grad(lambda xi, yi: fn(xi[None])[0, yi]))(x, y))
    ixg = lambda fn: (lambda x, y: x * grad(fn)(x, y))
    np.testing.assert_allclose(E.input_invariance(grad(f), grad(f_shift), X, Y, shift=shift), 0.0, atol=1e-12)
    diff = E.input_invariance(ixg(f), ixg(f_shift), X, Y, shift=shift)  # x g vs (x + c) g: c |g|
    g = np.asarray(grad(f)(X, Y))
    np.testing.assert_allclose(diff, [shift * np.abs(g[n]).max() for n in range(N)], **TOL)
    np.testing.assert_array_equal(E.input_invariance(ixg(f), ixg(f_shift), X, Y, shift=shift, atol=1e-4),
                                  np.asarray(diff) <= 1e-4)
    np.testing.assert_array_equal(E.input_invariance(grad(f), grad(f_shift), X, Y, shift=shift, atol=1e-4), 1.0)
