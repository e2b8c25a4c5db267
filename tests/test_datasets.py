import numpy as np
import pytest

from jlrp import datasets

GENERATORS = {
    "shapes": lambda seed: datasets.shapes(64, seed=seed),
    "pattern_toy": lambda seed: datasets.pattern_toy(64, seed=seed),
    "fields": lambda seed: datasets.fields(64, seed=seed),
    "text": lambda seed: datasets.text(64, seed=seed),
}


@pytest.mark.parametrize("name", GENERATORS)
def test_deterministic_per_seed(name):
    a, b, c = GENERATORS[name](0), GENERATORS[name](0), GENERATORS[name](1)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    if a.mask is not None:
        np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.x, c.x)


@pytest.mark.parametrize("name, x_shape, x_dtype, mask_shape", [
    ("shapes", (64, 32, 32, 1), np.float32, (64, 32, 32)),
    ("pattern_toy", (64, 2), np.float32, None),
    ("fields", (64, 32, 32, 1), np.float32, (64, 32, 32)),
    ("text", (64, 16), np.int32, (64, 16)),
])
def test_shapes_and_dtypes(name, x_shape, x_dtype, mask_shape):
    d = GENERATORS[name](0)
    assert d.x.shape == x_shape and d.x.dtype == x_dtype
    assert d.y.shape == (64,)
    assert len(d) == 64
    if mask_shape is None:
        assert d.mask is None
    else:
        assert d.mask.shape == mask_shape and d.mask.dtype == bool
    assert np.isfinite(d.x).all()


def test_shapes_balanced_and_masks():
    d = datasets.shapes(200, size=32, seed=3)
    assert d.y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(d.y, minlength=4), [50, 50, 50, 50])
    # Deciding shape: non-empty, and its ring of border pixels free (mask fully inside the image).
    assert (d.mask.sum((1, 2)) >= 10).all()
    border = np.ones((32, 32), bool)
    border[1:-1, 1:-1] = False
    assert not d.mask[:, border].any()
    # Every image has 1 or 2 distractors, never (in these sizes) overlapping the deciding shape.
    dm = d.info["distractor_mask"]
    assert (dm.sum((1, 2)) > 0).all()
    assert not (dm & d.mask).any()
    # Pixel values: shapes bright, background dark, roughly within [0, 1].
    x = d.x[..., 0]
    assert x[d.mask].mean() > 0.6 and abs(x[~d.mask & ~dm].mean()) < 0.05
    assert -1 < x.min() and x.max() < 2


def test_shapes_classes_differ_in_shape_not_brightness():
    # The label must be decided by geometry: mean brightness of the shapes is class independent,
    # while fill fraction of the bounding box differs (square 1 > circle pi/4 > triangle 1/2 > cross).
    d = datasets.shapes(400, seed=0, noise=0.0)
    x = d.x[..., 0]
    bright = [x[d.mask & (d.y == c)[:, None, None]].mean() for c in range(4)]
    assert np.ptp(bright) < 0.05
    fill = []
    for c in range(4):
        m = d.mask[d.y == c]
        rows, cols = m.any(2), m.any(1)
        fill.append(np.mean(m.sum((1, 2)) / (rows.sum(1) * cols.sum(1))))
    assert fill[0] > fill[1] > fill[2] and fill[1] > fill[3], fill


def test_pattern_toy_statistics():
    d = datasets.pattern_toy(20000, seed=0)
    x, y = d.x.astype(np.float64), d.y.astype(np.float64)
    assert y.min() >= -1 and y.max() <= 1
    cov = ((x - x.mean(0)) * (y - y.mean())[:, None]).mean(0)
    # cov(x, y) = a_s var(y) since eps is independent of y.
    np.testing.assert_allclose(cov / y.var(), d.info["a_s"], atol=0.05)
    np.testing.assert_allclose(d.info["a_s"], [1, 0])
    np.testing.assert_allclose(d.info["a_d"], [1, 1])
    np.testing.assert_allclose(d.info["signal"] + d.info["distractor"], d.x, atol=1e-6)
    # The distractor lies along a_d: both coordinates of d are equal, with the requested spread.
    dd = d.info["distractor"]
    np.testing.assert_array_equal(dd[:, 0], dd[:, 1])
    np.testing.assert_allclose(dd[:, 0].std(), 1.0, atol=0.03)
    # w = (1, -1) cancels the distractor and recovers y exactly.
    np.testing.assert_allclose(x @ np.array([1.0, -1.0]), y, atol=1e-5)


def test_pattern_toy_mu_sigma():
    d = datasets.pattern_toy(20000, seed=1, mu=2.0, sigma=0.5)
    eps = d.info["distractor"][:, 1]
    assert abs(eps.mean() - 2.0) < 0.02 and abs(eps.std() - 0.5) < 0.02


def test_fields_labels_and_masks():
    d = datasets.fields(200, seed=0)
    np.testing.assert_array_equal(np.bincount(d.y), [100, 100])
    has = d.mask.any((1, 2))
    np.testing.assert_array_equal(has, d.y == 1)
    area = d.mask[d.y == 1].sum((1, 2))
    sig = d.info["anomaly_sigma"][d.y == 1]
    # Disc of radius 2 sigma, fully inside the image.
    np.testing.assert_allclose(area, np.pi * (2 * sig) ** 2, rtol=0.35)
    c = d.info["anomaly_center"]
    assert np.isnan(c[d.y == 0]).all() and np.isfinite(c[d.y == 1]).all()
    # The anomaly is a local peak: centre minus surrounding annulus (2-3 sigma) is large for
    # label 1, and ~0 at the same places in label-0 fields (smooth background only).
    x, (yy, xx) = d.x[..., 0], np.mgrid[:32, :32]
    pos, neg = np.flatnonzero(d.y == 1), np.flatnonzero(d.y == 0)

    def contrast(i, cy, cx, s):
        r = np.hypot(yy - cy, xx - cx)
        return x[i][r <= r.min() + 0.5].mean() - x[i][(r >= 2 * s) & (r <= 3 * s)].mean()

    peak = [contrast(i, *c[i], d.info["anomaly_sigma"][i]) for i in pos]
    none = [contrast(j, *c[i], d.info["anomaly_sigma"][i]) for i, j in zip(pos, neg)]
    assert np.mean(peak) > 1.2 and np.median(peak) > 1.2
    assert abs(np.mean(none)) < 0.3


def test_fields_background_standardised():
    d = datasets.fields(100, seed=5)
    x0 = d.x[d.y == 0, ..., 0]
    np.testing.assert_allclose(x0.mean((1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(x0.std((1, 2)), 1, atol=1e-3)


def test_text_label_rule():
    d = datasets.text(500, seq_len=16, vocab=50, seed=0)
    pos, neg = np.array(d.info["positive"]), np.array(d.info["negative"])
    assert not set(pos) & set(neg)
    n_pos = np.isin(d.x, pos).sum(1)
    n_neg = np.isin(d.x, neg).sum(1)
    assert (n_pos != n_neg).all()
    np.testing.assert_array_equal(d.y, (n_pos > n_neg).astype(int))
    np.testing.assert_array_equal(d.mask, np.isin(d.x, np.concatenate([pos, neg])))
    np.testing.assert_array_equal(np.bincount(d.y), [250, 250])
    assert d.x.min() >= 1 and d.x.max() < 50
    # Filler words are actually used and span the rest of the vocabulary.
    assert set(np.unique(d.x[~d.mask])) == set(range(9, 50))


def test_text_short_sequences():
    d = datasets.text(100, seq_len=2, vocab=10, seed=0)
    assert (d.mask.sum(1) == 1).all()
    with pytest.raises(ValueError, match="vocab"):
        datasets.text(10, vocab=5)


def test_batches():
    d = datasets.text(10, seed=0)
    b = list(d.batches(4))
    assert [len(xb) for xb, _ in b] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in b]), d.x)
    assert [len(xb) for xb, _ in d.batches(4, drop_last=True)] == [4, 4]
    s1 = list(d.batches(4, seed=1))
    s2 = list(d.batches(4, seed=1))
    ys = np.concatenate([yb for _, yb in s1])
    np.testing.assert_array_equal(ys, np.concatenate([yb for _, yb in s2]))
    xs = np.concatenate([xb for xb, _ in s1])
    assert not np.array_equal(xs, d.x)  # shuffled ...
    np.testing.assert_array_equal(np.sort(xs, 0), np.sort(d.x, 0))  # ... but a permutation
    # x and y stay paired after shuffling.
    order = [np.flatnonzero((d.x == row).all(1))[0] for row in xs]
    np.testing.assert_array_equal(d.y[order], ys)


def test_generation_at_scale():
    """2000 samples of every generator: complete, finite, labelled (speed is measured in benchmarks/, never
    asserted in a test)."""
    for gen in (datasets.shapes, datasets.fields, datasets.text, datasets.pattern_toy):
        d = gen(2000)
        assert len(d) == len(d.y) == 2000, gen.__name__
        assert np.isfinite(d.x).all() and np.isfinite(d.y).all(), gen.__name__
        if d.mask is not None:
            assert d.mask.shape[0] == 2000 and d.mask.any(), gen.__name__
