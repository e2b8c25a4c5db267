"""Input gradients explain regression models (Hechtlinger 2016).

(a) Linear regression ``y = X beta + noise`` fitted with Adam: the gradient of the prediction with respect
    to the input is the fitted weight vector, for every sample, so it recovers ``beta`` up to the fit error.
(b) An MLP fitted to ``y = sin(x0) + x1^2 + 0.1 noise`` over 10 features, 8 of them irrelevant: the mean
    absolute input gradient over the data ranks the two relevant features first.

    python examples/regression.py --seed 0 --steps 1000
"""
from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlrp

BETA = np.array([1.5, -2.0, 0.5, 0.0, 3.0, -0.7], np.float32)


def fit(apply, params, x, y, steps: int, lr: float):
    """Minimise the mean squared error of ``apply(params, x)`` (shape ``(N, 1)``) with full-batch Adam."""
    opt = optax.adam(lr)

    def step(carry, _):
        params, state = carry
        grads = jax.grad(lambda p: jnp.mean((apply(p, x)[:, 0] - y) ** 2))(params)
        updates, state = opt.update(grads, state)
        return (optax.apply_updates(params, updates), state), None

    # one compiled scan instead of `steps` Python-level dispatches
    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=steps))(params)
    return params


# --------------------------------------------------------------------------------------------------
# (a) linear regression

def linear_data(n: int = 500, seed: int = 0, noise: float = 0.1):
    """``X ~ N(0, I)`` of shape ``(n, len(BETA))`` and ``y = X @ BETA + 0.5 + noise``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, len(BETA))).astype(np.float32)
    return x, (x @ BETA + 0.5 + noise * rng.standard_normal(n)).astype(np.float32)


def linear(params, x):
    """``x @ w + b`` with a trailing output axis ``(N, 1)`` (a regression output, see jlrp.gradient)."""
    return x @ params["w"] + params["b"]


def fit_linear(x, y, steps: int = 1000, seed: int = 0):
    """Fit :func:`linear` by Adam on the squared error; return its params ``{'w': (D, 1), 'b': (1,)}``."""
    key = jax.random.key(seed)
    params = {"w": 0.1 * jax.random.normal(key, (x.shape[1], 1)), "b": jnp.zeros(1)}
    return fit(linear, params, x, y, steps, lr=0.05)


def input_gradient(apply, params, x) -> jax.Array:
    """d prediction / d x per sample ``(N, D)`` (regression: the output itself is explained)."""
    return jlrp.gradient(apply, argnums=1)(params, x)


# --------------------------------------------------------------------------------------------------
# (b) MLP regression with a few relevant features

class MLP(nn.Module):
    """Two tanh hidden layers and a linear output ``(N, 1)``; tanh suits the smooth target.

    Narrow on purpose: with 64 units (~5k parameters) 2000 samples are fitted below the noise level,
    and the overfit function leans on the irrelevant features too."""
    hidden: int = 16

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.hidden)(x))
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)


def mlp_data(n: int = 2000, features: int = 10, seed: int = 0):
    """``x ~ U[-2, 2]^features`` and ``y = sin(x0) + x1^2 + 0.1 noise``: only features 0 and 1 matter."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n, features)).astype(np.float32)
    return x, (np.sin(x[:, 0]) + x[:, 1] ** 2 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def fit_mlp(x, y, steps: int = 1000, seed: int = 0):
    """Fit an :class:`MLP` by Adam; return ``(model, params)``."""
    model = MLP()
    params = model.init(jax.random.key(seed), x[:1])
    return model, fit(model.apply, params, x, y, steps, lr=1e-2)


def feature_importance(apply, params, x) -> np.ndarray:
    """Mean absolute input gradient per feature over the data (a global importance, Hechtlinger 2016)."""
    return np.abs(np.asarray(input_gradient(apply, params, x))).mean(0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args(argv)

    x, y = linear_data(seed=args.seed)
    params = fit_linear(x, y, args.steps, args.seed)
    grad = np.asarray(input_gradient(linear, params, x))
    print("(a) linear regression y = X beta + noise")
    print(f"  true beta      {np.array2string(BETA, precision=3)}")
    print(f"  input gradient {np.array2string(grad[0], precision=3)} (identical for every sample: "
          f"{bool((grad == grad[0]).all())})")
    print(f"  max |grad - beta| = {np.abs(grad - BETA).max():.4f}")

    x, y = mlp_data(seed=args.seed)
    model, params = fit_mlp(x, y, args.steps, args.seed)
    xt, yt = mlp_data(500, seed=args.seed + 1000)
    mse = float(jnp.mean((model.apply(params, xt)[:, 0] - yt) ** 2))
    importance = feature_importance(model.apply, params, xt)
    print("\n(b) MLP regression y = sin(x0) + x1^2 + 0.1 noise, 10 features")
    print(f"  test MSE {mse:.4f} (noise variance 0.01)")
    # for x ~ U[-2, 2]: E|d sin(x0)/dx0| = E|cos x0| = (2 - sin 2) / 2, E|d x1^2/dx1| = E|2 x1| = 2
    print(f"  expected mean |gradient|: x0 {(2 - np.sin(2)) / 2:.3f}, x1 2.000, others 0")
    print("  mean |gradient| ranking: " + ", ".join(f"x{i} ({importance[i]:.3f})"
                                                    for i in np.argsort(-importance)))


if __name__ == "__main__":
    main()
