"""Issue 10's silent-wrong cases, one named test each (each failed on the spelling-based analysis).

Oracles: LRP-0 equals input x gradient on piecewise-linear models (with normalisation statistics detached
where a model has them), the report balances, and models written two ways give the same relevance.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp
from jlrp import rules

jax.config.update("jax_enable_x64", True)

LRP0 = jlrp.Composite([("linear", rules.zero()), ("affine", rules.zero()), ("sum", rules.zero()),
                       ("add", rules.zero())], "lrp0")
COUNTER = iter(range(10**6))


def rnd(*shape, scale=1.0):
    return scale * jax.random.normal(jax.random.fold_in(jax.random.key(10), next(COUNTER)), shape)


def conv(x, k, padding="SAME", stride=1):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def input_x_gradient(f, args, argnums, target):
    argnums = argnums if isinstance(argnums, tuple) else (argnums,)
    grads = jax.grad(lambda *a: f(*a)[:, target].sum(), argnums=argnums)(*args)
    return jax.tree.map(lambda a, g: a * g, tuple(args[k] for k in argnums), grads)


def assert_close(a, b, rtol=1e-9):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = max(float(jnp.abs(y).max()), 1e-30)
        assert float(jnp.abs(x - y).max()) <= rtol * scale, (float(jnp.abs(x - y).max()), scale)


def closure(rep) -> float:
    lost = float(jnp.sum(rep.initial)) - sum(float(jnp.sum(r)) for r in jax.tree.leaves(rep.relevance))
    return abs(lost - sum(float(l.absorbed) for l in rep.layers)) / max(1.0, abs(float(jnp.sum(rep.initial))))


def check_lrp0(f, args, argnums, target=0):
    r = jlrp.lrp(f, LRP0, argnums=argnums)(*args, target=target)
    want = input_x_gradient(f, args, argnums, target)
    assert_close(r if isinstance(argnums, tuple) else (r,), want)
    rep = jlrp.report(f, LRP0, argnums=argnums)(*args, target=target)
    assert closure(rep) < 1e-8


# 1. explained inputs broadcast before they are combined ------------------------------------------------------
def test_case1_broadcast_explained_summand_gets_its_share():
    w = rnd(5, 3)
    x, c = rnd(4, 5), rnd(3)
    f = lambda x, c: x @ w + c
    check_lrp0(f, (x, c), (0, 1))
    r_c = jlrp.lrp(f, LRP0, argnums=(0, 1))(x, c, target=1)[1]
    assert float(jnp.abs(r_c).max()) > 1e-3  # the broadcast summand is not silently zero


def test_case1_film_conditioning():
    k, v, w = rnd(3, 3, 2, 4), rnd(3, 4), rnd(4 * 4 * 4, 3)
    img, meta = rnd(2, 4, 4, 2), rnd(2, 3)
    f = lambda img, meta: jax.nn.relu(conv(img, k) + (meta @ v)[:, None, None, :]).reshape(2, -1) @ w
    check_lrp0(f, (img, meta), (0, 1))


def test_case1_explaining_parameters_gives_biases_their_share():
    w1, w2 = rnd(5, 6), rnd(6, 3)
    biases = {"b1": rnd(6), "b2": rnd(3)}
    x = rnd(4, 5)
    f = lambda p, x: jax.nn.relu(x @ w1 + p["b1"]) @ w2 + p["b2"]
    check_lrp0(f, (biases, x), (0, 1), target=2)
    r = jlrp.lrp(f, LRP0, argnums=0)(biases, x, target=2)
    assert float(jnp.abs(r["b1"]).max()) > 1e-3 and float(jnp.abs(r["b2"]).max()) > 1e-3


# 2. a scale that cannot be folded, then a bias ------------------------------------------------------------
def test_case2_unfoldable_scale_then_bias():
    k, s, b, w = rnd(3, 3, 2, 3), rnd(4, 4, 3), rnd(4, 4, 3), rnd(48, 2)
    f = lambda x: jax.nn.relu(conv(x, k) * s + b).reshape(x.shape[0], -1) @ w
    check_lrp0(f, (rnd(3, 4, 4, 2),), 0)


# 3. normalisation that cannot be folded into a linear layer -----------------------------------------------
def _bn(x, p):
    return (x - p["mean"]) / jnp.sqrt(p["var"] + 1e-5) * p["scale"] + p["bias"]


def test_case3_preactivation_batchnorm_densenet_block():
    k1, k2, w = rnd(3, 3, 2, 3), rnd(3, 3, 5, 4), rnd(64, 2)
    bn = {"mean": rnd(5), "var": jnp.abs(rnd(5)) + 0.1, "scale": rnd(5), "bias": rnd(5)}

    def f(x):
        h = jnp.concatenate([x, conv(x, k1)], axis=-1)  # dense connectivity
        h = conv(jax.nn.relu(_bn(h, bn)), k2)  # BN -> ReLU -> conv (pre-activation)
        return h.reshape(x.shape[0], -1) @ w

    x = rnd(3, 4, 4, 2)
    check_lrp0(f, (x,), 0)
    r = jlrp.lrp(f, rules.epsilon(1e-6))(x, target=0)
    logit = f(x)[:, 0]
    assert float(jnp.abs(r).max()) < 1e3 * float(jnp.abs(logit).max())


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm"])
def test_case3_normalisation_after_conv_equals_ixg_with_detached_std(norm):
    """The centring is a linear map (its mean is not a constant), the standard deviation is a constant: LRP-0
    equals input x gradient of the model with only the standard deviation detached."""
    k, w = rnd(3, 3, 2, 4), rnd(64, 2)
    g, b = rnd(4), rnd(4)

    def normalise(h, detach):
        hs = h.reshape(h.shape[:-1] + (2, 2)) if norm == "groupnorm" else h[..., None, :]
        axes = (1, 2, 4) if norm == "groupnorm" else (-2, -1)
        mean = hs.mean(axes, keepdims=True)
        std = jnp.sqrt(((hs - mean) ** 2).mean(axes, keepdims=True) + 1e-5)
        if detach:
            std = jax.lax.stop_gradient(std)
        return ((hs - mean) / std).reshape(h.shape) * g + b

    f = lambda x, detach=False: jax.nn.relu(normalise(conv(x, k), detach)).reshape(x.shape[0], -1) @ w
    x = rnd(3, 4, 4, 2)
    r = jlrp.lrp(f, LRP0)(x, target=1)
    assert_close(r, input_x_gradient(lambda x: f(x, True), (x,), (0,), 1)[0])
    assert closure(jlrp.report(f, LRP0)(x, target=1)) < 1e-8


# 4. bias and BatchNorm past a dtype cast ------------------------------------------------------------------
def test_case4_bf16_dense_absorbs_its_bias():
    w1, b1, w2 = rnd(6, 8), rnd(8), rnd(8, 2)
    x = rnd(4, 6)
    f = lambda x, dt: jax.nn.relu(x.astype(dt) @ w1.astype(dt) + b1.astype(dt)) @ w2.astype(dt)
    r16 = jlrp.lrp(lambda x: f(x, jnp.bfloat16), rules.epsilon())(x.astype(jnp.bfloat16), target=0)
    r32 = jlrp.lrp(lambda x: f(x, jnp.float32), rules.epsilon())(x.astype(jnp.float32), target=0)
    np.testing.assert_allclose(jnp.sum(r16.astype(jnp.float32), -1), jnp.sum(r32, -1), rtol=0.05, atol=0.05)
    rep = jlrp.report(lambda x: f(x, jnp.bfloat16), rules.epsilon())(x.astype(jnp.bfloat16), target=0)
    dense = [l for l in rep.layers if l.info.kind == "dense"]
    assert "bias" in dense[0].info.reason


def test_case4_flax_batchnorm_is_folded_in_bf16():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(3, (3, 3), dtype=jnp.bfloat16)(x)
            x = nn.BatchNorm(use_running_average=True, dtype=jnp.bfloat16)(x)
            return nn.Dense(2, dtype=jnp.bfloat16)(nn.relu(x).reshape(x.shape[0], -1))

    x = rnd(2, 4, 4, 1).astype(jnp.float32)
    v = Net().init(jax.random.key(0), x)
    rep = jlrp.report(Net().apply, rules.epsilon(), argnums=1)(v, x, target=0)
    kinds = [l.info.kind for l in rep.layers]
    assert "affine" not in kinds, kinds
    conv_layer = next(l for l in rep.layers if l.info.kind == "conv")
    assert "scale" in conv_layer.info.reason and "bias" in conv_layer.info.reason


# 5. explicit zero padding before a VALID conv -------------------------------------------------------------
@pytest.mark.parametrize("composite", ["flat", "zbox", "epsilon_plus_flat"])
def test_case5_explicit_pad_equals_same_padding(composite):
    k, w = rnd(3, 3, 2, 3), rnd(48, 2)
    comp = {"flat": rules.flat(), "zbox": rules.zbox(-3.0, 3.0),
            "epsilon_plus_flat": jlrp.composites.epsilon_plus_flat()}[composite]
    same = lambda x: jax.nn.relu(conv(x, k)).reshape(x.shape[0], -1) @ w
    padded = lambda x: jax.nn.relu(conv(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), k, "VALID")).reshape(
        x.shape[0], -1) @ w
    x = rnd(2, 4, 4, 2)
    assert_close(jlrp.lrp(padded, comp)(x, target=1), jlrp.lrp(same, comp)(x, target=1), 1e-10)
    assert closure(jlrp.report(padded, comp)(x, target=1)) < 1e-8


# 6. constants concatenated into the activation stream -----------------------------------------------------
def test_case6_cls_token_report_balances():
    cls, wq, wo = rnd(1, 1, 4), rnd(4, 4), rnd(4, 2)

    def f(x):
        h = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, 4)), x], axis=1)
        h = jax.nn.relu(h @ wq)
        return h[:, 0] @ wo + h[:, 1:].sum(1) @ wo

    x = rnd(2, 3, 4)
    for comp in (LRP0, jlrp.composites.epsilon_plus_flat(), rules.epsilon(0.1)):
        assert closure(jlrp.report(f, comp)(x, target=0)) < 1e-8


# 7. DeconvNet / Guided BackProp modify only ReLUs ---------------------------------------------------------
@pytest.mark.parametrize("method", [jlrp.guided_backprop, jlrp.deconvnet], ids=["gbp", "deconvnet"])
def test_case7_casts_and_input_normalisation_keep_their_gradient(method):
    w1, w2 = rnd(5, 6), rnd(6, 3)
    m, s = rnd(5), jnp.abs(rnd(5)) + 0.5
    net = lambda h: jax.nn.relu(h @ w1) @ w2
    wrapped = lambda x: net(((x.astype(jnp.float32) - m) / s).astype(jnp.float64))
    x = rnd(4, 5)
    got = method(wrapped)(x, target=1)
    want = method(net)((x - m) / s, target=1) / s  # the preprocessing is linear: chain rule
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# 8. CP-LRP and LayerNorm, however they are written --------------------------------------------------------
def _attention(x, wq, wk, wv, softmax):
    q, k, v = x @ wq, x @ wk, x @ wv
    return softmax(jnp.einsum("bqd,bkd->bqk", q, k)) @ v


def test_case8_cp_lrp_softmax_written_as_exp_log_softmax():
    wq, wk, wv, wo = rnd(4, 4), rnd(4, 4), rnd(4, 4), rnd(4, 2)
    x = rnd(2, 3, 4)
    ways = [jax.nn.softmax, lambda a: jnp.exp(jax.nn.log_softmax(a))]
    comp = jlrp.Composite([("product", rules.cp())])
    rs = [jlrp.lrp(lambda x: _attention(x, wq, wk, wv, sm).sum(1) @ wo, comp)(x, target=0) for sm in ways]
    assert_close(rs[1], rs[0], 1e-9)
    origins = [l.info.origins for l in jlrp.report(lambda x: _attention(x, wq, wk, wv, ways[1]).sum(1) @ wo,
                                                    comp)(x, target=0).layers if l.info.kind == "product"]
    assert ("softmax", "") in origins


def test_case8_layernorm_with_broadcast_to():
    w = rnd(6, 2)

    def ln(x, explicit):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        if explicit:
            mean, var = jnp.broadcast_to(mean, x.shape), jnp.broadcast_to(var, x.shape)
        return (x - mean) / jnp.sqrt(var + 1e-5)

    x = rnd(3, 6)
    rs = [jlrp.lrp(lambda x: ln(x, e) @ w, rules.epsilon())(x, target=0) for e in (False, True)]
    assert_close(rs[1], rs[0], 1e-12)


# 9. position selectors mean the same scanned or unrolled --------------------------------------------------
def test_case9_scanned_layers_get_first_only_at_step_zero():
    ws, bs = rnd(3, 5, 5, scale=0.6), rnd(3, 5, scale=0.1)
    wo = rnd(5, 2)

    def scanned(x):
        h, _ = jax.lax.scan(lambda h, p: (jax.nn.relu(h @ p[0] + p[1]), None), x, (ws, bs))
        return h @ wo

    def unrolled(x):
        for i in range(3):
            x = jax.nn.relu(x @ ws[i] + bs[i])
        return x @ wo

    x = rnd(4, 5)
    for comp in (jlrp.composites.epsilon_plus_flat(), jlrp.composites.epsilon_alpha2_beta1_flat()):
        assert_close(jlrp.lrp(scanned, comp)(x, target=1), jlrp.lrp(unrolled, comp)(x, target=1), 1e-10)
    rep = jlrp.report(scanned, jlrp.composites.epsilon_plus_flat())(x, target=1)
    assert closure(rep) < 1e-8


def test_case9_reverse_scan_first_is_the_first_executed_step():
    ws = rnd(3, 4, 4, scale=0.7)
    scanned = lambda x: jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, ws, reverse=True)[0]
    unrolled = lambda x: jax.nn.relu(jax.nn.relu(jax.nn.relu(x @ ws[2]) @ ws[1]) @ ws[0])
    x = rnd(2, 4)
    comp = jlrp.composites.epsilon_plus_flat()
    assert_close(jlrp.lrp(scanned, comp)(x, target=0), jlrp.lrp(unrolled, comp)(x, target=0), 1e-10)


# 10. jitted sub-blocks, targets under jit, rules on max layers --------------------------------------------
def test_case10_jitted_sub_block_forward_is_bit_identical():
    w1, w2 = rnd(16, 32), rnd(32, 3)
    block = jax.jit(lambda h: jnp.tanh(h @ w1) * 0.5 + jnp.exp(-h @ w1))
    f = lambda x: block(x) @ w2
    x = rnd(8, 16)
    out = jlrp.transform(f, rules.epsilon())(x)
    assert np.array_equal(np.asarray(out), np.asarray(f(x)))
    assert np.array_equal(np.asarray(jax.jit(jlrp.transform(f, rules.epsilon()))(x)), np.asarray(jax.jit(f)(x)))


def test_case10_out_of_range_target_under_jit_is_an_error():
    w = rnd(4, 3)
    explain = jax.jit(jlrp.lrp(lambda x: x @ w, rules.epsilon()))
    x = rnd(2, 4)
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(explain(x, target=jnp.array([0, 3])))
    assert np.isfinite(np.asarray(explain(x, target=jnp.array([0, 2])))).all()


def test_case10_rule_on_cumulative_max_layers():
    w = rnd(5, 5)
    f = lambda x: jax.lax.cummax(x @ w, axis=1)
    g = lambda x: jnp.cumsum(x @ w, axis=1)  # the stand-in a rule on a max layer propagates through
    x = rnd(3, 5)
    r = jlrp.lrp(f, jlrp.Composite([("max", rules.epsilon())]))(x, target=4)
    ref = jlrp.lrp(g, jlrp.Composite([("sum", rules.epsilon())]))(x, relevance=jax.nn.one_hot(jnp.full(3, 4), 5) * f(x))
    assert np.isfinite(np.asarray(r)).all()
    assert_close(r, ref, 1e-6)


def test_rules_are_type_checked_where_they_enter():
    with pytest.raises(TypeError, match="jlrp rule"):
        jlrp.Composite([("dense", 0.25)])
    with pytest.raises(TypeError, match="jlrp rule"):
        jlrp.Composite([("conv", "epsilon")])
    with pytest.raises(TypeError, match="jlrp rule"):
        jlrp.register_rule("sort", 1e-6)


# ------------------------------------------------------------------------------------------------------
# Found by the property suite (tests/test_properties.py) and the model zoo

def test_relu_batchnorm_relu_keeps_the_batchnorm_a_layer():
    # ReLU, per-channel affine map, ReLU: the affine map is a layer (its shift absorbs like a bias), not part
    # of one activation region that passes relevance through unchanged
    w1, w2, scale, shift = rnd(5, 6), rnd(6, 3), rnd(6), rnd(6)
    f = lambda x: jax.nn.relu(jax.nn.relu(x @ w1) * scale + shift) @ w2
    x = rnd(4, 5)
    assert_close(jlrp.lrp(f, LRP0)(x, target=1), input_x_gradient(f, (x,), 0, 1)[0])
    kinds = [l.info.kind for l in jlrp.report(f, LRP0)(x, target=1).layers]
    assert kinds == ["dense", "activation", "affine", "activation", "dense"], kinds


def test_tanh_gelu_stays_one_activation():
    # the activation's own scalar constants (0.5 * (1 + tanh(.))) are no layer of their own
    w1, w2 = rnd(5, 6), rnd(6, 3)
    f = lambda x: jax.nn.gelu(x @ w1, approximate=True) @ w2
    kinds = [l.info.kind for l in jlrp.report(f, LRP0)(rnd(4, 5), target=1).layers]
    assert kinds == ["dense", "activation", "dense"], kinds


def test_relevance_leaves_a_jitted_block_through_an_activation_output():
    # a jitted block reading an activation's output: relevance must reach the layers before the block
    w1, w2, w3 = rnd(5, 6), rnd(6, 6), rnd(6, 3)
    block = jax.jit(lambda h: jax.nn.relu(h @ w2))
    f = lambda x: block(jax.nn.relu(x @ w1)) @ w3
    x = rnd(4, 5)
    assert_close(jlrp.lrp(f, LRP0)(x, target=2), input_x_gradient(f, (x,), 0, 2)[0])


def test_zero_pad_from_a_closed_over_constant_under_jit():
    # the pad value is a traced constant when the explanation itself is jitted: no concrete value needed
    k1, k2, w = rnd(3, 3, 2, 4), rnd(3, 3, 4, 4), rnd(4, 2)
    zero = jnp.zeros(())

    def f(x, zero):
        h = jax.nn.relu(conv(x, k1))
        h = jax.lax.pad(h, zero, [(0, 0, 0), (1, 1, 0), (1, 1, 0), (0, 0, 0)])
        return jax.nn.relu(conv(h, k2, "VALID")).mean((1, 2)) @ w

    x = rnd(2, 6, 6, 2)
    eager = jlrp.lrp(f, LRP0, argnums=0)(x, zero, target=0)
    jitted = jax.jit(lambda x, z: jlrp.lrp(f, LRP0, argnums=0)(x, z, target=0))(x, zero)
    assert_close(jitted, eager, 1e-12)
    assert_close(eager, input_x_gradient(f, (x, zero), 0, 0)[0])


def test_normalisation_statistics_are_no_layers_and_jit_blocks_stay_bit_identical():
    # LayerNorm's variance (here E[x^2] - E[x]^2, as Flax NNX writes it) only feeds constants: no layers
    # for it; and an eagerly called jitted block computes exactly the model's values
    w1, w2, scale, shift = rnd(5, 6), rnd(6, 3), rnd(6), rnd(6)

    @jax.jit
    def norm(h):
        mean = h.mean(-1, keepdims=True)
        var = jnp.maximum((h * h).mean(-1, keepdims=True) - mean ** 2, 0)
        return jax.nn.relu((h - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + shift)

    f = lambda x: norm(x @ w1) @ w2
    x = rnd(4, 5)
    report = jlrp.report(f)(x, target=0)
    assert [l.info.kind for l in report.layers] == ["dense", "affine", "activation", "dense"]
    assert np.array_equal(np.asarray(jlrp.transform(f, argnums=0)(x)), np.asarray(f(x)))


def test_literal_arguments_of_a_jitted_call_stay_its_parameters():
    # jnp.var is a jax.jit called with the literal correction 0: inside the model's program n - 0 is a
    # parameter, so the variance is divided by n; folded into a constant, XLA multiplies by 1/n (an ulp off)
    w1, w2 = rnd(5, 96), rnd(96, 3)
    f = lambda x: (jnp.tanh(x @ w1) / jnp.sqrt(jnp.var(x @ w1, axis=-1, keepdims=True) + 1e-5)) @ w2
    x = rnd(64, 5)
    assert np.array_equal(np.asarray(jlrp.transform(f, argnums=0)(x)), np.asarray(f(x)))


def test_positions_computed_from_token_ids_carry_no_relevance():
    # positions from cumsum(ids != pad) are constants: the token relevance equals that of the same model
    # given the positions as a constant input
    emb, pos, w = rnd(10, 6), rnd(6, 6), rnd(6, 3)
    ids = jnp.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    positions = jnp.cumsum(ids != 0, axis=1)
    f = lambda ids: jnp.tanh(emb[ids] + pos[jnp.cumsum(ids != 0, axis=1)]).sum(1) @ w
    g = lambda ids: jnp.tanh(emb[ids] + pos[positions]).sum(1) @ w
    explain = lambda fn: jlrp.lrp(fn, rules.epsilon())(ids, target=0)
    assert_close(explain(f), explain(g), 1e-12)
    # RoBERTa's positions: what is computed token by token from such positions and the ids (cumsum(mask) *
    # mask + pad) is a position too, not an embedding of the ids
    roberta = lambda ids: (jnp.cumsum(ids != 0, axis=1) * (ids != 0) + 0).astype(jnp.int32)
    f = lambda ids: jnp.tanh(emb[ids] + pos[roberta(ids)]).sum(1) @ w
    g = lambda ids, p=roberta(ids): jnp.tanh(emb[ids] + pos[p]).sum(1) @ w
    assert_close(explain(f), explain(g), 1e-12)


def test_token_ids_on_non_leading_axes_of_the_embedding():
    # penzai names axes: an embedding written table.T[:, ids] has the ids' axes after the feature axis
    emb, w = rnd(10, 6), rnd(6, 3)
    ids = jnp.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    leading = lambda ids: jnp.einsum("ntd,dc->nc", jnp.tanh(emb[ids]), w)
    trailing = lambda ids: jnp.einsum("dnt,dc->nc", jnp.tanh(emb.T[:, ids]), w)
    r = jlrp.lrp(trailing, rules.epsilon())(ids, target=0)
    assert r.shape == ids.shape
    assert_close(r, jlrp.lrp(leading, rules.epsilon())(ids, target=0), 1e-12)


def test_div_of_two_activations_scales_the_numerator():
    # linear attention's normaliser: the denominator is a constant (like LayerNorm's std), so the layer is
    # the numerator times 1/den; reference: input x gradient with the denominator detached
    wq, w = rnd(6, 6), rnd(6, 3)

    def f(x, detach=False):
        q = jax.nn.relu(x @ wq)
        den = q.sum(-1, keepdims=True) + 1.0
        den = jax.lax.stop_gradient(den) if detach else den
        return (x / den).sum(1) @ w

    x = rnd(2, 5, 6)
    report = jlrp.report(f, LRP0)(x, target=1)
    assert "normaliser" in report.layers[-3].info.reason
    assert_close(report.relevance, input_x_gradient(lambda x: f(x, True), (x,), 0, 1)[0])
