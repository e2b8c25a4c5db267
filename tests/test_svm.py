"""BoW kernel SVM and its LRP decomposition (Bach et al. 2015): jlrp/_src/svm.py."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlrp._src import svm

N_TRAIN, N_TEST, SIZE = 200, 200, 24


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 for the conservation checks, restored afterwards so other test modules are unaffected."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def make_shapes(n: int, seed: int, size: int = SIZE, noise: float = 0.1):
    """Class +1: filled square, class -1: filled disc of the same expected area (side s, radius s/sqrt(pi),
    s uniform in 6..10, so the area is no cue), at random positions in the upper part; both classes carry
    a distractor, a 2 x 12 horizontal bar of the same intensity, in the lower part. Gaussian noise.
    Returns images (n, size, size), labels (n,) in {-1, +1}, masks of the deciding shape (n, size, size)."""
    rng = np.random.default_rng(seed)
    y = np.where(np.arange(n) % 2 == 0, 1, -1)
    rng.shuffle(y)
    yy, xx = np.mgrid[:size, :size] + 0.5
    s = rng.integers(6, 11, n)[:, None, None]
    cy, cx = rng.uniform(6, 11, n)[:, None, None], rng.uniform(6, size - 6, n)[:, None, None]
    square = (np.abs(yy - cy) < s / 2) & (np.abs(xx - cx) < s / 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < s ** 2 / np.pi
    shape = np.where(y[:, None, None] > 0, square, disc)
    by, bx = rng.integers(18, 22, n)[:, None, None], rng.integers(0, size - 12, n)[:, None, None]
    bar = (yy >= by) & (yy < by + 2) & (xx >= bx) & (xx < bx + 12)
    img = 0.8 * (shape | bar) + noise * rng.standard_normal((n, size, size))
    return img, y, shape


@pytest.fixture(scope="module")
def data():
    xtr, ytr, _ = make_shapes(N_TRAIN, 0)
    xte, yte, mte = make_shapes(N_TEST, 1)
    return jnp.asarray(xtr), ytr, jnp.asarray(xte), yte, mte


# C = 10: histograms are normalised (sum 1), so kernel differences between classes are small and the
# margin needs alphas well above 1.
@pytest.fixture(scope="module")
def hard_model(data):
    return svm.train_bow_svm(data[0], data[1], k=32, key=jax.random.PRNGKey(0), C=10.0, steps=2000)


@pytest.fixture(scope="module")
def soft_model(data):
    return svm.train_bow_svm(data[0], data[1], k=32, key=jax.random.PRNGKey(0), C=10.0, steps=2000,
                             assignment="soft", beta=2.0)


def _accuracy(model, x, y):
    return float((np.asarray(model.predict(x)) == y).mean())


# --------------------------------------------------------------------------- building blocks

def test_patch_descriptors_match_numpy_and_footprints():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 9, 7, 3))
    desc, foot = svm.patch_descriptors(jnp.asarray(img), patch=3, stride=2)
    tops, lefts = range(0, 9 - 3 + 1, 2), range(0, 7 - 3 + 1, 2)
    ref = np.stack([img[:, t:t + 3, l:l + 3, :].reshape(2, -1) for t in tops for l in lefts], 1)
    np.testing.assert_allclose(desc, ref)
    assert foot.shape == (len(tops) * len(lefts), 9, 7)
    for p, (t, l) in enumerate((t, l) for t in tops for l in lefts):
        want = np.zeros((9, 7))
        want[t:t + 3, l:l + 3] = 1
        np.testing.assert_array_equal(foot[p], want)
    # NHW == NHWC with one channel; centring removes each patch's mean
    d1, _ = svm.patch_descriptors(jnp.asarray(img[..., 0]), patch=3, stride=2)
    d2, _ = svm.patch_descriptors(jnp.asarray(img[..., :1]), patch=3, stride=2)
    np.testing.assert_array_equal(d1, d2)
    dc, _ = svm.patch_descriptors(jnp.asarray(img), patch=3, stride=2, center=True)
    np.testing.assert_allclose(dc, ref - ref.mean(-1, keepdims=True), atol=1e-12)


def test_kmeans_reduces_inertia(data):
    desc, _ = svm.patch_descriptors(data[0][:50])
    key = jax.random.PRNGKey(1)
    seeded = svm.kmeans(desc, 16, key, iters=0)  # k-means++ seeding only
    fitted = svm.kmeans(desc, 16, key, iters=20)
    x = np.asarray(desc).reshape(-1, desc.shape[-1])

    def inertia(c):  # direct numpy computation
        return ((x[:, None, :] - np.asarray(c)[None]) ** 2).sum(-1).min(-1).sum()

    np.testing.assert_allclose(svm.kmeans_inertia(desc, fitted), inertia(fitted), rtol=1e-9)
    assert inertia(fitted) < 0.9 * inertia(seeded)
    # run to convergence: a fixed point of Lloyd, every centroid is the mean of its cluster
    more = np.asarray(svm.kmeans(desc, 16, key, iters=60))
    lab = ((x[:, None, :] - more[None]) ** 2).sum(-1).argmin(-1)
    for j in np.unique(lab):
        np.testing.assert_allclose(more[j], x[lab == j].mean(0), atol=1e-9)


def test_bow_histograms():
    rng = np.random.default_rng(2)
    desc, code = rng.standard_normal((3, 10, 4)), rng.standard_normal((5, 4))
    d2 = ((desc[:, :, None, :] - code[None, None]) ** 2).sum(-1)
    h, a = svm.bow(jnp.asarray(desc), jnp.asarray(code), "hard")
    counts = np.stack([np.bincount(r, minlength=5) for r in d2.argmin(-1)])
    np.testing.assert_allclose(h, counts / 10)
    h, a = svm.bow(jnp.asarray(desc), jnp.asarray(code), "soft", beta=0.7, normalize=False)
    soft = np.exp(-0.7 * (d2 - d2.min(-1, keepdims=True)))
    soft /= soft.sum(-1, keepdims=True)
    np.testing.assert_allclose(a, soft, rtol=1e-9)
    np.testing.assert_allclose(h, soft.sum(1), rtol=1e-9)


def test_kernel_matches_numpy():
    rng = np.random.default_rng(3)
    x, z = rng.random((4, 6)), rng.random((7, 6))
    ref = np.array([[np.minimum(a, b).sum() for b in z] for a in x])
    np.testing.assert_allclose(svm.hik_kernel(jnp.asarray(x), jnp.asarray(z)), ref, rtol=1e-12)


def test_svm_dual_is_feasible_and_satisfies_kkt(data, hard_model):
    """Training accuracy > 90 %, dual feasibility, and the KKT conditions on the training set."""
    xtr, ytr, xte, yte, _ = data
    m = hard_model
    acc_tr, acc_te = _accuracy(m, xtr, ytr), _accuracy(m, xte, yte)
    print(f"\nhard BoW-SVM: train acc {acc_tr:.3f}, test acc {acc_te:.3f}, {m.coef.shape[0]} support vectors")
    assert acc_tr > 0.9
    assert acc_te > 0.8
    desc, _ = svm.patch_descriptors(xtr)
    h, _ = svm.bow(desc, m.codebook)
    alpha, b = svm.fit_svm(svm.hik_kernel(h, h), jnp.asarray(ytr), 10.0, 2000)
    alpha = np.asarray(alpha)
    assert alpha.min() >= 0 and alpha.max() <= 10.0
    assert abs((alpha * ytr).sum()) < 1e-8
    yf = ytr * np.asarray(m.decision_function(xtr))
    tol = 1e-5
    assert np.all(yf[alpha <= tol] >= 1 - 1e-3)  # outside the margin
    assert np.all(yf[alpha >= 10 - tol] <= 1 + 1e-3)  # bounded SVs: inside or on the margin
    free = (alpha > tol) & (alpha < 10 - tol)
    assert free.any() and np.abs(yf[free] - 1).max() < 0.05  # free SVs on the margin


def test_soft_model_accuracy(data, soft_model):
    xtr, ytr, xte, yte, _ = data
    acc_tr, acc_te = _accuracy(soft_model, xtr, ytr), _accuracy(soft_model, xte, yte)
    print(f"\nsoft BoW-SVM: train acc {acc_tr:.3f}, test acc {acc_te:.3f}")
    assert acc_tr > 0.9 and acc_te > 0.8


# --------------------------------------------------------------------------- LRP decomposition

def _check_conservation(model, x):
    e = jax.jit(svm.explain_svm)(model, x)
    f = np.asarray(model.decision_function(x))
    lost = np.asarray(e.undistributed)
    scale = np.abs(f).max()
    err = {
        "decision": np.abs(np.asarray(e.decision) - f).max() / scale,
        "dims": np.abs(np.asarray(e.dims).sum(-1) - f).max() / scale,
        "features": np.abs(np.asarray(e.features).sum(-1) - (f - lost)).max() / scale,
        "pixels": np.abs(np.asarray(e.pixels).sum((1, 2)) - (f - lost)).max() / scale,
    }
    assert max(err.values()) < 1e-6, err
    # Empty bins: h_d = 0 => the kernel term vanishes, R_d is exactly the bias share, and only that is lost.
    h, _, _ = model.features(x)
    empty = np.asarray(h) <= 0
    np.testing.assert_allclose(np.asarray(e.dims)[empty], float(e.bias_share), rtol=1e-12)
    np.testing.assert_allclose(lost, float(e.bias_share) * empty.sum(-1), rtol=1e-12)
    return e, err, empty


def test_conservation_hard(data, hard_model):
    e, err, empty = _check_conservation(hard_model, data[2])
    assert empty.any()  # the empty-bin check above was not vacuous
    print(f"\nhard: max relative conservation error {max(err.values()):.2e}; b/D = {float(e.bias_share):.4f}; "
          f"empty bins per image {empty.sum(-1).mean():.1f} of {empty.shape[1]}")


def test_conservation_soft(data, soft_model):
    e, err, empty = _check_conservation(soft_model, data[2])
    print(f"\nsoft: max relative conservation error {max(err.values()):.2e}")
    # a very sharp softmax underflows to exact zeros: empty bins in the soft case too
    sharp = dataclasses.replace(soft_model, config=dataclasses.replace(soft_model.config, beta=1e4))
    _, _, empty = _check_conservation(sharp, data[2][:20])
    assert empty.any()


@pytest.mark.parametrize("assignment,normalize", [("hard", True), ("soft", True), ("soft", False)])
def test_explanation_matches_a_loop_reference(assignment, normalize):
    """Every level against a direct numpy transcription of the formulas, with explicit loops."""
    rng = np.random.default_rng(4)
    x = rng.random((2, 6, 8, 2))
    code, sup = rng.random((5, 2 * 2 * 2)), rng.random((3, 5))
    coef, b = rng.standard_normal(3), 0.3
    cfg = svm.BowConfig(patch=2, stride=2, assignment=assignment, beta=3.0, normalize=normalize)
    model = svm.BowSVM(jnp.asarray(code), jnp.asarray(sup), jnp.asarray(coef), jnp.asarray(b), cfg)
    e = jax.jit(svm.explain_svm)(model, jnp.asarray(x))
    corners = [(t, l) for t in range(0, 5, 2) for l in range(0, 7, 2)]
    for n in range(2):
        desc = np.stack([x[n, t:t + 2, l:l + 2].ravel() for t, l in corners])  # (P, 8)
        d2 = ((desc[:, None] - code[None]) ** 2).sum(-1)
        a = np.eye(5)[d2.argmin(-1)] if assignment == "hard" else np.exp(-3 * d2) / np.exp(-3 * d2).sum(-1, keepdims=True)
        w = a / len(corners) if normalize else a
        h = w.sum(0)
        r_d = np.array([sum(coef[i] * min(sup[i, d], h[d]) for i in range(3)) + b / 5 for d in range(5)])
        r_p = np.array([sum(r_d[d] * w[p, d] / h[d] for d in range(5) if h[d] > 0) for p in range(len(corners))])
        r_pix = np.zeros((6, 8))
        for p, (t, l) in enumerate(corners):
            r_pix[t:t + 2, l:l + 2] += r_p[p] / 4
        np.testing.assert_allclose(e.dims[n], r_d, rtol=1e-10)
        np.testing.assert_allclose(e.features[n], r_p, rtol=1e-10)
        np.testing.assert_allclose(e.pixels[n], r_pix, rtol=1e-10, atol=1e-14)
        f = sum(coef[i] * np.minimum(sup[i], h).sum() for i in range(3)) + b
        np.testing.assert_allclose(e.decision[n], f, rtol=1e-12)


def _dilate_by_footprint(masks: np.ndarray, foot: np.ndarray) -> np.ndarray:
    """Union of the footprints of all patches that contain at least one mask pixel."""
    touch = np.einsum("phw,nhw->np", foot, masks.astype(foot.dtype)) > 0
    return np.einsum("np,phw->nhw", touch.astype(foot.dtype), foot) > 0


def _localisation(model, x, y, masks):
    e = jax.jit(svm.explain_svm)(model, x)
    f = np.asarray(e.decision)
    sel = (y == 1) & (f > 0)  # correctly classified squares, explaining f(x)
    pos = np.maximum(np.asarray(e.pixels)[sel], 0)
    _, foot = svm.patch_descriptors(x[:1], model.config.patch, model.config.stride)
    plain, dil = masks[sel], _dilate_by_footprint(masks[sel], foot)
    return {"plain": (pos * plain).sum() / pos.sum(), "plain_area": plain.mean(),
            "dilated": (pos * dil).sum() / pos.sum(), "dilated_area": dil.mean(), "n": int(sel.sum())}


def test_relevance_localises_on_the_deciding_shape(data, hard_model, soft_model):
    """Share of positive pixel relevance on the square. Two masks: the plain shape mask, and the shape mask
    dilated by the patch footprint (the union of the 4 x 4 footprints of all patches that contain at least
    one square pixel). The dilated mask is the finest region the method can address: a patch's relevance
    is spread uniformly over its footprint, so a patch that sees a corner of the square through one pixel
    necessarily puts 15/16 of its relevance outside the plain mask.

    Asserted (robust over seeds): the dilated share is > 1.5 x the dilated mask's area fraction, i.e.
    relevance is concentrated there (uniform spreading would give 1 x). The target "> 60 % on the mask" is
    not asserted: on the plain mask it is not reached (0.10-0.23 over 5 data/codebook seeds, xfail below);
    on the dilated mask it is reached for this seed (hard 0.64) but not robustly (hard 0.46-0.64, soft
    0.52-0.59 over 5 seeds), mainly because the distractor bar shares straight-edge visual words with the
    square and receives positive relevance (about 25-35 % of it)."""
    xte, yte, mte = data[2], data[3], data[4]
    for name, model in (("hard", hard_model), ("soft", soft_model)):
        s = _localisation(model, xte, yte, mte)
        print(f"\n{name}: positive relevance on the plain mask {s['plain']:.3f} (area {s['plain_area']:.3f}), "
              f"on the footprint-dilated mask {s['dilated']:.3f} (area {s['dilated_area']:.3f}), n={s['n']}")
        assert s["n"] > 0.8 * (yte == 1).sum()
        assert s["dilated"] > 1.5 * s["dilated_area"]


@pytest.mark.xfail(reason="the > 60 % localisation target is not met on the plain mask", strict=True)
def test_localisation_target_60_percent_plain(data, hard_model):
    assert _localisation(hard_model, data[2], data[3], data[4])["plain"] > 0.6


# --------------------------------------------------------------------------- transformations

def test_jit_equals_eager_and_batch_equals_single(data, soft_model, hard_model):
    x = data[2][:6]
    for model in (hard_model, soft_model):
        eager = svm.explain_svm(model, x)
        jitted = jax.jit(svm.explain_svm)(model, x)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(model.decision_function(x), eager.decision, rtol=1e-12)
        vm = jax.jit(jax.vmap(lambda im: svm.explain_svm(model, im[None])))(x)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(vm)):
            if np.ndim(a) == 0:  # bias_share is per model
                np.testing.assert_allclose(b, np.full(b.shape, a))
            else:
                np.testing.assert_allclose(a, np.asarray(b).reshape(a.shape), rtol=1e-10, atol=1e-12)
        one = svm.explain_svm(model, x[2:3])
        np.testing.assert_allclose(one.pixels[0], eager.pixels[2], rtol=1e-10, atol=1e-12)
