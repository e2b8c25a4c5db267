"""Model-parameter randomisation sanity check: jlrp/_src/sanity.py."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlrp
from jlrp import evaluation as E
from test_patterns import CNN  # conv-pool-conv-dense-dense-dense


def numpy_spearman(a, b):
    """Rank correlation written out: average ranks for ties, then Pearson of the ranks."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        for value in np.unique(v):  # ties: the mean of their positions
            r[v == value] = r[v == value].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return np.corrcoef(ra, rb)[0, 1]


def test_rank_correlation_matches_numpy_with_ties_and_constants():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 3, 5))
    b = a + rng.normal(size=a.shape)
    a[1, 0] = 0.0  # ties
    b[1, :, :2] = 0.0
    b[2] = 1.0  # a constant map
    got = np.asarray(E.rank_correlation(jnp.asarray(a), jnp.asarray(b)))
    want = [numpy_spearman(a[i].ravel(), b[i].ravel()) for i in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert got[2] == 0.0 and np.all(np.isfinite(got))
    np.testing.assert_allclose(E.rank_correlation(jnp.asarray(a), jnp.asarray(a ** 3)), 1.0, rtol=1e-6)


def numpy_init(shapes, seed):
    """Parameters for the shapes of a model's variables, drawn with numpy (He-normal kernels, zero biases and
    means, unit scales and variances): flax's and equinox's initialisers would compile a random program
    per layer shape, which took most of this file's time."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if not isinstance(s, jax.ShapeDtypeStruct):  # functions and other static leaves
            return s
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        if s.ndim >= 2:  # kernels: (..., fan_in, out) in flax, (out, in) in equinox: the larger fan either way
            fan_in = int(np.prod(s.shape[:-1])) if name in ("kernel", "value") else int(s.shape[-1])
            value = rng.normal(size=s.shape) * np.sqrt(2.0 / fan_in)
        else:
            value = np.ones(s.shape) if name in ("scale", "var") else np.zeros(s.shape)
        return jax.device_put(np.asarray(value, s.dtype))
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def trained():
    data = jlrp.datasets.shapes(1000, size=16)
    x, y = jax.device_put(np.asarray(data.x, np.float32)), jax.device_put(np.asarray(data.y))
    model = CNN()
    params = numpy_init(jax.eval_shape(model.init, jax.random.key(0), x[:1]), 0)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, idx):
        grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(p, x[idx]), y[idx]).mean())(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for idx in np.random.default_rng(1).integers(0, len(x), size=(300, 128)):
        params, state = step(params, state, idx)
    test = jlrp.datasets.shapes(200, size=16, seed=3)
    xt, yt = jnp.asarray(test.x, jnp.float32), jnp.asarray(test.y)
    accuracy = float((model.apply(params, xt).argmax(-1) == yt).mean())
    return model, params, xt[:16], yt[:16], accuracy


def test_randomize_redraws_only_the_named_modules(trained):
    model, params, *_ = trained
    key = jax.random.key(5)
    new = E.randomize(params, ["Dense_1", "Conv_0"], key)
    flat_old = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
    for path, old in flat_old.items():
        changed = not np.array_equal(old, flat_new[path])
        module = jax.tree_util.keystr(path)
        assert changed == ("Dense_1" in module or "Conv_0" in module), module
        if changed and old.size > 100:  # the scale is kept
            np.testing.assert_allclose(flat_new[path].std(), old.std(), rtol=0.2)
    again = E.randomize(params, ["Dense_1", "Conv_0"], key)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(again)))


def test_randomisation_separates_explanations_from_artifacts(trained):
    """LRP follows the model: after randomising the whole model its maps are far from the trained model's.
    A map that ignores the parameters (the input itself, an 'edge detector') stays identical at every
    step: the check flags it."""
    model, params, x, y, accuracy = trained
    print(f"\nCNN test accuracy {accuracy:.3f} (chance 0.25)")
    assert accuracy > 0.5
    lrp = jlrp.lrp(model.apply, jlrp.composites.epsilon_plus(), argnums=1)
    methods = {"lrp epsilon_plus": lambda p, x: lrp(p, x, target=y),
               "the input itself": lambda p, x: x}
    key = jax.random.key(7)
    results = {"lrp epsilon_plus": E.parameter_randomization(methods["lrp epsilon_plus"], params, x, key),
               # skip: a regex of modules to leave out of the default order
               "the input itself": E.parameter_randomization(methods["the input itself"], params, x, key,
                                                             skip="Conv")}
    modules = results["lrp epsilon_plus"]["modules"]
    assert modules == ["Dense_2", "Dense_1", "Dense_0", "Conv_1", "Conv_0"]  # output first
    assert results["the input itself"]["modules"] == ["Dense_2", "Dense_1", "Dense_0"]
    print("\nmean rank correlation of |R| with the trained model's, randomised cumulatively from the output:")
    print(f"{'':>18} | " + " | ".join(f"{m:>8}" for m in modules))
    for name, res in results.items():
        assert res["spearman"].shape == res["spearman_abs"].shape == (len(res["modules"]), len(x))
        print(f"{name:>18} | " + " | ".join(f"{v:8.3f}" for v in np.asarray(res["spearman_abs"]).mean(1)))
    np.testing.assert_allclose(results["the input itself"]["spearman"], 1.0, rtol=1e-6)
    full = np.asarray(results["lrp epsilon_plus"]["spearman"][-1]).mean()
    print(f"lrp epsilon_plus: signed rank correlation after randomising everything {full:.3f}")
    assert full < 0.5, full
    one_at_a_time = E.parameter_randomization(methods["lrp epsilon_plus"], params, x, key, cascade=False)
    assert one_at_a_time["spearman"].shape == (5, len(x))
    np.testing.assert_allclose(one_at_a_time["spearman"][0], results["lrp epsilon_plus"]["spearman"][0],
                               rtol=1e-6)  # the first step is the same single module
    with pytest.raises(ValueError, match="unknown modules"):
        E.parameter_randomization(methods["lrp epsilon_plus"], params, x, key, order=["Dense_9"])


def test_modules_of_equinox_and_nnx_models():
    """Modules are found in any pytree: an Equinox MLP's list of layers (functions are not parameters)
    and an NNX state; the check runs end to end on both."""
    eqx = pytest.importorskip("equinox")
    from flax import nnx

    x = np.random.default_rng(0).normal(size=(6, 3))
    mlp = numpy_init(eqx.filter_eval_shape(eqx.nn.MLP, 3, 2, 8, 2, key=jax.random.key(1)), 1)
    explain = jlrp.gradient(lambda m, x: jax.vmap(m)(x), argnums=1)
    res = E.parameter_randomization(lambda m, x: explain(m, x, target=0), mlp, x, jax.random.key(2))
    assert res["modules"] == ["layers/2", "layers/1", "layers/0"]
    assert np.all(np.isfinite(res["spearman"])) and res["spearman"].shape == (3, 6)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden, self.out = nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.hidden(x)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
    state = numpy_init(state, 2)
    apply = lambda state, x: nnx.merge(graphdef, state)(x)
    explain = jlrp.gradient(apply, argnums=1)
    res = E.parameter_randomization(lambda s, x: explain(s, x, target=1), state, x, jax.random.key(3),
                                    order=["out", "hidden"])
    assert res["modules"] == ["out", "hidden"] and np.all(np.isfinite(res["spearman"]))
    assert float(res["spearman"][-1].mean()) < 0.9


def test_randomize_keeps_scale_sign_and_earlier_draws():
    params = {"params": {"Dense_0": {"kernel": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "bias": jnp.zeros(8)},
                         "BatchNorm_0": {"scale": jnp.linspace(0.5, 1.5, 8), "bias": jnp.linspace(-1, 1, 8)}},
              "batch_stats": {"BatchNorm_0": {"mean": jnp.linspace(-1, 1, 8), "var": jnp.linspace(0.1, 2.0, 8)}},
              "step": jnp.array(3)}
    key = jax.random.key(0)
    new = E.randomize(params, ["Dense_0", "BatchNorm_0"], key)
    np.testing.assert_array_equal(new["params"]["Dense_0"]["bias"], 0.0)  # constant: stays
    assert not np.allclose(new["params"]["Dense_0"]["kernel"], params["params"]["Dense_0"]["kernel"])
    assert float(new["batch_stats"]["BatchNorm_0"]["var"].min()) > 0  # batch_stats belong to the module
    assert float(new["params"]["BatchNorm_0"]["scale"].min()) > 0
    assert not np.allclose(new["batch_stats"]["BatchNorm_0"]["mean"], params["batch_stats"]["BatchNorm_0"]["mean"])
    assert int(new["step"]) == 3
    # one module, by exact name (a string is one name, not a set of characters or a prefix)
    one = E.randomize(params, "Dense_0", key)
    np.testing.assert_array_equal(one["params"]["Dense_0"]["kernel"], new["params"]["Dense_0"]["kernel"])
    np.testing.assert_array_equal(one["params"]["BatchNorm_0"]["scale"], params["params"]["BatchNorm_0"]["scale"])


def test_nan_maps_are_not_a_pass():
    a = jnp.arange(12.0).reshape(2, 6)
    got = np.asarray(E.rank_correlation(a, a.at[0, 2].set(jnp.nan)))
    assert np.isnan(got[0]) and got[1] == pytest.approx(1.0)


def test_default_order_is_the_call_order_output_first():
    """The default order comes from the forward pass, not from the (alphabetical) parameter keys: module
    names out of alphabetical order, more than 10 layers, a BatchNorm in between, plain pytrees. (The order
    alone, found from the traced explanation: parameter_randomization returns it as its "modules", which
    the CNN test above checks end to end; running the check here too would only compile more programs.)"""
    import flax.linen as nn
    from jlrp._src.sanity import _default_order

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(4, name="encoder")(x))
            x = nn.BatchNorm(use_running_average=True, name="norm")(x)
            for i in range(11):
                x = nn.relu(nn.Dense(4, name=f"hidden_{i}")(x))
            return nn.Dense(2, name="classifier")(x)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5))
    model = Net()
    variables = numpy_init(jax.eval_shape(model.init, jax.random.key(1), x), 1)
    lrp = jlrp.lrp(model.apply, jlrp.rules.epsilon(), argnums=1)
    expected = ["encoder", "norm", *(f"hidden_{i}" for i in range(11)), "classifier"][::-1]
    assert _default_order(lambda p, x: lrp(p, x, target=0), variables, x) == expected

    # plain pytrees: a list of (W, b) layers groups by list index; a flat dict is one module ''
    layers = [(rng.normal(size=(5, 4)), np.zeros(4)), (rng.normal(size=(4, 2)), np.zeros(2))]

    def mlp(layers, x):
        for w, b in layers[:-1]:
            x = jax.nn.relu(x @ w + b)
        return x @ layers[-1][0] + layers[-1][1]

    assert _default_order(lambda p, x: jlrp.gradient(mlp, argnums=1)(p, x, target=1), layers, x) == ["1", "0"]
    flat = {"w1": layers[0][0], "w2": layers[1][0]}
    res = E.parameter_randomization(lambda p, x: jlrp.gradient(lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"],
                                                                argnums=1)(p, x, target=1), flat, x, key=jax.random.key(6))
    assert res["modules"] == [""]


def test_no_module_to_randomise_is_an_error():
    with pytest.raises(ValueError, match="no module to randomise"):
        E.parameter_randomization(lambda p, x: x, {"steps": jnp.array(3)}, jnp.ones((2, 3)), jax.random.key(0))
