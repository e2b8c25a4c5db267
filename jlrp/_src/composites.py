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
from typing import Callable, Sequence, Union

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
        return lambda layer: any(compiled.search(p) for p in layer.params)
    return lambda layer: any(fnmatch.fnmatchcase(p, pattern) for p in layer.params)


def module_path(pattern: str, *, regex: bool = False) -> Callable[[LayerInfo], bool]:
    """Select layers by module path (Flax linen's name stack, e.g. 'CNN/Conv_0'); glob or regex."""
    if regex:
        compiled = re.compile(pattern)
        return lambda layer: bool(compiled.search(layer.module))
    return lambda layer: fnmatch.fnmatchcase(layer.module, pattern) or fnmatch.fnmatchcase(
        layer.module, "*/" + pattern)


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
        return rule

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
