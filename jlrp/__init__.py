"""jlrp: Layer-wise Relevance Propagation for JAX, as a JAX transform.

    explain = jlrp.lrp(model.apply, jlrp.composites.epsilon_plus_flat(), argnums=1)
    relevance = jax.jit(explain)(params, x, target=labels)

Relevance rules are ``jax.custom_vjp`` backward passes that jlrp swaps into your model's jaxpr; the forward
values stay identical, so explanations are ordinary JAX functions (jit, vmap, sharding).
"""
from jlrp import composites, rules
from jlrp._src.api import LayerRelevance, Report, lrp, register_rule, report, transform, vjp
from jlrp._src.composites import Composite, module_path, param_path
from jlrp._src.layers import LayerInfo, UnsupportedPrimitiveError

__all__ = [
    "Composite", "LayerInfo", "LayerRelevance", "Report", "UnsupportedPrimitiveError", "composites", "lrp",
    "module_path", "param_path", "register_rule", "report", "rules", "transform", "vjp",
]
__version__ = "0.1.0"
