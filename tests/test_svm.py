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


def make_shapes(n: int, seed: int, size: int = SIZE, noise: float = 0.1, bar_level: float = 0.4):
    """Class +1: filled square, class -1: filled disc of the same expected area (side s, radius s/sqrt(pi),
    s uniform in 6..10, so the area is no cue), intensity 0.8, at random positions in the upper part; both
    classes carry a distractor, a 2 x 12 horizontal bar of intensity ``bar_level``, in the lower part.
    Gaussian noise. At the default 0.4 the bar shares no visual word with the shapes; at 0.8 its straight
    edges are the square's words, and the model rightly counts them as square evidence.
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
    img = 0.8 * shape + bar_level * bar + noise * rng.standard_normal((n, size, size))
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

def _check_conservation(model, x, bias="absorb", pixels="energy"):
    e = jax.jit(svm.explain_svm, static_argnames=("bias", "pixels"))(model, x, bias=bias, pixels=pixels)
    f = np.asarray(model.decision_function(x))
    b = float(model.bias)
    lost = np.asarray(e.undistributed)
    scale = np.abs(f).max()
    err = {
        "decision": np.abs(np.asarray(e.decision) - f).max() / scale,
        "dims": np.abs(np.asarray(e.dims).sum(-1) - (f - (b if bias == "absorb" else 0))).max() / scale,
        "features": np.abs(np.asarray(e.features).sum(-1) - (f - lost)).max() / scale,
        "pixels": np.abs(np.asarray(e.pixels).sum((1, 2)) - (f - lost)).max() / scale,
    }
    assert max(err.values()) < 1e-6, err
    # Empty bins: h_d = 0 => the kernel term vanishes, R_d is exactly the bias share (b / D or 0), and
    # with 'spread' only that is lost; with 'absorb' exactly b is.
    h, _, _ = model.features(x)
    empty = np.asarray(h) <= 0
    share = b / h.shape[-1] if bias == "spread" else 0.0
    np.testing.assert_allclose(float(e.bias_share), share, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(e.dims)[empty], share, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lost, share * empty.sum(-1) if bias == "spread" else b, rtol=1e-12)
    return e, err, empty


@pytest.mark.parametrize("bias,pixels", [("absorb", "energy"), ("spread", "uniform")])
def test_conservation_both_conventions(data, hard_model, bias, pixels):
    e, err, empty = _check_conservation(hard_model, data[2], bias, pixels)
    assert empty.any()  # the empty-bin check above was not vacuous
    print(f"\n{bias}/{pixels}: max relative conservation error {max(err.values()):.2e}; "
          f"b = {float(hard_model.bias):.4f}; empty bins per image {empty.sum(-1).mean():.1f} of {empty.shape[1]}")


def test_conservation_soft(data, soft_model):
    e, err, empty = _check_conservation(soft_model, data[2])
    print(f"\nsoft: max relative conservation error {max(err.values()):.2e}")
    # a very sharp softmax underflows to exact zeros: empty bins in the soft case too
    sharp = dataclasses.replace(soft_model, config=dataclasses.replace(soft_model.config, beta=1e4))
    _, _, empty = _check_conservation(sharp, data[2][:20], "spread")
    assert empty.any()


@pytest.mark.parametrize("assignment,normalize,bias,pixels,patch,stride,center", [
    ("hard", True, "spread", "uniform", 2, 2, False), ("soft", True, "absorb", "energy", 2, 2, False),
    ("soft", False, "spread", "energy", 3, 1, True), ("hard", False, "absorb", "uniform", 3, 2, False),
    ("soft", True, "absorb", "energy", 3, 2, False)])
def test_explanation_matches_a_loop_reference(assignment, normalize, bias, pixels, patch, stride, center):
    """Every level against a direct numpy transcription of the formulas, with explicit loops (the library
    derives the kernel step with the LRP interpreter on the model's jaxpr); overlapping patches
    (stride < patch), centred descriptors and two channels included."""
    rng = np.random.default_rng(4)
    x = rng.random((2, 6, 8, 2))
    x[0, :3, :3] = 0  # an all-zero patch: 'energy' falls back to uniform there
    dd = patch * patch * 2
    code, sup = rng.random((5, dd)) - 0.5 * center, rng.random((3, 5))
    coef, b = rng.standard_normal(3), 0.3
    cfg = svm.BowConfig(patch=patch, stride=stride, center=center, assignment=assignment, beta=3.0,
                        normalize=normalize)
    model = svm.BowSVM(jnp.asarray(code), jnp.asarray(sup), jnp.asarray(coef), jnp.asarray(b), cfg)
    e = jax.jit(svm.explain_svm, static_argnames=("bias", "pixels"))(model, jnp.asarray(x), bias=bias,
                                                                       pixels=pixels)
    corners = [(t, l) for t in range(0, 6 - patch + 1, stride) for l in range(0, 8 - patch + 1, stride)]
    for n in range(2):
        desc = np.stack([x[n, t:t + patch, l:l + patch].ravel() for t, l in corners])  # (P, dd)
        if center:
            desc = desc - desc.mean(1, keepdims=True)
        d2 = ((desc[:, None] - code[None]) ** 2).sum(-1)
        a = np.eye(5)[d2.argmin(-1)] if assignment == "hard" else np.exp(-3 * d2) / np.exp(-3 * d2).sum(-1, keepdims=True)
        w = a / len(corners) if normalize else a
        h = w.sum(0)
        share = b / 5 if bias == "spread" else 0.0
        r_d = np.array([sum(coef[i] * min(sup[i, d], h[d]) for i in range(3)) + share for d in range(5)])
        r_p = np.array([sum(r_d[d] * w[p, d] / h[d] for d in range(5) if h[d] > 0) for p in range(len(corners))])
        r_pix = np.zeros((6, 8))
        for p, (t, l) in enumerate(corners):
            energy = (desc[p] ** 2).reshape(patch, patch, 2).sum(-1)  # pixel (channel-summed) energy
            if pixels == "energy" and energy.sum() > 0:
                q = energy / energy.sum()
            else:
                q = np.full((patch, patch), 1 / patch ** 2)
            r_pix[t:t + patch, l:l + patch] += r_p[p] * q
        np.testing.assert_allclose(e.dims[n], r_d, rtol=1e-10)
        np.testing.assert_allclose(e.features[n], r_p, rtol=1e-10)
        np.testing.assert_allclose(e.pixels[n], r_pix, rtol=1e-10, atol=1e-14)
        f = sum(coef[i] * np.minimum(sup[i], h).sum() for i in range(3)) + b
        np.testing.assert_allclose(e.decision[n], f, rtol=1e-12)
        np.testing.assert_allclose(e.pixels[n].sum(), f - (b if bias == "absorb" else share * (h == 0).sum()),
                                   rtol=1e-10)
    with pytest.raises(ValueError, match="bias"):
        svm.explain_svm(model, jnp.asarray(x), bias="share")
    with pytest.raises(ValueError, match="pixels"):
        svm.explain_svm(model, jnp.asarray(x), pixels="gradient")


def test_integer_images_are_read_as_float():
    """uint8 images: squared distances and energies in float (squares of uint8 would wrap around)."""
    rng = np.random.default_rng(6)
    img = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    code = jnp.asarray(rng.random((4, 16)) * 255)
    model = svm.BowSVM(code, jnp.asarray(rng.random((3, 4))), jnp.asarray([1.0, -0.5, 0.2]), jnp.asarray(0.1),
                       svm.BowConfig(patch=4, stride=4))
    as_float = svm.explain_svm(model, jnp.asarray(img, jnp.float32))
    as_int = svm.explain_svm(model, jnp.asarray(img))
    for a, b in zip(jax.tree.leaves(as_int), jax.tree.leaves(as_float)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def _dilate_by_footprint(masks: np.ndarray, foot: np.ndarray) -> np.ndarray:
    """Union of the footprints of all patches that contain at least one mask pixel."""
    touch = np.einsum("phw,nhw->np", foot, masks.astype(foot.dtype)) > 0
    return np.einsum("np,phw->nhw", touch.astype(foot.dtype), foot) > 0


def _localisation(model, x, y, masks, **kwargs):
    e = svm.explain_svm(model, x, **kwargs)
    f = np.asarray(e.decision)
    sel = (y == 1) & (f > 0)  # correctly classified squares, explaining f(x)
    pos = np.maximum(np.asarray(e.pixels)[sel], 0)
    _, foot = svm.patch_descriptors(x[:1], model.config.patch, model.config.stride)
    plain, dil = masks[sel], _dilate_by_footprint(masks[sel], foot)
    return {"plain": (pos * plain).sum() / pos.sum(), "plain_area": plain.mean(),
            "dilated": (pos * dil).sum() / pos.sum(), "dilated_area": dil.mean(), "n": int(sel.sum())}


def _report(name, s):
    print(f"\n{name}: positive relevance on the square {s['plain']:.3f} (area {s['plain_area']:.3f}), on the "
          f"footprint-dilated square {s['dilated']:.3f} (area {s['dilated_area']:.3f}), n={s['n']}")


def test_relevance_localises_on_the_deciding_shape(data, hard_model, soft_model):
    """Share of positive pixel relevance on the square (the shape that decides the class), with the default
    conventions (bias absorbed, 'energy' pixels). Target > 60 %: asserted for the soft-assignment model
    (measured 0.84-0.96 over 5 data/codebook seeds, 0.80-0.97 with 400 training images). The hard model is
    noisier (0.51-0.78 over the same seeds: a hard codebook spends words on background noise, whose
    counts the SVM partly fits) and only needs to concentrate relevance (> 2x the square's area).
    For comparison, printed not asserted: Bach et al.'s conventions (bias spread over the dimensions,
    patches spread uniformly over their pixels) give 0.1-0.3 on the square, most of it on the blank pixels
    around it."""
    xte, yte, mte = data[2], data[3], data[4]
    soft = _localisation(soft_model, xte, yte, mte)
    hard = _localisation(hard_model, xte, yte, mte)
    _report("soft", soft)
    _report("hard", hard)
    for name, model in (("soft", soft_model), ("hard", hard_model)):
        _report(f"{name}, bias spread, uniform pixels",
                _localisation(model, xte, yte, mte, bias="spread", pixels="uniform"))
    for s in (soft, hard):
        assert s["n"] > 0.8 * (yte == 1).sum()
    assert soft["plain"] > 0.6
    assert hard["plain"] > 2 * hard["plain_area"] and hard["dilated"] > 1.5 * hard["dilated_area"]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_localisation_over_seeds(seed):
    """The > 60 % target on other data and codebook seeds (measured 0.84-0.96; about 2 s per seed)."""
    xtr, ytr, _ = make_shapes(N_TRAIN, 10 * seed)
    xte, yte, mte = make_shapes(N_TEST, 10 * seed + 1)
    model = svm.train_bow_svm(jnp.asarray(xtr), ytr, k=32, key=jax.random.PRNGKey(seed), C=10.0, steps=2000,
                              assignment="soft", beta=2.0)
    s = _localisation(model, jnp.asarray(xte), yte, mte)
    _report(f"soft, seed {seed}", s)
    assert s["plain"] > 0.6


def test_shared_words_distractor_takes_its_share(data, soft_model):
    """When the distractor bar has the square's intensity its edges are the square's visual words: the SVM
    counts them as square evidence and the explanation says so (relevance on the bar), so the square's
    share drops (0.49-0.67 over 5 seeds). Asserted: the bar gets more positive relevance than with the
    distinct bar of the default data."""
    xtr, ytr, _ = make_shapes(N_TRAIN, 0, bar_level=0.8)
    xte, yte, mte = make_shapes(N_TEST, 1, bar_level=0.8)
    model = svm.train_bow_svm(jnp.asarray(xtr), ytr, k=32, key=jax.random.PRNGKey(0), C=10.0, steps=2000,
                              assignment="soft", beta=2.0)
    shared = _localisation(model, jnp.asarray(xte), yte, mte)
    _report("soft, bar with the square's intensity", shared)
    default = _localisation(soft_model, data[2], data[3], data[4])
    bar = lambda s: 1 - s["dilated"]  # relevance away from the square
    assert bar(shared) > bar(default)


# --------------------------------------------------------------------------- transformations

def test_jit_equals_eager_and_batch_equals_single(data, soft_model, hard_model):
    x = data[2][:6]
    for model in (hard_model, soft_model):
        eager = svm.explain_svm(model, x)
        jitted = jax.jit(svm.explain_svm)(model, x)
        spread = jax.jit(svm.explain_svm, static_argnames=("bias", "pixels"))(model, x, bias="spread",
                                                                             pixels="uniform")
        np.testing.assert_allclose(spread.pixels, svm.explain_svm(model, x, bias="spread", pixels="uniform").pixels,
                                   rtol=1e-10, atol=1e-12)
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
