"""Shared plumbing of the metrics (units, baselines, ranks) and the fixtures of the metric tests: small
models written twice, in numpy (for the loop-based references) and in jax (for jlrp), and their analytic
input gradients."""
import jax.numpy as jnp
import numpy as np
import scipy.stats

RNG = np.random.default_rng(20)
N, H, W, C = 3, 5, 4, 2
CLASSES = 3
W1 = RNG.normal(size=(H * W * C, 6)) * 0.4
W2 = RNG.normal(size=(6, CLASSES))
X = RNG.normal(size=(N, H, W, C))
Y = np.array([0, 2, 1])
R_PIX = RNG.normal(size=(N, H, W))  # one relevance per pixel (both channels)
R_VAL = RNG.normal(size=(N, H, W, C))  # one per value


def model_np(x):
    return np.tanh(np.asarray(x, np.float64).reshape(len(x), -1) @ W1) @ W2


def model_jax(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ W1) @ W2


def grad_np(x, y):
    """d f_y / d x for every row, shaped like x."""
    flat = np.asarray(x, np.float64).reshape(len(x), -1)
    h = np.tanh(flat @ W1)
    return (((1 - h ** 2) * W2[:, y].T) @ W1.T).reshape(np.shape(x))


def explain_jax(x, y):
    """The gradient of the target logit, the jax twin of grad_np."""
    import jax
    return jax.vmap(jax.grad(lambda xi, yi: model_jax(xi[None])[0, yi]))(x, y)


# token model: ids (N, T) -> embeddings (N, T, D) -> tanh dense -> logits
T, D, V = 6, 3, 10
EMB = RNG.normal(size=(V, D))
WT1 = RNG.normal(size=(T * D, 5)) * 0.5
WT2 = RNG.normal(size=(5, CLASSES))
IDS = RNG.integers(1, V, size=(N, T))
R_TOK = RNG.normal(size=(N, T))


def token_model_np(ids):
    e = EMB[np.asarray(ids)]
    return embed_model_np(e)


def embed_model_np(e):
    return np.tanh(np.asarray(e).reshape(len(e), -1) @ WT1) @ WT2


def token_model_jax(ids):
    return embed_model_jax(jnp.asarray(EMB)[ids])


def embed_model_jax(e):
    return jnp.tanh(e.reshape(e.shape[0], -1) @ WT1) @ WT2


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def pearson(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return scipy.stats.pearsonr(a, b)[0]


def spearman(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return scipy.stats.spearmanr(a, b)[0]


# ----------------------------------------------------------------------------------------------------------
# tests of the shared plumbing
# ----------------------------------------------------------------------------------------------------------

def test_units_follow_the_relevance_shape():
    import pytest
    from jlrp._src import metrics_common as mc

    assert mc.unit_shape((N, H, W, C), (N, H, W, C)) == (H * W * C, 1)  # every value
    assert mc.unit_shape((N, H, W, C), (N, H, W)) == (H * W, C)  # pixels
    assert mc.unit_shape((N, T, D), (N, T)) == (T, D)  # tokens of embeddings
    assert mc.unit_shape((N, T), (N, T)) == (T, 1)  # token ids
    with pytest.raises(ValueError, match="does not fit"):
        mc.unit_shape((N, H, W, C), (N, W, H))
    xu, ru = mc.as_units(jnp.asarray(X), jnp.asarray(R_PIX))
    np.testing.assert_array_equal(xu[1, 7], X[1, 7 // W, 7 % W])  # row-major pixels, channels together
    base = np.asarray(mc.unit_baseline(xu, "mean"))
    np.testing.assert_allclose(base[2, 0], X[2].mean((0, 1)), rtol=1e-12)  # per channel for pixel units
    np.testing.assert_allclose(np.asarray(mc.unit_baseline(xu, "min"))[2], X[2].min(), rtol=0)


def test_rankdata_and_correlations():
    from jlrp._src import metrics_common as mc

    v = np.round(RNG.normal(size=(4, 30)), 1)  # ties
    np.testing.assert_array_equal(mc.rankdata(jnp.asarray(v)), [scipy.stats.rankdata(r) for r in v])
    # long rows (binary search in sorted integer keys): ties, signed zeros (equal), infinities; float32 too
    long = np.round(RNG.normal(size=(3, 300)), 1)
    long[0, :4] = [0.0, -0.0, np.inf, -np.inf]
    for a in (long, long.astype(np.float32)):
        np.testing.assert_array_equal(mc.rankdata(jnp.asarray(a)), [scipy.stats.rankdata(r) for r in a])
    keys = np.asarray(mc.sort_key(jnp.asarray(long[0])))
    np.testing.assert_array_equal(np.argsort(keys, kind="stable"), np.argsort(long[0], kind="stable"))
    w = v + RNG.normal(size=v.shape)
    np.testing.assert_allclose(mc.spearman(jnp.asarray(v), jnp.asarray(w)),
                               [scipy.stats.spearmanr(a, b)[0] for a, b in zip(v, w)], rtol=1e-12)
    np.testing.assert_allclose(mc.pearson(jnp.asarray(v), jnp.asarray(w)),
                               [scipy.stats.pearsonr(a, b)[0] for a, b in zip(v, w)], rtol=1e-12)
    assert float(mc.pearson(jnp.ones(5), jnp.arange(5.0))) == 0.0  # constant: 0, not NaN


def test_random_subsets_and_flat_draws():
    import jax
    from jlrp._src import evaluation as ev
    from jlrp._src import metrics_common as mc

    # every row a subset of exactly k positions, every one of the C(5, 3) = 10 subsets about equally often
    # (k > p / 2: drawn as the complement of a 2-subset by Floyd's algorithm)
    m = np.asarray(mc.random_subsets(jax.random.key(1), (2, 2000), 5, 3)).reshape(4000, 5)
    assert (m.sum(1) == 3).all()
    _, counts = np.unique(m @ (2 ** np.arange(5)), return_counts=True)
    assert len(counts) == 10 and np.abs(counts - 400).max() < 5 * np.sqrt(400)  # 5 standard deviations
    # the flat draws are jax.random's numbers for the shape
    key, shape = jax.random.key(3), (3, 8)
    np.testing.assert_array_equal(ev.random_normal(key, shape), jax.random.normal(key, shape))
    np.testing.assert_array_equal(ev.random_uniform(key, shape, minval=-2.0, maxval=3.0),
                                  jax.random.uniform(key, shape, minval=-2.0, maxval=3.0))
