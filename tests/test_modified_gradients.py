"""DeconvNet and Guided BackProp through the interpreter, against hand-written backward passes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp

jax.config.update("jax_enable_x64", True)

W1 = jax.random.normal(jax.random.key(0), (5, 7))
W2 = jax.random.normal(jax.random.key(1), (7, 6))
W3 = jax.random.normal(jax.random.key(2), (6, 3))
X = jax.random.normal(jax.random.key(3), (4, 5))
T = jnp.array([0, 2, 1, 2])


def net(x):
    return jax.nn.relu(jax.nn.relu(x @ W1) @ W2) @ W3


def _manual(x, t, gate):
    """Backward by hand; ``gate(signal, preactivation)`` is the rule at each relu."""
    z1 = x @ W1
    z2 = jax.nn.relu(z1) @ W2
    g = jax.nn.one_hot(t, 3) @ W3.T
    g = gate(g, z2) @ W2.T
    return gate(g, z1) @ W1.T


GUIDED = lambda g, z: g * (z > 0) * (g > 0)
DECONV = lambda g, z: jnp.maximum(g, 0)


@pytest.mark.parametrize("method,gate", [(jlrp.guided_backprop, GUIDED), (jlrp.deconvnet, DECONV)],
                         ids=["guided_backprop", "deconvnet"])
def test_matches_hand_written_backward_and_composes(method, gate):
    explain = method(net)
    r = explain(X, target=T)
    np.testing.assert_allclose(r, _manual(X, T, gate), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jax.jit(explain)(X, target=T), r, rtol=1e-12, atol=1e-14)
    single = jax.vmap(lambda x, t: explain(x[None], target=t)[0])(X, T)
    np.testing.assert_allclose(single, r, rtol=1e-12, atol=1e-14)
    # and they differ from the plain gradient on this net (the rule is really applied)
    grad = jax.vmap(jax.grad(lambda x, t: net(x[None])[0, t]))(X, T)
    assert float(jnp.abs(r - grad).max()) > 1e-3


def test_linear_model_gives_the_weights():
    w = jax.random.normal(jax.random.key(4), (5, 3))
    for method in (jlrp.guided_backprop, jlrp.deconvnet, jlrp.gradient):
        r = method(lambda x: x @ w)(X, target=1)
        np.testing.assert_allclose(r, jnp.broadcast_to(w[:, 1], X.shape), rtol=1e-12)
