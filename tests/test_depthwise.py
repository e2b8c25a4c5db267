"""Depthwise convolutions' fast derivative (jlrp/_src/depthwise.py): the model's forward is the primitive's (bit
for bit), the derivative (VJP and JVP, w.r.t. input and kernel) and a rule's shifted-form values equal XLA's
to rounding, for 1-D and 2-D, NHWC and NCHW, strides, kernel dilation, explicit/asymmetric padding and channel
multipliers; other convolutions stay the primitive; LRP-0 through a depthwise CNN is input x gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp
from jlrp._src.depthwise import bind_conv

jax.config.update("jax_enable_x64", True)

C = 4
CASES = {  # name: (input shape, kernel shape, conv keywords)
    "nhwc-same": ((2, 9, 10, C), (3, 3, 1, C), dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "nhwc-7x7-m2": ((2, 9, 10, C), (7, 7, 1, 2 * C), dict(window_strides=(1, 1), padding=((3, 3), (3, 3)),
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "nchw-stride-dilation": ((2, C, 9, 10), (C, 1, 3, 2), dict(window_strides=(2, 1), padding=((1, 2), (0, 1)),
                                                              rhs_dilation=(2, 1),
                                                              dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "1d-valid-m3": ((3, 11, C), (5, 1, 3 * C), dict(window_strides=(3,), padding=((0, 0),),
                                                    dimension_numbers=("NWC", "WIO", "NWC"))),
}


def conv_params(x, w, kw):
    """The primitive's parameters as jax.lax.conv_general_dilated binds them."""
    jaxpr = jax.make_jaxpr(lambda x, w: jax.lax.conv_general_dilated(x, w, feature_group_count=C, **kw))(x, w)
    return jaxpr.jaxpr.eqns[-1].params


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_bitwise_and_derivatives_equal_xla(case):
    shape, kshape, kw = CASES[case]
    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=kshape))
    native = lambda x, w: jax.lax.conv_general_dilated(x, w, feature_group_count=C, **kw)  # noqa: E731
    params = conv_params(x, w, kw)
    ours = lambda x, w: bind_conv(x, w, **params)  # noqa: E731
    y, y0 = ours(x, w), native(x, w)
    np.testing.assert_array_equal(y, y0)
    assert "custom_jvp" in str(jax.make_jaxpr(ours)(x, w))  # the fast path was taken
    g = jnp.asarray(rng.normal(size=y.shape))
    for a, b in zip(jax.vjp(ours, x, w)[1](g), jax.vjp(native, x, w)[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    t = (jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=kshape)))
    np.testing.assert_allclose(jax.jvp(ours, (x, w), t)[1], jax.jvp(native, (x, w), t)[1], rtol=1e-12, atol=1e-12)
    # a rule's own computation: the shifted form, equal to rounding
    np.testing.assert_allclose(bind_conv(x, w, rule=True, **params), y0, rtol=1e-12, atol=1e-12)
    batched = jax.vmap(lambda x: ours(x[None], w)[0])(x)  # vmap over the batch
    np.testing.assert_allclose(batched, y0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups,cin", [(1, 4), (2, 4)])
def test_other_convolutions_stay_the_primitive(groups, cin):
    x = jnp.ones((1, 6, 6, cin))
    w = jnp.ones((3, 3, cin // groups, 4))
    kw = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    jaxpr = jax.make_jaxpr(lambda x, w: jax.lax.conv_general_dilated(x, w, feature_group_count=groups, **kw))(x, w)
    params = jaxpr.jaxpr.eqns[-1].params
    text = str(jax.make_jaxpr(lambda x, w: bind_conv(x, w, rule=True, **params))(x, w))
    assert "conv_general_dilated" in text and "custom_jvp" not in text


def test_lrp0_through_a_depthwise_cnn_is_input_times_gradient():
    rng = np.random.default_rng(1)
    w1, dw, w2 = (jnp.asarray(rng.normal(size=s)) for s in ((3, 3, 2, 8), (5, 5, 1, 8), (8 * 36, 3)))

    def model(x):
        conv = lambda x, w, g: jax.lax.conv_general_dilated(  # noqa: E731
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g)
        h = jax.nn.relu(conv(x, w1, 1))
        h = jax.nn.relu(conv(h, dw, 8))
        return h.reshape(len(x), -1) @ w2

    x = jnp.asarray(rng.normal(size=(2, 6, 6, 2)))
    lrp0 = jlrp.lrp(model, jlrp.rules.zero(1e-100))(x, target=1)  # no stabilizer to speak of
    gradient = jax.grad(lambda x: model(x)[:, 1].sum())(x)
    np.testing.assert_allclose(lrp0, x * gradient, rtol=1e-10, atol=1e-12)
    # the explanation computes no grouped convolution in its backward pass: only the model's forward one
    text = jax.jit(lambda x: jlrp.lrp(model, jlrp.rules.gamma(0.25))(x, target=1)).lower(x).as_text()
    assert text.count("feature_group_count = 8") == 1, text.count("feature_group_count = 8")


def test_a_repeated_eager_explanation_compiles_nothing(caplog):
    """Eagerly, every operation compiles once per shape; a second call must reuse them all. A jitted block of
    the model (run as one program again) and a rule's shifted-form depthwise conv were compiled anew at every
    call: each call traced a new function (fails without the per-plan block cache / jitted shifted form)."""
    rng = np.random.default_rng(1)
    kw = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    params = {"dw": jnp.asarray(rng.normal(size=(3, 3, 1, C))), "b": jnp.asarray(rng.normal(size=(C,))),
              "dense": jnp.asarray(rng.normal(size=(6 * 6 * C, 3)))}

    @jax.jit
    def block(p, x):  # a jit block of several nodes: depthwise conv, bias, relu
        return jax.nn.relu(jax.lax.conv_general_dilated(x, p["dw"], feature_group_count=C, **kw) + p["b"])

    def model(p, x):
        return block(p, x).reshape(x.shape[0], -1) @ p["dense"]

    x = jnp.asarray(rng.normal(size=(2, 6, 6, C)))
    for composite in (jlrp.composites.epsilon_plus_flat(), jlrp.composites.epsilon_gamma_box(-3.0, 3.0)):
        explain = jlrp.lrp(model, composite, argnums=1)
        first = explain(params, x)
        with caplog.at_level("WARNING"), jax.log_compiles(True):
            caplog.clear()
            second = explain(params, x)
        compiles = [r.getMessage()[:120] for r in caplog.records if "ompil" in r.getMessage()]
        assert compiles == [], compiles
        np.testing.assert_array_equal(second, first)
