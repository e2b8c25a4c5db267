"""Faithfulness metrics (jlrp/_src/metrics_faithfulness.py) against loop-based numpy references of their
published definitions and hand-computed cases, float64, 1e-10."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlrp import evaluation as E
from test_metrics_common import (C, CLASSES, EMB, H, IDS, N, R_PIX, R_TOK, R_VAL, W, X, Y, embed_model_jax,
                                 embed_model_np, model_jax, model_np, pearson, softmax, spearman, token_model_jax,
                                 token_model_np)

TOL = dict(rtol=1e-10, atol=1e-10)
RNG = np.random.default_rng(11)


def score(model, x, y):
    return model(x[None])[0, y]


def units(x, r):
    """numpy: x as (P, U) and r as (P,) for one sample."""
    p = r.size
    return x.reshape(p, -1).copy(), r.reshape(p)


def baseline_np(x_units, kind):
    if kind == "mean":
        return np.broadcast_to(x_units.mean(0, keepdims=True), x_units.shape)
    if kind == "min":
        return np.full(x_units.shape, x_units.min())
    if kind == "zero":
        return np.zeros(x_units.shape)
    return np.full(x_units.shape, float(kind))


# ----------------------------------------------------------------------------------------------------------
# faithfulness correlation
# ----------------------------------------------------------------------------------------------------------

def ref_faithfulness_correlation(model, x, r, y, subsets, baseline):
    out = []
    for n in range(len(x)):
        xu, ru = units(x[n], r[n])
        base = baseline_np(xu, baseline)
        f0 = score(model, x[n], y[n])
        atts, deltas = [], []
        for s in subsets[n]:
            xp = xu.copy()
            for i in s:
                xp[i] = base[i]
            deltas.append(f0 - score(model, xp.reshape(x[n].shape), y[n]))
            atts.append(sum(ru[i] for i in s))
        out.append(pearson(atts, deltas))
    return np.array(out)


@pytest.mark.parametrize("relevance,baseline", [(R_PIX, "mean"), (R_VAL, 0.5)])
def test_faithfulness_correlation_reference(relevance, baseline):
    p = relevance[0].size
    subsets = np.stack([np.stack([RNG.choice(p, 4, replace=False) for _ in range(7)]) for _ in range(N)])
    got = E.faithfulness_correlation(model_jax, X, relevance, Y, subsets=subsets, baseline=baseline, chunk_size=3)
    np.testing.assert_allclose(got, ref_faithfulness_correlation(model_np, X, relevance, Y, subsets, baseline), **TOL)


def test_faithfulness_correlation_hand_case_and_draws():
    # f = sum(x), zero baseline: the drop when removing S is sum_S x. x = 1..4, r = [1, 0, 1, 1]
    # subsets {0}, {1}, {2, 3}: attributions 1, 0, 2; drops 1, 2, 7 -> Pearson 5 / sqrt(2 * 62 / 3)
    x = np.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    f = lambda v: v.reshape(v.shape[0], -1).sum(1, keepdims=True)
    r = np.array([1.0, 0, 1, 1]).reshape(x.shape)
    got = E.faithfulness_correlation(f, x, r, 0, subsets=np.array([[[0, 0], [1, 1], [2, 3]]]), baseline="zero")
    # a repeated index is one unit: {0, 0} = {0}
    np.testing.assert_allclose(got, [5 / math.sqrt(2 * 62 / 3)], **TOL)
    # drawn subsets: for a linear model with exact contributions every subset gives att = drop: corr 1
    w = RNG.normal(size=(1, H, W, C))
    lin = lambda v: (v * w).sum((1, 2, 3))[:, None]
    a = E.faithfulness_correlation(lin, X, X * w, None, key=jax.random.key(0), subset_size=5, runs=20,
                                   baseline="zero")
    np.testing.assert_allclose(a, 1.0, **TOL)
    b = E.faithfulness_correlation(model_jax, X, R_VAL, Y, key=jax.random.key(1), subset_size=5, runs=20)
    c = E.faithfulness_correlation(model_jax, X, R_VAL, Y, key=jax.random.key(2), subset_size=5, runs=20)
    assert np.all(np.abs(b) <= 1) and not np.allclose(b, c)


def test_faithfulness_correlation_tokens():
    subsets = np.stack([np.stack([RNG.choice(IDS.shape[1], 2, replace=False) for _ in range(6)]) for _ in range(N)])
    got = E.faithfulness_correlation(token_model_jax, IDS, R_TOK, Y, subsets=subsets, baseline=0)
    ref = ref_faithfulness_correlation(token_model_np, IDS, R_TOK, Y, subsets, 0)
    np.testing.assert_allclose(got, ref, **TOL)
    emb = EMB[IDS]  # (N, T, D) embeddings, relevance per token: whole tokens are replaced
    got = E.faithfulness_correlation(embed_model_jax, emb, R_TOK, Y, subsets=subsets, baseline="zero")
    np.testing.assert_allclose(got, ref_faithfulness_correlation(embed_model_np, emb, R_TOK, Y, subsets, "zero"), **TOL)
    with pytest.raises(ValueError, match="integer baseline"):
        E.faithfulness_correlation(token_model_jax, IDS, R_TOK, Y, subsets=subsets, baseline="mean")


# ----------------------------------------------------------------------------------------------------------
# monotonicity correlation
# ----------------------------------------------------------------------------------------------------------

def ref_monotonicity(model, x, r, y, values, step):
    out = []
    for n in range(len(x)):
        xu, ru = units(x[n], r[n])
        order = np.argsort(ru, kind="stable")
        f0 = score(model, x[n], y[n])
        atts, variances = [], []
        for g in range(values.shape[0]):
            group = order[g * step:(g + 1) * step]
            sq = []
            for s in range(values.shape[1]):
                xp = xu.copy()
                xp[group] = values[g, s, n]
                sq.append((f0 - score(model, xp.reshape(x[n].shape), y[n])) ** 2)
            variances.append(np.mean(sq))
            atts.append(ru[group].sum())
        out.append(spearman(atts, variances))
    return np.array(out)


@pytest.mark.parametrize("relevance,step", [(R_PIX, 1), (R_VAL, 3)])
def test_monotonicity_correlation_reference(relevance, step):
    groups = -(-relevance[0].size // step)
    values = RNG.uniform(size=(groups, 4, N))
    got = E.monotonicity_correlation(model_jax, X, relevance, Y, values=values, features_in_step=step)
    np.testing.assert_allclose(got, ref_monotonicity(model_np, X, relevance, Y, values, step), **TOL)
    if step > 1:
        drawn = E.monotonicity_correlation(model_jax, X, relevance, Y, key=jax.random.key(0), samples=3,
                                           features_in_step=step)
        assert drawn.shape == (N,) and np.all(np.abs(drawn) <= 1)


def test_monotonicity_hand_case():
    # f = x0 + 2 x1 + 3 x2, replaced by v = 0: squared drops x_i^2 w_i^2 = 1, 4, 9 for x = 1; relevance
    # 3, 2, 1 ranks them in reverse: Spearman -1; relevance 1, 2, 3: +1
    f = lambda v: (v * jnp.array([1.0, 2, 3])).sum(1, keepdims=True)
    x = np.ones((1, 3))
    values = np.zeros((3, 2, 1))
    np.testing.assert_allclose(E.monotonicity_correlation(f, x, np.array([[3.0, 2, 1]]), 0, values=values), [-1.0])
    np.testing.assert_allclose(E.monotonicity_correlation(f, x, np.array([[1.0, 2, 3]]), 0, values=values), [1.0])


# ----------------------------------------------------------------------------------------------------------
# selectivity, region curves
# ----------------------------------------------------------------------------------------------------------

def region_order(r, region):
    h, w = r.shape
    regions = [(i, j) for i in range(0, h, region) for j in range(0, w, region)]
    sums = [r[i:i + region, j:j + region].sum() for i, j in regions]
    return [regions[k] for k in np.argsort(-np.array(sums), kind="stable")]


def ref_selectivity(model, x, r, y, region):
    out = []
    for n in range(len(x)):
        xp = x[n].copy()
        low = x[n].min()
        curve = []
        for i, j in region_order(r[n], region):
            xp[i:i + region, j:j + region] = low
            curve.append(score(model, xp, y[n]))
        out.append(np.trapezoid(curve, dx=1))
    return np.array(out)


def test_selectivity_reference():
    got = E.selectivity(model_jax, X, R_PIX, Y, region=2)
    np.testing.assert_allclose(got, ref_selectivity(model_np, X, R_PIX, Y, 2), **TOL)
    # hand case: f = sum(x) of a 2x2 image of ones, regions of one pixel, min baseline 1 = no change: 4 * 3
    ones = np.ones((1, 2, 2, 1))
    f = lambda v: v.reshape(v.shape[0], -1).sum(1, keepdims=True)
    np.testing.assert_allclose(E.selectivity(f, ones, np.ones((1, 2, 2)), 0, region=1), [12.0])
    # f = sum(x) of x = [[4, 1], [2, 3]] (sum 10, min 1), relevance = x: 4, 3, 2, 1 become 1 in turn, the
    # curve after each step is 7, 5, 4, 4 -> area (7 + 4) / 2 + 5 + 4 = 14.5
    x = np.array([[4.0, 1], [2, 3]]).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(E.selectivity(f, x, x[..., 0], 0, region=1), [14.5])


# ----------------------------------------------------------------------------------------------------------
# insertion / deletion
# ----------------------------------------------------------------------------------------------------------

def ref_insertion_deletion(model, x, r, y, step, base, insert, probability=True):
    out = []
    for n in range(len(x)):
        xu, ru = units(x[n], r[n])
        bu = base[n].reshape(xu.shape)
        order = np.argsort(-ru, kind="stable")
        p = len(ru)
        curve = []
        for i in range(-(-p // step) + 1):
            k = min(i * step, p)
            cur = (bu if insert else xu).copy()
            cur[order[:k]] = (xu if insert else bu)[order[:k]]
            logits = model(cur.reshape(1, *x[n].shape))
            curve.append((softmax(logits) if probability else logits)[0, y[n]])
        steps = len(curve) - 1
        out.append(np.trapezoid(curve, dx=1 / steps))
    return np.array(out)


@pytest.mark.parametrize("step", [3])
def test_deletion_and_insertion_reference(step):
    zero = np.zeros_like(X)
    got = E.deletion_auc(model_jax, X, R_PIX, Y, step=step)
    np.testing.assert_allclose(got, ref_insertion_deletion(model_np, X, R_PIX, Y, step, zero, False), **TOL)
    blurred = RNG.normal(size=X.shape)
    got = E.insertion_auc(model_jax, X, R_PIX, Y, step=step, baseline=blurred, output="logit")
    ref = ref_insertion_deletion(model_np, X, R_PIX, Y, step, blurred, True, probability=False)
    np.testing.assert_allclose(got, ref, **TOL)


def test_insertion_default_blur_and_tokens():
    # the default insertion start is a gaussian blur (sigma 5) of each channel
    curve = E.insertion_deletion_curve(model_jax, X, R_PIX, Y, mode="insertion", output="logit")
    d = np.arange(H)[:, None] - np.arange(H)[None]
    kh = np.exp(-0.5 * (d / 5.0) ** 2)
    kh /= kh.sum(1, keepdims=True)
    d = np.arange(W)[:, None] - np.arange(W)[None]
    kw = np.exp(-0.5 * (d / 5.0) ** 2)
    kw /= kw.sum(1, keepdims=True)
    blurred = np.einsum("hi,nijc,wj->nhwc", kh, X, kw)
    np.testing.assert_allclose(curve[:, 0], model_np(blurred)[np.arange(N), Y], **TOL)
    np.testing.assert_allclose(curve[:, -1], model_np(X)[np.arange(N), Y], **TOL)
    assert curve.shape == (N, H + 1)  # default step: one image row
    got = E.deletion_auc(token_model_jax, IDS, R_TOK, Y, baseline=0)
    ref = ref_insertion_deletion(token_model_np, IDS, R_TOK, Y, 1, np.zeros_like(IDS), False)
    np.testing.assert_allclose(got, ref, **TOL)


# ----------------------------------------------------------------------------------------------------------
# comprehensiveness / sufficiency
# ----------------------------------------------------------------------------------------------------------

def ref_rationale(model, x, r, y, fractions, base_value, keep, delete):
    out = []
    for n in range(len(x)):
        xu, ru = units(x[n], r[n])
        p = len(ru)
        order = list(np.argsort(-ru, kind="stable"))
        p0 = softmax(model(x[n][None]))[0, y[n]]
        drops = []
        for f in fractions:
            k = math.ceil(f * p - 1e-9)
            top = set(order[:k])
            gone = [i for i in range(p) if (i not in top) == keep]
            if delete:
                rest = [xu[i] for i in range(p) if i not in gone]
                cur = np.array(rest + [np.full(xu.shape[1], base_value)] * len(gone))
            else:
                cur = xu.copy()
                for i in gone:
                    cur[i] = base_value
            drops.append(p0 - softmax(model(cur.reshape(1, *x[n].shape)))[0, y[n]])
        out.append(np.mean(drops))
    return np.array(out)


@pytest.mark.parametrize("delete", [False, True])
def test_comprehensiveness_sufficiency_tokens(delete):
    fr = (0.1, 0.34, 0.5, 1.0)
    got = E.comprehensiveness(token_model_jax, IDS, R_TOK, Y, fractions=fr, baseline=0, delete=delete)
    np.testing.assert_allclose(got, ref_rationale(token_model_np, IDS, R_TOK, Y, fr, 0, False, delete), **TOL)
    got = E.sufficiency(token_model_jax, IDS, R_TOK, Y, fractions=fr, baseline=0, delete=delete)
    np.testing.assert_allclose(got, ref_rationale(token_model_np, IDS, R_TOK, Y, fr, 0, True, delete), **TOL)
    emb = EMB[IDS]
    got = E.comprehensiveness(embed_model_jax, emb, R_TOK, Y, fractions=fr, baseline=0.0, delete=delete)
    np.testing.assert_allclose(got, ref_rationale(embed_model_np, emb, R_TOK, Y, fr, 0.0, False, delete), **TOL)


def test_deletion_moves_tokens_up():
    # a probe "model" whose scores are the ids themselves: deleting the 2 most relevant of [5, 6, 7, 8]
    # (relevance 0, 3, 1, 2 -> ids 6 and 8) leaves [5, 7, pad, pad]; sufficiency keeps [6, 8, pad, pad]
    probe = lambda ids: jnp.concatenate([ids.astype(jnp.float64), jnp.zeros((ids.shape[0], 1))], 1)
    ids, r = np.array([[5, 6, 7, 8]]), np.array([[0.0, 3, 1, 2]])
    # scored output: the logit of class 1 (= id at position 1): 6 -> 7 after deletion, 6 -> 8 when kept
    comp = E.comprehensiveness(probe, ids, r, 1, fractions=(0.5,), baseline=9, delete=True, output="logit")
    suff = E.sufficiency(probe, ids, r, 1, fractions=(0.5,), baseline=9, delete=True, output="logit")
    np.testing.assert_allclose(comp, [6 - 7])
    np.testing.assert_allclose(suff, [6 - 8])
    replaced = E.comprehensiveness(probe, ids, r, 1, fractions=(0.5,), baseline=9, output="logit")
    np.testing.assert_allclose(replaced, [6 - 9])


# ----------------------------------------------------------------------------------------------------------
# infidelity
# ----------------------------------------------------------------------------------------------------------

def test_infidelity_gaussian_reference():
    noise = RNG.normal(size=(5,) + X.shape) * 0.1
    for relevance in (R_PIX, R_VAL):
        got = E.infidelity(model_jax, X, relevance, Y, noise=noise)
        ref = []
        for n in range(N):
            errs = []
            for s in range(len(noise)):
                i_dot_r = (noise[s, n].reshape(relevance[n].size, -1).sum(1) * relevance[n].ravel()).sum()
                drop = score(model_np, X[n], Y[n]) - score(model_np, X[n] - noise[s, n], Y[n])
                errs.append((i_dot_r - drop) ** 2)
            ref.append(np.mean(errs))
        np.testing.assert_allclose(got, ref, **TOL)
    # a linear model explained by its weights: I . w = f(x) - f(x - I) exactly, infidelity 0
    w = RNG.normal(size=(1, H, W, C))
    lin = lambda v: (v * w).sum((1, 2, 3))[:, None]
    zero = E.infidelity(lin, X, np.broadcast_to(w, X.shape), 0, key=jax.random.key(0), samples=8)
    np.testing.assert_allclose(zero, 0.0, atol=1e-20)


def test_infidelity_patches_reference():
    # Quantus's variant: patches replaced cumulatively in row-major order by the per-image minimum
    for relevance in (R_PIX, R_VAL):
        got = E.infidelity(model_jax, X, relevance, Y, perturbation="patches", region=2)
        ref = []
        for n in range(N):
            xp = X[n].copy()
            low = X[n].min()
            errs = []
            for i in range(0, H, 2):
                for j in range(0, W, 2):
                    xp[i:i + 2, j:j + 2] = low
                    diff = X[n] - xp
                    rr = relevance[n] if relevance.ndim == 4 else relevance[n][..., None]
                    a = (rr * diff).sum()
                    drop = score(model_np, X[n], Y[n]) - score(model_np, xp, Y[n])
                    errs.append((drop - a) ** 2)
            ref.append(np.mean(errs))
        np.testing.assert_allclose(got, ref, **TOL)


# ----------------------------------------------------------------------------------------------------------
# ROAD
# ----------------------------------------------------------------------------------------------------------

def ref_impute(img, removed):
    """Noise-free linear imputation by a dense solve of the neighbour equations, one channel at a time."""
    h, w = removed.shape
    unknown = [(i, j) for i in range(h) for j in range(w) if removed[i, j]]
    index = {p: k for k, p in enumerate(unknown)}
    weights = {(1, 1): 1 / 12, (0, 1): 1 / 6, (-1, 1): 1 / 12, (1, -1): 1 / 12, (0, -1): 1 / 6, (-1, -1): 1 / 12,
               (1, 0): 1 / 6, (-1, 0): 1 / 6}
    out = img.copy()
    for c in range(img.shape[2]):
        a = np.zeros((len(unknown), len(unknown)))
        b = np.zeros(len(unknown))
        for k, (i, j) in enumerate(unknown):
            for (di, dj), wt in weights.items():
                ii, jj = i + di, j + dj
                if 0 <= ii < h and 0 <= jj < w:
                    a[k, k] += wt
                    if removed[ii, jj]:
                        a[k, index[ii, jj]] -= wt
                    else:
                        b[k] += wt * img[ii, jj, c]
        solution = np.linalg.solve(a, b)
        for k, p in enumerate(unknown):
            out[p[0], p[1], c] = solution[k]
    return out


def test_noisy_linear_imputation_hand_case_and_noise():
    img = np.arange(9.0).reshape(3, 3, 1)
    removed = np.zeros((3, 3), bool)
    removed[1, 1] = True  # the centre: the weighted mean of its neighbours, 16/6 + 16/12 = 4
    got = E.noisy_linear_imputation(img, removed, noise=0.0)
    np.testing.assert_allclose(got[1, 1, 0], 4.0, **TOL)
    np.testing.assert_array_equal(np.asarray(got)[~removed], img[~removed])
    big = RNG.normal(size=(12, 12, 1))
    gone = RNG.uniform(size=(12, 12)) < 0.7
    clean = np.asarray(E.noisy_linear_imputation(big, gone, noise=0.0))
    np.testing.assert_allclose(clean, ref_impute(big, gone), **TOL)
    noisy = np.asarray(E.noisy_linear_imputation(big, gone, noise=0.01, key=jax.random.key(0)))
    delta = (noisy - clean)[..., 0]
    assert np.all(delta[~gone] == 0) and 0.008 < delta[gone].std() < 0.012


def test_road_reference():
    pct = (10, 35, 70, 95)
    got = E.road(model_jax, X, R_PIX, Y, percentages=pct, noise=0.0, output="logit")
    acc = E.road(model_jax, X, R_PIX, Y, percentages=pct, noise=0.0)
    lerf = E.road(model_jax, X, R_PIX, Y, percentages=pct, noise=0.0, output="logit", order="lerf")
    p = H * W
    for n in range(N):
        for order, curve in (("morf", got), ("lerf", lerf)):
            ranked = np.argsort(-R_PIX[n].ravel() if order == "morf" else R_PIX[n].ravel(), kind="stable")
            for q, value in zip(pct, np.asarray(curve[n])):
                removed = np.zeros(p, bool)
                removed[ranked[:int(p * q / 100)]] = True
                imputed = ref_impute(X[n], removed.reshape(H, W))
                logits = model_np(imputed[None])[0]
                np.testing.assert_allclose(value, logits[Y[n]], **TOL)
                if order == "morf":
                    assert acc[n, pct.index(q)] == float(np.argmax(logits) == Y[n])


def test_errors():
    with pytest.raises(ValueError, match="key"):
        E.faithfulness_correlation(model_jax, X, R_PIX, Y)
    with pytest.raises(ValueError, match="does not fit"):
        E.faithfulness_correlation(model_jax, X, R_PIX[:, :2], Y, key=jax.random.key(0))
    with pytest.raises(ValueError, match="out of range"):
        E.deletion_auc(model_jax, X, R_PIX, CLASSES)
    with pytest.raises(ValueError, match="percentages"):
        E.road(model_jax, X, R_PIX, Y, percentages=(100,), noise=0.0)
