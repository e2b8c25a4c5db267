"""Tests for perturbation curves, AOPC and localisation scores (jlrp._src.evaluation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlrp._src import evaluation as ev

# Hand case: 4x4 single-channel image, linear model f_0 = sum(w * x), plus a second class f_1 = sum(x) / 100
# that overtakes f_0 during MoRF: with target=None the tracked class must stay the initial argmax (0).
X = np.arange(1, 17, dtype=np.float32).reshape(1, 4, 4, 1)
W = np.array([[1, -1, 2, 0], [0, 3, -2, 1], [1, 1, -1, 2], [-3, 0, 1, 1]], np.float32).reshape(1, 4, 4, 1)
R = np.array([[3, 15, 0, 7], [12, 1, 9, 4], [6, 14, 2, 11], [8, 5, 13, 10]], np.float32).reshape(1, 4, 4, 1)


def linear2(x):
    return jnp.stack([(x * W).sum((1, 2, 3)), x.sum((1, 2, 3)) / 100], -1)


def numpy_curve(x, w, rel, order, value):
    """Independent reference: flip pixels one at a time in a Python loop, re-evaluate sum(w * x)."""
    x = x.ravel().copy()
    idx = np.argsort(-rel.ravel() if order == "morf" else rel.ravel(), kind="stable")
    out = [float((w.ravel() * x).sum())]
    for i in idx:
        x[i] = value
        out.append(float((w.ravel() * x).sum()))
    return np.array(out)


# Region = 2: quadrant relevance TL 31, TR 20, BL 33, BR 36; quadrant contributions w*x: TL 17, TR 0, BL -20,
# BR 44 (f = 41); quadrant weight sums: TL 3, TR 1, BL -1, BR 3. MoRF = BR, BL, TL, TR; LeRF the reverse.
HAND_REGION2 = {
    ("morf", "zero"): [41, -3, 17, 0, 0],
    ("lerf", "zero"): [41, 41, 24, 44, 0],
    ("morf", 2.0): [41, 3, 21, 10, 12],  # replacing a quadrant by 2 changes f by 2 * sum(w) - contribution
    ("lerf", 2.0): [41, 43, 32, 50, 12],
}
HAND_AOPC = {("morf", "zero"): 30.0, ("lerf", "zero"): 11.0, ("morf", 2.0): 23.6, ("lerf", 2.0): 5.4}


@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("baseline", ["zero", 2.0])
def test_hand_case_region2(order, baseline):
    curve = ev.perturbation_curve(linear2, X, R, order=order, region=2, baseline=baseline)
    np.testing.assert_array_equal(np.asarray(curve), [HAND_REGION2[order, baseline]])
    np.testing.assert_allclose(ev.aopc(curve), [HAND_AOPC[order, baseline]], rtol=1e-6)


@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("baseline", ["zero", 2.0])
def test_hand_case_region1(order, baseline):
    curve = ev.pixel_flipping(linear2, X, R, order=order, baseline=baseline)
    ref = numpy_curve(X, W, R, order, 0.0 if baseline == "zero" else baseline)
    assert curve.shape == (1, 17)
    np.testing.assert_array_equal(np.asarray(curve)[0], ref)
    np.testing.assert_allclose(ev.aopc(curve), [(ref[0] - ref).mean()], rtol=1e-6)


def test_hand_case_first_steps_literal():  # also: steps= cuts the curve short
    # MoRF pixel order by R: 15 at (0,1) [w*x = -2], 14 at (2,1) [10], 13 at (3,2) [15], 12 at (1,0) [0]
    curve = ev.pixel_flipping(linear2, X, R, baseline="zero", steps=4)
    np.testing.assert_array_equal(np.asarray(curve), [[41, 43, 33, 18, 18]])


def test_targets_and_layouts():
    # target=1 tracks the other logit; NHW input and (N, H, W) relevance for NHWC input give the same curves
    c1 = ev.perturbation_curve(linear2, X, R, target=1, region=2, baseline="zero")
    np.testing.assert_allclose(np.asarray(c1), [[1.36, 0.82, 0.36, 0.22, 0.0]], rtol=1e-5)
    c_hw = ev.perturbation_curve(linear2, X, R[..., 0], region=2, baseline="zero")
    np.testing.assert_array_equal(np.asarray(c_hw), [HAND_REGION2["morf", "zero"]])
    nhw = ev.perturbation_curve(lambda x: linear2(x[..., None]), X[..., 0], R[..., 0], region=2, baseline="zero")
    np.testing.assert_array_equal(np.asarray(nhw), [HAND_REGION2["morf", "zero"]])
    # channels of relevance are summed per pixel before ranking
    r2 = np.concatenate([R + 100, -100 * np.ones_like(R)], -1)
    x2 = np.repeat(X, 2, -1) / 2
    c2 = ev.perturbation_curve(lambda x: linear2(x.sum(-1, keepdims=True)), x2, r2, region=2, baseline="zero")
    np.testing.assert_array_equal(np.asarray(c2), [HAND_REGION2["morf", "zero"]])


def test_feature_vectors():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    rel = x * w
    f = lambda v: jnp.stack([v @ w, -(v @ w)], -1)
    curve = ev.perturbation_curve(f, x, rel, target=0, region=3, baseline="zero")  # regions 0-2,3-5,6-8,9
    assert curve.shape == (3, 5)
    for n in range(3):
        contrib = rel[n]
        regions = [contrib[0:3].sum(), contrib[3:6].sum(), contrib[6:9].sum(), contrib[9:].sum()]
        order = np.argsort(-np.array(regions), kind="stable")
        ref = np.concatenate([[contrib.sum()], contrib.sum() - np.cumsum(np.array(regions)[order])])
        np.testing.assert_allclose(np.asarray(curve[n]), ref, rtol=1e-5, atol=1e-5)
    # a model with one score per row (regression) needs no target; a traced target works under jit
    np.testing.assert_allclose(np.asarray(ev.perturbation_curve(lambda v: v @ w, x, rel, region=3, baseline="zero")),
                               np.asarray(curve), rtol=1e-6)
    traced = jax.jit(lambda t: ev.perturbation_curve(f, x, rel, t, region=3, baseline="zero"))(jnp.array([1, 1, 0]))
    np.testing.assert_allclose(np.asarray(traced), np.asarray(curve) * np.array([[-1], [-1], [1]]), rtol=1e-6)


def _small_model(rng, c_in=1, classes=3):
    k = rng.normal(size=(3, 3, c_in, 4)).astype(np.float32) * 0.5
    d = rng.normal(size=(4, classes)).astype(np.float32) * 0.5

    def f(x):
        h = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(h).mean((1, 2)) @ d
    return f


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(1)  # numpy: jax.random would add compiles to the test time
    x = rng.normal(size=(3, 6, 6, 2)).astype(np.float32)
    rel = rng.normal(size=(3, 6, 6, 2)).astype(np.float32)
    return _small_model(rng, c_in=2), x, rel


def test_jit_equals_eager(setup):
    f, x, rel = setup
    kw = dict(order="morf", region=3, baseline="mean", chunk_size=2)  # 2 scanned chunks + a remainder
    jitted = jax.jit(lambda x, r: ev.perturbation_curve(f, x, r, **kw))(x, rel)
    with jax.disable_jit():
        eager = ev.perturbation_curve(f, x, rel, **kw)
    assert jitted.shape == (3, 5)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)


def test_batch_equals_single_and_chunking(setup, monkeypatch):
    f, x, rel = setup
    full = ev.perturbation_curve(f, x, rel, region=(2, 3), baseline="blur")  # 3 x 2 regions, 7 steps
    assert full.shape == (3, 7)
    for n in range(3):
        single = ev.perturbation_curve(f, x[n:n + 1], rel[n:n + 1], region=(2, 3), baseline="blur")
        np.testing.assert_allclose(np.asarray(single[0]), np.asarray(full[n]), rtol=1e-5, atol=1e-5)
    for chunk in (1, 3):  # 1 -> a scan over 7 steps; 3 -> two scanned chunks and a remainder of 1
        chunked = ev.perturbation_curve(f, x, rel, region=(2, 3), baseline="blur", chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-5, atol=1e-5)
    # the automatic chunk size bounds the inputs held at once (here forced down to one step per chunk)
    monkeypatch.setattr(ev, "_AUTO_CHUNK_VALUES", 100)
    np.testing.assert_allclose(np.asarray(ev.perturbation_curve(f, x, rel, region=(2, 3), baseline="blur")),
                               np.asarray(full), rtol=1e-5, atol=1e-5)
    # explicit targets equal the argmax default
    tgt = jnp.argmax(f(x), -1)
    np.testing.assert_allclose(np.asarray(ev.perturbation_curve(f, x, rel, tgt, region=(2, 3), baseline="blur")),
                               np.asarray(full), rtol=1e-6)


def test_random_order_reproducible(setup):
    f, x, rel = setup
    run = lambda k: np.asarray(ev.perturbation_curve(f, x, rel, order="random", region=2, key=jax.random.key(k)))
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(a[:, [0, -1]], c[:, [0, -1]], rtol=1e-5, atol=1e-6)  # same start, same end
    # the random order ignores the relevance
    np.testing.assert_array_equal(a, np.asarray(ev.perturbation_curve(f, x, -rel, order="random", region=2,
                                                                       key=jax.random.key(0))))


def test_baselines():
    # a probe model whose logits are the pixels: the curve of pixel t ends at the baseline value of pixel t
    x = np.random.default_rng(3).normal(size=(2, 4, 4, 2)).astype(np.float32)
    probe = lambda v: v.reshape(v.shape[0], -1)
    rel = jnp.ones_like(x)
    end = lambda b, **kw: np.asarray(ev.perturbation_curve(probe, x, rel, target=5, baseline=b, **kw))
    mean = end("mean")
    np.testing.assert_allclose(mean[:, 0], np.asarray(x[:, 0, 2, 1]), rtol=1e-6)
    np.testing.assert_allclose(mean[:, -1], np.asarray(x[..., 1].mean((1, 2))), rtol=1e-5)  # pixel 5 = channel 1
    # all regions tie: index order, so pixel (0, 2) goes at step 3, not before
    assert (mean[:, 2] == mean[:, 0]).all() and (mean[:, 3] != mean[:, 0]).all()
    np.testing.assert_allclose(end(-1.5)[:, -1], -1.5)
    np.testing.assert_allclose(end("zero")[:, -1], 0.0)
    u = end("uniform", key=jax.random.key(0))[:, -1]
    lo, hi = np.asarray(x.min((1, 2, 3))), np.asarray(x.max((1, 2, 3)))
    assert ((u >= lo) & (u <= hi)).all() and not np.allclose(u, end("uniform", key=jax.random.key(1))[:, -1])
    blurred = end("blur")[:, -1]  # a gaussian average: strictly inside the channel's range, not the pixel value
    ch = np.asarray(x[..., 1]).reshape(2, -1)
    assert ((blurred > ch.min(1)) & (blurred < ch.max(1))).all()
    assert not np.allclose(blurred, mean[:, 0])


def test_linear_model_morf_beats_random_beats_lerf():
    # For a linear model with a zero baseline, relevance w * x are the exact contributions: MoRF removes
    # the largest partial sums first, so its AOPC is the maximum over all orders and LeRF's the minimum.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 8, 8, 1)).astype(np.float32)
    w = rng.normal(size=(1, 8, 8, 1)).astype(np.float32)
    f = lambda v: jnp.stack([(v * w).sum((1, 2, 3)), jnp.zeros(v.shape[0])], -1)
    rel, kr = x * w, jax.random.key(0)
    for region in (2,):  # region=1 curves are checked exactly in the hand cases
        kw_ = dict(region=region, baseline="zero", target=0)
        a = {o: ev.aopc(ev.perturbation_curve(f, x, rel, order=o, key=kr, **kw_)) for o in ("morf", "random", "lerf")}
        assert (a["morf"] >= a["random"] - 1e-4).all() and (a["random"] >= a["lerf"] - 1e-4).all()
        assert (a["morf"] > a["lerf"] + 1e-2).all()
        np.testing.assert_allclose(ev.aopc_difference(ev.perturbation_curve(f, x, rel, order="morf", **kw_),
                                                      ev.perturbation_curve(f, x, rel, order="lerf", **kw_)),
                                   a["morf"] - a["lerf"], rtol=1e-5, atol=1e-5)
        # a wrong explanation (negated) is worse than random
        neg = ev.aopc(ev.perturbation_curve(f, x, -rel, order="morf", **kw_))
        np.testing.assert_allclose(neg, a["lerf"], rtol=1e-5, atol=1e-5)


def test_normalized_aopc():
    morf = np.array([HAND_REGION2["morf", "zero"]], np.float32)
    lerf = np.array([HAND_REGION2["lerf", "zero"]], np.float32)
    np.testing.assert_allclose(ev.normalized_aopc(morf), [30 / 44], rtol=1e-6)  # range 41 - (-3)
    np.testing.assert_allclose(ev.normalized_aopc(morf, lerf), [(30 - 11) / 47], rtol=1e-6)  # lerf reaches 44
    # invariant to the score's scale and offset (comparable across models / temperatures)
    np.testing.assert_allclose(ev.normalized_aopc(3 * morf - 7, 3 * lerf - 7), [(30 - 11) / 47], rtol=1e-5)
    # a flat curve: 0, not NaN; a rising curve is negative and bounded by the range (no blow-up)
    np.testing.assert_array_equal(ev.normalized_aopc(np.array([[1.0, 1.0, 1.0]])), [0.0])
    np.testing.assert_allclose(ev.normalized_aopc(np.array([[1.0, 1.0, 2.0]])), [-1 / 3], rtol=1e-6)
    np.testing.assert_allclose(ev.normalized_aopc(np.array([[1.0, 0.99, 5.0]])), [(0.01 - 4) / 3 / 4.01], rtol=1e-5)


def test_localisation_hand_cases():
    mask = np.zeros((1, 4, 4), bool)
    mask[:, :2] = True  # top half
    inside = np.zeros((1, 4, 4, 1), np.float32)
    inside[0, 0, 1, 0], inside[0, 1, 3, 0] = 2.0, 1.0
    inside[0, 3, 0, 0] = -5.0  # negative relevance outside does not count
    np.testing.assert_allclose(ev.relevance_mass_accuracy(inside, mask), [1.0])
    half = inside.copy()
    half[0, 2, 2, 0] = 3.0
    np.testing.assert_allclose(ev.relevance_mass_accuracy(half, mask), [0.5])
    zero = ev.relevance_mass_accuracy(np.zeros((1, 4, 4, 1)), mask)
    assert np.asarray(zero).tolist() == [0.0]
    # channels are summed per pixel first: +4 and -4 on one outside pixel cancel
    two_ch = np.concatenate([inside, np.zeros_like(inside)], -1)
    two_ch[0, 3, 3] = [4.0, -4.0]
    np.testing.assert_allclose(ev.relevance_mass_accuracy(two_ch, mask[..., None]), [1.0])
    # batched, jit-able
    both = jax.jit(ev.relevance_mass_accuracy)(np.concatenate([inside, half]), np.concatenate([mask, mask]))
    np.testing.assert_allclose(both, [1.0, 0.5])
    np.testing.assert_allclose(ev.mask_fraction(mask), [0.5])


def test_rank_accuracy_hand_case():
    mask = np.zeros((1, 3, 3), bool)
    mask[0, 0, :] = True  # K = 3 pixels: the top row
    rel = np.array([[9, 1, 0], [8, 7, 0], [0, 0, 0]], np.float32)[None]  # top 3: 9 (in), 8, 7 (out)
    np.testing.assert_allclose(ev.relevance_rank_accuracy(rel, mask), [1 / 3])
    rel2 = np.array([[9, 8, 7], [1, 0, 0], [0, 0, 0]], np.float32)[None]
    np.testing.assert_allclose(ev.relevance_rank_accuracy(rel2, mask), [1.0])
    # ties broken by pixel index: all-zero relevance picks the first K pixels (the top row here)
    np.testing.assert_allclose(ev.relevance_rank_accuracy(np.zeros((1, 3, 3)), mask), [1.0])
    np.testing.assert_allclose(ev.relevance_rank_accuracy(rel, np.zeros_like(mask)), [0.0])  # empty mask
    np.testing.assert_allclose(ev.mask_fraction(mask), [1 / 3])


def test_evaluate_dataset(setup):
    f, x, rel = setup
    explain = lambda xb, yb: xb * 0.5 + 1.0
    mask = np.zeros(x.shape[:3], bool)
    mask[:, :3] = True
    y = np.array([0, 1, 2])
    batches = [(x[i:i + 1], y[i:i + 1], mask[i:i + 1]) for i in range(3)]
    res = ev.evaluate_dataset(explain, f, batches, progress=False, region=2)
    assert res["curve_morf"].shape == (3, 10) and res["aopc_lerf"].shape == (3,)
    ref = ev.perturbation_curve(f, x, explain(x, y), y, region=2)
    np.testing.assert_allclose(res["curve_morf"], np.asarray(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["aopc_difference"], res["aopc_morf"] - res["aopc_lerf"], rtol=1e-6)
    np.testing.assert_allclose(res["relevance_mass_accuracy"], ev.relevance_mass_accuracy(explain(x, y), mask))
    np.testing.assert_allclose(res["mean"]["mask_fraction"], 0.5)
    np.testing.assert_allclose(res["mean"]["aopc_morf"], res["aopc_morf"].mean(), rtol=1e-6)


def test_errors(setup):
    f, x, rel = setup
    with pytest.raises(ValueError, match="key"):
        ev.perturbation_curve(f, x, rel, order="random")
    with pytest.raises(ValueError, match="steps"):
        ev.perturbation_curve(f, x, rel, region=2, steps=10)
    with pytest.raises(ValueError, match="out of range"):
        ev.perturbation_curve(f, x, rel, target=3)
    with pytest.raises(ValueError, match="shape"):
        ev.perturbation_curve(f, x, rel[..., :1])
