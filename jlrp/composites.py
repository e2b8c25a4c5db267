"""Composites: which rule each layer gets (by kind, position, parameter path, module path or callable),
and the named presets with Zennit's and iNNvestigate's semantics."""
from jlrp._src.composites import (DEFAULTS, Composite, as_composite, epsilon_alpha2_beta1,
                                  epsilon_alpha2_beta1_flat, epsilon_gamma_box, epsilon_plus, epsilon_plus_flat,
                                  module_path, param_path, preset_a, preset_b)

__all__ = ["DEFAULTS", "Composite", "as_composite", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat",
           "epsilon_gamma_box", "epsilon_plus", "epsilon_plus_flat", "module_path", "param_path", "preset_a",
           "preset_b"]
