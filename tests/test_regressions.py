"""Regression tests for bugs found in review (each failed before its fix)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

import jlrp
from jlrp import rules

jax.config.update("jax_enable_x64", True)


def test_bf16_matmul_avgpool_and_attention_products_run_in_float32():
    w = jax.random.normal(jax.random.key(0), (6, 4), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (3, 6), jnp.bfloat16)
    assert jnp.isfinite(jlrp.lrp(lambda x: jax.nn.relu(x @ w) @ w.T @ w)(x, target=1)).all()
    img = jax.random.normal(jax.random.key(2), (2, 4, 4, 2), jnp.bfloat16)
    pooled = lambda x: nn.avg_pool(x, (2, 2), (2, 2)).reshape(2, -1)
    r = jlrp.lrp(pooled, rules.epsilon())(img, target=0)
    assert r.dtype == jnp.bfloat16 and bool(jnp.isfinite(r).all())
    q = jax.random.normal(jax.random.key(3), (2, 5, 4), jnp.bfloat16)
    attn = lambda q: jnp.einsum("bqd,bkd->bqk", q @ w.T[:, :4].T, q).sum(1)
    assert bool(jnp.isfinite(jlrp.lrp(attn, rules.epsilon())(q, target=0)).all())


def test_conv_batchnorm_flatten_dense_folds_the_scale():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=True)(nn.Conv(3, (3, 3), use_bias=False)(x))
            return nn.Dense(2)(x.reshape(x.shape[0], -1))

    model = Net()
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    v = model.init(jax.random.key(1), x)
    v = {"params": v["params"], "batch_stats": {"BatchNorm_0": {"mean": jnp.array([0.1, -0.2, 0.3]),
                                                                "var": jnp.array([0.5, 2.0, 1.0])}}}
    v["params"]["BatchNorm_0"]["scale"] = jnp.array([1.5, -0.7, 0.2])
    r = jlrp.lrp(model.apply, rules.epsilon(0.01), argnums=1)(v, x, target=0)
    s = v["params"]["BatchNorm_0"]["scale"] / jnp.sqrt(v["batch_stats"]["BatchNorm_0"]["var"] + 1e-5)
    b = -v["batch_stats"]["BatchNorm_0"]["mean"] * s
    k = v["params"]["Conv_0"]["kernel"] * s

    def merged(x):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
        return y.reshape(2, -1) @ v["params"]["Dense_0"]["kernel"] + v["params"]["Dense_0"]["bias"]

    np.testing.assert_allclose(r, jlrp.lrp(merged, rules.epsilon(0.01))(x, target=0), rtol=1e-10, atol=1e-14)


def test_nonnegativity_is_not_assumed_through_parameter_operands():
    w1 = jax.random.normal(jax.random.key(0), (4, 5))
    w2 = jax.random.normal(jax.random.key(1), (5, 3))
    s = -jnp.abs(jax.random.normal(jax.random.key(2), (5,)))  # a negative parameter scale
    x = jax.random.normal(jax.random.key(3), (2, 4))
    f = lambda x, s: (jax.nn.relu(x @ w1) * s) @ w2  # relu(h) * s is NOT >= 0
    g = lambda x: (jax.nn.relu(x @ w1) * s) @ w2  # ... and with s a literal constant it is still < 0
    comp = jlrp.Composite([("linear", rules.zplus())])
    r_param = jlrp.lrp(f, comp)(x, s, target=0)
    r_const = jlrp.lrp(g, comp)(x, target=0)
    np.testing.assert_allclose(r_param, r_const, rtol=1e-12)


def test_the_same_activation_twice_in_a_product():
    x = jnp.array([1.0, 2.0, 3.0])
    r = jlrp.lrp(lambda x: jnp.dot(x, x)[None], jlrp.Composite([("product", rules.uniform(1e-12))]))(x, target=0)
    np.testing.assert_allclose(r, x * x, rtol=1e-10)  # Euler: x . grad(x.x) / 2


def test_silu_gated_mlp_splits_uniformly_and_sigmoid_gates_do_not():
    wg = jax.random.normal(jax.random.key(0), (4, 6))
    wu = jax.random.normal(jax.random.key(1), (4, 6))
    x = jax.random.normal(jax.random.key(2), (3, 4))
    for act, origin in ((jax.nn.silu, "activation"), (jax.nn.sigmoid, "sigmoid")):
        f = lambda x: (act(x @ wg) * (x @ wu)).sum(-1, keepdims=True)
        report = jlrp.report(f, rules.epsilon())(x)
        product = next(l for l in report.layers if l.info.kind == "product")
        assert origin in product.info.origins and "" in product.info.origins


def test_cp_lrp_survives_a_transpose_of_the_attention_weights():
    wq, wv = (jax.random.normal(jax.random.key(i), (4, 4)) for i in range(2))

    def attention(x):  # x: (b, t, d); weights transposed before use
        a = jax.nn.softmax(jnp.einsum("btd,bsd->bts", x @ wq, x), axis=-1)
        return jnp.einsum("bst,bsd->btd", jnp.swapaxes(a, 1, 2), x @ wv).sum((1, 2))[:, None]

    x = jax.random.normal(jax.random.key(3), (2, 3, 4))
    report = jlrp.report(attention, jlrp.Composite([("product", rules.cp())]))(x)
    products = [l.info.origins for l in report.layers if l.info.kind == "product"]
    assert any("softmax" in o for o in products)
    query = next(l for l in report.layers if l.info.kind == "dense" and l.info.params == ())
    assert float(jnp.abs(query.total)) < 1e-9  # no relevance into the query path under CP-LRP


def test_registered_multi_output_primitive_and_registry_changes_retrace():
    f = lambda x: jax.lax.top_k(x * 2.0, 2)[0] @ jnp.ones((2, 1))
    x = jnp.array([[3.0, 1.0, 2.0, -1.0]])
    explain = jlrp.lrp(f, rules.epsilon(1e-12))
    jlrp.register_rule("top_k", rules.gradient())
    try:
        r = explain(x)
        np.testing.assert_allclose(r, [[6.0, 0.0, 4.0, 0.0]], rtol=1e-10)
    finally:
        jlrp.register_rule("top_k", None)
    with pytest.raises(jlrp.UnsupportedPrimitiveError, match="top_k"):
        explain(x)  # the same explain function sees the registry change


def test_python_scalar_arguments_stay_static():
    w = jnp.ones((4, 4)) * 0.3

    def f(x, n_layers):
        for _ in range(n_layers):
            x = jax.nn.relu(x @ w)
        return x

    x = jnp.ones((2, 4))
    r2 = jlrp.lrp(f, rules.epsilon(1e-12))(x, 2, target=0)
    r3 = jlrp.lrp(f, rules.epsilon(1e-12))(x, 3, target=0)
    np.testing.assert_allclose(r2.sum(1), f(x, 2)[:, 0], rtol=1e-6)
    np.testing.assert_allclose(r3.sum(1), f(x, 3)[:, 0], rtol=1e-6)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_flat_does_not_build_a_ones_weight(as_numpy):
    """Flat replaces the weight by ones: every output unit then computes the same sum, so jlrp computes one
    unit and broadcasts. Before, a ones matrix of the weight's size was built (MLP memory 7.8x jax.grad).
    Checked on the compiled program's temporary memory (jax and numpy weights), and against the full
    computation."""
    w = jax.random.normal(jax.random.key(0), (1024, 512), jnp.float32)
    w = np.asarray(w) if as_numpy else w
    x = jax.random.normal(jax.random.key(1), (8, 1024), jnp.float32)
    model = lambda x: jax.nn.relu(x @ w) @ w[:512, :10]
    explain = jax.jit(lambda x: jlrp.lrp(model, jlrp.composites.epsilon_plus_flat())(x, target=0))
    temp = explain.lower(x).compile().memory_analysis().temp_size_in_bytes
    assert temp < w.nbytes / 4, (temp, w.nbytes)
    r = np.asarray(explain(x), np.float64)
    # flat on the first layer: R_i = sum_j R_j / 1024 for every input i (each output sees all 1024 inputs)
    first = jlrp.report(model, jlrp.composites.epsilon_plus_flat())(x, target=0).layers[0]
    np.testing.assert_allclose(r, np.broadcast_to(np.asarray(first.relevance).sum(1, keepdims=True) / 1024,
                                                   r.shape), rtol=1e-5)


@pytest.mark.parametrize("case", ["convolve_short_signal", "kernel_explained", "multihead_reshape",
                                  "numpy_weight", "transposed"])
def test_flat_shortcut_matches_the_ones_jacobian(case):
    """Flat against its definition: with input and weight replaced by ones the layer is the linear map M,
    R_in = M^T (R_out / M 1). Includes layouts where the explained input is the convolution's kernel (the
    shortcut must not treat the constant image's axes as output units) and a numpy weight."""
    rng = np.random.default_rng(0)
    if case == "convolve_short_signal":  # jnp swaps the operands: the explained signal becomes the kernel
        w, x = jnp.asarray(rng.normal(size=5)), jnp.asarray(rng.normal(size=3))
        f, f_ones = (lambda x: jnp.convolve(x, w, mode="same")), (lambda x: jnp.convolve(x, jnp.ones(5), mode="same"))
    elif case == "kernel_explained":
        img = jnp.asarray(rng.normal(size=(1, 2, 6, 6)))
        x = jnp.asarray(rng.normal(size=(3, 2, 3, 3)))
        conv = lambda im, k: jax.lax.conv_general_dilated(im, k, (1, 1), "SAME")
        f, f_ones = (lambda k: conv(img, k).reshape(-1)), (lambda k: conv(jnp.ones_like(img), k).reshape(-1))
    elif case == "multihead_reshape":
        w = jnp.asarray(rng.normal(size=(2, 4, 3)))
        x = jnp.asarray(rng.normal(size=(2, 5, 4)))
        proj = lambda x, w: jnp.einsum("bsd,hdk->bshk", x, w).reshape(2, 5, 6)
        f, f_ones = (lambda x: proj(x, w)), (lambda x: proj(x, jnp.ones_like(w)))
    elif case == "numpy_weight":
        w = rng.normal(size=(6, 4))
        x = jnp.asarray(rng.normal(size=(3, 6)))
        f, f_ones = (lambda x: x @ w), (lambda x: x @ np.ones_like(w))
    else:  # W @ x under vmap (Equinox's Linear)
        w = jnp.asarray(rng.normal(size=(4, 6)))
        x = jnp.asarray(rng.normal(size=(3, 6)))
        f, f_ones = (lambda x: jax.vmap(lambda v: w @ v)(x)), (lambda x: jax.vmap(lambda v: jnp.ones_like(w) @ v)(x))
    out = f(x)
    r = jlrp.lrp(f, rules.flat(1e-12))(x, relevance=out)
    ones = jnp.ones_like(x)
    m = jax.jacobian(f_ones)(ones).reshape(out.size, x.size)
    expected = (m.T @ (out.reshape(-1) / (m @ ones.reshape(-1)))).reshape(x.shape)
    np.testing.assert_allclose(r, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jax.jit(jlrp.lrp(f, rules.flat(1e-12)))(x, relevance=out), r, rtol=1e-12)
