"""examples/decoder_lm.py (issue 12's example) runs end to end: it trains a small Llama-style decoder on the
embedded text data, explains its next-token verdicts with AttnLRP, CP-LRP and a contrastive pair, and writes
HTML and PNG token heatmaps."""
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import jlrp

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "decoder_lm.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("jlrp_decoder_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("decoder")
    return module, out, module.main([str(out), "--steps", "300", "--show", "4"])


def test_the_model_learns_the_verdict(run):
    _, _, (accuracy, _, _) = run
    assert accuracy > 0.65  # chance: 0.5 (300 steps; the example trains 400 by default)


def test_relevance_falls_on_the_sentiment_words(run):
    module, _, (_, relevance, masks) = run
    assert set(relevance) == {"attnlrp", "cp_lrp", "contrastive"}
    share = masks.mean()
    for name, r in relevance.items():
        assert r.shape == masks.shape == (256, module.SEQ), name
        assert np.all(np.isfinite(r)) and np.abs(r).max() > 0, name
        positive = np.maximum(r, 0)
        mass = (positive * masks).sum() / positive.sum()
        assert mass > 1.3 * share, (name, mass, share)  # the verdict's evidence, not the filler words
    # CP-LRP holds attention weights and gates constant: a different explanation from AttnLRP's
    assert not np.allclose(relevance["attnlrp"], relevance["cp_lrp"], rtol=1e-3)


def test_writes_html_and_png_heatmaps(run):
    module, out, (_, relevance, _) = run
    for name in ("attnlrp", "cp_lrp", "contrastive"):
        html = (out / f"{name}.html").read_text(encoding="utf-8")
        titles = re.findall(r'class="jlrp-tok"[^>]*title="relevance ([^"]+)">([^<]*)<', html)
        assert len(titles) == 4 * module.SEQ and html.count('class="jlrp-text"') == 4, name
        assert "Ġ" not in html  # the byte-level BPE word marker becomes a space
        shown = np.array([float(t) for t, _ in titles]).reshape(4, module.SEQ)
        np.testing.assert_allclose(shown, relevance[name][:4], rtol=1e-3, atol=1e-6)
        image = jlrp.image.load_png(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 20 and image.shape[1] > 100
