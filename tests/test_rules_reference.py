"""Every LRP rule on every kind of linear layer against the dense-matrix reference (tests/reference.py).

A single-layer function ``f(x) = layer(x)`` is explained with a random (mixed-sign) output relevance, so each
test checks one rule on one layer directly. The reference builds the layer's matrix from its Jacobian and
applies the rule's formulas with numpy (Zennit's semantics, see /work/shared/REFERENCE.md).
"""
import functools

import jax

jax.config.update("jax_enable_x64", True)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jlrp  # noqa: E402
import reference as ref  # noqa: E402

TOL = 1e-10


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def rand(seed, shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


# ---------------------------------------------------------------------------------------------------------
# Layers: each case builds (function, args, argnums, input, reference layer)


def _conv(x, w, *, strides, padding, dn, lhs_dilation=None, rhs_dilation=None, groups=1):
    return jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dn,
                                        feature_group_count=groups)


NHWC = ("NHWC", "HWIO", "NHWC")
CONVS = {
    # name: (input shape, kernel shape, bias shape (broadcast against the output), conv keyword arguments)
    "conv1d_stride2_same": ((2, 8, 3), (3, 3, 4), (4,), dict(strides=(2,), padding="SAME",
                                                             dn=("NWC", "WIO", "NWC"))),
    "conv2d_stride2_same": ((1, 6, 6, 4), (3, 3, 4, 5), (5,), dict(strides=(2, 2), padding="SAME", dn=NHWC)),
    "conv2d_asymmetric_pad": ((1, 6, 6, 4), (3, 3, 4, 5), (5,), dict(strides=(1, 2), padding=((1, 2), (0, 1)),
                                                                     dn=NHWC)),
    "conv2d_rhs_dilation2": ((1, 6, 6, 4), (3, 3, 4, 5), (5,), dict(strides=(1, 1), padding="SAME", dn=NHWC,
                                                                    rhs_dilation=(2, 2))),
    "conv2d_lhs_dilation2": ((1, 4, 4, 4), (3, 3, 4, 3), (3,), dict(strides=(1, 1), padding=((2, 1), (1, 2)),
                                                                    dn=NHWC, lhs_dilation=(2, 2))),
    "conv2d_groups2": ((1, 6, 6, 4), (3, 3, 2, 6), (6,), dict(strides=(1, 1), padding="SAME", dn=NHWC,
                                                              groups=2)),
    "conv2d_nchw": ((1, 4, 6, 6), (5, 4, 3, 3), (5, 1, 1), dict(strides=(2, 1), padding=((1, 1), (0, 2)),
                                                                dn=("NCHW", "OIHW", "NCHW"))),
    "conv3d": ((1, 4, 4, 4, 2), (3, 3, 3, 2, 3), (3,), dict(strides=(1, 1, 1), padding="SAME",
                                                            dn=("NDHWC", "DHWIO", "NDHWC"))),
}
LAYERS = ["dense", "dense_flax", *CONVS, "conv_flax"]


@functools.lru_cache(maxsize=None)
def layer_case(name: str, bias: bool, nonneg: bool = False):
    seed = (LAYERS.index(name) + 1) * 10 + bias
    if name in ("dense", "dense_flax"):
        x_shape, w_shape, b_shape = (2, 5), (5, 4), (4,)
    elif name == "conv_flax":
        x_shape, w_shape, b_shape = (1, 6, 6, 4), (3, 3, 4, 5), (5,)
    else:
        x_shape, w_shape, b_shape, _ = CONVS[name]
    x = rand(seed, x_shape)
    if nonneg:
        x = np.abs(x) * (rand(seed + 5, x_shape) > -0.5)  # non-negative, with some exact zeros
    w = rand(seed + 1, w_shape, 0.5)
    b = rand(seed + 2, b_shape, 0.5) if bias else None

    if name == "dense":
        apply = lambda x, w: x @ w  # noqa: E731
    elif name in CONVS:
        apply = functools.partial(_conv, **CONVS[name][3])
    if name in ("dense", *CONVS):
        if bias:
            fn, args = (lambda x, w, b: apply(x, w) + b), (x, w, b)
        else:
            fn, args = apply, (x, w)
        argnums = 0
    else:  # Flax linen modules
        make = (lambda **kw: nn.Dense(4, **kw)) if name == "dense_flax" else (
            lambda **kw: nn.Conv(5, (3, 3), strides=2, padding="SAME", **kw))
        module, bare = make(use_bias=bias), make(use_bias=False)
        params = {"params": {"kernel": w, **({"bias": b} if bias else {})}}
        fn, args, argnums = module.apply, (params, x), 1
        apply = lambda x, w: bare.apply({"params": {"kernel": w}}, x)  # noqa: E731
    layer = ref.from_layer(apply, w, x_shape, b, name)
    out_shape = jax.eval_shape(fn, *args).shape
    R = rand(seed + 3, out_shape)
    return fn, args, argnums, x, layer, R


def explain(rule, case):
    fn, args, argnums, x, layer, R = case
    r = jlrp.lrp(fn, rule, argnums=argnums)(*args, relevance=R)
    assert r.shape == x.shape and r.dtype == jnp.float64
    return np.asarray(r)


# ---------------------------------------------------------------------------------------------------------
# Rules: name -> x -> (jlrp rule, reference rule)

def _box_arrays(x):
    rng = np.random.default_rng(7)
    low = -1.0 - np.abs(rng.normal(size=x.shape))
    high = 1.0 + np.abs(rng.normal(size=x.shape))
    return low, high


RULES = {
    "zero": lambda x: (jlrp.rules.zero(), ref.Zero(1e-12)),
    "epsilon0.1": lambda x: (jlrp.rules.epsilon(0.1), ref.Epsilon(0.1)),
    "epsilon0.1_nobias": lambda x: (jlrp.rules.epsilon(0.1, bias=False), ref.Epsilon(0.1, bias=False)),
    "gamma0.25": lambda x: (jlrp.rules.gamma(0.25), ref.Gamma(0.25, 1e-6)),
    "gamma0.25_nobias": lambda x: (jlrp.rules.gamma(0.25, bias=False), ref.Gamma(0.25, 1e-6, bias=False)),
    "alpha2beta1": lambda x: (jlrp.rules.alpha_beta(2, 1), ref.AlphaBeta(2, 1)),
    "alpha1beta0": lambda x: (jlrp.rules.alpha_beta(1, 0), ref.AlphaBeta(1, 0)),
    "alpha2beta1_nobias": lambda x: (jlrp.rules.alpha_beta(2, 1, bias=False), ref.AlphaBeta(2, 1, bias=False)),
    "zplus": lambda x: (jlrp.rules.zplus(), ref.ZPlus()),
    "zplus_nobias": lambda x: (jlrp.rules.zplus(bias=False), ref.ZPlus(bias=False)),
    "zbox_scalar": lambda x: (jlrp.rules.zbox(-1.5, 2.0), ref.ZBox(-1.5, 2.0)),
    "zbox_array": lambda x: (jlrp.rules.zbox(*_box_arrays(x)), ref.ZBox(*_box_arrays(x))),
    "wsquare": lambda x: (jlrp.rules.wsquare(), ref.WSquare()),
    "wsquare_bias": lambda x: (jlrp.rules.wsquare(bias=True), ref.WSquare(bias=True)),
    "flat": lambda x: (jlrp.rules.flat(), ref.Flat()),
}
NONNEG_RULES = ["zplus", "zplus_nobias", "alpha1beta0", "gamma0.25"]

OBSERVED: dict[str, float] = {}  # max error per rule (printed with -s by the last test)


def _check(rule_name, layer_name, bias, nonneg=False):
    case = layer_case(layer_name, bias, nonneg)
    x, layer, R = case[3], case[4], case[5]
    rule, ref_rule = RULES[rule_name](x)
    got = explain(rule, case)
    want = ref.linear_relevance(ref_rule, layer, x, R).reshape(x.shape)
    err = rel_err(got, want)
    OBSERVED[rule_name] = max(OBSERVED.get(rule_name, 0.0), err)
    assert err < TOL, f"{rule_name} on {layer_name} (bias={bias}): relative error {err:.3g}"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("rule_name", list(RULES))
def test_rule_matches_reference(rule_name, layer_name, bias):
    _check(rule_name, layer_name, bias)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layer_name", ["dense", "dense_flax", "conv2d_stride2_same", "conv2d_groups2",
                                        "conv2d_nchw", "conv3d"])
@pytest.mark.parametrize("rule_name", NONNEG_RULES)
def test_rule_matches_reference_nonnegative_input(rule_name, layer_name, bias):
    _check(rule_name, layer_name, bias, nonneg=True)


def test_zbox_per_channel_bounds_broadcast_like_zennit():
    """Bounds of shape (C,) (per channel, NHWC) broadcast to the input's shape."""
    case = layer_case("conv2d_stride2_same", True)
    x, layer, R = case[3], case[4], case[5]
    low, high = np.array([-1.0, -2.0, -0.5, -1.5]), np.array([1.0, 2.5, 0.5, 3.0])
    got = explain(jlrp.rules.zbox(low, high), case)
    want = ref.linear_relevance(ref.ZBox(np.broadcast_to(low, x.shape), np.broadcast_to(high, x.shape)),
                                layer, x, R).reshape(x.shape)
    assert rel_err(got, want) < TOL


# ---------------------------------------------------------------------------------------------------------
# The tests can fail: different rules give clearly different numbers, on every layer type


EQUIVALENT = {frozenset({"zplus", "alpha1beta0"})}  # identical by definition (Zennit: ZPlus = alpha1-beta0)


@pytest.mark.parametrize("layer_name", ["dense", "conv2d_stride2_same", "conv2d_lhs_dilation2"])
def test_swapped_rules_disagree_with_the_reference(layer_name):
    case = layer_case(layer_name, True)
    x, layer, R = case[3], case[4], case[5]
    got = {name: explain(make(x)[0], case) for name, make in RULES.items()}
    want = {name: ref.linear_relevance(make(x)[1], layer, x, R).reshape(x.shape) for name, make in RULES.items()}
    for a in RULES:
        for b in RULES:
            err = rel_err(got[a], want[b])
            if a == b or frozenset({a, b}) in EQUIVALENT:
                assert err < TOL, (a, b, err)
            else:
                assert err > 1e-3, f"jlrp {a} is indistinguishable from the reference {b} ({err:.3g})"


def test_reference_checks_itself_against_the_textbook_formulas():
    """The reference's term machinery agrees with the table formulas written out per unit."""
    rng = np.random.default_rng(3)
    x = np.abs(rng.normal(size=6))
    W, b = rng.normal(size=(6, 4)), rng.normal(size=4)
    W[0], W[1] = np.abs(W[0]), -np.abs(W[1])  # every unit has positive and negative weights
    R = rng.normal(size=4)
    layer = ref.dense(W, b)
    z = x @ W + b
    # LRP-0 with bias: z_ij / z_j R_j
    want = (x[:, None] * W / z[None, :] * R[None, :]).sum(1)
    assert rel_err(ref.linear_relevance(ref.Zero(1e-300), layer, x, R), want) < 1e-12
    # z+ (x >= 0, no bias): x_i w_ij+ / sum_i' x_i' w_i'j+
    zp = x[:, None] * np.maximum(W, 0)
    want = (zp / zp.sum(0, keepdims=True) * R[None, :]).sum(1)
    assert rel_err(ref.linear_relevance(ref.ZPlus(1e-300, bias=False), layer, x, R), want) < 1e-12
    # w^2: w_ij^2 / sum_i' w_i'j^2
    want = (W ** 2 / (W ** 2).sum(0, keepdims=True) * R[None, :]).sum(1)
    assert rel_err(ref.linear_relevance(ref.WSquare(1e-300), layer, x, R), want) < 1e-12
    # alpha-beta (x >= 0): a z+_ij / z+_j - b z-_ij / z-_j, bias split into b+ and b-
    zpos, zneg = x[:, None] * np.maximum(W, 0), x[:, None] * np.minimum(W, 0)
    want = (2 * zpos / (zpos.sum(0) + np.maximum(b, 0)) - zneg / (zneg.sum(0) + np.minimum(b, 0))) @ R
    assert rel_err(ref.linear_relevance(ref.AlphaBeta(2, 1, 1e-300), layer, x, R), want) < 1e-12
    # flat on a conv: each output spreads its relevance evenly over its (in-bounds) receptive field
    case = layer_case("conv2d_asymmetric_pad", False)
    conv, R_conv = case[4], case[5].ravel()
    mask = np.abs(conv.M) > 0
    want = (mask / mask.sum(1, keepdims=True) * R_conv[:, None]).sum(0)
    assert rel_err(ref.linear_relevance(ref.Flat(1e-300), conv, case[3], R_conv), want) < 1e-12
    # gamma (x >= 0, z > 0): x_i (w_ij + g w_ij+) / sum_i' (...) with b + g b+
    up = W + 0.25 * np.maximum(W, 0)
    zg = x[:, None] * up
    den = zg.sum(0) + b + 0.25 * np.maximum(b, 0)
    want = ((zg / den) * (R * (z > 0))).sum(1)
    zg_neg = x[:, None] * (W + 0.25 * np.minimum(W, 0))
    want += ((zg_neg / (zg_neg.sum(0) + b + 0.25 * np.minimum(b, 0))) * (R * (z < 0))).sum(1)
    assert rel_err(ref.linear_relevance(ref.Gamma(0.25, 1e-300), layer, x, R), want) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# BatchNorm (inference) after a dense or conv layer: merged into the layer before the rule applies


BN_RULES = {
    "epsilon0.1": (jlrp.rules.epsilon(0.1), ref.Epsilon(0.1)),
    "zplus": (jlrp.rules.zplus(), ref.ZPlus()),
    "alpha2beta1": (jlrp.rules.alpha_beta(2, 1), ref.AlphaBeta(2, 1)),
    "gamma0.25": (jlrp.rules.gamma(0.25), ref.Gamma(0.25, 1e-6)),
    "zbox": (jlrp.rules.zbox(-1.5, 2.0), ref.ZBox(-1.5, 2.0)),
    "wsquare_bias": (jlrp.rules.wsquare(bias=True), ref.WSquare(bias=True)),
}


@functools.lru_cache(maxsize=None)
def bn_case(layer_name: str, form: str):
    rng = np.random.default_rng(11)
    if layer_name == "dense":
        x_shape, w_shape, c_shape = (2, 5), (5, 4), (4,)
        apply = lambda x, w: x @ w  # noqa: E731
    else:
        x_shape, w_shape, c_shape, kw = CONVS[layer_name]
        apply = functools.partial(_conv, **kw)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape) * 0.5
    b = rng.normal(size=c_shape) * 0.5
    mean, var = rng.normal(size=c_shape), rng.uniform(0.5, 2.0, size=c_shape)
    scale = rng.normal(size=c_shape)  # mixed signs
    scale.ravel()[0] = -abs(scale.ravel()[0]) - 0.5
    shift = rng.normal(size=c_shape)
    if form == "mul":
        def fn(x):
            return (apply(x, w) + b - mean) * scale + shift
        s = scale
    else:  # the usual (z - mean) / sqrt(var + eps) * gamma + beta
        std = np.sqrt(var + 1e-5)

        def fn(x):
            return (apply(x, w) + b - mean) / std * scale + shift
        s = scale / std
    unmerged = ref.from_layer(apply, w, x_shape, b - mean)
    out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct(x_shape, jnp.float64)).shape
    s_flat = np.broadcast_to(s, out_shape).ravel()
    t_flat = np.broadcast_to(shift, out_shape).ravel()
    merged = ref.merge_affine(unmerged, s_flat, t_flat)
    R = rng.normal(size=out_shape)
    return fn, x, unmerged, merged, R


@pytest.mark.parametrize("form", ["mul", "div"])
@pytest.mark.parametrize("layer_name", ["dense", "conv2d_stride2_same", "conv2d_nchw"])
@pytest.mark.parametrize("rule_name", list(BN_RULES))
def test_batchnorm_is_merged_into_the_layer(rule_name, layer_name, form):
    fn, x, unmerged, merged, R = bn_case(layer_name, form)
    rule, ref_rule = BN_RULES[rule_name]
    got = np.asarray(jlrp.lrp(fn, rule)(x, relevance=R))
    want = ref.linear_relevance(ref_rule, merged, x, R).reshape(x.shape)
    err = rel_err(got, want)
    OBSERVED[f"bn/{rule_name}"] = max(OBSERVED.get(f"bn/{rule_name}", 0.0), err)
    assert err < TOL, err
    # the merged layer's forward pass is the function's
    np.testing.assert_allclose(merged(x.ravel()), np.ravel(fn(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule_name", ["zplus", "alpha2beta1"])
def test_batchnorm_merge_matters(rule_name):
    """Sanity: rule-on-layer then pass through the BN (no merging) gives different numbers for these rules."""
    fn, x, unmerged, merged, R = bn_case("conv2d_stride2_same", "mul")
    rule, ref_rule = BN_RULES[rule_name]
    got = np.asarray(jlrp.lrp(fn, rule)(x, relevance=R))
    not_merged = ref.linear_relevance(ref_rule, unmerged, x, R).reshape(x.shape)
    assert rel_err(got, not_merged) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Other ways of writing a linear layer and its affine tail (all merged into one layer before the rule)


def _affine_forms():
    rng = np.random.default_rng(21)
    W = rng.normal(size=(5, 4)) * 0.5
    Wt = rng.normal(size=(4, 5)) * 0.5  # for W @ x
    W3 = rng.normal(size=(3, 4)) * 0.5  # for einsum over (batch, time, features)
    b, c = rng.normal(size=4), rng.normal(size=4)
    s = rng.normal(size=4)
    s[0] = -abs(s[0]) - 0.3  # a negative scale
    d = np.where(rng.normal(size=4) > 0, 1.0, -1.0) * rng.uniform(0.5, 2.0, size=4)
    k, kb = rng.normal(size=(3, 3, 4, 5)) * 0.5, rng.normal(size=5)
    mm = lambda x, w: x @ w  # noqa: E731
    conv_t = lambda x, w: jnp.transpose(_conv(x, w, **CONVS["conv2d_stride2_same"][3]), (0, 3, 1, 2))  # noqa
    conv_s = lambda x, w: jnp.transpose(_conv(x, w, **CONVS["conv2d_stride2_same"][3]), (0, 2, 1, 3))  # noqa
    ks = rng.normal(size=5)
    ks[1] = -abs(ks[1]) - 0.3
    return {
        # name: (x shape, apply(x, kernel), kernel, fn(x), per-channel scale, per-channel shift)
        "b_plus_z": ((2, 5), mm, W, lambda x: b + x @ W, 1.0, b),
        "z_minus_c": ((2, 5), mm, W, lambda x: x @ W - c, 1.0, -c),
        "c_minus_z": ((2, 5), mm, W, lambda x: c - x @ W, -1.0, c),
        "neg_z_plus_b": ((2, 5), mm, W, lambda x: -(x @ W) + b, -1.0, b),
        "scalar_bias": ((2, 5), mm, W, lambda x: x @ W + 0.5, 1.0, 0.5),
        "div": ((2, 5), mm, W, lambda x: (x @ W + b) / d, 1.0 / d, b / d),
        "scale_then_bias": ((2, 5), mm, W, lambda x: (x @ W) * s + b, s, b),
        "w_left": ((5,), lambda x, w: w @ x, Wt, lambda x: Wt @ x + b, 1.0, b),
        "einsum_3d": ((2, 3, 3), lambda x, w: jnp.einsum("bti,io->bto", x, w), W3,
                      lambda x: jnp.einsum("bti,io->bto", x, W3) * s + b, s, b),
        "conv_hw_swapped_then_bn": ((1, 6, 6, 4), conv_s, k, lambda x: conv_s(x, k) * ks + kb, ks, kb),
        # a transpose that changes the output's shape, then the bias / BatchNorm (once found unmerged)
        "conv_transposed_output": ((1, 6, 6, 4), conv_t, k, lambda x: conv_t(x, k) + kb[:, None, None], 1.0,
                                   kb[:, None, None]),
        "dense_transposed_then_bn": ((2, 5), lambda x, w: (x @ w).T, W,
                                     lambda x: (x @ W).T * s[:, None] + b[:, None], s[:, None], b[:, None]),
    }


AFFINE_FORMS = _affine_forms()
AFFINE_RULES = ["epsilon0.1", "zplus", "alpha2beta1", "gamma0.25", "wsquare_bias", "zbox_scalar", "flat"]


@pytest.mark.parametrize("form", list(AFFINE_FORMS))
def test_affine_tails_are_merged_into_the_layer(form):
    x_shape, apply, kernel, fn, scale, shift = AFFINE_FORMS[form]
    rng = np.random.default_rng(22)
    x = rng.normal(size=x_shape)
    out_shape = np.shape(fn(x))
    R = rng.normal(size=out_shape)
    scale = np.broadcast_to(scale, out_shape).ravel()
    shift = np.broadcast_to(shift, out_shape).ravel()
    layer = ref.merge_affine(ref.from_layer(apply, kernel, x_shape), scale, shift)
    np.testing.assert_allclose(layer(x.ravel()), np.ravel(fn(x)), rtol=1e-12, atol=1e-12)
    for rule_name in AFFINE_RULES:
        rule, ref_rule = RULES[rule_name](x)
        got = np.asarray(jlrp.lrp(fn, rule)(x, relevance=R))
        want = ref.linear_relevance(ref_rule, layer, x, R).reshape(x.shape)
        err = rel_err(got, want)
        OBSERVED[f"affine/{rule_name}"] = max(OBSERVED.get(f"affine/{rule_name}", 0.0), err)
        assert err < TOL, (rule_name, err)


def test_zz_report_observed_errors():
    """Prints the max relative error seen per rule (run with -s); runs last in this module."""
    for name, err in sorted(OBSERVED.items()):
        print(f"{name:24s} {err:.2e}")
