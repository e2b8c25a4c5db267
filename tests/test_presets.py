"""Named composites (Zennit / iNNvestigate presets) and composite selectors on Flax linen models, against the
sequential dense-matrix reference (tests/reference.py) with each layer's rule chosen per Zennit's semantics."""
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
B = 2
T = np.array([1, 2])


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(10)(x))
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


def _random_params(module, x, seed):
    """Random float64 parameters of the module's shapes (linen would initialise biases to zero)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))  # no compilation
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [rng.normal(size=l.shape) * 0.4 for l in leaves])


@functools.lru_cache(maxsize=None)
def setup(name):
    """(apply, params, x, reference steps of one sample)."""
    rng = np.random.default_rng(0)
    if name == "cnn":
        module, x = CNN(), rng.normal(size=(B, 6, 6, 3))
    else:
        module, x = MLP(), rng.normal(size=(B, 5))
    params = _random_params(module, x, 1)
    p = params["params"]
    if name == "cnn":
        conv0 = lambda h, k: nn.Conv(4, (3, 3), use_bias=False).apply({"params": {"kernel": k}}, h)  # noqa: E731
        conv1 = lambda h, k: nn.Conv(6, (3, 3), strides=2, use_bias=False).apply(  # noqa: E731
            {"params": {"kernel": k}}, h)
        steps = [ref.from_layer(conv0, p["Conv_0"]["kernel"], (1, 6, 6, 3), p["Conv_0"]["bias"], "Conv_0"),
                 ref.RELU,
                 ref.from_layer(conv1, p["Conv_1"]["kernel"], (1, 6, 6, 4), p["Conv_1"]["bias"], "Conv_1"),
                 ref.RELU, ref.FLATTEN,
                 ref.dense(p["Dense_0"]["kernel"], p["Dense_0"]["bias"], "Dense_0"), ref.RELU,
                 ref.dense(p["Dense_1"]["kernel"], p["Dense_1"]["bias"], "Dense_1")]
    else:
        steps = [ref.dense(p["Dense_0"]["kernel"], p["Dense_0"]["bias"]), ref.RELU,
                 ref.dense(p["Dense_1"]["kernel"], p["Dense_1"]["bias"]), ref.RELU,
                 ref.dense(p["Dense_2"]["kernel"], p["Dense_2"]["bias"])]
    for i in range(B):  # the reference computes the model
        np.testing.assert_allclose(ref.forward(steps, x[i:i + 1])[-1], np.asarray(module.apply(params, x))[i],
                                   rtol=1e-12)
    return module.apply, params, x, steps


def check(name, composite, ref_rules, key=None):
    apply, params, x, steps = setup(name)
    got = np.asarray(jlrp.lrp(apply, composite, argnums=1)(params, x, target=T))
    errs = []
    for i in range(B):
        want = ref.sequential_relevance(steps, ref_rules, x[i:i + 1], target=int(T[i])).reshape(x.shape[1:])
        errs.append(rel_err(got[i], want))
    if key is not None:
        OBSERVED[key] = max(OBSERVED.get(key, 0.0), max(errs))
    return max(errs)


OBSERVED: dict[str, float] = {}

# ---------------------------------------------------------------------------------------------------------
# Presets: rule per layer (conv0, conv1, dense0, dense1) for the CNN and (dense0, dense1, dense2) for the MLP

LOW, HIGH = -2.5, 3.0
LOW_C, HIGH_C = np.array([-1.0, -2.0, -3.0]), np.array([2.0, 1.5, 3.0])  # per input channel (NHWC)
EPS6 = ref.Epsilon(1e-6)
AB21, AB10 = ref.AlphaBeta(2, 1), ref.AlphaBeta(1, 0)


def _box_c():
    return ref.ZBox(np.broadcast_to(LOW_C, (1, 6, 6, 3)), np.broadcast_to(HIGH_C, (1, 6, 6, 3)))


PRESETS = {
    # name: (composite factory, CNN rules, MLP rules)
    "epsilon_plus": (jlrp.composites.epsilon_plus,
                     [ref.ZPlus(), ref.ZPlus(), EPS6, EPS6], [EPS6] * 3),
    "epsilon_plus_flat": (jlrp.composites.epsilon_plus_flat,
                          [ref.Flat(), ref.ZPlus(), EPS6, EPS6], [ref.Flat(), EPS6, EPS6]),
    "epsilon_gamma_box": (lambda: jlrp.composites.epsilon_gamma_box(LOW, HIGH),
                          [ref.ZBox(LOW, HIGH), ref.Gamma(0.25), EPS6, EPS6], [EPS6] * 3),
    "epsilon_gamma_box_per_channel": (lambda: jlrp.composites.epsilon_gamma_box(LOW_C, HIGH_C),
                                      [_box_c(), ref.Gamma(0.25), EPS6, EPS6], None),
    "epsilon_alpha2_beta1": (jlrp.composites.epsilon_alpha2_beta1, [AB21, AB21, EPS6, EPS6], [EPS6] * 3),
    "epsilon_alpha2_beta1_flat": (jlrp.composites.epsilon_alpha2_beta1_flat,
                                  [ref.Flat(), AB21, EPS6, EPS6], [ref.Flat(), EPS6, EPS6]),
    "preset_a": (jlrp.composites.preset_a, [AB10, AB10, ref.Epsilon(0.1), ref.Epsilon(0.1)],
                 [ref.Epsilon(0.1)] * 3),
    "preset_b": (jlrp.composites.preset_b, [AB21, AB21, ref.Epsilon(0.1), ref.Epsilon(0.1)],
                 [ref.Epsilon(0.1)] * 3),
}
CASES = [(p, m) for p in PRESETS for m in ("cnn", "mlp") if PRESETS[p][1 if m == "cnn" else 2] is not None]


@pytest.mark.parametrize("preset,model_name", CASES)
def test_preset_matches_reference(preset, model_name):
    make, cnn_rules, mlp_rules = PRESETS[preset]
    rules = cnn_rules if model_name == "cnn" else mlp_rules
    err = check(model_name, make(), rules, key=preset)
    assert err < TOL, err


def test_default_composite_is_epsilon_plus_flat():
    err = check("cnn", None, [ref.Flat(), ref.ZPlus(), EPS6, EPS6])
    assert err < TOL, err


@pytest.mark.parametrize("preset", ["epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box",
                                    "epsilon_alpha2_beta1", "preset_a", "preset_b"])
def test_preset_differs_from_its_neighbours(preset):
    """Sanity: the comparison fails when one layer's rule is swapped in the reference."""
    make, rules, _ = PRESETS[preset]
    for k, swap in [(0, ref.Epsilon(1e-6)), (1, ref.Flat()), (2, ref.Epsilon(0.5))]:
        swapped = list(rules)
        swapped[k] = swap
        assert check("cnn", make(), swapped) > 1e-4, (preset, k)


def test_report_names_the_rule_of_each_layer():
    apply, params, x, _ = setup("cnn")
    rep = jlrp.report(apply, jlrp.composites.epsilon_gamma_box(LOW, HIGH), argnums=1)(params, x, target=T)
    linear = [(layer.info.module, layer.rule) for layer in rep.layers if layer.info.kind in ("dense", "conv")]
    assert [m.split("/")[-1] for m, _ in linear] == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    assert [r for _, r in linear] == ["zbox", "gamma(0.25)", "epsilon(1e-06)", "epsilon(1e-06)"]


# ---------------------------------------------------------------------------------------------------------
# Selectors: later entries override earlier ones; param paths, module paths and callables


def test_param_path_entry_overrides_an_earlier_kind_entry():
    composite = jlrp.Composite([("conv", jlrp.rules.zplus()), ("dense", jlrp.rules.epsilon(0.1)),
                                (jlrp.param_path("*Dense_1*"), jlrp.rules.alpha_beta(2, 1))])
    assert check("cnn", composite, [ref.ZPlus(), ref.ZPlus(), ref.Epsilon(0.1), AB21]) < TOL
    # the other order: the kind entry comes last and wins again
    composite = jlrp.Composite([("conv", jlrp.rules.zplus()),
                                (jlrp.param_path("*Dense_1*"), jlrp.rules.alpha_beta(2, 1)),
                                ("dense", jlrp.rules.epsilon(0.1))])
    assert check("cnn", composite, [ref.ZPlus(), ref.ZPlus(), ref.Epsilon(0.1), ref.Epsilon(0.1)]) < TOL


def test_param_path_regex_and_exact_path():
    composite = jlrp.Composite([("linear", jlrp.rules.epsilon(0.1)),
                                (jlrp.param_path(r"Conv_\d/kernel$", regex=True), jlrp.rules.gamma(0.25)),
                                (jlrp.param_path("params/Dense_0/kernel"), jlrp.rules.zplus())])
    want = [ref.Gamma(0.25), ref.Gamma(0.25), ref.ZPlus(), ref.Epsilon(0.1)]
    assert check("cnn", composite, want) < TOL


def test_callable_selector():
    second_conv = lambda info: info.kind == "conv" and info.conv_index == 1  # noqa: E731
    composite = jlrp.Composite([("linear", jlrp.rules.epsilon(1e-6)), (second_conv, jlrp.rules.gamma(0.25)),
                                (lambda info: info.last, jlrp.rules.zero())])
    assert check("cnn", composite, [EPS6, ref.Gamma(0.25), EPS6, ref.Zero(1e-12)]) < TOL


def test_first_and_module_path_selectors():
    composite = jlrp.Composite([("linear", jlrp.rules.epsilon(0.1)), ("first", jlrp.rules.wsquare()),
                                (jlrp.module_path("Dense_0"), jlrp.rules.alpha_beta(1, 0))])
    assert check("cnn", composite, [ref.WSquare(), ref.Epsilon(0.1), AB10, ref.Epsilon(0.1)]) < TOL


def test_zz_report_observed_errors():
    for name, err in sorted(OBSERVED.items()):
        print(f"preset {name:30s} {err:.2e}")
