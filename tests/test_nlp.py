"""Tests of the NLP and regression examples (examples/text_classification.py, examples/regression.py).

The models are trained once per module with small settings; every figure is measured on held-out data.
"""
import os
import sys

import jax
import numpy as np
import pytest

import jlrp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import regression as rg  # noqa: E402
import text_classification as tc  # noqa: E402

STEPS = 300


@pytest.fixture(scope="module")
def text_data():
    return tc.load_data(seed=0, n_train=2000, n_test=500)


@pytest.fixture(scope="module")
def models(text_data):
    train, _ = text_data
    return {"cnn": tc.train_text_cnn(train, STEPS), "mlp": tc.train_mlp(train, STEPS)}


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_text_models_are_accurate(models, text_data, name):
    model, params = models[name]
    assert tc.accuracy(model, params, text_data[1]) > 0.9


@pytest.mark.parametrize("method", ["lrp", "input_x_gradient"])
def test_cnn_relevance_falls_on_sentiment_words(models, text_data, method):
    """More than twice the sentiment words' token share of the positive relevance lands on them."""
    model, params = models["cnn"]
    test = text_data[1]
    share = tc.positive_share(tc.word_relevance(method, model, params, test.x), test.mask)
    assert share > 2 * test.mask.mean(), (share, test.mask.mean())


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_token_lrp_is_conservative(models, text_data, name):
    """Per sample, sum over tokens of R plus the relevance absorbed by the layers is the explained logit."""
    model, params = models[name]
    ids = text_data[1].x[:8]
    relevance = tc.word_relevance("lrp", model, params, ids)
    assert relevance.shape == ids.shape

    # vmap over single-sample calls: the report's absorbed shares are totals over its (one-row) batch
    explain = jlrp.report(model.apply, jlrp.rules.epsilon(), argnums=1)
    rep = jax.jit(jax.vmap(lambda i: explain(params, i[None])))(ids)
    np.testing.assert_allclose(rep.relevance[:, 0], relevance, rtol=1e-5, atol=1e-6)
    logit = model.apply(params, ids).max(-1)  # the predicted class is explained
    absorbed = sum(layer.absorbed for layer in rep.layers)
    np.testing.assert_allclose(relevance.sum(-1) + absorbed, logit, rtol=1e-5)

    # the same explanation taken at the embedded sequence, summed over the embedding axis by hand
    e = model.apply(params, ids, method=model.embed)
    body = lambda p, x: model.apply(p, x, method=model.body)  # noqa: E731
    by_hand = jax.jit(jlrp.lrp(body, jlrp.rules.epsilon(), argnums=1))(params, e).sum(-1)
    np.testing.assert_allclose(relevance, by_hand, rtol=1e-5, atol=1e-6)


def test_linear_regression_gradient_is_the_weights():
    x, y = rg.linear_data(seed=0)
    params = rg.fit_linear(x, y, steps=1000)
    grad = np.asarray(rg.input_gradient(rg.linear, params, x))
    w = np.asarray(params["w"][:, 0])
    np.testing.assert_array_equal(grad, np.broadcast_to(w.astype(grad.dtype), x.shape))  # exactly, per sample
    assert np.abs(grad - rg.BETA).max() < 0.03


def test_mlp_regression_ranks_the_relevant_features_first():
    x, y = rg.mlp_data(seed=0)
    model, params = rg.fit_mlp(x, y, steps=1000)
    importance = rg.feature_importance(model.apply, params, rg.mlp_data(500, seed=1)[0])
    assert set(np.argsort(-importance)[:2]) == {0, 1}, importance
    # and the magnitudes are the true ones: E|cos x0| = (2 - sin 2) / 2, E|2 x1| = 2 for x ~ U[-2, 2]
    np.testing.assert_allclose(importance[:2], [(2 - np.sin(2)) / 2, 2.0], rtol=0.2)
    assert importance[2:].max() < 0.1, importance
