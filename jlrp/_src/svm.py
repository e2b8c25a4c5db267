"""Kernel SVM over bag-of-words (BoW) image features and its LRP decomposition (Bach et al. 2015).

Pipeline (all JAX, batched over the leading image axis, jit-able)::

    images (N, H, W[, C])
      -> patch_descriptors   local features x_p: flattened (optionally mean-centred) patches   (N, P, Dd)
      -> bow                 assignment a_{p,d} to codebook word d (hard one-hot / soft softmax),
                             sum pooling  h_d = s * sum_p a_{p,d},  s = 1/P if normalize else 1  (N, D)
      -> SVM                 f(x) = sum_i c_i k(x_i, h) + b,  k(x, z) = sum_d min(x_d, z_d)      (N,)
                             with c_i = alpha_i y_i from the dual problem.

The LRP decomposition (``explain_svm``) walks this pipeline backwards:

    R_d   = sum_i c_i min(x_{i,d}, h_d)  [+ b / D]               BoW dimension d
    R_p   = sum_d R_d * s a_{p,d} / h_d    (0 where h_d = 0)     local feature p  (its share of h_d)
    R_uv  = sum_p R_p * q_p(u, v)                                pixel (u, v), q_p sums to 1 over patch p

Bias: ``bias='absorb'`` (default) keeps b out of the decomposition, as LRP's bias absorbs its share of a
layer: the kernel part is f(x) - f(empty histogram) = f(x) - b, so ``sum_d R_d = sum_uv R_uv = f(x) - b``.
``bias='spread'`` splits b equally over the D BoW dimensions (b / D each, the convention of Bach et al.):
``sum_d R_d = f(x)``; where h_d = 0 no local feature contributes to dimension d (its kernel term is exactly
0), so only that dimension's bias share stays behind: ``sum_uv R_uv = f(x) - (b / D) #{d : h_d = 0}``.
Either way ``undistributed = f(x) - sum_uv R_uv`` is returned.

The first step is derived by jlrp's LRP interpreter from the jaxpr of the kernel terms (``min`` with a
support vector is an elementwise region, the sum over dimensions a sum layer split proportionally); the
pooling step is one exact proportional split; the descriptor-to-pixel step is specific to patch
descriptors. tests/test_svm.py checks every level against a loop transcription of these formulas.

Pixels: ``pixels='energy'`` (default) splits a patch's relevance over its pixels in proportion to their
share of the descriptor's squared norm, ``q_p(u, v) = x_p(u, v)^2 / |x_p|^2`` (channels summed; for
centred descriptors the deviations from the patch mean): the deep-Taylor share with the blank patch (or,
centred, the flat patch) as root point, so within a patch a pixel at the background level 0 (at the
patch mean) gets nothing; an all-zero descriptor falls back to the uniform split.
``pixels='uniform'`` spreads it evenly over the footprint, ``q = 1 / patch**2``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import rules
from .api import lrp
from .composites import Composite

Array = jax.Array


# --------------------------------------------------------------------------- local features

def _as_nhwc(images: Array) -> Array:
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.inexact):  # uint8 images: squares would overflow
        images = images.astype(jnp.promote_types(jnp.float32, jnp.result_type(float)))
    if images.ndim == 3:  # NHW grayscale
        return images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must be NHW or NHWC, got shape {images.shape}")
    return images


def _patch_grid(h: int, w: int, patch: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    if patch > h or patch > w or patch < 1 or stride < 1:
        raise ValueError(f"patch={patch}, stride={stride} do not fit images of size {h}x{w}")
    tops, lefts = np.arange(0, h - patch + 1, stride), np.arange(0, w - patch + 1, stride)
    ty, tx = np.meshgrid(tops, lefts, indexing="ij")
    return ty.ravel(), tx.ravel()  # (P,), row-major over the patch grid


def patch_footprints(h: int, w: int, patch: int = 4, stride: int = 2) -> np.ndarray:
    """Static pixel membership of every patch: float array (P, h, w), 1 inside patch p, else 0.

    Patches are the valid (unpadded) windows with top-left corners on a ``stride`` grid, row-major.
    """
    ty, tx = _patch_grid(h, w, patch, stride)
    rows = (np.arange(h)[None, :] >= ty[:, None]) & (np.arange(h)[None, :] < ty[:, None] + patch)
    cols = (np.arange(w)[None, :] >= tx[:, None]) & (np.arange(w)[None, :] < tx[:, None] + patch)
    return (rows[:, :, None] & cols[:, None, :]).astype(np.float32)


def patch_descriptors(images: Array, patch: int = 4, stride: int = 2,
                      center: bool = False) -> tuple[Array, np.ndarray]:
    """Overlapping patches as local descriptors.

    Args:
      images: (N, H, W) or (N, H, W, C).
      patch, stride: square window size and step (no padding; P = n_rows * n_cols windows).
      center: subtract each patch's mean (over its pixels and channels) from its descriptor.

    Returns:
      descriptors (N, P, patch*patch*C) and the static footprint (P, H, W) from ``patch_footprints``.
    """
    x = _as_nhwc(images)
    n, h, w, c = x.shape
    ty, tx = _patch_grid(h, w, patch, stride)
    r = ty[:, None] + np.arange(patch)  # (P, patch) static gather indices
    q = tx[:, None] + np.arange(patch)
    d = x[:, r[:, :, None], q[:, None, :], :].reshape(n, len(ty), patch * patch * c)
    if center:
        d = d - d.mean(axis=-1, keepdims=True)
    return d, patch_footprints(h, w, patch, stride)


# --------------------------------------------------------------------------- codebook

def _sq_dists(x: Array, c: Array) -> Array:
    """Squared Euclidean distances (M, k) between rows of x (M, D) and c (k, D), clamped at 0."""
    d2 = (x * x).sum(-1)[:, None] - 2.0 * x @ c.T + (c * c).sum(-1)[None, :]
    return jnp.maximum(d2, 0.0)


def kmeans_inertia(descriptors: Array, centroids: Array) -> Array:
    """Sum over descriptors of the squared distance to the nearest centroid (scalar)."""
    x = descriptors.reshape(-1, descriptors.shape[-1])
    return _sq_dists(x, centroids).min(-1).sum()


@functools.partial(jax.jit, static_argnames=("k",))
def kmeans(descriptors: Array, k: int, key: Array, iters: int = 20) -> Array:
    """Plain k-means (Lloyd) with k-means++ seeding; returns centroids (k, D).

    ``descriptors`` may have any leading shape (..., D); all rows are clustered together. An empty cluster
    keeps its previous centroid. Deterministic given ``key``. Jitted (``k`` static, ``iters`` traced).
    """
    x = descriptors.reshape(-1, descriptors.shape[-1])
    m = x.shape[0]
    k0, key = jax.random.split(key)
    first = x[jax.random.randint(k0, (), 0, m)]
    cent = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    dmin = ((x - first) ** 2).sum(-1)

    def seed(i, carry):  # k-means++: next centre drawn with probability proportional to D(x)^2
        cent, dmin = carry
        logits = jnp.where(dmin.sum() > 0, jnp.log(dmin), 0.0)  # all-duplicate data: uniform
        j = jax.random.categorical(jax.random.fold_in(key, i), logits)
        cent = cent.at[i].set(x[j])
        return cent, jnp.minimum(dmin, ((x - x[j]) ** 2).sum(-1))

    cent, _ = jax.lax.fori_loop(1, k, seed, (cent, dmin))

    def lloyd(_, cent):
        onehot = jax.nn.one_hot(_sq_dists(x, cent).argmin(-1), k, dtype=x.dtype)  # (M, k)
        counts = onehot.sum(0)
        sums = onehot.T @ x
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], cent)

    return jax.lax.fori_loop(0, iters, lloyd, cent)


# --------------------------------------------------------------------------- bag of words

@functools.partial(jax.jit, static_argnames=("assignment", "pooling", "normalize"))
def bow(descriptors: Array, codebook: Array, assignment: Literal["hard", "soft"] = "hard",
        beta: float = 1.0, pooling: Literal["sum"] = "sum", normalize: bool = True) -> tuple[Array, Array]:
    """BoW histogram by assignment and sum pooling.

    a_{p,d} = one_hot(argmin_d |x_p - m_d|^2)          (hard)
            = softmax_d(-beta |x_p - m_d|^2)            (soft; beta is in 1 / squared descriptor units)
    h_d     = s * sum_p a_{p,d},   s = 1/P if normalize (histogram sums to 1) else 1.

    Args:
      descriptors: (N, P, Dd); codebook: (D, Dd).
    Returns:
      (h, a): histogram (N, D) and the per-patch assignment weights a (N, P, D), rows of a sum to 1.
    """
    if pooling != "sum":
        raise NotImplementedError("only sum pooling is implemented (max pooling: future work)")
    n, p, dd = descriptors.shape
    d2 = _sq_dists(descriptors.reshape(n * p, dd), codebook).reshape(n, p, -1)
    if assignment == "hard":
        a = jax.nn.one_hot(d2.argmin(-1), codebook.shape[0], dtype=descriptors.dtype)
    elif assignment == "soft":
        a = jax.nn.softmax(-beta * d2, axis=-1)
    else:
        raise ValueError(f"assignment must be 'hard' or 'soft', got {assignment!r}")
    h = a.sum(1) / p if normalize else a.sum(1)
    return h, a


# --------------------------------------------------------------------------- kernel SVM

def hik_kernel(x: Array, z: Array) -> Array:
    """Histogram intersection kernel K_{ij} = sum_d min(x_{i,d}, z_{j,d}); x (n, D), z (m, D) -> (n, m)."""
    return jnp.minimum(x[:, None, :], z[None, :, :]).sum(-1)


def _project(v: Array, y: Array, c: float, iters: int = 100) -> Array:
    """Euclidean projection onto {0 <= alpha <= C, y^T alpha = 0}: alpha = clip(v - mu y, 0, C) with the
    multiplier mu found by bisection (y^T clip(v - mu y, 0, C) is non-increasing in mu)."""
    g = lambda mu: (y * jnp.clip(v - mu * y, 0.0, c)).sum()
    hi0 = jnp.abs(v).max() + c + 1.0

    def step(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        pos = g(mid) > 0
        return jnp.where(pos, mid, lo), jnp.where(pos, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, step, (-hi0, hi0))
    return jnp.clip(v - 0.5 * (lo + hi) * y, 0.0, c)


@jax.jit
def fit_svm(kernel: Array, y: Array, C: float = 1.0, steps: int = 2000) -> tuple[Array, Array]:
    """Soft-margin SVM by projected gradient on the dual, with optax (SGD + Nesterov momentum).

        min_alpha  1/2 alpha^T Q alpha - 1^T alpha,   Q = (y y^T) * K,   0 <= alpha <= C,  y^T alpha = 0

    Step size 1 / lambda_max(Q); after every optax step alpha is projected back onto the feasible set
    (``_project``). The bias follows from the KKT conditions: the mean of y_i - (K c)_i over free support
    vectors (0 < alpha_i < C), else the midpoint of the interval allowed by the bounded ones (as libsvm).
    Jitted; ``C`` and ``steps`` are traced, so changing them does not recompile.

    Args:
      kernel: (n, n) training kernel matrix; y: (n,) labels in {-1, +1}.
    Returns:
      (alpha (n,), b ()). The decision function is f(x) = sum_i alpha_i y_i k(x_i, x) + b.
    """
    y = y.astype(kernel.dtype)
    q = y[:, None] * y[None, :] * kernel
    lr = 1.0 / jnp.maximum(jnp.linalg.eigvalsh(q)[-1], 1e-12)
    opt = optax.sgd(lr, momentum=0.9, nesterov=True)
    alpha = jnp.zeros_like(y)

    def step(_, carry):
        alpha, state = carry
        upd, state = opt.update(q @ alpha - 1.0, state, alpha)
        return _project(optax.apply_updates(alpha, upd), y, C), state

    alpha, _ = jax.lax.fori_loop(0, steps, step, (alpha, opt.init(alpha)))

    r = y - kernel @ (alpha * y)  # b that puts sample i exactly on its margin
    tol = 1e-6 * C
    free = (alpha > tol) & (alpha < C - tol)
    at0, atc = alpha <= tol, alpha >= C - tol
    inf = jnp.asarray(jnp.inf, r.dtype)
    lower = jnp.where((at0 & (y > 0)) | (atc & (y < 0)), r, -inf).max()
    upper = jnp.where((at0 & (y < 0)) | (atc & (y > 0)), r, inf).min()
    mid = jnp.where(jnp.isfinite(lower) & jnp.isfinite(upper), 0.5 * (lower + upper),
                    jnp.where(jnp.isfinite(lower), lower, jnp.where(jnp.isfinite(upper), upper, 0.0)))
    b = jnp.where(free.any(), jnp.where(free, r, 0.0).sum() / jnp.maximum(free.sum(), 1), mid)
    return alpha, b


# --------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class BowConfig:
    """Static hyper-parameters of the BoW pipeline (hashable: jit treats it as static)."""
    patch: int = 4
    stride: int = 2
    center: bool = False
    assignment: Literal["hard", "soft"] = "hard"
    beta: float = 1.0
    normalize: bool = True
    C: float = 1.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BowSVM:
    """Trained BoW kernel SVM. A pytree (arrays are leaves, ``config`` is static), so it can be passed
    through ``jax.jit`` / ``jax.vmap``.

    Attributes:
      codebook: (D, Dd) visual words.
      support: (m, D) histograms of the support vectors (training samples with alpha_i > 0).
      coef: (m,) c_i = alpha_i y_i.
      bias: () b.
      config: BowConfig.
    """
    codebook: Array
    support: Array
    coef: Array
    bias: Array
    config: BowConfig = dataclasses.field(metadata=dict(static=True))

    def features(self, images: Array) -> tuple[Array, Array, np.ndarray]:
        """(h (N, D), a (N, P, D), footprint (P, H, W)) for ``images``."""
        cfg = self.config
        desc, foot = patch_descriptors(images, cfg.patch, cfg.stride, cfg.center)
        h, a = bow(desc, self.codebook, cfg.assignment, cfg.beta, "sum", cfg.normalize)
        return h, a, foot

    def decision_function(self, images: Array) -> Array:
        """f(x) = sum_i c_i k_HIK(x_i, h(x)) + b for every image: (N,). Jitted."""
        return _decision_function(self, images)

    def predict(self, images: Array) -> Array:
        """Labels in {-1, +1} (f(x) >= 0 -> +1): (N,)."""
        return jnp.where(self.decision_function(images) >= 0, 1, -1)


@jax.jit
def _decision_function(model: BowSVM, images: Array) -> Array:
    h, _, _ = model.features(images)
    return hik_kernel(h, model.support) @ model.coef + model.bias


def train_bow_svm(images: Array, labels: Array, k: int = 32, key: Array | None = None, patch: int = 4,
                  stride: int = 2, C: float = 1.0, steps: int = 2000, assignment: str = "hard",
                  beta: float = 1.0, normalize: bool = True, center: bool = False,
                  kmeans_iters: int = 20) -> BowSVM:
    """Whole pipeline: descriptors -> k-means codebook (k words) -> BoW -> dual SVM with HIK kernel.

    Args:
      images: (N, H, W[, C]) training images; labels: (N,) in {-1, +1}.
      key: PRNG key for k-means seeding (default PRNGKey(0)).
    Returns:
      A frozen ``BowSVM`` holding only the support vectors (alpha_i > 0 exactly; the projection clips to 0).
    """
    y = np.asarray(labels)
    if not np.all(np.isin(y, (-1, 1))):
        raise ValueError("labels must be -1 or +1")
    key = jax.random.PRNGKey(0) if key is None else key
    cfg = BowConfig(patch, stride, center, assignment, float(beta), normalize, float(C))
    desc = jax.jit(lambda im: patch_descriptors(im, patch, stride, center)[0])(images)
    codebook = kmeans(desc, k, key, kmeans_iters)
    h, _ = bow(desc, codebook, assignment, beta, "sum", normalize)
    alpha, b = fit_svm(jax.jit(hik_kernel)(h, h), jnp.asarray(y), C, steps)
    sv = np.flatnonzero(np.asarray(alpha) > 0)
    coef = alpha[sv] * jnp.asarray(y[sv], alpha.dtype)
    return BowSVM(codebook=codebook, support=h[sv], coef=coef, bias=b, config=cfg)


# --------------------------------------------------------------------------- LRP

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SVMExplanation:
    """Relevance at every level of the BoW SVM (see the module docstring for the formulas).

    Attributes:
      decision: (N,) f(x).
      dims: (N, D) R_d, including the bias share; sums to f(x) (bias='spread') or f(x) - b ('absorb').
      features: (N, P) R_p; sums to f(x) - undistributed.
      pixels: (N, H, W) R_uv; sums to f(x) - undistributed (channels are summed).
      bias_share: () the bias relevance given to every BoW dimension: b / D ('spread') or 0 ('absorb').
      undistributed: (N,) f(x) - sum R_uv: b ('absorb') or (b / D) #{d : h_d = 0} ('spread').
    """
    decision: Array
    dims: Array
    features: Array
    pixels: Array
    bias_share: Array
    undistributed: Array


def _pixel_weights(desc: Array, rule: str) -> Array:
    """Per descriptor entry the share q of its patch's relevance (entries of one patch sum to 1)."""
    if rule == "uniform":
        return jnp.full_like(desc, 1.0 / desc.shape[-1])
    if rule != "energy":
        raise ValueError(f"pixels must be 'energy' or 'uniform', got {rule!r}")
    e = desc * desc
    total = e.sum(-1, keepdims=True)
    return jnp.where(total > 0, e / jnp.where(total > 0, total, 1.0), 1.0 / desc.shape[-1])


_SUM_RULES = Composite([("sum", rules.norm(1e-12))], "hik")  # proportional split, ~exact


def _kernel_terms(h: Array, support: Array, coef: Array) -> Array:
    """``c_i k(x_i, h)`` for every image and support vector: (N, m)."""
    return jnp.minimum(h[:, None, :], support[None]).sum(-1) * coef


_explain_kernel = lrp(_kernel_terms, _SUM_RULES)


def explain_svm(model: BowSVM, images: Array, *, bias: Literal["absorb", "spread"] = "absorb",
                pixels: Literal["energy", "uniform"] = "energy") -> SVMExplanation:
    """LRP for the BoW kernel SVM (Bach et al. 2015), explaining f(x) itself (no target selection).

        R_d  = sum_i c_i min(x_{i,d}, h_d)  [+ b / D with bias='spread']
        R_p  = sum_d R_d * s a_{p,d} / h_d             (s a_{p,d} / h_d is p's share of the pooled h_d;
                                                         defined as 0 where h_d = 0, where a_{p,d} = 0 too)
        R_uv = sum_p R_p * q_p(u, v)                   (q_p: 'energy' or 'uniform' share of pixel uv in p)

    See the module docstring for the two bias conventions and the two pixel rules.

    Args:
      model: a trained ``BowSVM``; images: (N, H, W[, C]).
      bias: 'absorb' (``sum R = f(x) - b``) or 'spread' (``b / D`` per BoW dimension).
      pixels: 'energy' or 'uniform'.
    Returns:
      SVMExplanation; jit-able with ``jax.jit(explain_svm, static_argnames=("bias", "pixels"))``.
    """
    if bias not in ("absorb", "spread"):
        raise ValueError(f"bias must be 'absorb' or 'spread', got {bias!r}")
    cfg = model.config
    desc, _ = patch_descriptors(images, cfg.patch, cfg.stride, cfg.center)
    h, a = bow(desc, model.codebook, cfg.assignment, cfg.beta, "sum", cfg.normalize)
    bias_share = model.bias / h.shape[-1] if bias == "spread" else jnp.zeros_like(model.bias)
    # Decision value -> BoW dimensions by jlrp's interpreter on the kernel's own jaxpr: min(h, x_i) is an
    # elementwise region (pass), the sum over dimensions a sum layer (proportional split). Seeded with the
    # per-support-vector terms c_i k(x_i, h), it gives R_d = sum_i c_i min(x_{i,d}, h_d).
    terms = _kernel_terms(h, model.support, model.coef)
    r_dims = _explain_kernel(h, model.support, model.coef, relevance=terms) + bias_share
    # -> local features: each patch's share of the pooled count, written out so that a bin with h_d = 0
    # is exactly empty (a stabilised split would also swallow the bias share of bins with h_d ~ 1e-300)
    empty = h <= 0
    share = (1.0 / a.shape[1] if cfg.normalize else 1.0) * a / jnp.where(empty, 1.0, h)[:, None, :]
    r_feat = jnp.einsum("npd,nd->np", share, r_dims)
    # patches -> pixels: the transpose of the patch gather scatters each entry's share back to its pixel
    r_entries = r_feat[..., None] * _pixel_weights(desc, pixels)
    x = _as_nhwc(images).astype(r_entries.dtype)
    _, scatter = jax.vjp(lambda im: patch_descriptors(im, cfg.patch, cfg.stride)[0], x)
    r_pix = scatter(r_entries)[0].sum(-1)
    decision = hik_kernel(h, model.support) @ model.coef + model.bias  # computed directly, not from r_dims
    # what stays behind, from the convention (not measured: the tests compare it with the sums)
    kept = jnp.broadcast_to(model.bias, decision.shape) if bias == "absorb" else bias_share * empty.sum(-1)
    return SVMExplanation(decision=decision, dims=r_dims, features=r_feat, pixels=r_pix,
                          bias_share=bias_share, undistributed=kept)
