"""LRP rules: each one a short configuration of one generic modified-VJP mechanism (see ``Rule``).

Dense/conv rules: :func:`zero` (LRP-0), :func:`epsilon`, :func:`gamma`, :func:`alpha_beta`, :func:`zplus`,
:func:`zbox`, :func:`wsquare`, :func:`flat`. Other layers: :func:`norm` (sums, residual adds, average
pooling), :func:`uniform` / :func:`cp` (products of activations: attention, gates), :func:`softmax`
(AttnLRP's softmax rule), :func:`scaling` (the identity on normalisations), :func:`pass_` (activations),
:func:`gradient` (keep the ordinary VJP), :func:`deconvnet` and :func:`guided_backprop` (activation rules).
Write your own with :class:`Rule`/:class:`Group`/:class:`Term`, or :class:`Custom` for an arbitrary backward
function; :class:`PerLayer` chooses a rule per layer.
"""
from jlrp._src.rules import (Custom, Group, Native, Pass, PerLayer, Product, Rule, Scaling, Softmax, Substitute,
                             Term, alpha_beta, cp, deconvnet, epsilon, flat, gamma, gradient, guided_backprop, norm,
                             operand_roles, pass_, propagate, scaling, softmax, softmax_axes, stabilize, uniform,
                             wsquare, zbox, zero, zplus)

__all__ = ["Custom", "Group", "Native", "Pass", "PerLayer", "Product", "Rule", "Scaling", "Softmax", "Substitute",
           "Term", "alpha_beta", "cp", "deconvnet", "epsilon", "flat", "gamma", "gradient", "guided_backprop", "norm",
           "operand_roles", "pass_", "propagate", "scaling", "softmax", "softmax_axes", "stabilize", "uniform",
           "wsquare", "zbox", "zero", "zplus"]
