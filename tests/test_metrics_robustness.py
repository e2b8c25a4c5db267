"""Robustness metrics (jlrp/_src/metrics_robustness.py) against loop-based numpy references, float64, 1e-10.
The explanation is the gradient of the target logit: analytic in numpy (grad_np), jax.grad in jlrp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlrp import evaluation as E
from test_metrics_common import N, X, Y, explain_jax, grad_np, model_jax, model_np

TOL = dict(rtol=1e-10, atol=1e-10)
RNG = np.random.default_rng(12)
NOISE = RNG.uniform(-0.3, 0.3, size=(6,) + X.shape)


def norm(v):
    return np.sqrt((np.asarray(v) ** 2).sum())


def ref(kind, noise, eps=0.0, drop_changed=False, normalise=False):
    out = []
    for n in range(N):
        x, y = X[n], Y[n]
        r = grad_np(x[None], np.array([y]))[0]
        values = []
        for s in range(len(noise)):
            xs = x + noise[s, n]
            rs = grad_np(xs[None], np.array([y]))[0]
            if drop_changed and np.argmax(model_np(xs[None])[0]) != np.argmax(model_np(x[None])[0]):
                continue
            if kind == "sensitivity":
                values.append(norm(r - rs) / (norm(r) if normalise else 1.0))
            elif kind == "lipschitz":
                values.append(norm(r - rs) / (norm(x - xs) + eps))
            else:
                rr = np.where(r == 0, eps, r)
                num = norm((r - rs) / rr)
                if kind == "input":
                    den = norm((x - xs) / np.where(x == 0, eps, x))
                else:
                    den = norm(model_np(x[None])[0] - model_np(xs[None])[0])
                values.append(num / max(den, eps))
        out.append(values)
    return out


def test_sensitivity_reference():
    got_max = E.max_sensitivity(explain_jax, X, Y, noise=NOISE, chunk_size=4)  # a scanned chunk + remainder
    got_avg = E.avg_sensitivity(explain_jax, X, Y, noise=NOISE, normalise=True)
    vals = ref("sensitivity", NOISE)
    np.testing.assert_allclose(got_max, [max(v) for v in vals], **TOL)
    normed = ref("sensitivity", NOISE, normalise=True)
    np.testing.assert_allclose(got_avg, [np.mean(v) for v in normed], **TOL)
    # the clean explanation can be passed in; a drawn sample lies in the ball
    again = E.max_sensitivity(explain_jax, X, Y, relevance=explain_jax(X, Y), noise=NOISE, chunk_size=4)
    np.testing.assert_allclose(again, got_max, **TOL)
    drawn = E.max_sensitivity(explain_jax, X, Y, key=jax.random.key(0), samples=4, radius=0.1, chunk_size=4)
    assert drawn.shape == (N,) and np.all(drawn > 0)


def test_sensitivity_hand_case():
    # explain(x) = x^2 (elementwise): R(x + d) - R(x) = 2 x d + d^2. x = [1, 2], d = [0.1, 0]: ||.|| = 0.21
    explain = lambda x, y: x ** 2
    x = np.array([[1.0, 2.0]])
    noise = np.array([[[0.1, 0.0]], [[0.0, -0.1]]])  # second: |-0.4 + 0.01| = 0.39
    np.testing.assert_allclose(E.max_sensitivity(explain, x, 0, noise=noise), [0.39], **TOL)
    np.testing.assert_allclose(E.avg_sensitivity(explain, x, 0, noise=noise), [0.3], **TOL)
    np.testing.assert_allclose(E.max_sensitivity(explain, x, 0, noise=noise, normalise=True),
                               [0.39 / np.sqrt(17)], **TOL)
    # Lipschitz: 0.21 / 0.1 and 0.39 / 0.1 -> 3.9
    np.testing.assert_allclose(E.local_lipschitz_estimate(explain, x, 0, noise=noise), [3.9], **TOL)


def test_lipschitz_and_stability_reference():
    gauss = RNG.normal(size=(5,) + X.shape) * 0.1
    got = E.local_lipschitz_estimate(explain_jax, X, Y, noise=gauss, eps=1e-10)
    np.testing.assert_allclose(got, [max(v) for v in ref("lipschitz", gauss, eps=1e-10)], **TOL)
    got = E.relative_input_stability(explain_jax, X, Y, noise=NOISE)
    np.testing.assert_allclose(got, [max(v) for v in ref("input", NOISE, eps=1e-6)], **TOL)
    got = E.relative_output_stability(explain_jax, X, Y, noise=NOISE, model=model_jax)
    want = [max(v) if v else np.nan for v in ref("output", NOISE, eps=1e-6, drop_changed=True)]
    np.testing.assert_allclose(got, want, **TOL)


def test_changed_predictions_are_left_out():
    big = RNG.normal(size=(8,) + X.shape) * 3.0  # large noise: some copies change the class
    got = E.max_sensitivity(explain_jax, X, Y, noise=big, model=model_jax)
    vals = ref("sensitivity", big, drop_changed=True)
    assert any(len(v) < 8 for v in vals), "the test needs a changed prediction"
    np.testing.assert_allclose(got, [max(v) if v else np.nan for v in vals], **TOL)


def test_stability_hand_case():
    # explain(x) = 2 x: (R - R') / R = -d / x; RIS = ||d / x|| / ||d / x|| = 1 for any d
    explain = lambda x, y: 2 * x
    x = np.array([[1.0, -2.0, 4.0]])
    noise = RNG.normal(size=(3, 1, 3))
    np.testing.assert_allclose(E.relative_input_stability(explain, x, 0, noise=noise), [1.0], **TOL)
    # a zero entry of x and R: eps_min replaces it in both ratios; R changes by 2 d there, x by d:
    # ||2 d / eps|| / ||d / eps|| = 2
    x0 = np.array([[0.0, 1.0]])
    d = np.array([[[0.5, 0.0]]])
    np.testing.assert_allclose(E.relative_input_stability(explain, x0, 0, noise=d), [2.0], **TOL)
    # ROS of a model f(x) = 3 x (3 logits): ||(R - R')/R|| / ||3 d||
    f = lambda v: 3 * v
    x1 = np.array([[1.0, 2.0, 5.0]])
    d = np.array([[[0.1, 0.1, -0.1]]])
    want = np.sqrt(0.01 + 0.0025 + 0.0004) / (3 * np.sqrt(0.03))
    np.testing.assert_allclose(E.relative_output_stability(explain, x1, 2, noise=d, model=f), [want], **TOL)


def test_errors():
    with pytest.raises(ValueError, match="key"):
        E.max_sensitivity(explain_jax, X, Y)
    with pytest.raises(ValueError, match="model"):
        E.relative_output_stability(explain_jax, X, Y, noise=NOISE)
    with pytest.raises(ValueError, match="model"):
        E.max_sensitivity(explain_jax, X, None, noise=NOISE)  # target None needs the model's argmax
    np.testing.assert_allclose(E.max_sensitivity(explain_jax, X, None, noise=NOISE, model=model_jax),
                               E.max_sensitivity(explain_jax, X, jnp.argmax(model_jax(X), -1), noise=NOISE,
                                                 model=model_jax), **TOL)
