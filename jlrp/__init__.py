"""jlrp: Layer-wise Relevance Propagation for JAX, as a JAX transform.

    explain = jlrp.lrp(model.apply, jlrp.composites.epsilon_plus_flat(), argnums=1)
    relevance = jax.jit(explain)(params, x, target=labels)

Relevance rules are ``jax.custom_vjp`` backward passes that jlrp swaps into your model's jaxpr; the forward
values stay identical, so explanations are ordinary JAX functions (jit, vmap, sharding).

Modules: :mod:`jlrp.rules`, :mod:`jlrp.composites`, :mod:`jlrp.evaluation`, :mod:`jlrp.image`,
:mod:`jlrp.datasets`, :mod:`jlrp.svm`, :mod:`jlrp.patterns`, :mod:`jlrp.concepts`.
"""
from jlrp import composites, concepts, datasets, evaluation, image, patterns, rules, svm
from jlrp._src.api import (LayerRelevance, Report, deconvnet, guided_backprop, lrp, register_rule, report,
                           transform, vjp)
from jlrp._src.attribution import gradient, input_x_gradient, integrated_gradients, occlusion, smoothgrad
from jlrp._src.composites import Composite, module_path, param_path
from jlrp._src.layers import LayerInfo, UnsupportedPrimitiveError
from jlrp._src.stream import explain_dataset

__all__ = [
    "Composite", "LayerInfo", "LayerRelevance", "Report", "UnsupportedPrimitiveError", "composites", "concepts",
    "datasets",
    "deconvnet", "evaluation", "explain_dataset", "gradient", "guided_backprop", "image", "input_x_gradient",
    "integrated_gradients", "lrp", "module_path", "occlusion", "param_path", "patterns", "register_rule", "report",
    "rules",
    "smoothgrad", "svm", "transform", "vjp",
]
__version__ = "0.1.0"
