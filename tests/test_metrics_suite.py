"""The evaluation entry point (jlrp/_src/metrics_suite.py): methods x metrics over streamed batches equal
the metrics called directly, the table is written as Markdown / CSV / PNG, and batches share programs."""
import csv
import io
import math

import jax
import numpy as np
import pytest

from jlrp import evaluation as E
from test_metrics_common import H, N, W, X, Y, model_jax
from test_metrics_randomisation import PARAMS, compilations, mlp, mlp_grad

RNG = np.random.default_rng(3)
MASK = RNG.uniform(size=(2 * N, H, W)) < 0.3
XS = np.concatenate([X, X[::-1] + 0.1])
YS = np.concatenate([Y, Y[::-1]])


def model_mlp(x):
    return mlp(PARAMS, x)


def gradient_mlp(x, y):
    return mlp_grad(PARAMS, x, y)


def input_x_gradient_mlp(x, y):
    return x * mlp_grad(PARAMS, x, y)


def test_evaluate_equals_direct_calls(tmp_path):
    from jlrp._src.metrics_suite import _jitted

    methods = {"gradient": gradient_mlp, "input_x_gradient": input_x_gradient_mlp}
    metrics = ["faithfulness_correlation", "sparseness", "pointing_game", "completeness",
               E.metric("max_sensitivity", samples=3)]
    batches = [(XS[:N], YS[:N], MASK[:N]), (XS[N:], YS[N:], None)]  # the second batch has no mask
    key = jax.random.key(7)
    lines = []
    res = E.evaluate(model_mlp, methods, batches, metrics=metrics, key=key, progress=False, out=tmp_path, plot=True,
                     log=lines.append)
    assert len(lines) == 4 and "batch 1" in lines[-1]
    # the function objects evaluate() hands to the metrics (jitted once per function): the direct calls
    # below reuse its compiled programs instead of compiling each metric again
    model = _jitted(model_mlp)
    for name, method in methods.items():
        explain = _jitted(method)
        scores = res.per_sample[name]
        want = {k: [] for k in ("faithfulness_correlation", "sparseness", "completeness", "max_sensitivity")}
        for b, (x, y, _) in enumerate(batches):
            r = explain(x, y)
            k = lambda j: jax.random.fold_in(jax.random.fold_in(key, b), j)
            want["faithfulness_correlation"].append(E.faithfulness_correlation(
                model, x, r, y, key=k(0), subset_size=max(1, min(224, r[0].size // 4))))
            want["sparseness"].append(E.sparseness(r))
            want["completeness"].append(np.abs(E.completeness(model, x, r, y)))
            want["max_sensitivity"].append(E.max_sensitivity(explain, x, y, r, key=k(4), samples=3))
        for metric_name, parts in want.items():
            np.testing.assert_allclose(scores[metric_name], np.concatenate(parts), rtol=1e-10, atol=1e-12)
        # localisation only where a mask came with the batch
        np.testing.assert_array_equal(scores["pointing_game"], E.pointing_game(explain(XS[:N], YS[:N]), MASK[:N]))
    means = res.mean()
    assert math.isclose(means["gradient"]["sparseness"], float(np.mean(res.per_sample["gradient"]["sparseness"])))
    table = res.markdown()
    assert table.splitlines()[0].startswith("| method | faithfulness corr. ↑ | sparseness ↑ | pointing game ↑")
    assert "| *category* | *faithfulness* | *complexity* | *localisation*" in table
    rows = list(csv.reader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert rows[0] == ["method", "faithfulness_correlation", "sparseness", "pointing_game", "completeness",
                       "max_sensitivity"]
    assert float(rows[1][2]) == pytest.approx(means["gradient"]["sparseness"], rel=1e-12)
    assert (tmp_path / "results.md").read_text().strip() == table
    assert (tmp_path / "results.png").stat().st_size > 0


def test_randomisation_metric_with_params():
    explain = lambda p, x, y: mlp_grad(p, x, y)
    res = E.evaluate(mlp, {"gradient": explain}, [(XS[:N], YS[:N]), (XS[N:], YS[N:])], metrics=["mprt"],
                     params=PARAMS, key=jax.random.key(1), progress=False)
    for b, sl in enumerate((slice(0, N), slice(N, None))):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), b), 0)
        direct = E.parameter_randomization(explain, PARAMS, XS[sl], key, target=YS[sl])
        np.testing.assert_allclose(res.per_sample["gradient"]["mprt"][sl], direct["spearman"][-1], rtol=1e-12)


def test_batches_share_compiled_programs():
    explain = jax.jit(lambda x, y: x * 2.0)
    batches = [(XS[:N], YS[:N]), (XS[N:], YS[N:])]
    metrics = [E.metric("faithfulness_correlation", subset_size=4, runs=5), "complexity"]
    with compilations() as names:
        E.evaluate(model_jax, {"double": explain}, batches, metrics=metrics, progress=False)
    assert names.count("_faithfulness_correlation") == 1 and names.count("complexity") == 1, names
    with compilations() as names:  # the same functions again: nothing to compile
        E.evaluate(model_jax, {"double": explain}, batches[::-1], metrics=metrics, progress=False)
    assert "_faithfulness_correlation" not in names and "complexity" not in names, names


def test_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        E.metric("nonsense")
    with pytest.raises(ValueError, match="params"):
        E.evaluate(model_jax, {"a": lambda x, y: x}, [], metrics=["mprt"])
    assert set(E.METRICS) >= {"faithfulness_correlation", "road", "max_sensitivity", "pointing_game", "sparseness",
                              "random_logit", "non_sensitivity"}
    assert {m.category for m in E.METRICS.values()} == {"faithfulness", "robustness", "localisation", "complexity",
                                                        "randomisation", "axiomatic"}
