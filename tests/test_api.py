"""The transform's contract: same forward values, jit == eager, vmap == batch, sharded == single device,
no retrace, linen == NNX, clear errors."""
import os
import subprocess
import sys
import textwrap

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import jlrp

jax.config.update("jax_enable_x64", True)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


def _cnn(dtype=jnp.float64):
    model = CNN()
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 1), dtype)
    params = model.init(jax.random.key(1), x)
    # non-zero biases so that bias handling is exercised
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape, p.dtype), params)
    return model, params, x


COMPOSITES = [jlrp.rules.epsilon(0.01), jlrp.composites.epsilon_plus_flat(),
              jlrp.composites.epsilon_gamma_box(-3.0, 3.0), jlrp.composites.epsilon_alpha2_beta1()]


@pytest.mark.parametrize("composite", COMPOSITES, ids=repr)
def test_forward_unchanged_and_jit_equals_eager(composite):
    model, params, x = _cnn()
    f = jlrp.transform(model.apply, composite, argnums=1)
    np.testing.assert_array_equal(f(params, x), model.apply(params, x))
    np.testing.assert_array_equal(jax.jit(f)(params, x), jax.jit(model.apply)(params, x))
    explain = jlrp.lrp(model.apply, composite, argnums=1)
    eager = explain(params, x, target=1)
    jitted = jax.jit(explain, static_argnames=())(params, x, target=1)
    assert np.abs(eager).sum() > 0
    np.testing.assert_allclose(jitted, eager, rtol=1e-10, atol=1e-13)  # fusion may reorder float sums


def test_vmap_equals_batch():
    model, params, x = _cnn()
    explain = jlrp.lrp(model.apply, jlrp.composites.epsilon_plus_flat(), argnums=1)
    targets = jnp.array([0, 2, 1, 2])
    batch = explain(params, x, target=targets)
    single = jax.vmap(lambda xi, ti: explain(params, xi[None], target=ti)[0])(x, targets)
    np.testing.assert_allclose(single, batch, rtol=1e-12, atol=1e-14)
    # and each row of the batch explanation depends only on its own row
    one = explain(params, x[2:3], target=targets[2])
    np.testing.assert_allclose(one[0], batch[2], rtol=1e-12, atol=1e-14)


def test_targets_argmax_and_custom_relevance():
    model, params, x = _cnn()
    explain = jlrp.lrp(model.apply, jlrp.rules.epsilon(), argnums=1)
    out = model.apply(params, x)
    by_argmax = explain(params, x)
    by_index = explain(params, x, target=jnp.argmax(out, -1))
    np.testing.assert_array_equal(by_argmax, by_index)
    custom = explain(params, x, relevance=out * jax.nn.one_hot(jnp.argmax(out, -1), 3))
    np.testing.assert_allclose(custom, by_argmax, rtol=1e-12)
    # linear in the initial relevance
    twice = explain(params, x, relevance=2 * out * jax.nn.one_hot(jnp.argmax(out, -1), 3))
    np.testing.assert_allclose(twice, 2 * by_argmax, rtol=1e-10)


def test_no_retrace_on_same_shapes():
    model, params, x = _cnn()
    calls = []

    def fn(p, x):
        calls.append(1)
        return model.apply(p, x)

    explain = jlrp.lrp(fn, jlrp.rules.epsilon(), argnums=1)
    explain(params, x, target=0)
    explain(params, x + 1.0, target=1)
    assert len(calls) == 1
    jitted = jax.jit(explain)
    jitted(params, x, target=0)
    jitted(params, x * 2, target=0)
    assert len(calls) == 1  # the jit trace reuses the cached jaxpr too
    explain(params, x[:2], target=0)  # a new shape traces once more
    assert len(calls) == 2


def test_vjp_mirrors_jax_vjp():
    model, params, x = _cnn()
    out, relevance_fn = jlrp.vjp(lambda x: model.apply(params, x), x, composite=jlrp.rules.epsilon())
    np.testing.assert_array_equal(out, model.apply(params, x))
    r0 = out * jax.nn.one_hot(jnp.argmax(out, -1), 3)
    (r,) = relevance_fn(r0)
    expected = jlrp.lrp(model.apply, jlrp.rules.epsilon(), argnums=1)(params, x)
    np.testing.assert_allclose(r, expected, rtol=1e-12)
    out2, fn2 = jlrp.vjp(model.apply, params, x, composite=jlrp.rules.epsilon(), argnums=1)
    np.testing.assert_allclose(fn2(r0)[0], expected, rtol=1e-12)


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.dense1 = nnx.Linear(36, 8, rngs=rngs)
        self.dense2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        x = nnx.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.dense2(nnx.relu(self.dense1(x)))


def test_linen_and_nnx_give_identical_relevance():
    model, params, x = _cnn()
    p = params["params"]
    net = NNXCNN(nnx.Rngs(0))
    net.conv.kernel.set_value(p["Conv_0"]["kernel"])
    net.conv.bias.set_value(p["Conv_0"]["bias"])
    net.dense1.kernel.set_value(p["Dense_0"]["kernel"])
    net.dense1.bias.set_value(p["Dense_0"]["bias"])
    net.dense2.kernel.set_value(p["Dense_1"]["kernel"])
    net.dense2.bias.set_value(p["Dense_1"]["bias"])
    graphdef, state = nnx.split(net)

    def nnx_apply(state, x):
        return nnx.merge(graphdef, state)(x)

    np.testing.assert_allclose(nnx_apply(state, x), model.apply(params, x), rtol=1e-12)
    for composite in COMPOSITES:
        r_linen = jlrp.lrp(model.apply, composite, argnums=1)(params, x, target=1)
        r_nnx = jlrp.lrp(nnx_apply, composite, argnums=1)(state, x, target=1)
        np.testing.assert_allclose(r_nnx, r_linen, rtol=1e-11, atol=1e-14)
    # parameter-path selection works on the NNX state too
    select = jlrp.Composite([("linear", jlrp.rules.epsilon()), (jlrp.param_path("dense2/*"), jlrp.rules.zplus())])
    report = jlrp.report(nnx_apply, select, argnums=1)(state, x)
    rules = {l.info.params: l.rule for l in report.layers if l.info.is_linear}
    assert rules[("dense2/bias/value", "dense2/kernel/value")] == "zplus"
    assert rules[("dense1/bias/value", "dense1/kernel/value")].startswith("epsilon")


def test_sharded_batch_equals_single_device():
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        jax.config.update("jax_enable_x64", True)
        import sys; sys.path.insert(0, %r)
        from test_api import _cnn
        import jlrp
        assert len(jax.devices()) == 4, jax.devices()
        model, params, x = _cnn()
        x = jnp.concatenate([x, x[::-1] * 0.5])  # batch of 8
        targets = jnp.arange(8) %% 3
        explain = jax.jit(jlrp.lrp(model.apply, jlrp.composites.epsilon_plus_flat(), argnums=1))
        single = explain(params, x, target=targets)
        mesh = jax.make_mesh((4,), ("batch",))
        xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
        ts = jax.device_put(targets, NamedSharding(mesh, P("batch")))
        sharded = explain(params, xs, target=ts)
        assert len(sharded.sharding.device_set) == 4, sharded.sharding
        np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-12, atol=1e-14)
        # inside jax.shard_map (varying and replicated values mixed; the gamma rule's modified weights too)
        for composite in (jlrp.composites.epsilon_plus_flat(), jlrp.composites.epsilon_alpha2_beta1()):
            lrp = jlrp.lrp(model.apply, composite, argnums=1)
            inside = jax.jit(jax.shard_map(lambda p, x, t: lrp(p, x, target=t), mesh=mesh,
                                           in_specs=(P(), P("batch"), P("batch")), out_specs=P("batch")))
            np.testing.assert_allclose(np.asarray(inside(params, xs, ts)),
                                       np.asarray(lrp(params, x, target=targets)), rtol=1e-12, atol=1e-14)
        try:  # z^B's bounds are replicated values: a clear error, never relevance summed over devices
            lrp = jlrp.lrp(model.apply, jlrp.composites.epsilon_gamma_box(-3.0, 3.0), argnums=1)
            jax.jit(jax.shard_map(lambda p, x, t: lrp(p, x, target=t), mesh=mesh,
                                  in_specs=(P(), P("batch"), P("batch")), out_specs=P("batch")))(params, xs, ts)
            raise SystemExit("z^B inside shard_map ran")
        except NotImplementedError as error:
            assert "shard_map" in str(error)
        print("SHARDED-OK")
    """) % os.path.dirname(__file__)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "SHARDED-OK" in proc.stdout, proc.stdout + proc.stderr


def test_model_that_switches_mesh_axes_inside_an_explicit_mesh():
    # Flax NNX's Embed (and jimm's models) look tokens up under jax.sharding.auto_axes inside an explicit
    # mesh: the lookup's equations were traced under another mesh than the caller's, and are replayed in it
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    rng = np.random.default_rng(0)
    emb, w = jnp.asarray(rng.normal(size=(10, 6))), jnp.asarray(rng.normal(size=(6, 3)))
    ids = jnp.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    plain = lambda emb, ids: jnp.tanh(jnp.take(emb, ids, axis=0)).sum(1) @ w
    expected = jlrp.lrp(plain, jlrp.rules.epsilon(), argnums=1)(emb, ids, target=0)
    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        take = jax.sharding.auto_axes(lambda e, i: jnp.take(e, i, axis=0), out_sharding=P())
        switching = lambda emb, ids: jnp.tanh(take(emb, ids)).sum(1) @ w
        ids_sharded = jax.device_put(ids, NamedSharding(mesh, P()))
        explain = jlrp.lrp(switching, jlrp.rules.epsilon(), argnums=1)
        for run in (explain, jax.jit(explain)):
            np.testing.assert_allclose(np.asarray(run(emb, ids_sharded, target=0)), np.asarray(expected),
                                       rtol=1e-12)
        report = jlrp.report(switching, jlrp.rules.epsilon(), argnums=1)(emb, ids_sharded, target=0)
        np.testing.assert_allclose(np.asarray(report.relevance), np.asarray(expected), rtol=1e-12)


def test_bf16_model_gives_finite_float32_quality_relevance():
    model, params, x = _cnn(jnp.float32)
    explain = jlrp.lrp(model.apply, jlrp.composites.epsilon_plus_flat(), argnums=1)
    ref = explain(params, x, target=0)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    r16 = explain(p16, x.astype(jnp.bfloat16), target=0)
    assert r16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(r16)))
    corr = np.corrcoef(np.asarray(r16, np.float32).ravel(), np.asarray(ref).ravel())[0, 1]
    assert corr > 0.95


def test_finite_for_dead_relus_and_zero_input():
    model, params, x = _cnn()
    for composite in COMPOSITES + [jlrp.rules.zero(), jlrp.rules.wsquare(), jlrp.rules.flat()]:
        r = jlrp.lrp(model.apply, composite, argnums=1)(params, jnp.zeros_like(x), target=0)
        assert bool(jnp.all(jnp.isfinite(r))), composite
    dead = jax.tree.map(lambda p: -jnp.abs(p), params)  # every relu dead
    r = jlrp.lrp(model.apply, jlrp.rules.zero(), argnums=1)(dead, jnp.abs(x), target=0)
    assert bool(jnp.all(jnp.isfinite(r)))


# ---------------------------------------------------------------------------------------------- errors

def test_target_out_of_range_and_bad_shapes():
    model, params, x = _cnn()
    explain = jlrp.lrp(model.apply, jlrp.rules.epsilon(), argnums=1)
    with pytest.raises(ValueError, match="out of range"):
        explain(params, x, target=3)
    with pytest.raises(ValueError, match="out of range"):
        explain(params, x, target=jnp.array([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="does not fit"):
        explain(params, x, target=jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        explain(params, x, target=1.5)
    with pytest.raises(ValueError, match="expected the model output's shape"):
        explain(params, x, relevance=jnp.ones((4, 2)))


def test_traced_targets_are_range_checked_under_jit_and_vmap_without_a_host_call_per_run():
    """A traced target out of range raises under jit and vmap; the host is called only on the branch a bad
    target takes (inside a cond), never on every run (a round trip that cost 4x jax.grad on a small MLP)."""
    model, params, x = _cnn()
    explain = jlrp.lrp(model.apply, jlrp.rules.epsilon(), argnums=1)
    run = jax.jit(lambda x, t: explain(params, x, target=t))
    good = jnp.array([0, 1, 2, 1])
    np.testing.assert_allclose(run(x, good), explain(params, x, target=np.asarray(good)), rtol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        jax.block_until_ready(run(x, jnp.array([0, 1, 2, 3])))
    batched = jax.vmap(run, in_axes=(None, 0))
    assert batched(x, jnp.stack([good, good[::-1]])).shape == (2,) + x.shape
    with pytest.raises(ValueError, match="out of range"):
        jax.block_until_ready(batched(x, jnp.stack([good, jnp.array([0, 0, 0, -1])])))

    def callbacks(jaxpr, in_cond=False):  # (primitive, inside a cond?) of every callback, at any depth
        for e in jaxpr.eqns:
            if "callback" in e.primitive.name:
                yield e.primitive.name, in_cond
            for p in e.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from callbacks(sub, in_cond or e.primitive.name == "cond")
    found = list(callbacks(jax.make_jaxpr(run)(x, good).jaxpr))
    assert found and all(in_cond for _, in_cond in found), found


def test_batch_of_scalar_outputs_is_not_guessed_silently():
    """A (batch,) output over a batched input: per-row scores or classes of one sample? jlrp reads classes
    (as documented) but warns, naming the fix for each reading; (batch, 1) outputs, relevance= and target=
    are unambiguous and silent. Unbatched / vmapped models whose first axis equals the number of classes
    and pytree arguments (parameters) must not be refused."""
    w = jnp.array([1.0, -2.0, 0.5])
    x = jnp.arange(12.0).reshape(4, 3) / 7
    rows = lambda x: x @ w  # (4,) per-row scores
    for method, fix in [(jlrp.lrp(rows, jlrp.rules.zero()), r"\(4, 1\) or pass relevance=out"),
                        (jlrp.gradient(rows), r"\(4, 1\); pass target="),
                        (jlrp.guided_backprop(rows), r"\(4, 1\); pass target="),
                        (jlrp.smoothgrad(rows, key=jax.random.key(0), n=2), r"\(4, 1\); pass target=")]:
        with pytest.warns(UserWarning, match=r"shape \(4,\).*leading axis of 4.*" + fix):
            method(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(jlrp.lrp(rows, jlrp.rules.zero())(x, relevance=rows(x)), x * w, rtol=1e-10)
        np.testing.assert_allclose(jlrp.lrp(lambda x: rows(x)[:, None], jlrp.rules.zero())(x), x * w, rtol=1e-10)
        np.testing.assert_allclose(jlrp.gradient(lambda x: rows(x)[:, None])(x), jnp.tile(w, (4, 1)))
        # an unbatched model with as many classes as input rows: target= keeps the class reading
        m = jnp.arange(12.0).reshape(3, 4) / 5
        classes = lambda x: (x @ m).sum(0)  # (4, 3) -> (4,) classes of one sample
        r = jlrp.lrp(classes, jlrp.rules.zero())(x, target=2)
        np.testing.assert_allclose(r.sum(), classes(x)[2], rtol=1e-6)  # the sum layer's stabiliser
        jlrp.lrp(classes, jlrp.rules.zero())(x[:3])  # no coincidence, no warning
        # explaining parameters (a pytree) is never read as a batch
        params = {"m": m, "b": jnp.zeros(4)}
        jlrp.gradient(lambda p, x: (x @ p["m"]).sum(0) + p["b"])(params, x[:3])


def test_wrong_argnums():
    model, params, x = _cnn()
    with pytest.raises(ValueError, match="argnums=2 is out of range"):
        jlrp.lrp(model.apply, argnums=2)(params, x)
    with pytest.raises(TypeError, match="argnums"):
        jlrp.lrp(model.apply, argnums="x")
    with pytest.raises(ValueError, match="bool.*floating-point"):
        jlrp.lrp(lambda w, m: (w * m).sum(-1), argnums=1)(jnp.ones((5, 2)), jnp.ones((5, 2), bool))


def test_token_ids_get_relevance_at_the_embedding_output():
    emb = jax.random.normal(jax.random.key(0), (10, 4))
    w = jax.random.normal(jax.random.key(1), (4, 3))

    def model(emb, ids):  # (batch, seq) ids -> (batch, 3) logits
        return jnp.tanh(emb[ids]).sum(1) @ w

    ids = jnp.array([[1, 2, 3], [4, 4, 9]])
    composite = jlrp.Composite([("linear", jlrp.rules.zero()), ("sum", jlrp.rules.norm(1e-12))])
    r = jlrp.lrp(model, composite, argnums=1)(emb, ids, target=2)
    assert r.shape == ids.shape
    # by hand: the dense layer's LRP-0 relevance of each token's embedding, summed over the embedding axis
    h = jnp.tanh(emb[ids])
    z = h.sum(1) @ w
    expected = (h * w[:, 2]).sum(-1) * (z[:, 2] / z[:, 2])[:, None]
    np.testing.assert_allclose(r, expected, rtol=1e-10)
    np.testing.assert_allclose(r.sum(1), z[:, 2], rtol=1e-10)


def test_unsupported_primitive_names_primitive_and_module():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4, name="proj")(x)
            return jnp.sort(x, axis=-1)

    model = Odd()
    x = jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)
    with pytest.raises(jlrp.UnsupportedPrimitiveError) as info:
        jlrp.lrp(model.apply, argnums=1)(params, x)
    msg = str(info.value)
    assert "'sort'" in msg and "Odd" in msg and "register_rule" in msg
