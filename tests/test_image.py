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
    out = im.normalize(r, percentile=None)   # plain linear scaling by the maximum
    assert out.shape == (3, 6, 6)
    np.testing.assert_array_equal(np.sign(out), np.sign(r))
    np.testing.assert_allclose(np.abs(out[:2]).max((1, 2)), 1.0, rtol=1e-6)   # per image
    np.testing.assert_array_equal(out[2], 0)
    np.testing.assert_allclose(out[1], r[1] / np.abs(r[1]).max(), rtol=1e-5)


def test_normalize_modes_and_channels():
    r = np.array([[-2.0, 0.0], [1.0, 4.0]])
    np.testing.assert_allclose(im.normalize(r, "absolute", percentile=None), [[0.5, 0], [0.25, 1]])
    np.testing.assert_allclose(im.normalize(r, "minmax", percentile=None), [[0, 2 / 6], [3 / 6, 1]])
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
    h = im.heatmap(r, percentile=None)
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
    # scale enlarges by pixel repetition
    np.testing.assert_array_equal(im.heatmap(r, scale=3), im.heatmap(r).repeat(3, 0).repeat(3, 1))


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


# --------------------------------------------------------------------------------------------------
# outliers, scale, input tiles, colour bars, method grids, vector output, curve styles

def test_default_percentile_clips_outliers_but_keeps_sparse_maps():
    rng = np.random.default_rng(0)
    r = rng.uniform(0.5, 1.0, (32, 32))
    r[3, 4] = 1e4  # one outlier
    assert im.DEFAULT_PERCENTILE == 99.5
    plain = im.heatmap(r, percentile=None)
    clipped = im.heatmap(r)  # the documented default
    np.testing.assert_array_equal(clipped, im.heatmap(r, percentile=99.5))
    # without clipping the map is white but for the outlier; with it the map shows its structure
    assert (plain[..., 1] > 250).mean() > 0.99
    assert (clipped[..., 1] < 200).mean() > 0.5
    np.testing.assert_array_equal(clipped[3, 4], (255, 0, 0))
    # a sparse map (3 non-zero pixels of 1024): the percentile is taken over the non-zero values, so the
    # pixels keep their colour instead of being clipped to 0
    s = np.zeros((32, 32))
    s[1, 1], s[2, 2], s[3, 3] = 1.0, -2.0, 4.0
    h = im.heatmap(s)
    assert h[3, 3, 0] == 255 and h[3, 3, 1] < 20 and h[2, 2, 2] == 255 and h[2, 2, 0] < 150
    np.testing.assert_array_equal(h[0, 0], (255, 255, 255))
    with pytest.raises(ValueError, match="percentile"):
        im.heatmap(s, percentile=0)


def test_overlay_and_png_scale(tmp_path):
    img = np.linspace(0, 1, 64).reshape(8, 8)
    rel = np.zeros((8, 8))
    rel[3, 3] = 1.0
    out = im.overlay(img, rel)
    np.testing.assert_array_equal(im.overlay(img, rel, scale=3), out.repeat(3, 0).repeat(3, 1))
    im.save_png(tmp_path / "a.png", out, scale=4)
    np.testing.assert_array_equal(im.load_png(tmp_path / "a.png"), out.repeat(4, 0).repeat(4, 1))
    with pytest.raises(ValueError, match="scale"):
        im.save_png(tmp_path / "b.png", out, scale=0)
    with pytest.raises(ValueError, match="scale"):
        im.overlay(img, rel, scale=1.5)


def test_input_tile():
    rng = np.random.default_rng(0)
    # float grayscale, min-max per image, to RGB
    x = rng.normal(size=(2, 5, 6, 1))
    t = im.input_tile(x)
    assert t.shape == (2, 5, 6, 3) and t.dtype == np.uint8
    for i in range(2):
        assert t[i].min() == 0 and t[i].max() == 255
        np.testing.assert_array_equal(t[i, ..., 0], t[i, ..., 2])
    np.testing.assert_array_equal(im.input_tile(x[0, ..., 0]), t[0])  # (H, W) works too
    # uint8 RGB is shown as it is; scale repeats pixels
    u = rng.integers(0, 256, (5, 6, 3)).astype(np.uint8)
    np.testing.assert_array_equal(im.input_tile(u), u)
    np.testing.assert_array_equal(im.input_tile(u, scale=2), u.repeat(2, 0).repeat(2, 1))
    # undo a normalisation: x = (u / 255 - mean) / std
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(im.input_tile((u / 255 - mean) / std, mean=mean, std=std), u, atol=1)
    # channels first, and a fixed range (clipped)
    np.testing.assert_array_equal(im.input_tile(np.moveaxis(u, -1, 0), channels_first=True), u)
    np.testing.assert_array_equal(im.input_tile(np.array([[-1.0, 0.5, 2.0]]), vmin=0, vmax=1)[0, :, 0],
                                  [0, 128, 255])
    with pytest.raises(ValueError, match="input_tile"):
        im.input_tile(np.zeros((2, 3, 4, 5, 6)))


def test_colorbar_runs_from_for_to_against_with_labels():
    bar = im.colorbar("bwr", length=200)
    assert bar.dtype == np.uint8 and bar.ndim == 3
    strip = bar[:, 2].astype(int)  # a column through the colours
    coloured = np.flatnonzero(np.abs(strip - strip.mean(-1, keepdims=True)).sum(-1) > 0)
    top, bottom = strip[coloured.min()], strip[coloured.max()]
    np.testing.assert_array_equal(top, (255, 0, 0))      # +1: evidence for
    np.testing.assert_array_equal(bottom, (0, 0, 255))   # -1: evidence against
    assert coloured.max() - coloured.min() + 1 >= 195
    # ticks and the evidence label are drawn to the right of the bar: text pixels, more with the label
    no_label = im.colorbar("bwr", length=200, label="")
    assert bar.shape[1] > no_label.shape[1] + 10
    assert (bar[:, no_label.shape[1]:].sum(-1) < 200).sum() > 50
    h = im.colorbar("coldnhot", "symmetric", length=120, orientation="horizontal")
    row = h[2].astype(int)
    xs = np.flatnonzero(row.sum(-1) < 765)  # not white
    np.testing.assert_array_equal(row[xs.max()], im.coldnhot(1.0))
    np.testing.assert_array_equal(row[xs.min()], im.coldnhot(-1.0))
    # an unsigned map in absolute mode: [0, 1]
    a = im.colorbar("hot", "absolute", length=50, label="")
    col = a[:, 1].astype(int)
    ys = np.flatnonzero(np.any(col != 255, -1))
    np.testing.assert_array_equal(col[ys.max()], (0, 0, 0))
    with pytest.raises(ValueError, match="orientation"):
        im.colorbar(orientation="diagonal")


def test_add_colorbar_keeps_the_image():
    tile = im.heatmap(np.random.default_rng(0).normal(size=(40, 30)))
    out = im.add_colorbar(tile, pad=5)
    assert out.shape[1] > tile.shape[1] + 5
    ys, xs = np.nonzero((out[:, :tile.shape[1]] != 255).any(-1))
    top = ys.min()
    np.testing.assert_array_equal(out[top:top + 40, :30], tile)
    below = im.add_colorbar(tile, side="bottom")
    ys, xs = np.nonzero((below[:40] != 255).any(-1))
    np.testing.assert_array_equal(below[:40, xs.min():xs.min() + 30], tile)
    assert below.shape[0] > 40 + 10
    with pytest.raises(ValueError, match="span"):
        im.add_colorbar(tile, span=(10, 100))


def _methods(n=2, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return ({"gradient": rng.normal(size=(n, size, size)),
             "integrated_gradients": rng.normal(size=(n, size, size, 3)),
             "LRP epsilon": rng.normal(size=(n, size, size))},
            rng.uniform(size=(n, size, size, 1)))


def test_method_grid_tiles_titles_and_colorbar():
    rel, x = _methods()
    scale, pad = 8, 4
    g = im.method_grid(rel, x, scale=scale, pad=pad)
    plain = im.method_grid(rel, x, scale=scale, pad=pad, colorbar=False)
    assert im.method_grid(rel, x, row_labels=["cat", "dog"], scale=scale, pad=pad).shape[1] > g.shape[1] + 20
    labels = im.grid([[t for t in row] for row in zip(im.input_tile(x), *(im.heatmap(r) for r in rel.values()))],
                     col_labels=["input", *rel], scale=scale, pad=pad)
    np.testing.assert_array_equal(plain, labels)   # the grid is exactly: input tiles, then one heatmap per method
    tw = 16 * scale
    top = plain.shape[0] - (2 * tw + 3 * pad)
    # titles readable at print size: text at least a tenth of a tile high, and each title within its column
    ink = (plain[:top].sum(-1) < 300)
    text_rows = np.flatnonzero(ink.any(1))
    assert text_rows.max() - text_rows.min() + 1 >= tw / 10
    for j in range(4):
        x0 = pad + j * (tw + pad)
        cols = np.flatnonzero(ink[:, x0 - pad:x0 + tw + pad].any(0))
        assert len(cols) > 0, f"column {j} has no title"
    gaps = [pad + j * (tw + pad) - pad // 2 for j in range(1, 4)]
    assert not ink[:, gaps].any(), "titles run into each other"
    # the colour bar, right of the tiles, along the tile rows: red (for) at the top, blue (against) below
    np.testing.assert_array_equal(g[:plain.shape[0], :plain.shape[1]], plain)
    right = g[:, plain.shape[1] + 1:].astype(int)
    colourful = np.abs(right - right.mean(-1, keepdims=True)).sum(-1) > 100
    col = int(np.argmax(colourful.sum(0)))
    ys = np.flatnonzero(colourful[:, col])
    assert ys.min() == top + pad and ys.max() == plain.shape[0] - pad - 1  # spans exactly the tile rows
    np.testing.assert_array_equal(right[ys.min(), col], (255, 0, 0))
    np.testing.assert_array_equal(right[ys.max(), col], (0, 0, 255))
    assert (right[:, col + 1:].sum(-1) < 200).sum() > 100  # tick labels and the evidence label
    with pytest.raises(ValueError, match="same number of samples"):
        im.method_grid({"a": np.zeros((2, 4, 4)), "b": np.zeros((3, 4, 4))})


def test_save_method_grid_vector_and_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (jlrp[plot]) not installed")
    rel, x = _methods()
    svg = im.save_method_grid(tmp_path / "fig.svg", rel, x, row_labels=["cat", "dog"], width=7.0, font_size=8)
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert 'width="504pt"' in text  # 7 inches
    for label in ("input", "gradient", "LRP epsilon", "cat", "dog", "evidence for (+) / against (-)", "against"):
        assert f">{label}<" in text or label in text, label
    assert "font-size: 8px" in text  # 8 pt text (SVG user units are points here)
    assert text.count("<image") == 2 * 4 + 1  # the tiles and the colour bar, embedded as pixels
    pdf = im.save_method_grid(tmp_path / "fig.pdf", rel, x)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and b"/FontFile2" in data  # TrueType fonts embedded (text, not paths)
    png = im.save_method_grid(tmp_path / "fig.png", rel, x, scale=2)
    np.testing.assert_array_equal(im.load_png(png), im.method_grid(rel, x, scale=2))
    with pytest.raises(ValueError, match=".png, .svg or .pdf"):
        im.save_method_grid(tmp_path / "fig.jpg", rel, x)


def test_save_method_grid_without_matplotlib(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rel, x = _methods()
    with pytest.raises(ImportError, match=r"jlrp\[plot\]"):
        im.save_method_grid(tmp_path / "fig.svg", rel, x)
    im.save_method_grid(tmp_path / "fig.png", rel, x)  # PNG needs Pillow only


def test_plot_curves_distinguishable_when_overlapping(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (jlrp[plot]) not installed")
    c = np.linspace(1, 0, 21)
    curves = {"a": c, "b": c, "c": c, "random": np.full(21, 0.5)}  # three curves on top of each other
    fig = im.plot_curves(curves, tmp_path / "c.svg")
    lines = fig.axes[0].lines
    styles = [(str(l.get_linestyle()), l.get_marker()) for l in lines]
    assert len(set(styles)) == 4, styles  # line style and marker differ (also in grayscale)
    assert len({l.get_color() for l in lines}) == 4
    # the markers of the overlapping curves sit at different points
    marked = [set(np.arange(21)[l.get_markevery()[0]::l.get_markevery()[1]]) for l in lines[:3]]
    assert not (marked[0] & marked[1]) and not (marked[0] & marked[2]) and not (marked[1] & marked[2])
    assert all(len(m) >= 3 for m in marked)
    assert "<svg" in (tmp_path / "c.svg").read_text()
    im.plot_curves(curves, tmp_path / "c.pdf")
    assert (tmp_path / "c.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match=".png, .svg or .pdf"):
        im.plot_curves(curves, tmp_path / "c.gif")
