"""An independent dense-matrix reference implementation of LRP (Zennit's semantics), for the tests.

Written from the formulas in /work/shared/REFERENCE.md ("Zennit parity"), not from jlrp's code: every layer
is an explicit matrix ``M`` (out x in) acting on flattened vectors, and every rule is computed from the
contribution matrices ``Z[j, i] = x_i * M[j, i]`` with numpy, in float64:

    R_i = sum_j Z[j, i] / stab(z_j) * R_j,      z_j = sum_i Z[j, i] + b_j,      stab(z) = z + eps * s(z)

with s(z) = +1 where z >= 0 and -1 elsewhere. A rule is a set of modified copies (x_k, M_k, b_k) of the layer
("terms"), grouped under shared denominators. JAX is only used to *obtain* the matrix of a layer (its Jacobian
with respect to the flattened input, with the unmodified, squared or all-ones kernel).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------------------------------------------------
# Layers as matrices


def stabilize(z: np.ndarray, eps: float) -> np.ndarray:
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def pos(a):
    return np.maximum(a, 0.0)


def neg(a):
    return np.minimum(a, 0.0)


@dataclasses.dataclass
class Linear:
    """A dense or conv layer on flat vectors: z = M @ x + b.

    ``M_square`` / ``M_ones`` are the layer's matrices with the *kernel* squared / set to ones (for a conv
    these keep the conv's structure: ones only where the kernel connects input and output).
    """
    M: np.ndarray
    b: np.ndarray
    M_square: np.ndarray
    M_ones: np.ndarray
    name: str = ""

    def __call__(self, x):
        return self.M @ x + self.b


def _jacobians(apply: Callable, kernels, x_shape) -> list[np.ndarray]:
    """The matrices (out x in) of the linear maps ``x -> apply(x, kernel)``: the layer applied to the basis
    vectors of the flattened input (columns), in one jitted, vmapped call per kernel."""
    n = int(np.prod(x_shape))
    basis = jnp.eye(n, dtype=jnp.float64)
    columns = jax.jit(lambda k: jax.vmap(lambda e: jnp.ravel(apply(e.reshape(x_shape), k)))(basis))
    return [np.asarray(columns(k), np.float64).T.copy() for k in kernels]


def _jacobian(apply: Callable, kernel, x_shape) -> np.ndarray:
    return _jacobians(apply, [kernel], x_shape)[0]


def from_layer(apply: Callable, kernel, x_shape, bias=None, name: str = "") -> Linear:
    """The matrix of ``x -> apply(x, kernel) + bias`` (``apply`` linear in x, without the bias).

    ``bias`` is broadcast to the output shape (e.g. shape (C,) for NHWC, (C, 1, 1) for NCHW).
    """
    kernel = jnp.asarray(kernel, jnp.float64)
    M, M_square, M_ones = _jacobians(apply, [kernel, kernel ** 2, jnp.ones_like(kernel)], x_shape)
    out_shape = jax.eval_shape(lambda x: apply(x, kernel), jax.ShapeDtypeStruct(x_shape, jnp.float64)).shape
    b = np.zeros(out_shape) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), out_shape)
    return Linear(M, np.array(b, np.float64).ravel(), M_square, M_ones, name)


def dense(W, b=None, name: str = "") -> Linear:
    """``x @ W + b`` for a single vector x: M = W^T."""
    W = np.asarray(W, np.float64)
    b = np.zeros(W.shape[1]) if b is None else np.asarray(b, np.float64)
    return Linear(W.T.copy(), b.copy(), (W ** 2).T.copy(), np.ones_like(W.T), name)


def merge_affine(layer: Linear, scale, shift) -> Linear:
    """The layer followed by ``z * scale + shift`` (per output unit, flat): BatchNorm merged into the layer.

    The kernel-derived matrices are recomputed from the merged kernel: squared rows scale by scale^2, the
    all-ones structure does not change.
    """
    scale = np.asarray(scale, np.float64)
    shift = np.asarray(shift, np.float64)
    return Linear(layer.M * scale[:, None], layer.b * scale + shift, layer.M_square * scale[:, None] ** 2,
                  layer.M_ones, layer.name)


# ---------------------------------------------------------------------------------------------------------
# Rules


@dataclasses.dataclass(frozen=True)
class Epsilon:
    eps: float = 1e-6
    bias: bool = True


def Zero(stabilizer: float = 1e-12, bias: bool = True) -> Epsilon:  # noqa: N802 - mirrors a rule name
    return Epsilon(stabilizer, bias)


@dataclasses.dataclass(frozen=True)
class Gamma:
    gamma: float = 0.25
    stabilizer: float = 1e-6
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class AlphaBeta:
    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class ZPlus:
    stabilizer: float = 1e-6
    bias: bool = True


@dataclasses.dataclass(frozen=True, eq=False)
class ZBox:
    low: Any
    high: Any
    stabilizer: float = 1e-6
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class WSquare:
    stabilizer: float = 1e-6
    bias: bool = False


@dataclasses.dataclass(frozen=True)
class Flat:
    stabilizer: float = 1e-6


@dataclasses.dataclass(frozen=True)
class Norm:
    stabilizer: float = 1e-6


def _group(terms, R, eps, mask=1.0):
    """Terms (sign, Z (out x in), b (out)) sharing one denominator; returns sum_k sign_k sum_j Z_k[j, i] c_j."""
    z = sum(s * (Z.sum(axis=1) + b) for s, Z, b in terms)
    c = mask * R / stabilize(z, eps)
    return sum(s * (Z * c[:, None]).sum(axis=0) for s, Z, b in terms)


def _bounds(value, n):
    """A scalar bound, or one per input (already broadcast to the input's shape by the caller)."""
    value = np.asarray(value, np.float64)
    if value.ndim and value.size != n:
        raise ValueError(f"bounds of shape {value.shape}: broadcast them to the input shape ({n} values)")
    return np.broadcast_to(value.ravel() if value.ndim else value, (n,))


def linear_relevance(rule, layer: Linear, x, R) -> np.ndarray:
    """R_in (flat) of ``rule`` on ``layer`` at input x (flat) for output relevance R (flat)."""
    x = np.asarray(x, np.float64).ravel()
    R = np.asarray(R, np.float64).ravel()
    M, b = layer.M, layer.b
    zero = np.zeros_like(b)
    ones = np.ones_like(x)
    if isinstance(rule, Epsilon):
        return _group([(1, x * M, b if rule.bias else zero)], R, rule.eps)
    if isinstance(rule, Gamma):
        g = rule.gamma
        up, down = M + g * pos(M), M + g * neg(M)
        b_up, b_down = (b + g * pos(b), b + g * neg(b)) if rule.bias else (zero, zero)
        z = M @ x + b  # the unmodified output selects the group
        r_pos = _group([(1, pos(x) * up, b_up), (1, neg(x) * down, zero)], R, rule.stabilizer, z > 0)
        r_neg = _group([(1, pos(x) * down, b_down), (1, neg(x) * up, zero)], R, rule.stabilizer, z < 0)
        return r_pos + r_neg
    if isinstance(rule, AlphaBeta):
        bp, bn = (pos(b), neg(b)) if rule.bias else (zero, zero)
        act = _group([(1, pos(x) * pos(M), bp), (1, neg(x) * neg(M), zero)], R, rule.stabilizer)
        inh = _group([(1, pos(x) * neg(M), bn), (1, neg(x) * pos(M), zero)], R, rule.stabilizer)
        return rule.alpha * act - rule.beta * inh
    if isinstance(rule, ZPlus):
        bp = pos(b) if rule.bias else zero
        return _group([(1, pos(x) * pos(M), bp), (1, neg(x) * neg(M), zero)], R, rule.stabilizer)
    if isinstance(rule, ZBox):
        low, high = _bounds(rule.low, x.size), _bounds(rule.high, x.size)
        b0, bp, bn = (b, pos(b), neg(b)) if rule.bias else (zero, zero, zero)
        return _group([(1, x * M, b0), (-1, low * pos(M), bp), (-1, high * neg(M), bn)], R, rule.stabilizer)
    if isinstance(rule, WSquare):
        return _group([(1, ones * layer.M_square, b ** 2 if rule.bias else zero)], R, rule.stabilizer)
    if isinstance(rule, Flat):
        return _group([(1, ones * layer.M_ones, zero)], R, rule.stabilizer)
    raise TypeError(f"no reference for {rule!r}")


def linear_absorbed(rule, layer: Linear, x, R) -> float:
    return float(np.sum(R) - np.sum(linear_relevance(rule, layer, x, R)))


# ---------------------------------------------------------------------------------------------------------
# Whole sequential models


RELU = "relu"
FLATTEN = "flatten"  # a no-op on flat vectors (row-major flattening of a single sample)


@dataclasses.dataclass
class SumPool:
    """A parameter-free linear map (sum pooling, a sum over axes): the norm rule."""
    P: np.ndarray

    def __call__(self, x):
        return self.P @ x


def sum_pool(apply: Callable, x_shape) -> SumPool:
    return SumPool(_jacobian(lambda x, _: apply(x), None, x_shape))


@dataclasses.dataclass
class Scale:
    """Elementwise multiplication by a constant that is not merged into a layer (e.g. avg pool's 1 / k): pass."""
    c: float

    def __call__(self, x):
        return x * self.c


def forward(steps: Sequence, x) -> list[np.ndarray]:
    """Activations at every step's input, plus the output (flat vectors)."""
    acts = [np.asarray(x, np.float64).ravel()]
    for step in steps:
        a = acts[-1]
        if step == RELU:
            acts.append(np.maximum(a, 0.0))
        elif step == FLATTEN:
            acts.append(a)
        else:
            acts.append(step(a))
    return acts


def sequential_relevance(steps: Sequence, rules: Sequence, x, R_out=None, target: int | None = None,
                         norm_stabilizer: float = 1e-6) -> np.ndarray:
    """Chain the per-layer references through a sequential model of one sample.

    ``rules`` holds one rule per :class:`Linear` step, in order. ReLU and Scale pass relevance, SumPool uses
    the norm rule. The initial relevance is ``R_out`` or the target logit ``out * one_hot(target)``.
    """
    acts = forward(steps, x)
    out = acts[-1]
    if R_out is None:
        R = np.zeros_like(out)
        R[target] = out[target]
    else:
        R = np.asarray(R_out, np.float64).ravel()
    linear = [s for s in steps if isinstance(s, Linear)]
    if len(rules) != len(linear):
        raise ValueError(f"{len(rules)} rules for {len(linear)} linear layers")
    rule_of = {id(s): r for s, r in zip(linear, rules)}
    for step, a in zip(reversed(steps), reversed(acts[:-1])):
        if isinstance(step, Linear):
            R = linear_relevance(rule_of[id(step)], step, a, R)
        elif isinstance(step, SumPool):
            R = _group([(1, a * step.P, np.zeros(step.P.shape[0]))], R, norm_stabilizer)
        # relu, flatten and scale: pass
    return R
