"""Token heatmaps: sub-word handling, HTML structure and escaping, the PNG, and the HTML rendered by a real
headless Chromium (not blank, legend present)."""
import html.parser
import os
import shutil
import subprocess

import numpy as np
import pytest

import jlrp
from jlrp._src import image as im
from jlrp._src import text as tx

SENTENCE = ["[CLS]", "the", "movie", "was", "un", "##believ", "##ably", "good", ",", "not", "<script>alert(1)</script>",
            "&", "bad", ".", "[SEP]"]
VALUES = np.array([0.0, 0.1, 0.3, -0.05, 0.8, 0.9, 0.4, 1.5, 0.0, -0.9, -1.5, 0.02, -0.3, 0.1, 0.0])


# --------------------------------------------------------------------------------------------------
# tokens

def test_wordpiece():
    assert tx.detect_subwords(SENTENCE) == "wordpiece"
    shown = jlrp.image.display_tokens(SENTENCE)
    assert shown[:9] == [("", "[CLS]"), (" ", "the"), (" ", "movie"), (" ", "was"), (" ", "un"), ("", "believ"),
                         ("", "ably"), (" ", "good"), ("", ",")]
    words, r = jlrp.image.merge_subwords(SENTENCE, VALUES)
    assert words[4] == "unbelievably" and r[4] == pytest.approx(0.8 + 0.9 + 0.4)
    assert words[5:7] == ["good,", "not"]  # punctuation attaches to its word
    assert r.sum() == pytest.approx(VALUES.sum())  # conservation
    assert len(words) == len(r)


def test_byte_level_bpe():
    # "The café was\n great! 😀": é is two bytes in one token, the emoji's 4 bytes are split over two tokens
    tokens = ["The", "Ġcaf", "Ã©", "Ġwas", "Ċ", "Ġgreat", "!", "ĠðŁĺ", "Ģ", "<|endoftext|>"]
    assert tx.detect_subwords(tokens) == "bpe"
    shown = jlrp.image.display_tokens(tokens)
    assert shown == [("", "The"), (" ", "caf"), ("", "é"), (" ", "was"), ("", "↵\n"), (" ", "great"), ("", "!"),
                     (" ", "·"), ("", "\U0001F600"), ("", "<|endoftext|>")]
    words, r = jlrp.image.merge_subwords(tokens, np.arange(10.0))
    assert words == ["The", "café", "was", "↵", "great!", "\U0001F600<|endoftext|>"]
    np.testing.assert_allclose(r, [0, 3, 3, 4, 11, 24])


def test_sentencepiece_raw_and_words():
    assert jlrp.image.display_tokens(["▁The", "▁movie", "s", "▁is", "▁"]) == [
        ("", "The"), (" ", "movie"), ("", "s"), (" ", "is"), ("", "␣")]
    # strings that carry their own whitespace (e.g. decoded pieces)
    assert tx.detect_subwords(["Hello ", "wor", "ld", "!\n", "Next"]) == "raw"
    assert jlrp.image.display_tokens(["Hello ", "wor", "ld", "!\n", "Next"]) == [
        ("", "Hello"), (" ", "wor"), ("", "ld"), ("", "!"), ("\n", "Next")]
    assert jlrp.image.display_tokens(["a", "b", ".", "c"]) == [("", "a"), (" ", "b"), ("", "."), (" ", "c")]
    with pytest.raises(ValueError, match="subwords"):
        jlrp.image.display_tokens(["a"], subwords="bert")


# --------------------------------------------------------------------------------------------------
# HTML

class _Spans(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self.tags, self._in = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "span" and a.get("class") == "jlrp-tok":
            self.spans.append({"style": a["style"], "title": a["title"], "text": ""})
            self._in = True

    def handle_endtag(self, tag):
        self._in = self._in and tag != "span"

    def handle_data(self, data):
        if self._in:
            self.spans[-1]["text"] += data


def test_html_spans_colours_and_escaping():
    page = jlrp.image.token_html(SENTENCE, VALUES, title="a <b>review</b>", percentile=None)
    assert page.startswith("<!DOCTYPE html>") and "<script>" not in page and "<b>review" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&amp;" in page
    p = _Spans()
    p.feed(page)
    assert "script" not in p.tags and "b" not in p.tags  # the token strings never become markup
    assert [s["text"] for s in p.spans] == [core for _, core in jlrp.image.display_tokens(SENTENCE)]
    # colours: the heatmap colours of the values scaled by their maximum (no clipping here)
    expected = im.bwr(VALUES / np.abs(VALUES).max())
    got = [tuple(int(s["style"].split("#")[1][i:i + 2], 16) for i in (0, 2, 4)) for s in p.spans]
    np.testing.assert_array_equal(got, expected)
    assert p.spans[7]["title"] == "relevance +1.5"
    assert 'id="jlrp-legend"' in page and im.EVIDENCE_LABEL in page
    assert 'id="jlrp-legend"' not in jlrp.image.token_html(SENTENCE, VALUES, legend=False)
    # a trailing embedding axis is summed
    assert jlrp.image.token_html(SENTENCE, np.stack([VALUES, 0 * VALUES], -1)) == \
        jlrp.image.token_html(SENTENCE, VALUES)


def test_html_several_texts_and_errors(tmp_path):
    texts = [["a", "b"], ["c", "d", "e"]]
    values = [np.array([1.0, -1.0]), np.array([0.1, 0.2, -0.1])]
    per_text = jlrp.image.token_html(texts, values, legend=False)
    shared = jlrp.image.token_html(texts, values, shared_scale=True, legend=False)
    assert per_text.count('class="jlrp-text"') == 2
    # each text on its own: "d" is the maximum of its text and saturated; on a shared scale it is pale
    assert "#ff0000" in per_text.split("jlrp-text")[-1] and "#ff0000" not in shared.split("jlrp-text")[-1]
    path = jlrp.image.save_token_html(tmp_path / "t.html", texts[0], [1.0, -1.0])
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError, match="does not match 3 tokens"):
        jlrp.image.token_html(["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(TypeError, match="not one string"):
        jlrp.image.token_html("a b c", [1.0, 2.0, 3.0])


def test_token_png(tmp_path):
    img = jlrp.image.token_image(SENTENCE, VALUES, width=500)
    assert img.dtype == np.uint8 and img.shape[1] == 500 and img.shape[2] == 3
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert (255, 0, 0) in colours and (0, 0, 255) in colours  # "good" and the script token, saturated
    assert (img.sum(-1) < 100).mean() > 0.005  # dark text
    no_legend = jlrp.image.token_image(SENTENCE, VALUES, width=500, legend=False)
    assert no_legend.shape[0] < img.shape[0]
    np.testing.assert_array_equal(no_legend[:no_legend.shape[0] - 30], img[:no_legend.shape[0] - 30])
    big = jlrp.image.token_image(SENTENCE, VALUES, width=500, scale=2)
    assert big.shape[1] == 1000 and big.shape[0] > 1.8 * img.shape[0]
    path = jlrp.image.save_token_png(tmp_path / "t.png", SENTENCE, VALUES)
    assert jlrp.image.load_png(path).shape[2] == 3


# --------------------------------------------------------------------------------------------------
# a real browser

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
REQUIRED = bool(os.environ.get("JLRP_REQUIRE_BROWSER") or os.environ.get("CI"))


def _screenshot(page_path, png_path, profile, size=(900, 420)):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
           f"--window-size={size[0]},{size[1]}", f"--screenshot={png_path}", page_path.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert png_path.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return im.load_png(png_path)[..., :3].astype(int)


@pytest.mark.skipif(CHROMIUM is None and not REQUIRED,
                    reason="no chromium binary on PATH: install it with `apt-get install -y chromium` "
                           "(Debian/Ubuntu; .ci/run installs it)")
def test_html_rendered_by_headless_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.fail("JLRP_REQUIRE_BROWSER/CI is set but no chromium binary is on PATH (apt-get install -y chromium)")
    pages = {}
    for legend in (True, False):
        path = jlrp.image.save_token_html(tmp_path / f"legend-{legend}.html", SENTENCE, VALUES, legend=legend,
                                          percentile=None)
        pages[legend] = _screenshot(path, tmp_path / f"legend-{legend}.png", tmp_path / f"profile-{legend}")
    shot, plain = pages[True], pages[False]
    assert shot.shape == plain.shape and shot.shape[0] >= 400

    def red(a):
        return (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)

    def blue(a):
        return (a[..., 2] > 200) & (a[..., 0] < 60) & (a[..., 1] < 60)

    dark = shot.sum(-1) < 200
    # not blank: the saturated tokens ("good" red, the script token blue) and dark text are on the page
    assert red(plain).sum() > 100 and blue(plain).sum() > 100, "the token colours are missing"
    assert dark.sum() > 200, "no text rendered"
    # the legend: the only difference between the two screenshots, below the tokens
    differ = np.abs(shot - plain).sum(-1) > 30
    assert differ.any(), "the legend is not rendered"
    rows = np.flatnonzero(differ.any(1))
    token_rows = np.flatnonzero((red(plain) | blue(plain)).any(1))
    assert rows.min() > token_rows.max(), "the legend overlaps the tokens"
    # its colour bar: a row whose colours run from blue (against) through white to red (for)
    colourful = (np.abs(shot - shot.mean(-1, keepdims=True)).sum(-1) > 60) & differ
    bar_row = int(np.argmax(colourful.sum(1)))
    xs = np.flatnonzero(colourful[bar_row])
    assert len(xs) > 150, "no colour bar in the legend"
    line = shot[bar_row]
    left, right = line[xs.min() + 2], line[xs.max() - 2]
    assert left[2] > 200 and left[0] < 60, f"the bar should start blue (against), got {left}"
    assert right[0] > 200 and right[2] < 60, f"the bar should end red (for), got {right}"
    middle = line[(xs.min() + xs.max()) // 2]
    assert middle.min() > 200, f"the bar's middle should be white (0), got {middle}"
    # and its text (tick labels and the label) below the bar
    assert (dark & differ)[bar_row + 1:].sum() > 100, "the legend has no text"
