"""The README's showcase (examples/demo.py) runs end to end with --quick settings and writes its four outputs."""
import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import jlrp

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("jlrp_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.main(["--quick", "--out", str(out)])


def test_writes_the_four_files(run):
    out, result = run
    for name in ("heatmaps.png", "curves.png", "results.md", "metrics.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert {p.name for p in result["paths"].values()} == {"heatmaps.png", "curves.png", "results.md", "metrics.csv"}


def test_heatmap_grid_has_a_tile_per_image_and_method(demo, run):
    out, _ = run
    image = jlrp.image.load_png(out / "heatmaps.png")
    rows, scale, pad = demo.QUICK["rows"], demo.parse_args([]).scale, 4
    cols = 2 + len(demo.METHODS)  # input, mask, one column per method
    tile = 32 * scale
    assert image.ndim == 3 and image.shape[2] == 3
    # the tiles plus a label margin (a line of text above, class names on the left)
    top = image.shape[0] - (rows * tile + (rows + 1) * pad)
    left = image.shape[1] - (cols * tile + (cols + 1) * pad)
    assert 0 < top < 40 and 0 < left < 120, image.shape


def test_curve_plot_is_a_readable_png(run):
    out, _ = run
    image = jlrp.image.load_png(out / "curves.png")
    assert image.shape[:2] == (350, 700)  # plot_curves: 7 x 3.5 inches at 100 dpi
    assert image.std() > 0  # not blank


def test_results_table_has_a_row_per_method_with_finite_numbers(demo, run):
    out, result = run
    text = (out / "results.md").read_text()
    for name in demo.METHODS:
        row = re.search(rf"^\| {name} \|(.*)\|$", text, re.M)
        assert row, f"no row for {name}"
        values = [float(v) for v in row.group(1).split("|")]
        assert len(values) == 8 and all(math.isfinite(v) for v in values), row.group(0)
        assert -1.0 <= values[-1] <= 1.0  # the randomised-model rank correlation
    assert "PASS" in text or "FAIL" in text  # the claims are reported
    assert set(result["results"]) == set(demo.METHODS)
    # the sanity check: a map that ignores the model (the fixed-key random baseline) correlates exactly 1
    assert result["results"]["random"]["randomized"] == pytest.approx(1.0)
    assert 0.0 <= result["accuracy"] <= 1.0


def test_methods_option_selects_columns(demo):
    args = demo.parse_args(["--methods", "gradient,random", "--quick"])
    assert args.methods == ["gradient", "random"] and args.batch_size == demo.QUICK["batch_size"]
    with pytest.raises(SystemExit):
        demo.parse_args(["--methods", "gradient,nonsense"])


def test_random_baseline_scores_the_mask_area(demo):
    """Uniform random relevance puts a share of its mass on the mask equal to the mask's area (sanity check
    of the chance level that the claims compare against)."""
    ds = jlrp.datasets.shapes(64, seed=3)
    ctx = demo.Context(None, None, ds.x, 0.0, 1.0, seed=0, ig_steps=2)
    relevance = demo.METHODS["random"].build(ctx)(ds.x, ds.y)
    mass = np.asarray(jlrp.evaluation.relevance_mass_accuracy(relevance, ds.mask)).mean()
    area = np.asarray(jlrp.evaluation.mask_fraction(ds.mask)).mean()
    assert abs(mass - area) < 0.02


def test_metrics_by_category_table(demo, run):
    """The second table: a column per metric of every category, a row per method, finite numbers."""
    out, result = run
    text = (out / "results.md").read_text()
    section = text.split("## By category")[1].split("## Claims")[0]
    header = next(line for line in section.splitlines() if line.startswith("| method |"))
    assert "faithfulness corr." in header and "max-sensitivity" in header and "random logit" in header
    categories = next(line for line in section.splitlines() if line.startswith("| *category* |"))
    for category in ("faithfulness", "robustness", "localisation", "complexity", "randomisation", "axiomatic"):
        assert f"*{category}*" in categories
    for name in demo.METHODS:
        row = re.search(rf"^\| {name} \|(.*)\|$", section, re.M)
        values = [float(v) for v in row.group(1).split("|")]
        assert len(values) == len(demo.category_metrics(demo.parse_args(["--quick"])))
        assert all(math.isfinite(v) for v in values), row.group(0)
    means = result["metrics"].mean()
    # the random baseline ignores the class: its maps for the label and another class are the same
    assert means["random"]["random_logit"] == pytest.approx(1.0)
    assert 0.0 <= means["gradient"]["pointing_game"] <= 1.0
