"""An NNX module object can be passed where a function is expected (issue 11): jlrp.lrp / jlrp.gradient trace
it with its state, also through nnx.scan (which refuses Variables from another trace level)."""
import jax
import jax.numpy as jnp
from flax import nnx

import jlrp


class Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.lin(x))


class ScannedNet(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)
        self.blocks = make(rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(block, x):
            return block(x)
        return self.head(step(self.blocks, x))


def _reference_input_x_gradient(model, x, target):
    graphdef, state = nnx.split(model)  # differentiated with its state: one trace level for NNX
    grad = jax.grad(lambda s, x: nnx.merge(graphdef, s)(x)[:, target].sum(), argnums=(0, 1))(state, x)[1]
    return x * grad


def test_nnx_module_with_scan_gradient_and_lrp():
    model = ScannedNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 6), jnp.float64)
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if hasattr(a, "astype") else a, model)
    reference = _reference_input_x_gradient(model, x, 0)
    gradient = jlrp.gradient(model)(x, target=0)
    assert float(jnp.abs(x * gradient - reference).max()) <= 1e-12
    lrp0 = jlrp.lrp(model, jlrp.rules.zero(1e-30))
    assert float(jnp.abs(lrp0(x, target=0) - reference).max()) <= 1e-12 * float(jnp.abs(reference).max())
    jitted = jax.jit(lambda x: jlrp.lrp(model)(x, target=0))(x)
    assert float(jnp.abs(jitted - jlrp.lrp(model)(x, target=0)).max()) <= 1e-12


def test_selectors_match_the_same_layers_on_a_module_and_its_split_state():
    import pytest
    model = ScannedNet(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (4, 6))
    composite = jlrp.Composite([(jlrp.param_path("head/*"), jlrp.rules.gamma(0.5))], "head-gamma")
    on_module = jlrp.report(model, composite)(x, target=0)
    on_state = jlrp.report(lambda s, x: nnx.merge(graphdef, s)(x), composite, argnums=1)(state, x, target=0)
    rules = lambda report: [(l.info.kind, l.rule, l.info.params) for l in report.layers]
    assert rules(on_module) == rules(on_state)
    assert any("gamma" in rule for _, rule, _ in rules(on_module))
    with pytest.warns(UserWarning, match="matches no layer"):
        jlrp.lrp(model, jlrp.Composite([(jlrp.param_path("hed/*"), jlrp.rules.gamma())], "typo"))(x, target=0)
