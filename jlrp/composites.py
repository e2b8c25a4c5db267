"""Composites: which rule each layer gets (by kind, position, parameter path, module path or callable),
the named presets with Zennit's and iNNvestigate's semantics, and the transformer composites of AttnLRP
(:func:`attnlrp`, :func:`cp_lrp`, :func:`vit`) with latent attribution (:func:`top_units`)."""
from jlrp._src.composites import (DEFAULTS, Composite, as_composite, attnlrp, cp_lrp, epsilon_alpha2_beta1,
                                  epsilon_alpha2_beta1_flat, epsilon_gamma_box, epsilon_plus, epsilon_plus_flat,
                                  module_path, param_path, preset_a, preset_b, top_units, vit)

__all__ = ["DEFAULTS", "Composite", "as_composite", "attnlrp", "cp_lrp", "epsilon_alpha2_beta1",
           "epsilon_alpha2_beta1_flat", "epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat", "module_path",
           "param_path", "preset_a", "preset_b", "top_units", "vit"]
