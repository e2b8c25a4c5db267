import numpy as np
import pytest

from jlrp._src import image as im

SIGNED = ["bwr", "seismic", "coldnhot"]
V = np.linspace(0, 1, 101)


@pytest.mark.parametrize("name, neutral", [("bwr", (255, 255, 255)), ("seismic", (255, 255, 255)),
                                           ("coldnhot", (0, 0, 0))])
def test_signed_maps_neutral_and_symmetric(name, neutral):
    cm = im.get_colormap(name)
    assert cm.signed
    np.testing.assert_array_equal(cm(0.0), neutral)
    np.testing.assert_array_equal(cm(-V), cm(V)[..., ::-1])   # red <-> blue mirror
    # Positive side is reddish, negative side bluish.
    pos, neg = cm(V[1:]).astype(int), cm(-V[1:]).astype(int)
    assert (pos[:, 0] >= pos[:, 2]).all() and (pos[:, 0] > pos[:, 2]).any()
    assert (neg[:, 2] >= neg[:, 0]).all()


@pytest.mark.parametrize("name, lo, hi", [
    ("bwr", (0, 0, 255), (255, 0, 0)),
    ("seismic", (0, 0, 128), (128, 0, 0)),
    ("coldnhot", (0, 255, 255), (255, 255, 0)),
    ("gray", (0, 0, 0), (255, 255, 255)),
    ("hot", (0, 0, 0), (255, 255, 255)),
])
def test_endpoints(name, lo, hi):
    cm = im.COLORMAPS[name]
    out = cm(np.array([-1.0 if cm.signed else 0.0, 1.0]))
    assert out.dtype == np.uint8 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, [lo, hi])
    # Out-of-range values clip to the endpoints.
    np.testing.assert_array_equal(cm(np.array([-5.0, 5.0])), [lo, hi])


def test_midpoints():
    np.testing.assert_array_equal(im.bwr(0.5), (255, 128, 128))
    np.testing.assert_array_equal(im.seismic(-0.5), (0, 0, 255))
    np.testing.assert_array_equal(im.coldnhot(-0.5), (0, 0, 255))
    np.testing.assert_array_equal(im.hot(1 / 3), (255, 0, 0))
    np.testing.assert_array_equal(im.hot(2 / 3), (255, 255, 0))
    np.testing.assert_array_equal(im.gray(0.5), (128, 128, 128))
    # Monotone brightness for the sequential maps.
    for cm in (im.gray, im.hot):
        assert (np.diff(cm(V).astype(int).sum(-1)) >= 0).all()


def test_get_colormap_errors():
    assert im.get_colormap("hot") is im.hot
    assert im.get_colormap(im.bwr) is im.bwr
    with pytest.raises(ValueError, match="bwr.*coldnhot"):
        im.get_colormap("jet")


@pytest.mark.parametrize("mode", ["symmetric", "absolute", "minmax"])
@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 3), (4, 8, 8), (4, 8, 8, 1)])
def test_normalize_zero_input(mode, shape):
    out = im.normalize(np.zeros(shape), mode=mode)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, 0)
    out = im.normalize(np.zeros(shape), mode=mode, percentile=99)
    np.testing.assert_array_equal(out, 0)


def test_normalize_symmetric_per_image():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 6, 6)) * np.array([1.0, 100.0, 0.0])[:, None, None]
    r[0, 0, 0] = 0.0
    out = im.normalize(r)
    assert out.shape == (3, 6, 6)
    np.testing.assert_array_equal(np.sign(out), np.sign(r))
    np.testing.assert_allclose(np.abs(out[:2]).max((1, 2)), 1.0, rtol=1e-6)   # per image
    np.testing.assert_array_equal(out[2], 0)
    np.testing.assert_allclose(out[1], r[1] / np.abs(r[1]).max(), rtol=1e-5)


def test_normalize_modes_and_channels():
    r = np.array([[-2.0, 0.0], [1.0, 4.0]])
    np.testing.assert_allclose(im.normalize(r, "absolute"), [[0.5, 0], [0.25, 1]])
    np.testing.assert_allclose(im.normalize(r, "minmax"), [[0, 2 / 6], [3 / 6, 1]])
    # Channels are summed before normalising.
    rc = np.stack([r, r, -0.5 * r], -1)
    np.testing.assert_allclose(im.normalize(rc), im.normalize(r), rtol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        im.normalize(r, mode="foo")


def test_normalize_percentile_clips_outliers():
    r = np.ones((10, 10))
    r[0, 0] = 1000.0
    assert im.normalize(r)[5, 5] < 0.01
    out = im.normalize(r, percentile=95)
    np.testing.assert_allclose(out, 1.0)


def test_heatmap_shapes():
    rng = np.random.default_rng(0)
    for shape, expect in [((8, 9), (8, 9, 3)), ((8, 9, 3), (8, 9, 3)), ((5, 8, 9), (5, 8, 9, 3)),
                          ((5, 8, 9, 1), (5, 8, 9, 3))]:
        h = im.heatmap(rng.normal(size=shape))
        assert h.shape == expect and h.dtype == np.uint8
    # The largest positive value is pure red, zero is white, for bwr.
    r = np.zeros((4, 4))
    r[1, 2] = 3.0
    r[2, 2] = -1.5
    h = im.heatmap(r)
    np.testing.assert_array_equal(h[1, 2], (255, 0, 0))
    np.testing.assert_array_equal(h[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(h[2, 2], (128, 128, 255))
    # Batched heatmaps equal per-image heatmaps.
    b = rng.normal(size=(3, 6, 6, 2))
    np.testing.assert_array_equal(im.heatmap(b, "coldnhot"), [im.heatmap(x, "coldnhot") for x in b])
    # Ambiguous 3-D input: narrow last axis = channels, unless told otherwise.
    assert im.heatmap(b[0]).shape == (6, 6, 3)
    assert im.heatmap(b[0], channels=False).shape == (6, 6, 2, 3)
    # Signed data on an unsigned map uses the full range: 0 -> middle gray.
    np.testing.assert_array_equal(im.heatmap(r, "gray")[0, 0], (128, 128, 128))


def test_overlay():
    img = np.linspace(0, 10, 64).reshape(8, 8)
    rel = np.zeros((8, 8))
    rel[3, 3] = 1.0
    out = im.overlay(img, rel, alpha=0.5)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    # Without relevance the scaled grayscale image shows through unchanged.
    np.testing.assert_array_equal(out[0, 0], (0, 0, 0))
    np.testing.assert_array_equal(out[7, 7], (255, 255, 255))
    g = round(255 * img[3, 3] / 10)
    np.testing.assert_allclose(out[3, 3], [round((g + 255) / 2), round(g / 2), round(g / 2)], atol=1)
    flat = im.overlay(img, rel, alpha=0.5, weighted=False)
    np.testing.assert_array_equal(flat[0, 0], (128, 128, 128))  # black blended with white
    batch = im.overlay(np.stack([img, img])[..., None], np.stack([rel, -rel])[..., None])
    assert batch.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(batch[1, 3, 3], batch[0, 3, 3][::-1])
    rgb = im.overlay(np.repeat(img[..., None], 3, -1), np.repeat(rel[..., None], 3, -1))
    np.testing.assert_array_equal(rgb, out)
    with pytest.raises(ValueError, match="does not match"):
        im.overlay(np.zeros((7, 8)), rel)


def test_grid_size_arithmetic():
    tile = np.zeros((5, 7, 3), np.uint8)
    g = im.grid([[tile] * 4] * 3, pad=2, scale=3)
    assert g.shape == (3 * 15 + 4 * 2, 4 * 21 + 5 * 2, 3) and g.dtype == np.uint8
    # Tile placement: first tile starts after the padding, padding stays white.
    assert (g[:2] == 255).all() and (g[:, :2] == 255).all()
    assert (g[2:17, 2:23] == 0).all()
    # Arrays of shape (rows, cols, H, W) of grayscale tiles work too.
    g2 = im.grid(np.zeros((2, 3, 5, 7), np.uint8), pad=0)
    assert g2.shape == (10, 21, 3)


def test_grid_labels_add_margins():
    tile = np.zeros((8, 8, 3), np.uint8)
    plain = im.grid([[tile, tile], [tile, tile]], pad=2)
    lab = im.grid([[tile, tile], [tile, tile]], row_labels=["a", "bbbbbb"], col_labels=["x", "y"], pad=2)
    assert lab.shape[0] > plain.shape[0] and lab.shape[1] > plain.shape[1]
    # Text is drawn (some dark pixels in the margins), tiles are not covered.
    top = lab.shape[0] - plain.shape[0]
    left = lab.shape[1] - plain.shape[1]
    assert (lab[:top] < 128).any() and (lab[:, :left] < 128).any()
    np.testing.assert_array_equal(lab[top:, left:], plain)
    with pytest.raises(ValueError, match="labels"):
        im.grid([[tile]], row_labels=["a", "b"])
    with pytest.raises(TypeError, match="uint8"):
        im.grid([[tile.astype(float)]])


@pytest.mark.parametrize("shape", [(6, 5, 3), (6, 5), (6, 5, 4)])
def test_png_round_trip(tmp_path, shape):
    a = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    path = tmp_path / "sub" / "a.png"
    im.save_png(path, a)
    b = im.load_png(path)
    assert b.dtype == np.uint8
    np.testing.assert_array_equal(b, a)
    with pytest.raises(TypeError):
        im.save_png(tmp_path / "b.png", a.astype(np.float32))


def test_plot_curves(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (jlrp[plot]) not installed")
    path = tmp_path / "curves.png"
    im.plot_curves({"lrp": np.linspace(1, 0, 11), "random": np.full(11, 0.5)}, path,
                   xlabel="fraction removed", ylabel="score", title="pixel flipping",
                   x=np.linspace(0, 1, 11))
    img = im.load_png(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 10  # not blank


def test_plot_curves_without_matplotlib(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # makes the import fail
    with pytest.raises(ImportError, match=r"install jlrp\[plot\] for plots"):
        im.plot_curves({"a": np.zeros(3)}, tmp_path / "x.png")
