"""LRP rules: each one a short configuration of one generic modified-VJP mechanism (see ``Rule``).

Dense/conv rules: :func:`zero` (LRP-0), :func:`epsilon`, :func:`gamma`, :func:`alpha_beta`, :func:`zplus`,
:func:`zbox`, :func:`wsquare`, :func:`flat`. Other layers: :func:`norm` (sums, residual adds, average
pooling), :func:`uniform` (products of activations), :func:`pass_` (activations), :func:`gradient` (keep
the ordinary VJP), :func:`deconvnet` and :func:`guided_backprop` (activation rules). Write your own with
:class:`Rule`/:class:`Group`/:class:`Term`, or :class:`Custom` for an arbitrary backward function.
"""
from jlrp._src.rules import (Custom, Group, Native, Pass, Product, Rule, Substitute, Term, alpha_beta, cp, deconvnet, epsilon, flat,
                             gamma, gradient, guided_backprop, norm, pass_, propagate, stabilize, uniform,
                             wsquare, zbox, zero, zplus)

__all__ = ["Custom", "Group", "Native", "Pass", "Product", "Rule", "Substitute", "Term", "alpha_beta", "cp", "deconvnet", "epsilon", "flat",
           "gamma", "gradient", "guided_backprop", "norm", "pass_", "propagate", "stabilize", "uniform",
           "wsquare", "zbox", "zero", "zplus"]
