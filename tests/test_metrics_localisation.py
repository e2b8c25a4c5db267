"""Localisation and complexity metrics (metrics_localisation.py, metrics_complexity.py) against loop-based
numpy references of their definitions and hand-computed cases, float64, 1e-10."""
import math

import numpy as np
import pytest

from jlrp import evaluation as E

TOL = dict(rtol=1e-10, atol=1e-10)
RNG = np.random.default_rng(5)
REL = RNG.normal(size=(4, 6, 5, 2))  # (N, H, W, C): channels are summed per pixel
MASK = RNG.uniform(size=(4, 6, 5)) < 0.3
MASK[3] = False  # an empty mask: NaN
REL[1, 2, 2] = [50.0, 1.0]  # a clear maximum


def pixels(n):
    return REL[n].sum(-1), MASK[n]


def ref_pointing(tolerance=0.0, weighted=False):
    out = []
    for n in range(len(REL)):
        r, m = pixels(n)
        if not m.any():
            out.append(np.nan)
            continue
        top = np.argwhere(r == r.max())
        inside = np.argwhere(m)
        hit = any(min(math.dist(t, i) for i in inside) <= tolerance for t in top)
        out.append(float(hit) * ((1 - m.sum() / m.size) if weighted else 1.0))
    return np.array(out)


@pytest.mark.parametrize("tolerance,weighted", [(0.0, False), (1.5, False), (2.0, True)])
def test_pointing_game_reference(tolerance, weighted):
    got = E.pointing_game(REL, MASK, tolerance=tolerance, weighted=weighted)
    np.testing.assert_allclose(got, ref_pointing(tolerance, weighted), **TOL)


def test_pointing_game_hand_case():
    r = np.zeros((2, 3, 3))
    r[:, 0, 0] = 1.0
    m = np.zeros((2, 3, 3), bool)
    m[0, 0, 0] = True
    m[1, 2, 2] = True  # distance sqrt(8) from the maximum
    np.testing.assert_array_equal(E.pointing_game(r, m), [1.0, 0.0])
    np.testing.assert_array_equal(E.pointing_game(r, m, tolerance=2.9), [1.0, 1.0])
    np.testing.assert_array_equal(E.pointing_game(r, m, tolerance=2.8), [1.0, 0.0])
    # tokens (N, T): ties at the maximum hit if any lies on the mask
    np.testing.assert_array_equal(E.pointing_game(np.array([[1.0, 3, 3, 0]]), np.array([[0, 0, 1, 0]])), [1.0])


def ref_localisation(attributions, weighted):
    out = []
    for n in range(len(REL)):
        r, m = pixels(n)
        if attributions == "positive":
            r = np.maximum(r, 0)
        elif attributions == "abs":
            r = np.abs(r)
        if not m.any():
            out.append(np.nan)
            continue
        mu = sum(r[i, j] for i, j in np.argwhere(m)) / r.sum()
        out.append(mu * m.size / m.sum() if weighted else mu)
    return np.array(out)


@pytest.mark.parametrize("attributions", ["positive", "abs", "signed"])
def test_attribution_localisation_reference(attributions):
    for weighted in (False, True):
        got = E.attribution_localisation(REL, MASK, weighted=weighted, attributions=attributions)
        np.testing.assert_allclose(got, ref_localisation(attributions, weighted), **TOL)
    # the positive variant is the relevance mass accuracy (on samples with a mask)
    np.testing.assert_allclose(E.attribution_localisation(REL, MASK)[:3], E.relevance_mass_accuracy(REL, MASK)[:3],
                               **TOL)


def test_top_k_and_auc_reference():
    for k in (4, 30):
        got = E.top_k_intersection(REL, MASK, k=k)
        ci = E.top_k_intersection(REL, MASK, k=k, concept_influence=True)
        for n in range(len(REL)):
            r, m = pixels(n)
            if not m.any():
                assert np.isnan(got[n]) and np.isnan(ci[n])
                continue
            order = np.argsort(-r.ravel(), kind="stable")[:k]
            frac = m.ravel()[order].sum() / k
            np.testing.assert_allclose([got[n], ci[n]], [frac, frac * m.size / m.sum()], **TOL)
    auc = E.mask_auc(np.round(REL, 1), MASK)  # rounding makes ties
    for n in range(len(REL)):
        r, m = pixels(n)
        r = np.round(REL[n], 1).sum(-1)
        pos, neg = r[m], r[~m]
        if not m.any():
            assert np.isnan(auc[n])
            continue
        wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
        np.testing.assert_allclose(auc[n], wins / (len(pos) * len(neg)), **TOL)


def test_localisation_hand_cases():
    m = np.array([[1, 1, 0, 0]], bool)
    r = np.array([[3.0, 1.0, 2.0, -6.0]])
    np.testing.assert_allclose(E.attribution_localisation(r, m), [4 / 6], **TOL)
    np.testing.assert_allclose(E.attribution_localisation(r, m, weighted=True), [4 / 6 * 2], **TOL)
    np.testing.assert_allclose(E.attribution_localisation(r, m, attributions="abs"), [4 / 12], **TOL)
    np.testing.assert_allclose(E.top_k_intersection(r, m, k=2), [0.5], **TOL)  # 3 (in), 2 (out)
    # AUC: positives {3, 1}, negatives {2, -6}: pairs won 3>2, 3>-6, 1>-6 = 3 of 4
    np.testing.assert_allclose(E.mask_auc(r, m), [0.75], **TOL)
    assert np.isnan(E.mask_auc(r, np.ones_like(m))[0])


# ----------------------------------------------------------------------------------------------------------
# complexity
# ----------------------------------------------------------------------------------------------------------

def test_complexity_reference():
    rel = RNG.normal(size=(3, 4, 5))
    rel[1, 0] = 0.0  # zeros: 0 log 0 = 0
    for eps in (0.0, 1e-7):
        got = E.sparseness(rel, eps=eps)
        for n in range(3):
            a = np.sort(np.abs(rel[n]).ravel() + eps)
            p = a.size
            gini = sum((2 * (i + 1) - p - 1) * a[i] for i in range(p)) / (p * a.sum())
            np.testing.assert_allclose(got[n], gini, **TOL)
    for eps in (0.0, 1e-12):
        got = E.complexity(rel, eps=eps)
        for n in range(3):
            a = np.abs(rel[n]).ravel()
            q = a / a.sum()
            np.testing.assert_allclose(got[n], -sum(v * math.log(v + eps) for v in q if v > 0), **TOL)
    got = E.effective_complexity(rel, eps=0.5)
    np.testing.assert_array_equal(got, [(np.abs(rel[n]) > 0.5).sum() for n in range(3)])


def test_complexity_hand_cases():
    one_hot = np.array([[0.0, 0, 5, 0]])
    flat = np.array([[2.0, -2, 2, -2]])
    np.testing.assert_allclose(E.sparseness(np.concatenate([one_hot, flat])), [0.75, 0.0], **TOL)  # 1 - 1/P, 0
    np.testing.assert_allclose(E.complexity(np.concatenate([one_hot, flat])), [0.0, math.log(4)], **TOL)
    np.testing.assert_array_equal(E.effective_complexity(np.concatenate([one_hot, flat])), [1, 4])
    zero = np.zeros((1, 4))
    assert E.sparseness(zero)[0] == 0.0 and E.complexity(zero)[0] == 0.0
