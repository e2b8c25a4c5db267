"""Tests of the gradient family: gradient, input x gradient, SmoothGrad, Integrated Gradients, occlusion.

Compilation dominates the runtime on CPU, so related checks share one jax.jit (one compilation) and
eager execution is exercised once per method, in test_jit_and_vmap_match_eager.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlrp._src.attribution import (gradient, input_x_gradient, integrated_gradients, occlusion,
                                   smoothgrad)

N, D, C, H = 5, 6, 4, 8
KEY = jax.random.key(0)


def _rand(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


W, B = _rand(1, (D, C)), _rand(2, (C,))
W1, B1, W2, B2 = _rand(3, (D, H), 0.6), _rand(4, (H,), 0.3), _rand(5, (H, C), 0.6), _rand(6, (C,), 0.3)
X = _rand(7, (N, D))
T = jnp.array([0, 3, 1, 2, 3])
W_T = np.asarray(W)[:, np.asarray(T)].T  # (N, D): the weight column of each row's target


def linear(x):
    return x @ W + B


def regression(x):  # one output per row: (N, 1)
    return x @ W[:, :1] + B[:1]


def mlp(x):  # smooth nonlinear; works batched (N, D) -> (N, C) and unbatched (D,) -> (C,)
    return jnp.tanh(x @ W1 + B1) @ W2 + jax.nn.softplus(x @ W1)[..., :C] + B2


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# every method: (factory, extra call kwargs); SmoothGrad takes its key at call time
METHODS = {
    "gradient": (lambda f: gradient(f), {}),
    "probability": (lambda f: gradient(f, output="probability"), {}),
    "input_x_gradient": (lambda f: input_x_gradient(f, output="log_probability"), {}),
    "smoothgrad": (lambda f: smoothgrad(f, n=8, noise=0.1), {"key": KEY}),
    "integrated_gradients": (lambda f: integrated_gradients(f, steps=16, baseline=0.5), {}),
    "ig_chunked": (lambda f: integrated_gradients(f, steps=10, method="riemann_midpoint", chunk_size=4), {}),
    "occlusion": (lambda f: occlusion(f, window=2, stride=1, chunk_size=2), {}),
}


# ---------------------------------------------------------------------------- gradient

def test_gradient_of_linear_and_regression_models_is_the_coefficients():
    @jax.jit
    def run(x, t):
        return (gradient(linear)(x, target=t), gradient(linear)(x), gradient(linear)(x, target=2),
                gradient(regression)(x), gradient(lambda z: z @ W[:, 1] + 0.3)(x[0]))

    per_row, argmax, fixed, reg, scalar = run(X, T)
    close(per_row, W_T, 1e-6)
    close(argmax, W[:, jnp.argmax(linear(X), -1)].T, 1e-6)  # target=None: argmax per row
    close(fixed, jnp.broadcast_to(W[:, 2], X.shape), 1e-6)  # an int target: same class for every row
    close(reg, jnp.broadcast_to(W[:, 0], X.shape), 1e-6)  # (N, 1) regression output
    close(scalar, W[:, 1], 1e-6)  # unbatched scalar output


def test_relevance_is_the_cotangent():
    r = _rand(8, (N, C))
    close(jax.jit(gradient(linear))(X, relevance=r), r @ W.T)
    with pytest.raises(ValueError, match="either"):
        gradient(linear)(X, target=T, relevance=r)
    with pytest.raises(ValueError, match="shape"):
        gradient(linear)(X, relevance=r[:, :2])


def test_probability_and_log_probability_match_hand_derivation():
    # p = softmax(x @ W + b): dp_t/dx = W (p_t (e_t - p)) and dlog p_t/dx = W (e_t - p)
    x, t, h = X[:1], 2, 1e-2
    steps = h * jnp.eye(D)  # central differences along all D directions, as one batch

    @jax.jit
    def run(x):
        fd = (jax.nn.softmax(mlp(x + steps))[:, t] - jax.nn.softmax(mlp(x - steps))[:, t]) / (2 * h)
        return (gradient(linear, output="probability")(x, target=t)[0],
                gradient(linear, output="log_probability")(x, target=t)[0],
                gradient(mlp, output="probability")(x, target=t)[0], fd)

    prob, logprob, prob_mlp, fd = run(x)
    p = np.asarray(jax.nn.softmax(linear(x))[0])
    e = np.eye(C)[t]
    close(prob, np.asarray(W) @ (p[t] * (e - p)))
    close(logprob, np.asarray(W) @ (e - p))
    close(prob_mlp, fd, 2e-3)


def test_gradient_of_pytree_input_and_argnums():
    def model(p):
        return p["a"] @ W[:3] + p["b"][0] @ W[3:]

    def bilinear(w, x):
        return x @ w

    params = {"a": X[:, :3], "b": (X[:, 3:],)}

    @jax.jit
    def run(params, x, t):
        return (gradient(model)(params, target=t), input_x_gradient(model)(params, target=t),
                gradient(bilinear, argnums=1)(W, x, target=t), gradient(bilinear, argnums=0)(W, x, target=1))

    R, Rx, dx, dw = run(params, X, T)
    assert jax.tree_util.tree_structure(R) == jax.tree_util.tree_structure(params)
    close(R["a"], W_T[:, :3], 1e-6)
    close(R["b"][0], W_T[:, 3:], 1e-6)
    close(Rx["b"][0], X[:, 3:] * W_T[:, 3:], 1e-6)
    close(dx, W_T, 1e-6)
    close(dw[:, 1], X.sum(0), 1e-5)  # d sum_n (x_n @ w)_1 / dw[:, 1]
    close(dw[:, [0, 2, 3]], 0.0)


def test_input_x_gradient_is_x_times_gradient():
    @jax.jit
    def run(x, t):
        return [(input_x_gradient(mlp, output=o)(x, target=t), gradient(mlp, output=o)(x, target=t))
                for o in ("logit", "probability", "log_probability")]

    for ixg, g in run(X, T):
        close(ixg, X * g)


# ---------------------------------------------------------------------------- Integrated Gradients

def test_integrated_gradients_completeness_on_smooth_mlp():
    x0 = _rand(9, (D,), 0.1)

    @jax.jit
    def run(x, t):
        return [integrated_gradients(mlp, steps=s, baseline=x0, method=m, return_gap=True)(x, target=t)
                for s, m in [(64, "riemann_trapezoid"), (64, "riemann_midpoint"), (4, "riemann_left")]]

    (R, gap), (R_mid, gap_mid), (_, gap_coarse) = run(X, T)
    diff = np.asarray(mlp(X) - mlp(x0[None]))[np.arange(N), np.asarray(T)]
    assert gap.shape == (N,)
    close(gap, R.sum(1) - diff, 1e-5)  # the returned gap is what it claims to be
    for g in (gap, gap_mid):
        assert np.all(np.abs(np.asarray(g)) < 0.01 * np.abs(diff))
    # a coarse left Riemann sum shows a visibly larger gap (the check can fail)
    assert np.abs(np.asarray(gap_coarse)).max() > 10 * np.abs(np.asarray(gap)).max()


def test_integrated_gradients_linear_model_is_exact_and_chunking_changes_nothing():
    x0 = _rand(10, (N, D))

    @jax.jit
    def run(x, t):
        exact = [integrated_gradients(linear, steps=7, baseline=x0, method=m)(x, target=t)
                 for m in ("riemann_trapezoid", "riemann_midpoint", "riemann_left")]
        return exact, (integrated_gradients(mlp, steps=10, chunk_size=3)(x, target=t),  # ragged chunks
                       integrated_gradients(mlp, steps=10)(x, target=t))

    exact, (chunked, whole) = run(X, T)
    for R in exact:
        close(R, (X - x0) * W_T)
    close(chunked, whole)


# ---------------------------------------------------------------------------- SmoothGrad

def test_smoothgrad():
    sg = jax.jit(smoothgrad(mlp, n=8, noise=0.15))
    R = sg(X, key=KEY, target=T)
    assert R.shape == X.shape
    close(sg(X, key=KEY, target=T), R, 0)  # deterministic for a fixed key
    assert not np.allclose(sg(X, key=jax.random.key(1), target=T), R)

    @jax.jit
    def variants(x, t):
        return (smoothgrad(mlp, n=8, noise=0.15, chunk_size=3)(x, key=KEY, target=t),
                smoothgrad(mlp, n=3, noise=0.0)(x, key=KEY, target=t),
                smoothgrad(mlp, n=3, noise=0.0, square=True, key=KEY)(x, target=t),  # factory key as default
                gradient(mlp)(x, target=t))

    chunked, zero_noise, zero_noise_sq, grad = variants(X, T)
    close(chunked, R)  # chunking (ragged last chunk) changes nothing
    assert not np.allclose(R, grad, atol=1e-3)  # the noise does something
    close(zero_noise, grad, 1e-6)
    close(zero_noise_sq, grad ** 2, 1e-6)
    with pytest.raises(ValueError, match="key"):
        smoothgrad(mlp)(X, target=T)


def test_smoothgrad_noise_scale_is_per_sample():
    # row i's noise std is noise * (max - min) of row i: for f(x) = sum(x^2) / 2 the gradient is the
    # noisy input itself, so a row scaled by 100 shows 100x the noise
    quad = lambda x: 0.5 * jnp.sum(x ** 2, axis=-1, keepdims=True)
    x = jnp.stack([X[0], 100 * X[0]])
    noise_part = np.asarray(jax.jit(smoothgrad(quad, n=1, noise=0.2))(x, key=KEY) - x)
    ratio = noise_part[1].std() / noise_part[0].std()
    assert 10 < ratio < 1000


# ---------------------------------------------------------------------------- occlusion

def test_occlusion_by_hand():
    sq = lambda x: jnp.sum(x, axis=(1, 2, 3))[:, None] ** 2  # f(x) = (sum of a 4x4 image)^2
    ramp = jnp.arange(16.0).reshape(1, 4, 4, 1)

    @jax.jit
    def run(x, t):
        return (occlusion(linear, window=1)(x, target=t), occlusion(sq, window=(2, 2))(jnp.ones_like(ramp)),
                occlusion(sq, window=2, stride=1)(ramp), occlusion(sq, window=2, stride=3)(ramp))

    lin, ones, ramp1, ramp3 = run(X, T)
    # window 1, baseline 0 on a linear model: f(x) - f(x with x_i = 0) = x_i W[i, t]
    close(lin, X * W_T)
    # all ones: f = 256; occluding any 2x2 window leaves 12 -> 256 - 144 = 112 for every pixel (stride 2)
    close(ones[0, :, :, 0], np.full((4, 4), 112.0))
    # stride 1 on a ramp: each pixel averages the deltas of the 1, 2 or 4 windows covering it
    img = np.arange(16.0).reshape(4, 4)
    total = img.sum()
    delta = np.array([[total ** 2 - (total - img[i:i + 2, j:j + 2].sum()) ** 2 for j in range(3)]
                      for i in range(3)])
    covering = lambda r, c: [delta[i, j] for i in range(3) for j in range(3) if i <= r < i + 2 and j <= c < j + 2]
    expected = np.array([[np.mean(covering(r, c)) for c in range(4)] for r in range(4)])
    close(ramp1[0, :, :, 0], expected)
    # stride 3 would stop at start 0; the extra window flush with the edge (start 2) covers the rest:
    # the four windows tile the image, so each pixel gets the delta of its own window
    expected3 = np.kron(delta[::2, ::2], np.ones((2, 2)))
    close(ramp3[0, :, :, 0], expected3)


def test_occlusion_channels_and_baseline():
    # channels are occluded together (equal attribution across channels); occluding with x itself
    # changes nothing
    img = _rand(11, (2, 4, 4, 3))
    V = _rand(12, (4, 4, 3))
    model = lambda x: jnp.stack([jnp.sum(x * V, axis=(1, 2, 3)), x[:, 0, 0, 0]], -1)

    @jax.jit
    def run(x):
        return (occlusion(model, window=(2, 2))(x, target=0),
                occlusion(model, window=2, baseline=x)(x, target=0))

    R, R_same = run(img)
    assert R.shape == img.shape
    close(R[..., 0], R[..., 2])
    # window (2, 2), stride 2 on a linear model: each pixel gets its window's sum of x * V
    window_sums = np.asarray(img * V).reshape(2, 2, 2, 2, 2, 3).sum(axis=(2, 4, 5))
    close(R[..., 0], np.kron(window_sums, np.ones((1, 2, 2))))
    close(R_same, 0.0)


# ---------------------------------------------------------------------------- jit / vmap, errors

@pytest.mark.parametrize("name", list(METHODS))
def test_jit_and_vmap_match_eager(name):
    factory, kw = METHODS[name]
    explain = factory(mlp)
    R = explain(X, target=T, **kw)  # eager
    assert R.shape == X.shape

    @jax.jit
    def transformed(x, t):
        if name == "smoothgrad":  # row i of a batch draws its noise from split(key, N)[i]
            keys = jax.random.split(KEY, N)
            return [explain(x, target=t, key=KEY),
                    jax.vmap(lambda xi, ti, k: explain(xi, target=ti, key=k))(x, t, keys)]
        return [explain(x, target=t),
                jax.vmap(lambda xi, ti: explain(xi, target=ti))(x, t),  # the unbatched model (D,) -> (C,)
                jax.vmap(lambda xi, ti: explain(xi[None], target=ti)[0])(x, t)]  # a batch of one inside

    for other in transformed(X, T):
        close(other, R, 2e-5)


def test_jit_and_vmap_of_gap_and_regression():
    ig = integrated_gradients(regression, steps=8, return_gap=True)
    R, gap = ig(X)
    vmapped = jax.vmap(lambda xi: ig(xi[None]))
    (R2, gap2), (R3, gap3) = jax.jit(lambda x: (ig(x), vmapped(x)))(X)
    close(R2, R), close(gap2, gap), close(R3[:, 0], R), close(gap3[:, 0], gap)
    assert gap.shape == (N,)


@pytest.mark.parametrize("name", list(METHODS))
def test_bad_inputs(name):
    factory, kw = METHODS[name]
    explain = factory(mlp)
    with pytest.raises(ValueError, match="out of range"):
        explain(X, target=C, **kw)
    with pytest.raises(ValueError, match="out of range"):
        explain(X, target=jnp.array([0, 1, 2, 3, -1]), **kw)
    with pytest.raises(ValueError, match="floating point"):
        explain(jnp.ones((N, D), jnp.int32), target=T, **kw)


def test_bad_options():
    with pytest.raises(TypeError, match="single array"):
        integrated_gradients(lambda p: p["a"] @ W)({"a": X})
    with pytest.raises(TypeError, match="single array"):
        occlusion(lambda p: p[0] @ W)([X])
    with pytest.raises(ValueError, match="output"):
        gradient(linear, output="softmax")
    with pytest.raises(ValueError, match="class axis"):
        gradient(regression, output="probability")(X)
    with pytest.raises(ValueError, match="method"):
        integrated_gradients(linear, method="simpson")
    with pytest.raises(ValueError, match="window"):
        occlusion(linear, window=D + 1)(X)
