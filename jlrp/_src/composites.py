"""Composites: which rule each layer gets.

A composite is an ordered list of ``(selector, rule)`` entries; for every layer the *last* matching entry
wins (like ``optax.multi_transform`` labels, later entries override earlier ones). A selector is a kind name
('dense', 'conv', 'linear', 'sum', 'add', 'product', 'activation', '*'), 'first' / 'last' (the first / last
dense-or-conv layer), a :func:`param_path` or :func:`module_path` pattern, or any callable
``LayerInfo -> bool``. Layers no entry matches keep the defaults below.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp

from . import rules
from .analysis import REGISTRY
from .layers import LayerInfo

Selector = Union[str, Callable[[LayerInfo], bool]]

#: Rules for layers that no composite entry selects.
DEFAULTS = {
    "dense": rules.epsilon(),
    "conv": rules.epsilon(),
    "affine": rules.zero(),  # a diagonal map: the stabilizer only guards a x + b = 0
    "route": rules.gradient(),
    "sum": rules.norm(),
    "add": rules.norm(),
    "product": rules.uniform(),
    "activation": rules.pass_(),
    "max": rules.gradient(),
}

_KINDS = {"dense", "conv", "affine", "sum", "add", "product", "route", "activation", "max", "scan", "cond",
          "remat2"}


def _registered_kinds() -> set[str]:
    return {k if isinstance(k, str) else k.name for k in REGISTRY}


def _match(selector: Selector, layer: LayerInfo) -> bool:
    if callable(selector):
        return bool(selector(layer))
    if selector == "*":
        return True
    if selector == "linear":
        return layer.is_linear
    if selector == "first":
        return layer.first
    if selector == "last":
        return layer.last
    if selector in _KINDS or selector in _registered_kinds():
        return layer.kind == selector
    raise ValueError(f"unknown layer selector {selector!r}: use one of {sorted(_KINDS)}, 'linear', 'first', "
                     f"'last', '*', jlrp.param_path(...), jlrp.module_path(...) or a callable on LayerInfo")


def param_path(pattern: str, *, regex: bool = False) -> Callable[[LayerInfo], bool]:
    """Select layers fed by a parameter whose path matches ``pattern`` (glob, or regex with ``regex=True``).

    Paths join the keys of the argument's pytree with '/', e.g. 'params/Conv_0/kernel' for a Flax linen
    params dict or 'layers/0/kernel/value' for an NNX state: this works for any JAX library.
    """
    if regex:
        compiled = re.compile(pattern)
        select = lambda layer: any(compiled.search(p) for p in layer.params)
    else:
        select = lambda layer: any(fnmatch.fnmatchcase(p, pattern) for p in layer.params)
    select.pattern = f"param_path({pattern!r})"  # a pattern that matches no layer is warned about
    return select


def module_path(pattern: str, *, regex: bool = False) -> Callable[[LayerInfo], bool]:
    """Select layers by module path (Flax linen's name stack, e.g. 'CNN/Conv_0'); glob or regex."""
    if regex:
        compiled = re.compile(pattern)
        select = lambda layer: bool(compiled.search(layer.module))
    else:
        select = lambda layer: fnmatch.fnmatchcase(layer.module, pattern) or fnmatch.fnmatchcase(
            layer.module, "*/" + pattern)
    select.pattern = f"module_path({pattern!r})"
    return select


@dataclasses.dataclass(frozen=True)
class Composite:
    """An ordered mapping from layer selectors to rules; the last matching entry wins."""
    entries: tuple[tuple[Selector, rules.AnyRule], ...]
    name: str = "composite"

    def __init__(self, entries: Sequence[tuple[Selector, rules.AnyRule]], name: str = "composite"):
        try:
            entries = tuple((s, r) for s, r in entries)
        except (TypeError, ValueError):
            raise TypeError(f"a Composite takes a sequence of (selector, rule) pairs, got {entries!r}") from None
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "name", name)
        for selector, rule in self.entries:
            check_rule(rule, f"the rule for selector {selector!r}")
            if not callable(selector):
                _match(selector, _PROBE)  # fail early on a misspelt kind

    def resolve(self, layer: LayerInfo) -> rules.AnyRule:
        rule = _registered_rule(layer.kind) or DEFAULTS.get(layer.kind, rules.gradient())
        for selector, candidate in self.entries:
            if _match(selector, layer):
                rule = candidate
        while isinstance(rule, rules.PerLayer):  # chosen per layer (and per step inside scans)
            rule = rule.fn(layer)
            check_rule(rule, f"the rule {rule!r} chosen for layer {layer.index} ({layer.kind})")
        return rule

    def warn_unmatched(self, infos: list[LayerInfo]) -> None:
        """Warn about path selectors that match none of ``infos`` (a misspelt or stale parameter path)."""
        for selector, _ in self.entries:
            pattern = getattr(selector, "pattern", None)
            if pattern is not None and not any(selector(info) for info in infos):
                example = next((p for info in infos for p in info.params), None) or next(
                    (info.module for info in infos if info.module), "none")
                warnings.warn(f"jlrp: {pattern} in composite {self.name!r} matches no layer of this model "
                              f"(a layer's parameter path or module looks like {example!r}); its rule is "
                              f"not used", stacklevel=4)

    def __repr__(self) -> str:
        return self.name


_PROBE = LayerInfo(0, "dense", "dot_general", "", (), 0, 1, (), ())


def _registered_rule(kind: str):
    return next((r for k, r in REGISTRY.items() if (k if isinstance(k, str) else k.name) == kind), None)


def check_rule(rule, what: str) -> None:
    """Raise a TypeError unless ``rule`` is a jlrp rule (a float or a string would otherwise run silently as
    something else)."""
    if not isinstance(rule, rules.RuleBase):
        raise TypeError(f"{what} must be a jlrp rule (e.g. jlrp.rules.epsilon(), jlrp.rules.zplus(), "
                        f"jlrp.rules.gradient()), got {type(rule).__name__} {rule!r}")


def as_composite(composite) -> Composite:
    """Accept a Composite, a single rule (applied to every dense and conv layer), or None (the default)."""
    if composite is None:
        return epsilon_plus_flat()
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, rules.RuleBase):
        return Composite([("linear", composite)], name=repr(composite))
    raise TypeError(f"composite must be a jlrp Composite, a rule or None, got {type(composite).__name__}")


# --------------------------------------------------------------------------------------------------------
# Named presets, with Zennit's semantics (so users porting from Zennit get the same numbers).

def epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """Epsilon on dense layers, z+ on conv layers (Zennit's EpsilonPlus)."""
    return Composite([("dense", rules.epsilon(epsilon)), ("conv", rules.zplus(stabilizer))], "epsilon_plus")


def _preprocessing(layer: LayerInfo) -> bool:
    """An affine map the input meets before any dense/conv layer (a normalisation inside the model)."""
    return layer.kind == "affine" and layer.preceding_linear == 0


#: Presets with an input-independent or bounded first-layer rule (flat, z^B) pass relevance through input
#: preprocessing unchanged: dividing by a normalised input near 0 would undo what those rules are for.
_PASS_PREPROCESSING = (_preprocessing, rules.pass_())


def epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """EpsilonPlus with the flat rule on the first dense-or-conv layer (Zennit's EpsilonPlusFlat); input
    preprocessing inside the model (an affine normalisation before the first layer) passes relevance."""
    return Composite([*epsilon_plus(epsilon, stabilizer).entries, ("first", rules.flat(stabilizer)),
                      _PASS_PREPROCESSING], "epsilon_plus_flat")


def epsilon_gamma_box(low, high, epsilon: float = 1e-6, gamma: float = 0.25,
                      stabilizer: float = 1e-6) -> Composite:
    """z^B on the first conv layer (inputs bounded by [low, high]), gamma on other convs, epsilon on dense
    (Zennit's EpsilonGammaBox); input preprocessing inside the model passes relevance (the bounds are those of
    the first conv's input)."""
    return Composite([("dense", rules.epsilon(epsilon)), ("conv", rules.gamma(gamma, stabilizer)),
                      (lambda layer: layer.kind == "conv" and layer.conv_index == 0,
                       rules.zbox(low, high, stabilizer)), _PASS_PREPROCESSING], "epsilon_gamma_box")


def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """Alpha2-beta1 on conv layers, epsilon on dense layers (Zennit's EpsilonAlpha2Beta1)."""
    return Composite([("dense", rules.epsilon(epsilon)), ("conv", rules.alpha_beta(2.0, 1.0, stabilizer))],
                     "epsilon_alpha2_beta1")


def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """EpsilonAlpha2Beta1 with flat on the first dense-or-conv layer (Zennit's EpsilonAlpha2Beta1Flat)."""
    return Composite([*epsilon_alpha2_beta1(epsilon, stabilizer).entries, ("first", rules.flat(stabilizer)),
                      _PASS_PREPROCESSING], "epsilon_alpha2_beta1_flat")


def preset_a(epsilon: float = 0.1, stabilizer: float = 1e-6) -> Composite:
    """iNNvestigate's LRPSequentialPresetA: epsilon (0.1) on dense, alpha1-beta0 on conv."""
    return Composite([("dense", rules.epsilon(epsilon)), ("conv", rules.alpha_beta(1.0, 0.0, stabilizer))],
                     "preset_a")


def preset_b(epsilon: float = 0.1, stabilizer: float = 1e-6) -> Composite:
    """iNNvestigate's LRPSequentialPresetB: epsilon (0.1) on dense, alpha2-beta1 on conv."""
    return Composite([("dense", rules.epsilon(epsilon)), ("conv", rules.alpha_beta(2.0, 1.0, stabilizer))],
                     "preset_b")


def gradient_composite(activation_rule: rules.AnyRule, name: str) -> Composite:
    """Ordinary gradients through every layer except ReLUs (DeconvNet / Guided BackProp modify only those,
    as Zennit and Captum do: casts, normalisations and other activations keep their gradient)."""
    return Composite([("*", rules.gradient()), (lambda layer: layer.relu_like, activation_rule)], name)


# --------------------------------------------------------------------------------------------------------
# Transformers: AttnLRP (Achtibat et al., ICML 2024; its implementation LXT) and CP-LRP (Ali et al., ICML 2022)

def _transformer(product: rules.AnyRule, epsilon: float, linear: rules.AnyRule | None, name: str) -> Composite:
    return Composite([
        ("linear", linear or rules.epsilon(epsilon)),  # dense / conv: the epsilon rule, the bias absorbs
        ("affine", rules.scaling(rules.zero())),  # RMSNorm / L2 norm: identity (1/rms constant); LayerNorm:
        # LRP-0 on the centring (std constant, the bias absorbs); additive position embeddings: LRP-0 (absorbs)
        ("add", rules.norm(epsilon)),  # residual adds: the epsilon rule over the sum
        ("sum", rules.norm(epsilon)),  # means, pooling
        ("product", product),
        ("activation", rules.softmax()),  # softmax: x * (R - s sum R); every other activation: identity
    ], name)


def attnlrp(epsilon: float = 1e-6) -> Composite:
    """AttnLRP (Achtibat et al. 2024), rule for rule as LXT implements it.

    * dense layers: epsilon (the bias absorbs its share); residual adds and means: epsilon over the sum;
    * softmax: ``R_in = x * (R - s * sum(R))`` (masked, non-finite logits get 0); other activations
      (GELU, SiLU, tanh, ...): identity;
    * products of two activations (``q k^T``, ``A v``, SwiGLU / GeGLU / sigmoid gates): the epsilon-normalised
      bilinear rule split evenly (``rules.uniform(gates=False)``); ``x * f(x)`` written out is an activation;
    * RMSNorm, L2 normalisation and other pure scalings: identity (their 1/rms is constant); LayerNorm: only
      its standard deviation constant, the centring a linear map with LRP-0 (the bias absorbs); additive
      position / segment embeddings: LRP-0 over the sum (the position embedding absorbs its share)
      (``rules.scaling(rules.zero())``). LXT differentiates these with the statistics detached: LRP-0.

    Relevance then equals input x gradient of the model with AttnLRP's gradient patches (identity on
    activations, gradients / 4 at q and k and / 2 at v and gates, norm statistics detached) as eps -> 0.
    ``epsilon`` is the stabilizer of dense layers, sums and products (sign-aware: ``z + eps * sign(z)``).
    """
    return _transformer(rules.uniform(epsilon, gates=False), epsilon, None, "attnlrp")


def cp_lrp(epsilon: float = 1e-6) -> Composite:
    """CP-LRP (Ali et al. 2022) as LXT implements it: :func:`attnlrp` with attention weights and gates held
    constant (``rules.cp()``): relevance flows only through the values, and in gated MLPs (SwiGLU, GeGLU,
    sigmoid gates) only through the non-gate branch, which receives all of it."""
    return _transformer(rules.cp(epsilon), epsilon, None, "cp_lrp")


def vit(gamma: float | Callable[[LayerInfo], float] = 0.25, epsilon: float = 1e-6) -> Composite:
    """The ViT recipe of AttnLRP: CP-LRP inside attention and the gamma rule on every dense and conv layer
    (the patch embedding included). ``gamma`` is one value or a function of the layer's :class:`LayerInfo`
    to tune it per layer (e.g. ``lambda info: 1.0 if info.kind == "conv" else 0.1``, or by
    ``info.linear_index``); a layer given gamma 0 gets the epsilon rule."""
    def rule(value: float) -> rules.AnyRule:
        return rules.gamma(value, epsilon) if value else rules.epsilon(epsilon)

    linear = rules.PerLayer(lambda info: rule(float(gamma(info))), "gamma(per layer)") if callable(gamma) \
        else rule(gamma)
    return _transformer(rules.cp(epsilon), epsilon, linear, "vit")


def top_units(relevance, k: int, *, unit_axis: int = -1):
    """Latent attribution: the relevance of every unit of a layer and the ``k`` most relevant units per
    example. ``relevance`` is a layer's relevance from :func:`jlrp.report` (``report.layers[i].relevance``,
    e.g. a residual add's output (batch, tokens, width) or an MLP's hidden layer), with the batch on axis 0
    and units on ``unit_axis``; every other axis (tokens, pixels) is summed.

    Returns ``(per_unit, values, indices)``: shapes (batch, units), (batch, k), (batch, k); the top-k by
    signed relevance (evidence for the explained output), largest first.
    """
    r = jnp.moveaxis(jnp.asarray(relevance), unit_axis, -1)
    if r.ndim < 2:
        raise ValueError(f"top_units needs a batch axis and a unit axis, got relevance of shape {r.shape}")
    per_unit = r.reshape(r.shape[0], -1, r.shape[-1]).sum(1)
    if not 0 < k <= per_unit.shape[-1]:
        raise ValueError(f"k={k} must lie in [1, {per_unit.shape[-1]}] (the layer has {per_unit.shape[-1]} units)")
    values, indices = jax.lax.top_k(per_unit, k)
    return per_unit, values, indices
