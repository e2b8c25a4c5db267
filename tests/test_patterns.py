"""PatternNet / PatternAttribution: the toy problem of Kindermans et al. (2017), the statistics against
explicit formulas, streaming, save/load, the signal quality rho on a trained CNN, and the transform
contract (jit, vmap, conv layers)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn

import jlrp
from jlrp import patterns as P
from jlrp._src.patterns import _moments, _patterns

jax.config.update("jax_enable_x64", True)


def cos(a, b, axis=-1):
    return np.sum(a * b, axis) / (np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis))


def chunks(x, size):
    return [x[i:i + size] for i in range(0, len(x), size)]


# --------------------------------------------------------------------------------------------------------
# The toy problem: x = s + d, s = a_s y, d = a_d eps; the optimal filter w = (1, -1) cancels d.

TOY = jlrp.datasets.pattern_toy(20000)
TOY_X = jnp.asarray(TOY.x, jnp.float64)
W_TOY = jnp.array([[1.0], [-1.0]])
A_S = np.array([1.0, 0.0])


def toy_linear(x):
    return x @ W_TOY


def toy_relu(x):
    return jax.nn.relu(x @ W_TOY)


def test_toy_filter_recovers_the_signal():
    np.testing.assert_allclose(toy_linear(TOY_X)[:, 0], TOY.y, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "two_component"])
def test_toy_pattern_is_the_signal_direction(kind):
    pats = P.fit(toy_linear, (TOY_X,), chunks(TOY_X, 5000), kind=kind)
    a = np.asarray(pats.a[0])[:, 0]
    print(f"\n{kind}: pattern {a}, cosine with a_s {cos(a, A_S):.6f}")
    assert cos(a, A_S) > 0.99
    assert abs(a @ np.asarray(W_TOY)[:, 0] - 1) < 1e-12  # w^T a = 1
    # PatternNet returns the pattern itself for a linear model; PatternAttribution (W * a) * y
    np.testing.assert_allclose(P.patternnet(toy_linear, pats)(TOY_X[:5]), np.tile(a, (5, 1)), atol=1e-12)
    r = np.asarray(P.patternattribution(toy_linear, pats)(TOY_X))
    np.testing.assert_allclose(r, np.asarray(W_TOY)[:, 0] * a * (TOY_X @ np.asarray(W_TOY)), atol=1e-10)
    share = np.abs(r[:, 1]).sum() / np.abs(r).sum()
    print(f"{kind}: PatternAttribution share on the distractor-only dimension {share:.5f}")
    assert share < 0.01


def test_toy_gradient_family_returns_the_filter_and_lrp0_keeps_the_distractor():
    w = np.asarray(W_TOY)[:, 0]
    for name, method in [("gradient", jlrp.gradient), ("deconvnet", jlrp.deconvnet),
                         ("guided_backprop", jlrp.guided_backprop)]:
        g = np.asarray(method(toy_linear)(TOY_X))
        assert np.all(cos(g, w) > 0.999), name
        # with a relu after the output: the gradient and guided backprop are w where the unit is active,
        # DeconvNet ignores the forward mask and returns w everywhere
        g = np.asarray(method(toy_relu)(TOY_X))
        active = np.asarray(toy_relu(TOY_X))[:, 0] > 0
        rows = slice(None) if name == "deconvnet" else active
        assert np.all(cos(g[rows], w) > 0.999), name
    r = np.asarray(jlrp.lrp(toy_linear, jlrp.rules.zero())(TOY_X))
    np.testing.assert_allclose(r, w * np.asarray(TOY_X), atol=1e-10)  # w * x: the distractor stays
    print(f"\nLRP-0: mean |R| per dimension {np.abs(r).mean(0)}")
    assert np.abs(r[:, 1]).mean() > 0.1 * np.abs(r[:, 0]).mean()


# --------------------------------------------------------------------------------------------------------
# The statistics against the formulas, written out in numpy

RNG = np.random.default_rng(0)
W1, B1 = RNG.normal(size=(5, 6)), RNG.normal(size=6) * 0.5
W2, B2 = RNG.normal(size=(6, 3)), RNG.normal(size=3)
W2[:, 2] = -np.abs(W2[:, 2])  # unit 2 of the second layer never fires (inputs are relu outputs >= 0)
X_MLP = jnp.asarray(RNG.normal(size=(3000, 5)) + 0.3)


def mlp(x):
    return jax.nn.relu(x @ W1 + B1) @ W2 + B2


@np.errstate(divide="ignore", invalid="ignore")  # degenerate units give inf/NaN here (jlrp falls back)
def linear_pattern(x, w):
    y = x @ w
    cov = (x[:, :, None] * y[:, None]).mean(0) - x.mean(0)[:, None] * y.mean(0)
    return cov / np.sum(w * cov, 0)


@np.errstate(divide="ignore", invalid="ignore")
def component_pattern(x, w, positive):
    out = np.full_like(w, np.nan)  # NaN where a unit is never in the component (jlrp falls back there)
    y = x @ w
    for j in range(w.shape[1]):
        sel = y[:, j] > 0 if positive else y[:, j] <= 0
        if not sel.any():
            continue
        xs, ys = x[sel], y[sel, j]
        num = (xs * ys[:, None]).mean(0) - xs.mean(0) * y[:, j].mean()  # E_c[x y] - E_c[x] E[y]
        out[:, j] = num / (w[:, j] @ num)
    return out


def test_patterns_match_the_formulas():
    x, h = np.asarray(X_MLP), np.maximum(np.asarray(X_MLP) @ W1 + B1, 0)
    lin = P.fit(mlp, (X_MLP,), chunks(X_MLP, 1000), kind="linear")
    two = P.fit(mlp, (X_MLP,), chunks(X_MLP, 1000))
    assert sorted(lin.a) == sorted(two.a) == [0, 2] and lin.kind == "linear" and not lin.a_minus
    i1, i2 = sorted(two.a)
    for i, (inp, w) in zip((i1, i2), [(x, W1), (h, W2)]):
        np.testing.assert_allclose(lin.a[i], linear_pattern(inp, w), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(two.a_minus[i], component_pattern(inp, w, False), rtol=1e-9, atol=1e-12)
        assert float(two.count[i]) == 3000
    np.testing.assert_allclose(two.a[i1], component_pattern(x, W1, True), rtol=1e-9, atol=1e-12)
    # the unit that never fires: filter direction, flagged, w^T a = 1 and no NaN
    expected = component_pattern(h, W2, True)
    np.testing.assert_allclose(two.a[i2][:, :2], expected[:, :2], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(two.a[i2][:, 2], W2[:, 2] / (W2[:, 2] @ W2[:, 2]), rtol=1e-12)
    assert np.asarray(two.fallback[i2]).tolist() == [[False, False, True]]
    assert not np.asarray(two.fallback[i1]).any()
    for i, w in [(i1, W1), (i2, W2)]:
        np.testing.assert_allclose(np.sum(w * np.asarray(two.a[i]), 0), 1, rtol=1e-10)


def test_degenerate_units_and_zero_outputs():
    # integer inputs: y = x0 - x1 is exactly 0 for many samples (they belong to the y <= 0 component);
    # a constant positive output (0.1) leaves a rounding-level denominator; a constant negative one never fires
    x = np.c_[np.random.default_rng(3).integers(-2, 3, size=(500, 2)), np.ones(500)]
    w = np.array([[0.0, 1, 0], [0, -1, 0], [0.1, 0, -0.1]])
    f = lambda x: x @ w
    batches = [jnp.asarray(x[:170]), jnp.asarray(x[170:])]
    lin, two = P.fit(f, (x,), batches, kind="linear"), P.fit(f, (x,), batches)
    filt = w / np.sum(w * w, 0)
    assert (x @ w[:, 1] == 0).sum() > 50
    np.testing.assert_allclose(lin.a[0][:, 1], linear_pattern(x, w)[:, 1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(two.a[0][:, 1], component_pattern(x, w, True)[:, 1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(two.a_minus[0][:, 1], component_pattern(x, w, False)[:, 1], rtol=1e-10, atol=1e-12)
    for a in (lin.a[0], two.a[0], two.a_minus[0]):
        np.testing.assert_allclose(np.asarray(a)[:, [0, 2]], filt[:, [0, 2]], rtol=1e-12)
    assert np.asarray(lin.fallback[0]).tolist() == np.asarray(two.fallback[0]).tolist() == [[True, False, True]]


def test_patternnet_and_patternattribution_are_the_modified_backward_pass():
    pats = P.fit(mlp, (X_MLP,), [X_MLP])
    a1, a2 = (np.asarray(pats.a[k]) for k in sorted(pats.a))
    x = np.asarray(X_MLP[:20])
    gate = (x @ W1 + B1) > 0
    out = np.asarray(mlp(X_MLP[:20]))
    t = np.array([0, 1] * 10)
    seed = np.eye(3)[t]
    # PatternNet: one-hot seed, patterns instead of weights, the forward relu gates kept
    expected = ((seed @ a2.T) * gate) @ a1.T
    np.testing.assert_allclose(P.patternnet(mlp, pats)(X_MLP[:20], target=t), expected, atol=1e-10)
    # PatternAttribution: the target's output as seed, W * a_+ instead of weights
    expected = (((seed * out) @ (W2 * a2).T) * gate) @ (W1 * a1).T
    np.testing.assert_allclose(P.patternattribution(mlp, pats)(X_MLP[:20], target=t), expected, atol=1e-10)


def brute_rho(x, w, pos, neg, cut, by_sign=False):
    """1 - corr(y, v^T d) on held-out rows, v by lstsq (with intercept) per unit; by_sign: separate v for
    the rows with y > 0 and y <= 0 (one intercept)."""
    y = x @ w
    out = []
    for j in range(w.shape[1]):
        d = x - np.where(y[:, j:j + 1] > 0, pos[:, j], neg[:, j]) * y[:, j:j + 1]
        if by_sign:
            fires = y[:, j:j + 1] > 0
            d = np.c_[np.where(fires, d, 0), np.where(fires, 0, d)]
        d = np.c_[d, np.ones(len(x))]
        v = np.linalg.lstsq(d[:cut], y[:cut, j], rcond=None)[0]
        out.append(1 - np.corrcoef(y[cut:, j], d[cut:] @ v)[0, 1])
    return np.mean(out)


def test_rho_matches_brute_force_least_squares():
    lin = P.fit(mlp, (X_MLP,), [X_MLP], kind="linear")
    h = np.maximum(np.asarray(X_MLP) @ W1 + B1, 0)[:, :5]  # drop one input: full rank, a non-trivial rho
    f = lambda x: jax.nn.relu(x @ W1 + B1)[:, :5] @ W2[:5]
    pats = P.fit(f, (X_MLP,), [X_MLP])
    k = sorted(pats.a)[1]
    filt = W2[:5] / np.sum(W2[:5] ** 2, 0)
    got = P.rho(f, (X_MLP,), "filter", chunks(X_MLP, 1000))
    np.testing.assert_allclose(got[k], brute_rho(h, W2[:5], filt, filt, 1500), rtol=1e-6)
    got = P.rho(f, (X_MLP,), pats, [X_MLP], holdout=0.3)
    np.testing.assert_allclose(got[k], brute_rho(h, W2[:5], pats.a[k], pats.a_minus[k], 2100), rtol=1e-6)
    for est, a, b in [(pats, pats.a[k], pats.a_minus[k]), ("filter", filt, filt)]:
        got = P.rho(f, (X_MLP,), est, [X_MLP], holdout=0.3, by_sign=True)
        np.testing.assert_allclose(got[k], brute_rho(h, W2[:5], a, b, 2100, by_sign=True), rtol=1e-6)
    # the toy: the pattern leaves a distractor uncorrelated with y; the filter does not
    toy = {name: P.rho(toy_linear, (TOY_X,), est, [TOY_X])[0] for name, est in [
        ("filter", "filter"), ("linear", P.fit(toy_linear, (TOY_X,), [TOY_X], kind="linear"))]}
    print(f"\ntoy rho {toy}")
    assert toy["linear"] > 0.95 and toy["filter"] < 0.8
    assert sorted(P.rho(mlp, (X_MLP,), lin, [X_MLP])) == sorted(lin.a)  # every dense layer is scored


def test_patterns_decorrelate_the_distractor_exactly():
    """Why rho needs ``by_sign`` to rank the estimators: on the data they were fitted on, both patterns
    leave a distractor d = x - S(x) with cov(d, y) = 0 exactly; only the two-component pattern also gives
    cov(d 1[y > 0], y) = cov(d 1[y <= 0], y) = 0 (the linear one does not)."""
    h = np.maximum(np.asarray(X_MLP) @ W1 + B1, 0)
    f = lambda x: jax.nn.relu(x @ W1 + B1) @ W2 + B2  # the second layer, fitted on h (y excludes the bias)
    lin, two = (P.fit(f, (X_MLP,), [X_MLP], kind=kind) for kind in ("linear", "two_component"))
    k = sorted(two.a)[1]
    y = h @ W2
    cov = lambda d, y: (d * y[:, None]).mean(0) - d.mean(0) * y.mean()
    worst = {}
    for name, pos, neg in [("linear", lin.a[k], lin.a[k]), ("two", two.a[k], two.a_minus[k])]:
        pos, neg = np.asarray(pos), np.asarray(neg)
        for j in range(2):  # unit 2 never fires
            fires = y[:, j] > 0
            d = h - np.where(fires[:, None], pos[:, j], neg[:, j]) * y[:, j:j + 1]
            scale = np.abs(d).mean() * np.abs(y[:, j]).mean()
            assert np.abs(cov(d, y[:, j])).max() < 1e-12 * scale, name
            split = max(np.abs(cov(d * fires[:, None], y[:, j])).max(),
                        np.abs(cov(d * ~fires[:, None], y[:, j])).max()) / scale
            worst[name] = max(worst.get(name, 0), split)
    print(f"\nmax |cov(d 1[sign], y)| / scale: {worst}")
    assert worst["two"] < 1e-12 and worst["linear"] > 1e-3


def test_conv_statistics_match_explicit_patches():
    w = jnp.asarray(RNG.normal(size=(3, 3, 2, 4)))
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(x):
        return jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)

    x = jnp.asarray(RNG.normal(size=(10, 7, 7, 2)) + 0.2)
    state, _ = _moments(conv, (x,), [x[:6], x[6:]], 0, "two_component")
    (m,) = state.values()
    # patches (n, h, w, C * kh * kw) with features ordered (C, kh, kw), zero padding included
    patches = jax.lax.conv_general_dilated_patches(x, (3, 3), (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
    patches = np.asarray(patches).reshape(-1, 2, 3, 3)
    y = np.asarray(conv(x)).reshape(-1, 4)
    to_hwio = lambda s: np.transpose(s, (2, 3, 1, 0))  # (unit, C, kh, kw) -> (kh, kw, C, unit)
    mean = lambda t: to_hwio(np.einsum("pckl,pj->jckl", patches, t) / len(y))
    np.testing.assert_allclose(m["xy"], mean(y), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m["x"], mean(np.ones_like(y)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m["xy+"], mean(y * (y > 0)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m["x+"], mean(1.0 * (y > 0)), rtol=1e-10, atol=1e-12)
    assert float(m["n"]) == len(y)


# --------------------------------------------------------------------------------------------------------
# A small CNN trained on the synthetic shapes

class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(4)(x)


@pytest.fixture(scope="module")
def cnn():
    data = jlrp.datasets.shapes(2000, size=16)
    x, labels = jnp.asarray(data.x), jnp.asarray(data.y)
    model = CNN()
    params = model.init(jax.random.key(0), x[:1])
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state, key):
        idx = jax.random.choice(key, len(x), (128,))
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(p, x[idx]), labels[idx]).mean()
        updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for key in jax.random.split(jax.random.key(1), 300):  # a Python loop: lax.scan runs convs slower on CPU
        params, state = step(params, state, key)
    test = jlrp.datasets.shapes(2000, size=16, seed=1)
    x_test = jnp.asarray(test.x)
    accuracy = float(np.mean(np.asarray(model.apply(params, x_test).argmax(-1)) == test.y))
    print(f"\nCNN test accuracy {accuracy:.3f}")
    assert accuracy > 0.5  # chance is 0.25
    # one pass: the two-component moments include the linear ones (fit(kind='linear') is tested above)
    moments = _moments(model.apply, (params, x), chunks(x, 500), 1, "two_component")
    pats = {kind: _patterns(*moments, kind) for kind in ("linear", "two_component")}
    return model, params, x, x_test, pats


@pytest.fixture(scope="module")
def rho_table(cnn):
    model, params, x, x_test, pats = cnn
    estimators = {"random": "random", "filter": "filter", "linear": pats["linear"],
                  "two_component": pats["two_component"]}
    tables = {}
    for by_sign in (False, True):
        tables[by_sign] = table = {
            name: P.rho(model.apply, (params, x_test), est, chunks(x_test, 1000), argnums=1, by_sign=by_sign)
            for name, est in estimators.items()}
        dense = sorted(table["filter"])
        print(f"\nrho per dense layer, by_sign={by_sign} | " + " | ".join(f"layer {k}" for k in dense))
        for name, row in table.items():
            print(f"{name:>13} | " + " | ".join(f"{row[k]:.4f}" for k in dense))
    return tables, dense


def test_rho_linear_pattern_beats_the_filter(rho_table):
    # filter and random are ~0 here: dead relus feed the dense layers, and any estimator that puts signal on
    # a constant input lets x - S(x) reveal y exactly there; patterns are ~0 on constant inputs
    tables, dense = rho_table
    assert len(dense) == 3
    table = tables[False]
    for k in dense:
        assert 0.5 < table["linear"][k] <= 1.0 and table["linear"][k] > table["filter"][k] + 0.5
        # one v: both patterns are exact in population (see test_patterns_decorrelate_the_distractor_exactly)
        # and tie up to estimation noise
        assert abs(table["two_component"][k] - table["linear"][k]) < 0.05


def test_rho_paper_ordering_two_component_linear_filter(rho_table):
    """Kindermans et al.'s ordering in the dense layers of a ReLU network, rho with a sign-dependent read-out
    (``by_sign``), under which the two-component pattern is the exact optimum."""
    tables, dense = rho_table
    table = tables[True]
    for k in dense:
        assert table["two_component"][k] >= table["linear"][k] > table["filter"][k]


def test_patterns_on_a_cnn_jit_vmap_and_conv(cnn):
    model, params, x, _, pats = cnn
    xs = x[:6]
    two = pats["two_component"]
    assert [l.kind for l in two.layers] == ["conv", "conv", "dense", "dense", "dense"]
    assert two.a[two.layers[0].index].shape == params["params"]["Conv_0"]["kernel"].shape
    assert float(two.count[two.layers[0].index]) == 2000 * 16 * 16  # every output position is a sample
    for method in (P.patternnet, P.patternattribution):
        explain = method(model.apply, two, argnums=1)
        eager = np.asarray(explain(params, xs))
        assert eager.shape == xs.shape and np.all(np.isfinite(eager)) and np.abs(eager).sum() > 0
        np.testing.assert_allclose(jax.jit(explain)(params, xs), eager, rtol=1e-5, atol=1e-5)  # float32
        one = jax.jit(jax.vmap(lambda xi: explain(params, xi[None])[0]))(xs)
        np.testing.assert_allclose(one, eager, rtol=1e-5, atol=1e-5)
        # the patterns matter: not the plain gradient / input x gradient
        assert not np.allclose(eager, np.asarray(jlrp.gradient(lambda x: model.apply(params, x))(xs)))


def test_patterns_arranged_like_the_params(cnn):
    model, params, *_, pats = cnn
    two = pats["two_component"]
    for which in ("a", "a_minus"):
        tree = two.as_params(params, which)
        names = sorted(params["params"])
        assert names == ["Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2"]
        for layer, name in zip(two.layers, names):  # layers are in call order, as the module names
            assert tree["params"][name]["bias"] is None
            np.testing.assert_array_equal(tree["params"][name]["kernel"], getattr(two, which)[layer.index])
            assert tree["params"][name]["kernel"].shape == params["params"][name]["kernel"].shape


def test_fit_is_independent_of_the_batching():
    one, _ = _moments(mlp, (X_MLP,), [X_MLP], 0, "two_component")
    for size in (7, 1000):
        state, _ = _moments(mlp, (X_MLP,), chunks(X_MLP, size), 0, "two_component")
        for k in one:
            for name in ("xy", "x", "xy+", "x+", "n"):
                np.testing.assert_allclose(state[k][name], one[k][name], rtol=1e-10, atol=1e-13)
    a = P.fit(mlp, (X_MLP,), chunks(X_MLP, 7))
    b = P.fit(mlp, (X_MLP,), [X_MLP])
    for k in a.a:
        np.testing.assert_allclose(a.a[k], b.a[k], rtol=1e-8, atol=1e-11)
        np.testing.assert_allclose(a.a_minus[k], b.a_minus[k], rtol=1e-8, atol=1e-11)


def test_float32_accumulation_is_stable():
    x32, w1, b1 = (np.asarray(a, np.float32) for a in (X_MLP, W1, B1))
    with jax.enable_x64(False):
        pats = P.fit(lambda x: jax.nn.relu(x @ w1 + b1), (x32,), chunks(x32, 100), kind="linear")
    k = sorted(pats.a)[0]
    assert pats.a[k].dtype == jnp.float32
    np.testing.assert_allclose(pats.a[k], linear_pattern(np.asarray(X_MLP), W1), rtol=1e-3, atol=1e-4)


def test_float32_streaming_over_100k_samples():
    """100 batches of 1000 float32 samples with offsets 10-30x the spread (E[x y] - E[x] E[y] cancels
    heavily): the streamed float32 patterns match a float64 numpy reference on all the data."""
    rng = np.random.default_rng(5)
    offset = np.array([30.0, -20, 10, 5])
    x = rng.normal(size=(100_000, 4)) * [1, 2, 0.5, 1] + offset
    w = rng.normal(size=(4, 3))
    w -= np.outer(offset, offset @ w) / (offset @ offset)  # E[y] = 0: both components occur
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    with jax.enable_x64(False):
        pats = P.fit(lambda x: x @ w32, (x32[:1],), chunks(x32, 1000))
    assert pats.a[0].dtype == jnp.float32 and float(pats.count[0]) == 100_000
    for got, want in [(pats.a[0], component_pattern(x, w, True)), (pats.a_minus[0], component_pattern(x, w, False))]:
        err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
        print(f"\n100k float32 samples: max error {err:.2e} relative to the largest pattern entry")
        assert err < 1e-3


def test_save_load_round_trip(tmp_path):
    pats = P.fit(mlp, (X_MLP,), [X_MLP])
    pats.save(str(tmp_path / "p.npz"))
    back = P.load(str(tmp_path / "p.npz"))
    assert back.kind == pats.kind and back.layers == pats.layers
    assert jax.tree.structure(back) == jax.tree.structure(pats)
    for a, b in zip(jax.tree.leaves(pats), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(P.patternattribution(mlp, back)(X_MLP[:4]),
                                  P.patternattribution(mlp, pats)(X_MLP[:4]))


def test_errors():
    pats = P.fit(toy_linear, (TOY_X,), [TOY_X[:100]])
    with pytest.raises(ValueError, match="shape"):  # patterns of another model
        P.patternnet(lambda x: x @ jnp.ones((2, 3)), pats)(TOY_X[:2])
    with pytest.raises(ValueError, match="no pattern"):
        P.patternnet(mlp, pats)(X_MLP[:2])
    with pytest.raises(ValueError, match="kind"):
        P.fit(toy_linear, (TOY_X,), [TOY_X], kind="quadratic")
    with pytest.raises(ValueError, match="no batch"):
        P.fit(toy_linear, (TOY_X,), [])
    with pytest.raises(ValueError, match="estimator"):
        P.rho(toy_linear, (TOY_X,), "linear", [TOY_X])


def test_equinox_model_and_as_params_errors():
    """Models whose parameters carry functions (Equinox) fit, explain and score like any other; as_params
    refuses parameters it cannot place instead of returning an empty tree."""
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(5, 3, 8, 2, key=jax.random.key(0))
    apply = lambda m, x: jax.vmap(m)(x)
    pats = P.fit(apply, (mlp, X_MLP), chunks(X_MLP, 1000), argnums=1)
    assert [l.kind for l in pats.layers] == ["dense"] * 3
    r = P.patternattribution(apply, pats, argnums=1)(mlp, X_MLP[:4], target=0)
    assert r.shape == (4, 5) and np.all(np.isfinite(r))
    assert sorted(P.rho(apply, (mlp, X_MLP), pats, [X_MLP], argnums=1)) == sorted(pats.a)
    with pytest.raises(ValueError, match="no fitted layer's weight"):
        pats.as_params({"other": jnp.ones(3)})
    closure = P.fit(lambda x: mlp_apply_closed(x), (X_MLP,), [X_MLP])
    with pytest.raises(ValueError, match="closure"):
        closure.as_params({"w1": W1})


def mlp_apply_closed(x):
    return mlp(x)
