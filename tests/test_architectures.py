"""Every architecture: residual nets with BatchNorm (canonization), transformers, recurrent models, control
flow, pooling, and the same model in every JAX library."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import jlrp
from jlrp import rules

jax.config.update("jax_enable_x64", True)


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ------------------------------------------------------------------------------ ResNet with BatchNorm

class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3), use_bias=False)(x)))
        y = nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3), use_bias=False)(y))
        return nn.relu(x + y)


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3), use_bias=False)(x)))
        x = Block(name="Block_1")(Block(name="Block_0")(x))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def _resnet(zero_shift=False):
    model = ResNet()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
    variables = model.init(jax.random.key(1), x)
    keys = iter(jax.random.split(jax.random.key(2), 64))

    def randomise(path, leaf):
        name = jax.tree_util.keystr(path)
        k = next(keys)
        if "mean" in name or ("bias" in name and "BatchNorm" in name):
            return jnp.zeros_like(leaf) if zero_shift else 0.3 * jax.random.normal(k, leaf.shape)
        if "var" in name:
            return jax.random.uniform(k, leaf.shape, minval=0.5, maxval=2.0)
        if "scale" in name:  # some negative scales too
            return jax.random.uniform(k, leaf.shape, minval=-1.5, maxval=1.5)
        return leaf

    return model, jax.tree_util.tree_map_with_path(randomise, variables), x


def _merged_resnet(variables):
    """The same network with every BatchNorm merged into its conv by hand."""
    p, s = variables["params"], variables["batch_stats"]

    def conv_bn(x, conv, bn, stats):
        scale = bn["scale"] / jnp.sqrt(stats["var"] + 1e-5)
        w = conv["kernel"] * scale
        b = bn["bias"] - stats["mean"] * scale
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + b

    def block(x, p, s):
        y = jax.nn.relu(conv_bn(x, p["Conv_0"], p["BatchNorm_0"], s["BatchNorm_0"]))
        y = conv_bn(y, p["Conv_1"], p["BatchNorm_1"], s["BatchNorm_1"])
        return jax.nn.relu(x + y)

    def apply(x):
        x = jax.nn.relu(conv_bn(x, p["Conv_0"], p["BatchNorm_0"], s["BatchNorm_0"]))
        x = block(block(x, p["Block_0"], s["Block_0"]), p["Block_1"], s["Block_1"])
        return x.mean(axis=(1, 2)) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]

    return apply


@pytest.mark.parametrize("composite", [rules.epsilon(0.01), jlrp.composites.epsilon_plus_flat(),
                                       jlrp.composites.epsilon_gamma_box(-4.0, 4.0),
                                       jlrp.composites.epsilon_alpha2_beta1()], ids=repr)
def test_batchnorm_is_canonized_into_the_conv(composite):
    model, variables, x = _resnet()
    merged = _merged_resnet(variables)
    np.testing.assert_allclose(merged(x), model.apply(variables, x), rtol=1e-10)
    transformed = jlrp.transform(model.apply, composite, argnums=1)
    np.testing.assert_array_equal(transformed(variables, x), model.apply(variables, x))
    r_model = jlrp.lrp(model.apply, composite, argnums=1)(variables, x, target=2)
    r_merged = jlrp.lrp(merged, composite)(x, target=2)
    assert rel_err(r_model, r_merged) < 1e-10
    kinds = [l.info.kind for l in jlrp.report(model.apply, composite, argnums=1)(variables, x).layers]
    assert kinds.count("conv") == 5 and kinds.count("add") == 2  # BN folded: no stray affine layers


def test_resnet_conservation_with_bias_free_convs():
    model, variables, x = _resnet(zero_shift=True)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "Dense_0" in jax.tree_util.keystr(p) and "bias" in
        jax.tree_util.keystr(p) else v, variables)
    composite = jlrp.Composite([("linear", rules.zero(1e-12)), ("add", rules.norm(1e-12)),
                                ("sum", rules.norm(1e-12))])
    out = model.apply(variables, x)
    r = jlrp.lrp(model.apply, composite, argnums=1)(variables, x, target=1)
    np.testing.assert_allclose(r.reshape(2, -1).sum(1), out[:, 1], rtol=1e-8)


def test_batchnorm_before_a_conv_is_an_affine_layer():
    """DenseNet-style BN before its conv cannot be merged into a linear layer: it is an affine layer of its own
    (epsilon rule over ``a * x + b``), so its shift absorbs like a bias and LRP-0 equals input x gradient."""
    class PreBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=True)(x)
            x = nn.Conv(3, (3, 3), use_bias=False)(nn.relu(x))
            return nn.Dense(2, use_bias=False)(x.reshape(x.shape[0], -1))

    model = PreBN()
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
    v = model.init(jax.random.key(1), x)
    v = {"params": v["params"], "batch_stats": {"BatchNorm_0": {"mean": jnp.array([0.3, -0.2]),
                                                                "var": jnp.array([2.0, 0.5])}}}
    report = jlrp.report(model.apply, rules.zero(1e-12), argnums=1)(v, x, target=0)
    assert [l.info.kind for l in report.layers][:2] == ["affine", "activation"]
    grad = jax.grad(lambda x: model.apply(v, x)[:, 0].sum())(x)
    np.testing.assert_allclose(report.relevance, x * grad, rtol=1e-4, atol=5e-5)  # float32 parameters
    absorbed = sum(float(l.absorbed) for l in report.layers)
    assert abs(float(jnp.sum(report.initial)) - float(jnp.sum(report.relevance)) - absorbed) < 1e-6


# ------------------------------------------------------------------------------ transformers

SEQ, VOCAB, DIM = 6, 20, 8


class NNXEncoder(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.pos = nnx.Param(0.1 * jax.random.normal(jax.random.key(5), (SEQ, DIM)))
        self.blocks = nnx.List([self._block(rngs) for _ in range(2)])
        self.head = nnx.Linear(DIM, 3, rngs=rngs)

    @staticmethod
    def _block(rngs):
        return nnx.Dict(ln1=nnx.LayerNorm(DIM, rngs=rngs), ln2=nnx.RMSNorm(DIM, rngs=rngs),
                        attn=nnx.MultiHeadAttention(num_heads=2, in_features=DIM, decode=False, rngs=rngs),
                        up=nnx.Linear(DIM, 16, rngs=rngs), down=nnx.Linear(16, DIM, rngs=rngs))

    def __call__(self, ids):
        x = self.embed(ids) + self.pos[...]
        for b in self.blocks:
            x = x + b["attn"](b["ln1"](x))
            x = x + b["down"](nnx.gelu(b["up"](b["ln2"](x))))
        return self.head(x.mean(axis=1))


class LinenEncoder(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, DIM)(ids)
        for _ in range(2):
            x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
            h = nn.Dense(DIM)(nn.silu(nn.Dense(16)(nn.RMSNorm()(x))))
            x = x + h
        return nn.Dense(3)(x.mean(axis=1))


def _zero_positions(tree):
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "pos" in jax.tree_util.keystr(p) else v, tree)


def _zero_biases(tree):
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "bias" in jax.tree_util.keystr(p) else v, tree)


def _nnx_encoder():
    graphdef, state = nnx.split(NNXEncoder(nnx.Rngs(0)))
    return (lambda state, ids: nnx.merge(graphdef, state)(ids)), _zero_biases(state)


def _linen_encoder():
    model = LinenEncoder()
    params = model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
    return model.apply, _zero_biases(params)


@pytest.mark.parametrize("build", [_nnx_encoder, _linen_encoder], ids=["nnx", "linen"])
def test_transformer_conservation_per_token(build):
    apply, params = build()
    ids = jax.random.randint(jax.random.key(7), (20, SEQ), 0, VOCAB)
    params = _zero_positions(params)  # an additive position embedding absorbs its share, like a bias
    explain = jax.jit(jlrp.lrp(apply, rules.epsilon(1e-9), argnums=1))
    r = explain(params, ids, target=0)
    out = apply(params, ids)[:, 0]
    assert r.shape == ids.shape
    assert bool(jnp.all(jnp.isfinite(r)))
    ratio = np.abs(np.asarray(r.sum(1) - out)) / np.abs(np.asarray(out))
    assert ratio.max() < 1e-3, ratio
    # the relevance is not trivially uniform over tokens
    assert float(jnp.std(r)) > 1e-3 * float(jnp.abs(r).mean())


def test_transformer_rule_variants_are_selectable():
    apply, params = _nnx_encoder()
    params = _zero_positions(params)
    ids = jax.random.randint(jax.random.key(3), (4, SEQ), 0, VOCAB)
    uniform = jlrp.lrp(apply, rules.epsilon(1e-9), argnums=1)(params, ids)
    cp = jlrp.lrp(apply, jlrp.Composite([("linear", rules.epsilon(1e-9)), ("product", rules.cp())]),
                  argnums=1)(params, ids)
    assert rel_err(uniform, cp) > 1e-3  # different rules, different explanations
    out = apply(params, ids)
    np.testing.assert_allclose(cp.sum(1), out.max(1), rtol=1e-3)  # CP-LRP conserves too
    report = jlrp.report(apply, rules.epsilon(), argnums=1)(params, ids)
    products = [l.info for l in report.layers if l.info.kind == "product"]
    assert len(products) == 4 and {o for p in products for o in p.origins} == {"", "softmax"}


# ------------------------------------------------------------------------------ recurrent models

H, F, T = 5, 3, 7


def _lstm_params(key):
    k = jax.random.split(key, 3)
    return dict(W=0.5 * jax.random.normal(k[0], (F, 4 * H)), U=0.5 * jax.random.normal(k[1], (H, 4 * H)),
                b=jnp.zeros(4 * H), out=jax.random.normal(k[2], (H, 2)))


def _lstm_cell(p, carry, x):
    h, c = carry
    z = x @ p["W"] + h @ p["U"] + p["b"]
    i, f, o, g = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c)


def _gru_params(key):
    k = jax.random.split(key, 3)
    return dict(W=0.5 * jax.random.normal(k[0], (F, 3 * H)), U=0.5 * jax.random.normal(k[1], (H, 3 * H)),
                b=jnp.zeros(3 * H), out=jax.random.normal(k[2], (H, 2)))


def _gru_cell(p, carry, x):
    (h,) = carry
    xr, xz, xn = jnp.split(x @ p["W"] + p["b"], 3, axis=-1)
    ur, uz, un = jnp.split(h @ p["U"], 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + ur), jax.nn.sigmoid(xz + uz)
    n = jnp.tanh(xn + r * un)
    return ((1 - z) * n + z * h,)


def _rnn(cell, n_carry, scan):
    def apply(p, xs):  # xs: (batch, T, F)
        carry = tuple(jnp.zeros((xs.shape[0], H)) for _ in range(n_carry))
        if scan:
            carry, _ = jax.lax.scan(lambda c, x: (cell(p, c, x), None), carry, jnp.swapaxes(xs, 0, 1))
        else:
            for t in range(xs.shape[1]):
                carry = cell(p, carry, xs[:, t])
        return carry[0] @ p["out"]
    return apply


@pytest.mark.parametrize("cell,n_carry,init", [(_lstm_cell, 2, _lstm_params), (_gru_cell, 1, _gru_params)],
                         ids=["lstm", "gru"])
def test_recurrent_scan_equals_unrolled_and_conserves(cell, n_carry, init):
    p = init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (3, T, F))
    composite = jlrp.Composite([("linear", rules.zero(1e-12)), ("add", rules.norm(1e-12)),
                                ("affine", rules.zero(1e-12)), ("product", rules.uniform(1e-12))])
    scanned = jlrp.lrp(_rnn(cell, n_carry, True), composite, argnums=1)
    unrolled = jlrp.lrp(_rnn(cell, n_carry, False), composite, argnums=1)
    r_scan, r_unroll = scanned(p, xs, target=1), unrolled(p, xs, target=1)
    assert r_scan.shape == xs.shape  # relevance per time step and feature
    assert rel_err(r_scan, r_unroll) < 1e-9
    out = _rnn(cell, n_carry, True)(p, xs)[:, 1]
    np.testing.assert_allclose(r_scan.sum((1, 2)), out, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(scanned)(p, xs, target=1), r_scan, rtol=1e-10)
    # gates get no relevance by default; splitting uniformly into them breaks the time-step conservation
    uniform = jlrp.Composite([*composite.entries, ("product", rules.uniform(1e-12, gates=False))])
    r_uni = jlrp.lrp(_rnn(cell, n_carry, True), uniform, argnums=1)(p, xs, target=1)
    assert rel_err(r_uni, r_scan) > 1e-3


def test_report_itemises_the_scan_body_per_time_step():
    """The report lists a scan's body layers with one row per layer and the time step as a leading axis;
    step t of each body layer equals the same layer at step t of the unrolled model, and the whole report
    still balances (R_out - R_in = absorbed, the scan absorbing what its body does)."""
    p = _lstm_params(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (3, T, F))
    composite = jlrp.Composite([("linear", rules.epsilon(0.05)), ("add", rules.norm(1e-12)),
                                ("product", rules.uniform(1e-12))])
    scanned = jlrp.report(_rnn(_lstm_cell, 2, True), composite, argnums=1)(p, xs, target=1)
    unrolled = jlrp.report(_rnn(_lstm_cell, 2, False), composite, argnums=1)(p, xs, target=1)
    (scan,) = [l for l in scanned.layers if l.info.kind == "scan"]
    (body,) = scan.body
    per_step = len(body)
    assert scan.rule == "body" and per_step >= 4
    # the unrolled model: a shorter step 0 (the zero initial state makes h @ U a constant), then T - 1
    # copies of the body's layers in the body's order, then the output layer
    first = len(unrolled.layers) - 1 - (T - 1) * per_step
    for k, row in enumerate(body):
        assert row.relevance.shape == (T,) + row.info.output_shape and row.absorbed.shape == ()
        for t in range(1, T):
            twin = unrolled.layers[first + (t - 1) * per_step + k]
            assert (twin.info.kind, twin.info.output_shape) == (row.info.kind, row.info.output_shape)
            np.testing.assert_allclose(row.relevance[t], twin.relevance, rtol=1e-9, atol=1e-12)
    assert abs(float(scan.absorbed)) > 1e-3  # epsilon: the body does absorb
    leak = float(jnp.sum(scanned.initial) - jnp.sum(scanned.relevance))
    np.testing.assert_allclose(leak, sum(float(l.absorbed) for l in scanned.layers), rtol=1e-8)
    # the scan's own row: relevance at its output (the final hidden state)
    np.testing.assert_allclose(scan.total, scanned.layers[-1].total - scanned.layers[-1].absorbed, rtol=1e-8)
    table = scanned.table()
    assert "| 0.0 |" in table and f"| 0.{per_step - 1} |" in table
    jitted = jax.jit(jlrp.report(_rnn(_lstm_cell, 2, True), composite, argnums=1))(p, xs, target=1)
    np.testing.assert_allclose(jitted.layers[0].body[0][0].relevance, body[0].relevance, rtol=1e-10)


def _balance(rep):
    """sum R_out - sum R_in and the report's total absorbed share (they must agree)."""
    leak = float(jnp.sum(rep.initial) - sum(jnp.sum(r) for r in jax.tree.leaves(rep.relevance)))
    return leak, sum(float(l.absorbed) for l in rep.layers)


def test_report_scan_edge_cases():
    """A constant non-zero initial state (its relevance is absorbed like a bias's), reverse scans (steps are
    indexed like xs), relevance leaving through the per-step outputs of a flax nn.RNN (the scan row counts
    every explained output), vmap of the report, and token ids embedded inside a loop (refused)."""
    w = jnp.array([[0.5, 0.2], [0.1, 0.4]])
    x = jnp.array([[1.0, 2.0], [0.5, -1.0], [2.0, 1.0]])
    def rnn(x, h0, reverse=False):
        h, hs = jax.lax.scan(lambda h, xt: (jnp.tanh(h @ w + xt), h), h0, x, reverse=reverse)
        return h + hs.sum(0)

    for reverse in (False, True):
        rep = jlrp.report(rnn, rules.epsilon(1e-9))(x, jnp.ones(2), reverse, target=0)
        leak, absorbed = _balance(rep)
        assert abs(leak) > 0.05  # the constant initial state takes a real share
        np.testing.assert_allclose(leak, absorbed, rtol=1e-6)
        explained_h0 = jlrp.report(rnn, rules.epsilon(1e-9), argnums=(0, 1))(x, jnp.ones(2), reverse, target=0)
        np.testing.assert_allclose(*_balance(explained_h0), rtol=1e-6)
    # a reverse scan's rows are indexed like xs: step t is the forward scan's step T-1-t over x[::-1]
    backward = jlrp.report(rnn, rules.epsilon(1e-9))(x, jnp.ones(2), True, target=0).layers[0].body[0]
    forward = jlrp.report(rnn, rules.epsilon(1e-9))(x[::-1], jnp.ones(2), False, target=0).layers[0].body[0]
    for b_row, f_row in zip(backward, forward):
        np.testing.assert_allclose(b_row.relevance, f_row.relevance[::-1], rtol=1e-9, atol=1e-12)

    class Seq(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.RNN(nn.LSTMCell(4))(x)[:, -1])

    xs = jax.random.normal(jax.random.key(0), (2, 5, 3), jnp.float32)  # flax's carry is float32
    model = Seq()
    params = model.init(jax.random.key(1), xs)
    rep = jlrp.report(model.apply, rules.epsilon(1e-3), argnums=1)(params, xs, target=1)
    (scan,) = [l for l in rep.layers if l.info.kind == "scan"]
    head = rep.layers[-1]
    assert isinstance(scan.relevance, tuple) and len(scan.relevance) >= 2  # carries and per-step outputs
    np.testing.assert_allclose(scan.total, head.total - head.absorbed, rtol=1e-6)
    np.testing.assert_allclose(*_balance(rep), rtol=1e-5, atol=1e-7)
    batched = jax.vmap(lambda x: [r.relevance for r in jlrp.report(model.apply, rules.epsilon(1e-3), argnums=1)(
        params, x[None], target=1).layers[0].body[0]])(xs)  # per example: (steps, 1, ...) per body row
    for one, row in zip(batched, scan.body[0]):
        np.testing.assert_allclose(np.swapaxes(one[:, :, 0], 0, 1), row.relevance, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(r.relevance).max()) for r in scan.body[0]) > 1e-3

    emb = jax.random.normal(jax.random.key(2), (10, 2))
    inside = lambda ids: jax.lax.scan(lambda h, i: (jnp.tanh(h @ w + emb[i]), None), jnp.zeros(2), ids)[0]
    with pytest.raises(NotImplementedError, match="embedded inside a scan body.*Embed before the loop"):
        jlrp.lrp(inside, rules.epsilon())(jnp.array([1, 2, 3]), target=0)


def test_echo_state_network_and_fori_loop():
    w_in = jax.random.normal(jax.random.key(0), (F, 10)) * 0.5
    w_res = jax.random.normal(jax.random.key(1), (10, 10)) * 0.2
    w_out = jax.random.normal(jax.random.key(2), (10, 2))

    def esn(xs):
        def step(h, x):
            return jnp.tanh(x @ w_in + h @ w_res), None
        h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[0], 10)), jnp.swapaxes(xs, 0, 1))
        return h @ w_out

    def esn_fori(xs):
        h = jax.lax.fori_loop(0, T, lambda t, h: jnp.tanh(xs[:, t] @ w_in + h @ w_res), jnp.zeros((xs.shape[0], 10)))
        return h @ w_out

    xs = jax.random.normal(jax.random.key(3), (2, T, F))
    r1 = jlrp.lrp(esn, rules.epsilon(1e-9))(xs, target=0)
    r2 = jlrp.lrp(esn_fori, rules.epsilon(1e-9))(xs, target=0)
    assert rel_err(r1, r2) < 1e-9
    np.testing.assert_allclose(r1.sum((1, 2)), esn(xs)[:, 0], rtol=1e-5)


def test_cond_switch_and_checkpoint_follow_the_taken_branch():
    w1 = jax.random.normal(jax.random.key(0), (4, 6))
    w2 = jax.random.normal(jax.random.key(1), (6, 3))
    plain = lambda x: jax.nn.relu(x @ w1) @ w2

    def with_cond(x, flag):
        h = jax.lax.cond(flag, lambda x: jax.nn.relu(x @ w1), lambda x: jnp.tanh(x @ w1), x)
        return jax.checkpoint(lambda h: h @ w2)(h)

    x = jax.random.normal(jax.random.key(2), (3, 4))
    expected = jlrp.lrp(plain, rules.epsilon(0.1))(x, target=0)
    got = jlrp.lrp(with_cond, rules.epsilon(0.1))(x, True, target=0)
    assert rel_err(got, expected) < 1e-12
    other = jlrp.lrp(with_cond, rules.epsilon(0.1))(x, False, target=0)
    expected_tanh = jlrp.lrp(lambda x: jnp.tanh(x @ w1) @ w2, rules.epsilon(0.1))(x, target=0)
    assert rel_err(other, expected_tanh) < 1e-12
    # the report lists both branches and the checkpointed body; only the taken branch carries relevance
    rep = jlrp.report(with_cond, rules.epsilon(0.1))(x, False, target=0)
    cond, remat = rep.layers[0], rep.layers[1]
    assert (cond.info.kind, remat.info.kind) == ("cond", "remat2") and len(cond.body) == 2
    taken, skipped = cond.body  # the jaxpr's branches are (false, true): index 0, tanh, ran
    assert [r.info.kind for r in taken] == ["dense", "activation"]
    assert all(float(jnp.abs(r.relevance).sum()) > 0 for r in taken)
    assert all(float(jnp.abs(r.relevance).sum()) == 0 for r in skipped)
    np.testing.assert_allclose(cond.absorbed, taken[0].absorbed, rtol=1e-12)
    (head,) = remat.body[0]  # h @ w2, the last layer: its output relevance is the initial relevance
    np.testing.assert_allclose(head.total, rep.initial.sum(), rtol=1e-12)
    np.testing.assert_allclose(remat.total, head.total, rtol=1e-12)
    leak = float(jnp.sum(rep.initial) - jnp.sum(rep.relevance))
    np.testing.assert_allclose(leak, sum(float(l.absorbed) for l in rep.layers), rtol=1e-8)
    sw = lambda x, i: jax.lax.switch(i, [lambda x: x @ w1, lambda x: 2 * (x @ w1)], x) @ w2
    np.testing.assert_allclose(jlrp.lrp(sw, rules.epsilon(1e-9))(x, 1, target=0).sum(1),
                               sw(x, 1)[:, 0], rtol=1e-6)


# ------------------------------------------------------------------------------ graph structure

def test_branches_concat_split_slice_and_shared_activations():
    w = jax.random.normal(jax.random.key(0), (4, 6))
    v = jax.random.normal(jax.random.key(1), (6, 2))

    def net(x):
        h = jax.nn.relu(x @ w)  # used by three consumers
        a, b = jnp.split(h, 2, axis=1)
        cat = jnp.concatenate([b, a, h[:, :2]], axis=1)
        padded = jnp.pad(cat, ((0, 0), (0, 1)))[:, :6]
        return (padded + h) @ v

    x = jax.random.normal(jax.random.key(2), (3, 4))
    composite = jlrp.Composite([("linear", rules.zero(1e-12)), ("add", rules.norm(1e-12))])
    r = jlrp.lrp(net, composite)(x, target=1)
    np.testing.assert_allclose(r.sum(1), net(x)[:, 1], rtol=1e-8)


def test_max_pooling_winner_take_all_and_proportional():
    x = jnp.array([[[[1.0], [3.0]], [[2.0], [0.5]]]])  # one 2x2 window
    pool = lambda x: nn.max_pool(x, (2, 2), (2, 2)).reshape(1, 1)
    winner = jlrp.lrp(pool, rules.epsilon())(x)
    np.testing.assert_allclose(winner[0, :, :, 0], [[0, 3.0], [0, 0]])
    prop = jlrp.lrp(pool, jlrp.Composite([("max", rules.norm(1e-12))]))(x)
    np.testing.assert_allclose(prop[0, :, :, 0], np.array([[1.0, 3.0], [2.0, 0.5]]) * 3.0 / 6.5, rtol=1e-10)


def test_average_pooling_is_proportional():
    x = jnp.array([[[[1.0], [3.0]], [[2.0], [-2.0]]]])
    pool = lambda x: nn.avg_pool(x, (2, 2), (2, 2)).reshape(1, 1)
    r = jlrp.lrp(pool, rules.epsilon())(x)
    np.testing.assert_allclose(r[0, :, :, 0], np.array([[1.0, 3.0], [2.0, -2.0]]) / 4.0, rtol=1e-5)


def test_register_rule_for_an_unknown_primitive():
    f = lambda x: jnp.sort(x * 2.0, axis=-1) @ jnp.ones((4, 1))
    x = jnp.array([[3.0, 1.0, 2.0, -1.0]])
    with pytest.raises(jlrp.UnsupportedPrimitiveError, match="'sort'"):
        jlrp.lrp(f, rules.epsilon())(x)
    jlrp.register_rule("sort", rules.gradient())
    try:
        r = jlrp.lrp(f, rules.epsilon())(x)
        np.testing.assert_allclose(r.sum(), f(x)[0, 0], rtol=1e-6)
        np.testing.assert_allclose(r, x * 2.0, rtol=1e-6)  # sort's gradient routes R_i = 2 x_i back
    finally:
        jlrp.register_rule("sort", None)


# ------------------------------------------------------------------------------ every JAX library

def test_same_model_in_linen_nnx_equinox_haiku_and_plain_jax():
    eqx = pytest.importorskip("equinox")
    hk = pytest.importorskip("haiku")
    k = jax.random.split(jax.random.key(0), 4)
    conv_w = 0.5 * jax.random.normal(k[0], (3, 3, 1, 4))
    conv_b = 0.1 * jax.random.normal(k[1], (4,))
    dense_w = 0.3 * jax.random.normal(k[2], (64, 3))
    dense_b = 0.1 * jax.random.normal(k[3], (3,))
    x = jax.random.normal(jax.random.key(9), (2, 4, 4, 1))

    def plain(x):
        y = jax.lax.conv_general_dilated(x, conv_w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.nn.relu(y + conv_b)
        return y.reshape(y.shape[0], -1) @ dense_w + dense_b

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.relu(nn.Conv(4, (3, 3))(x))
            return nn.Dense(3)(y.reshape(y.shape[0], -1))

    linen_params = {"params": {"Conv_0": {"kernel": conv_w, "bias": conv_b},
                               "Dense_0": {"kernel": dense_w, "bias": dense_b}}}

    class NNX(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))
            self.dense = nnx.Linear(64, 3, rngs=nnx.Rngs(0))
            self.conv.kernel.set_value(conv_w)
            self.conv.bias.set_value(conv_b)
            self.dense.kernel.set_value(dense_w)
            self.dense.bias.set_value(dense_b)

        def __call__(self, x):
            y = nnx.relu(self.conv(x))
            return self.dense(y.reshape(y.shape[0], -1))

    graphdef, state = nnx.split(NNX())

    class Eqx(eqx.Module):
        conv: eqx.nn.Conv2d
        dense: eqx.nn.Linear

        def __call__(self, x):  # one example, CHW as Equinox expects
            y = jax.nn.relu(self.conv(jnp.transpose(x, (2, 0, 1))))
            return self.dense(jnp.transpose(y, (1, 2, 0)).reshape(-1))

    e = Eqx(eqx.nn.Conv2d(1, 4, 3, padding=1, key=k[0]), eqx.nn.Linear(64, 3, key=k[1]))
    e = eqx.tree_at(lambda m: (m.conv.weight, m.conv.bias, m.dense.weight, m.dense.bias), e,
                    (jnp.transpose(conv_w, (3, 2, 0, 1)), conv_b[:, None, None], dense_w.T, dense_b))

    def haiku_fn(x):
        y = jax.nn.relu(hk.Conv2D(4, 3, name="conv")(x))
        return hk.Linear(3, name="dense")(y.reshape(y.shape[0], -1))

    hkf = hk.without_apply_rng(hk.transform(haiku_fn))
    hk_params = {"conv": {"w": conv_w, "b": conv_b}, "dense": {"w": dense_w, "b": dense_b}}

    models = {
        "plain": (lambda x: plain(x), ()),
        "linen": (lambda p, x: Linen().apply(p, x), (linen_params,)),
        "nnx": (lambda s, x: nnx.merge(graphdef, s)(x), (state,)),
        "equinox": (lambda m, x: jax.vmap(m)(x), (e,)),
        "haiku": (hkf.apply, (hk_params,)),
    }
    reference = plain(x)
    for composite in [rules.epsilon(0.01), jlrp.composites.epsilon_plus_flat(),
                      jlrp.composites.epsilon_gamma_box(-3.0, 3.0)]:
        results = {}
        for name, (fn, params) in models.items():
            np.testing.assert_allclose(fn(*params, x), reference, rtol=1e-10, err_msg=name)
            results[name] = jlrp.lrp(fn, composite, argnums=len(params))(*params, x, target=2)
        for name, r in results.items():
            assert rel_err(r, results["plain"]) < 1e-10, (name, composite)


class ViT(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(DIM, (4, 4), strides=(4, 4), padding="VALID")(x)  # patch embedding
        x = x.reshape(x.shape[0], -1, DIM)
        x = x + self.param("pos", nn.initializers.normal(0.1), (1, x.shape[1], DIM))
        for _ in range(2):
            x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
            x = x + nn.Dense(DIM)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))
        return nn.Dense(3)(nn.LayerNorm()(x).mean(axis=1))


def test_small_vit_conserves_and_explains_pixels():
    model = ViT()
    x = jax.random.normal(jax.random.key(0), (20, 16, 16, 1))
    params = _zero_biases(model.init(jax.random.key(1), x))
    composite = jlrp.Composite([("linear", rules.epsilon(1e-9)), ("sum", rules.norm(1e-9)),
                                ("add", rules.norm(1e-9)), ("product", rules.uniform(1e-9))])
    # the positional embedding is a constant added after the patch-embedding conv: jlrp folds it into that
    # layer as its bias, so it absorbs relevance like a bias; the report accounts for it exactly
    report = jax.jit(jlrp.report(model.apply, composite, argnums=1))(params, x[:4], target=1)
    leak = float(jnp.sum(report.initial) - jnp.sum(report.relevance))
    np.testing.assert_allclose(leak, sum(float(l.absorbed) for l in report.layers), rtol=1e-6)
    assert abs(float(report.layers[0].absorbed)) > 1e-4  # the pos-embedding share
    # with it zeroed, like every other bias, relevance is conserved
    params = _zero_positions(params)
    zeroed = jax.jit(jlrp.report(model.apply, composite, argnums=1))(params, x[:4], target=1)
    assert abs(float(zeroed.layers[0].absorbed)) < 1e-7 * abs(float(jnp.sum(zeroed.initial)))  # stabilizer only
    r = jax.jit(jlrp.lrp(model.apply, composite, argnums=1))(params, x, target=1)
    out = model.apply(params, x)[:, 1]
    assert r.shape == x.shape and bool(jnp.all(jnp.isfinite(r)))
    ratio = np.abs(np.asarray(r.reshape(20, -1).sum(1) - out)) / np.abs(np.asarray(out))
    assert ratio.max() < 1e-3, ratio
