"""Max pooling's fast derivative (jlrp/_src/pooling.py) equals XLA's select_and_scatter_add gradient exactly,
ties included, for windows that tile the input (2-D, 1-D, 3-D, odd sizes that drop a border), and leaves
overlapping windows to XLA; through jlrp.lrp the winner-take-all rule is the ordinary gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp
from jlrp._src.pooling import bind_max_pool


def native(x, dims, strides, padding="VALID"):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, padding)


def ours(x, dims, strides, padding="VALID"):
    pads = jax.lax.padtype_to_pads(x.shape, dims, strides, padding) if isinstance(padding, str) else padding
    return bind_max_pool(x, window_dimensions=dims, window_strides=strides, padding=tuple(map(tuple, pads)),
                         base_dilation=(1,) * x.ndim, window_dilation=(1,) * x.ndim)


CASES = [((2, 8, 8, 3), (1, 2, 2, 1)), ((2, 9, 7, 3), (1, 2, 2, 1)), ((2, 9, 9, 2), (1, 3, 3, 1)),
         ((4, 10, 5), (1, 2, 1)), ((1, 4, 6, 4, 2), (1, 2, 3, 2, 1)), ((3, 8, 8, 2), (1, 4, 2, 1))]


@pytest.mark.parametrize("shape,dims", CASES)
@pytest.mark.parametrize("values", ["random", "ties", "integers"])
def test_derivative_equals_xla_gradient(shape, dims, values):
    rng = np.random.default_rng(0)
    x = {"random": rng.normal(size=shape), "ties": np.zeros(shape),
         "integers": rng.integers(-2, 3, size=shape).astype(float)}[values]
    g = rng.normal(size=native(x, dims, dims).shape)
    y, pull = jax.vjp(lambda x: ours(x, dims, dims), x)
    y0, pull0 = jax.vjp(lambda x: native(x, dims, dims), x)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(pull(g)[0], pull0(g)[0])
    t = rng.normal(size=shape)  # forward mode too
    np.testing.assert_array_equal(jax.jvp(lambda x: ours(x, dims, dims), (x,), (t,))[1],
                                  jax.jvp(lambda x: native(x, dims, dims), (x,), (t,))[1])
    batched = jax.vmap(jax.grad(lambda x: (ours(x, dims[1:], dims[1:]) * g[0]).sum()))(x)
    np.testing.assert_array_equal(batched, jax.vmap(jax.grad(lambda x: (native(x, dims[1:], dims[1:]) * g[0]).sum()))(x))


def test_overlapping_and_padded_windows_keep_xla():
    x = np.random.default_rng(1).normal(size=(2, 9, 9, 3))
    for dims, strides, padding in (((1, 3, 3, 1), (1, 2, 2, 1), "VALID"), ((1, 2, 2, 1), (1, 2, 2, 1), "SAME")):
        jaxpr = jax.make_jaxpr(jax.grad(lambda x: ours(x, dims, strides, padding).sum()))(x)
        assert "select_and_scatter_add" in str(jaxpr)
        np.testing.assert_array_equal(jax.grad(lambda x: ours(x, dims, strides, padding).sum())(x),
                                      jax.grad(lambda x: native(x, dims, strides, padding).sum())(x))


def test_lrp_through_a_max_pooling_cnn_is_the_gradient_there():
    """LRP-0 on a ReLU CNN with 2x2 max pooling (piecewise linear, no biases) equals input x gradient, and no
    select_and_scatter_add is left in the explanation's program."""
    rng = np.random.default_rng(2)
    w1, w2 = rng.normal(size=(3, 3, 1, 4)), rng.normal(size=(4 * 4 * 4, 3))

    def model(x):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return native(h, (1, 2, 2, 1), (1, 2, 2, 1)).reshape(x.shape[0], -1) @ w2

    x = rng.normal(size=(2, 8, 8, 1))
    explain = jax.jit(jlrp.lrp(model, jlrp.rules.zero()))
    r = explain(x, target=jnp.array([0, 2]))
    ixg = x * jax.grad(lambda x: model(x)[jnp.arange(2), jnp.array([0, 2])].sum())(x)
    np.testing.assert_allclose(r, ixg, rtol=1e-10, atol=1e-12)
    assert "select_and_scatter_add" not in str(jax.make_jaxpr(explain)(x, target=jnp.array([0, 2])))
