"""jlrp.evaluation against Quantus: the same numbers on the same inputs, and the speed of the same work.

Optional: needs Quantus, PyTorch (CPU) and jlrp's dependencies in one environment, kept apart from the
project's (e.g. ``python -m venv /tmp/qvenv && /tmp/qvenv/bin/pip install quantus==0.6.0 torch jax optax
pillow && /tmp/qvenv/bin/pip install --no-deps -e .``), then

    /tmp/qvenv/bin/python benchmarks/quantus_compare.py --out /tmp/quantus-compare

Setup: one small CNN (conv 3x3 x8 - relu - conv 3x3 x16 - relu - maxpool 2 - global mean - dense 4) with the
same random weights in PyTorch (NCHW) and JAX (NHWC), 64 images 32x32 (one channel) of
``jlrp.datasets.shapes`` with their masks, their labels as targets, explanation = the gradient of the target
logit (a torch ``explain_func`` for Quantus, ``jlrp.gradient`` for jlrp). Scores are logits
(``softmax=False`` passed to every Quantus metric; several default to probabilities).

Equality: float64 models (the torch model casts its input to float64, so Quantus's ``torch.Tensor(x)``
float32 cast of the inputs is exact where the inputs are float32 numbers: images, baseline replacements,
and the random values we hand to both); Quantus's own randomness (subsets, noise, classes, random
layers) is replayed or reproduced from its seed so both see the same draws. Every Quantus metric runs
with ``normalise=False`` and ``abs=False`` and gets the same maps as jlrp (|R| where jlrp's definition
takes it). The maps for the ranking metrics are the gradient plus N(0, 1e-6) noise, so that no two pixels
tie (numpy's unstable argsort and jlrp's index order would break ties differently).

Speed: float32 models (as Quantus predicts in float32), the work listed in issue 14, measured in ``--repeats``
interleaved rounds (Quantus, jlrp, and the bare model calls each side must make: torch forward passes or
gradients on batches of 64 as Quantus calls them, and the same rows through the jitted JAX model in jlrp's
chunks) after a warm-up of each; medians, the ratio Quantus / jlrp, and the bound Quantus / XLA model calls
(the speed-up a jlrp without any overhead would reach). jlrp's first call (compilation included) and the
programs it compiles are reported from JAX's compile log. The 1-minute load average is recorded: on a shared
machine torch's OpenMP threads slow down far more under load than XLA's thread pool, so ratios measured under
load overstate jlrp's advantage.
Results go to ``--out`` (results.md, results.json), never into the repository.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import statistics
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import quantus  # noqa: E402
import torch  # noqa: E402

import jlrp  # noqa: E402
from jlrp import evaluation as E  # noqa: E402
from jlrp._src.metrics_common import auto_chunk  # noqa: E402

N_CLASSES = 4


# --------------------------------------------------------------------------------------------------------
# the model, twice
# --------------------------------------------------------------------------------------------------------

def make_params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"conv0": {"w": rng.normal(size=(3, 3, 1, 8)) * 0.5, "b": rng.normal(size=8) * 0.1},
            "conv1": {"w": rng.normal(size=(3, 3, 8, 16)) * 0.2, "b": rng.normal(size=16) * 0.1},
            "dense": {"w": rng.normal(size=(16, N_CLASSES)) * 0.5, "b": rng.normal(size=N_CLASSES) * 0.1}}


def jax_model(params, x):
    conv = lambda v, w: jax.lax.conv_general_dilated(v, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(conv(x, params["conv0"]["w"]) + params["conv0"]["b"])
    h = jax.nn.relu(conv(h, params["conv1"]["w"]) + params["conv1"]["b"])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return h.mean((1, 2)) @ params["dense"]["w"] + params["dense"]["b"]


class TorchNet(torch.nn.Module):
    def __init__(self, params: dict, dtype: torch.dtype):
        super().__init__()
        self.dtype_ = dtype
        self.conv0 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.dense = torch.nn.Linear(16, N_CLASSES)
        self.to(dtype)  # before copying, so float64 weights are not rounded to float32
        with torch.no_grad():
            for name in ("conv0", "conv1"):
                getattr(self, name).weight.copy_(torch.tensor(params[name]["w"].transpose(3, 2, 0, 1)))
                getattr(self, name).bias.copy_(torch.tensor(params[name]["b"]))
            self.dense.weight.copy_(torch.tensor(params["dense"]["w"].T))
            self.dense.bias.copy_(torch.tensor(params["dense"]["b"]))

    def forward(self, x):
        x = x.to(self.dtype_)
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        h = torch.nn.functional.max_pool2d(h, 2)
        return self.dense(h.mean((2, 3)))


def torch_params(net: TorchNet) -> dict:
    """The torch model's weights in jax's layout."""
    g = lambda t: t.detach().double().numpy()
    return {"conv0": {"w": g(net.conv0.weight).transpose(2, 3, 1, 0), "b": g(net.conv0.bias)},
            "conv1": {"w": g(net.conv1.weight).transpose(2, 3, 1, 0), "b": g(net.conv1.bias)},
            "dense": {"w": g(net.dense.weight).T, "b": g(net.dense.bias)}}


def torch_gradient(model, inputs, targets, **kwargs):
    """Quantus explain_func: the gradient of the target logit, in the model's dtype (no float32 cast)."""
    dtype = next(model.parameters()).dtype
    x = torch.tensor(np.asarray(inputs), dtype=dtype, requires_grad=True)
    out = model(x)
    picked = out[torch.arange(len(x)), torch.as_tensor(np.asarray(targets), dtype=torch.long)]
    (grad,) = torch.autograd.grad(picked.sum(), x)
    return grad.detach().numpy()


class Replay:
    """A Quantus perturb_func that adds the given noise, one draw per call (Quantus calls it once per sample
    step with the flattened batch)."""

    def __init__(self, noise):
        self.noise, self.i = noise, 0

    def __call__(self, arr, indices=None, **kwargs):
        out = arr + self.noise[self.i].reshape(arr.shape)
        self.i += 1
        return out


def nchw(a):
    """Channels first, as a copy: Quantus changes some inputs in place (Sparseness adds 1e-7 to a_batch,
    Complexity normalises it)."""
    return np.array(np.moveaxis(np.asarray(a), -1, 1), copy=True)


# --------------------------------------------------------------------------------------------------------
# equality
# --------------------------------------------------------------------------------------------------------

def compare_numbers(x, y, mask, params) -> list[dict]:
    net = TorchNet(params, torch.float64).eval()
    model = jax.jit(lambda v: jax_model(params, v))
    grad = jlrp.gradient(lambda v: jax_model(params, v))
    explain = jax.jit(lambda v, t: grad(v, target=t))
    exact = np.asarray(explain(x, y))
    maps = exact + 1e-6 * np.random.default_rng(1).normal(size=exact.shape)  # no ties
    xq, aq, sq = nchw(x), nchw(maps), nchw(mask[..., None].astype(float))
    common = dict(model=net, x_batch=xq, y_batch=y, a_batch=aq, s_batch=sq, channel_first=True, device="cpu",
                  batch_size=len(x), explain_func=torch_gradient)
    plain = dict(normalise=False, abs=False, disable_warnings=True)
    logits = dict(softmax=False)  # Quantus scores probabilities by default for some metrics; jlrp: logits
    rows = []

    def add(name, setting, quantus_values, jlrp_values, note=""):
        q, j = np.asarray(quantus_values, np.float64), np.asarray(jlrp_values, np.float64)
        diff = float(np.nanmax(np.abs(q - j))) if q.size else float("nan")
        rows.append(dict(metric=name, settings=setting, max_abs_diff=diff, scale=float(np.nanmax(np.abs(j))),
                         same_nan=bool(np.array_equal(np.isnan(q), np.isnan(j))), note=note))
        print(f"  {name:32s} max |quantus - jlrp| = {diff:.2e}  (values up to {rows[-1]['scale']:.3g})", flush=True)

    n_px = x.shape[1] * x.shape[2]
    # region perturbation: Quantus returns f(x) - f(x^k), k = 1..K
    q = quantus.RegionPerturbation(patch_size=4, regions_evaluation=64, order="morf", perturb_baseline="black",
                                   **plain)(**common, **logits)
    curve = E.perturbation_curve(model, x, maps, y, order="morf", region=4, baseline="min")
    add("region perturbation", "4x4, MoRF, 'black' = min", q, curve[:, :1] - curve[:, 1:])

    np.random.seed(3)
    q = quantus.FaithfulnessCorrelation(nr_runs=100, subset_size=224, perturb_baseline="black",
                                        return_aggregate=False, **plain)(**common)
    np.random.seed(3)  # Quantus's draws: per run the subsets, then one U(0, 1) per image inside its baseline
    subsets = np.zeros((len(x), 100, 224), int)  # helper (it builds every baseline, "uniform" included)
    for run in range(100):
        for n in range(len(x)):
            subsets[n, run] = np.random.choice(n_px, 224, replace=False)
        np.random.uniform(0.0, 1.0, size=len(x))
    add("faithfulness correlation", "100 runs x 224 px, 'black'", q,
        E.faithfulness_correlation(model, x, maps, y, subsets=subsets, baseline="min"))

    step, samples = 16, 5
    np.random.seed(4)
    q = quantus.MonotonicityCorrelation(nr_samples=samples, features_in_step=step, perturb_baseline="uniform",
                                        **plain)(**common, **logits)
    np.random.seed(4)
    values = np.array([[np.random.uniform(0, 1, len(x)) for _ in range(samples)] for _ in range(n_px // step)])
    values = values.astype(np.float32).astype(np.float64)  # what torch.Tensor makes of them
    add("monotonicity correlation", f"{samples} samples, {step} px per step, U[0, 1)", q,
        E.monotonicity_correlation(model, x, maps, y, values=values, features_in_step=step))

    q = quantus.Selectivity(patch_size=4, perturb_baseline="black", **plain)(**common, **logits)
    c = np.asarray(q)
    add("selectivity (AUC)", "4x4, 'black'; Quantus curve -> np.trapezoid(dx=1)",
        np.trapezoid(c, dx=1, axis=1), E.selectivity(model, x, maps, y, region=4, baseline="min"),
        "Quantus's get_auc_score calls np.trapz, removed in numpy 2.4")

    q = quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=1, perturb_baseline="black",
                           loss_func="mse", **plain)(**common)
    add("infidelity", "Quantus's cumulative 4x4 patches, 'black', mse", q,
        E.infidelity(model, x, maps, y, perturbation="patches", region=4, baseline="min"))

    pct = list(range(10, 100, 10))
    road_q = quantus.ROAD(percentages=pct, noise=0.0, **plain)
    road_q(**common, **logits)
    q = [road_q.evaluation_scores[p] for p in pct]
    add("ROAD (accuracy per percentage)", "noise 0, MoRF, 10..90 %", q,
        E.road(model, x, maps, y, percentages=pct, noise=0.0).mean(0),
        "Quantus rounds the imputed images to float32 before predicting")

    noise = np.random.default_rng(5).uniform(-0.2, 0.2, size=(10,) + x.shape).astype(np.float64)
    noise_q = nchw(noise.reshape(-1, *x.shape[1:])).reshape(10, len(x), -1)
    kw = dict(nr_samples=10, return_nan_when_prediction_changes=False, **plain)
    robust = dict(common, a_batch=nchw(exact), softmax=False)  # both get the exact gradient
    q = quantus.MaxSensitivity(perturb_func=Replay(noise_q), **kw)(**robust)
    add("max-sensitivity", "10 samples U(-0.2, 0.2), normalised by ||R||", q,
        E.max_sensitivity(explain, x, y, exact, noise=noise, normalise=True))
    q = quantus.AvgSensitivity(perturb_func=Replay(noise_q), **kw)(**robust)
    add("avg-sensitivity", "as max-sensitivity", q, E.avg_sensitivity(explain, x, y, exact, noise=noise, normalise=True))
    gauss = np.random.default_rng(6).normal(size=(10,) + x.shape) * 0.1
    gauss_q = nchw(gauss.reshape(-1, *x.shape[1:])).reshape(10, len(x), -1)
    q = quantus.LocalLipschitzEstimate(perturb_func=Replay(gauss_q), **kw)(**robust)
    add("local Lipschitz estimate", "10 samples N(0, 0.1^2), eps 1e-10", q,
        E.local_lipschitz_estimate(explain, x, y, exact, noise=gauss, eps=1e-10))
    pos = np.abs(noise)
    pos_q = nchw(pos.reshape(-1, *x.shape[1:])).reshape(10, len(x), -1)
    q = quantus.RelativeInputStability(perturb_func=Replay(pos_q), **kw)(**robust)
    add("relative input stability", "10 samples |U(-0.2, 0.2)|", q,
        E.relative_input_stability(explain, x, y, exact, noise=pos))
    q = quantus.RelativeOutputStability(perturb_func=Replay(pos_q), **kw)(**robust)
    add("relative output stability", "as RIS; logits of the model", q,
        E.relative_output_stability(explain, x, y, exact, noise=pos, model=model, exclude_changed=False),
        "Quantus predicts the perturbed inputs in float32 (torch.Tensor)")

    a_abs = np.abs(maps)
    loc = dict(common, a_batch=aq)
    add("pointing game", "", quantus.PointingGame(**plain)(**loc), E.pointing_game(maps, mask))
    add("attribution localisation", "|R| (Quantus abs=True), R_tot + 1e-9",
        quantus.AttributionLocalisation(**plain)(**dict(loc, a_batch=nchw(a_abs))),
        E.attribution_localisation(maps, mask, attributions="abs", eps=1e-9))
    add("top-k intersection", "k = 100", quantus.TopKIntersection(k=100, **plain)(**loc),
        E.top_k_intersection(maps, mask, k=100))
    add("AUC (mask)", "", quantus.AUC(**plain)(**loc), E.mask_auc(maps, mask))
    add("relevance mass accuracy", "|R| (jlrp: the positive part; Quantus: all of a_batch)",
        quantus.RelevanceMassAccuracy(**plain)(**dict(loc, a_batch=nchw(a_abs))),
        E.relevance_mass_accuracy(a_abs, mask))
    add("relevance rank accuracy", "", quantus.RelevanceRankAccuracy(**plain)(**loc),
        E.relevance_rank_accuracy(maps, mask))
    # a fresh copy per call: Quantus changes a_batch in place (Sparseness adds 1e-7, Complexity divides it by
    # its sum); one shared array made effective complexity and non-sensitivity differ by 9 counts and
    # complexity by 2.7e-5 in an earlier run (docs/evaluation.md)
    cx = lambda: dict(common, a_batch=nchw(a_abs))
    add("sparseness", "|R|, eps 1e-7", quantus.Sparseness(**plain)(**cx()), E.sparseness(a_abs, eps=1e-7))
    add("complexity", "|R|, eps 1e-12", quantus.Complexity(**plain)(**cx()), E.complexity(a_abs, eps=1e-12))
    add("effective complexity", "|R|, eps 1e-5", quantus.EffectiveComplexity(eps=1e-5, **plain)(**cx()),
        E.effective_complexity(a_abs, eps=1e-5))

    q = quantus.RandomLogit(num_classes=N_CLASSES, seed=42, **plain)(**common)
    np.random.seed(42)
    r = np.random.randint(0, N_CLASSES - 1, len(x))
    add("random logit", "SSIM on the flattened maps (Quantus default)", q,
        E.random_logit(explain, x, y, maps, other=r + (r >= y), similarity="ssim_flat"))

    q = quantus.NonSensitivity(eps=1e-5, features_in_step=1, perturb_baseline="black", **plain)(**cx(), **logits)
    add("non-sensitivity", "|R|, eps 1e-5, 'black'", q, E.non_sensitivity(model, x, a_abs, y, baseline="min"))
    q = quantus.Completeness(perturb_baseline="black", **plain)(**common, **logits)
    gap = E.completeness(model, x, maps, y, baseline="min")
    add("completeness", "'black'; Quantus: gap == 0 (bool)", np.asarray(q, float), np.asarray(gap == 0, float),
        "jlrp returns the gap itself")

    # MPRT: Quantus randomises the layers top-down with torch.manual_seed(seed + 1) before each reset
    mprt = quantus.MPRT(layer_order="top_down", seed=42, similarity_func=quantus.similarity_func.correlation_spearman,
                        abs=True, normalise=False, disable_warnings=True)
    q = mprt(**dict(common, a_batch=nchw(exact)))
    random_net = copy.deepcopy(net)
    for module in [m for m in random_net.modules() if hasattr(m, "reset_parameters")][::-1]:
        torch.manual_seed(42 + 1)
        module.reset_parameters()
    explain_p = lambda p, v: grad_p(p, v, y)
    res = E.parameter_randomization(explain_p, params, x, None, order=["dense", "conv1", "conv0"],
                                    draws=torch_params(random_net))
    add("MPRT (|R|, per layer)", "top-down cascade, Quantus's torch re-initialisation as draws",
        [q[k] for k in ("dense", "conv1", "conv0")], res["spearman_abs"])
    return rows


def grad_p(p, v, t):
    return jlrp.gradient(jax_model, argnums=1)(p, v, target=t)


# --------------------------------------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------------------------------------

class CompileLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def emit(self, record):
        match = re.match(r"Finished XLA compilation of jit\((\w+)\)", record.getMessage())
        if match:
            self.names.append(match.group(1))


def _call(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def xla_model_calls(fn, x, y, calls, copies):
    """The model (or explanation) calls jlrp's program makes, and nothing else: ``calls`` batches of
    ``len(x)`` rows, ``copies`` batches per call (jlrp's chunk), each a different input (so XLA cannot hoist
    the call out of the loop), in one jitted program."""
    n_chunks, rest = divmod(calls, copies)
    xb = jnp.asarray(np.tile(x, (copies,) + (1,) * (x.ndim - 1)))
    yb = jnp.asarray(np.tile(y, copies))

    @jax.jit
    def run(xb, yb):
        out = jax.lax.map(lambda i: fn(xb + i.astype(xb.dtype) * 1e-3, yb).sum(), jnp.arange(n_chunks))
        if rest:
            out = out.sum() + fn(xb[:rest * len(x)], yb[:rest * len(x)]).sum()
        return out

    jax.block_until_ready(run(xb, yb))  # compile
    return lambda: run(xb, yb)


def torch_model_calls(net, x, y, calls, grad):
    """The torch model calls Quantus makes, and nothing else: ``calls`` forward passes (``grad``: gradient
    explanations via :func:`torch_gradient`) on batches of ``len(x)`` rows."""
    xt = nchw(x)

    def run():
        for i in range(calls):
            xi = xt + i * 1e-3
            if grad:
                torch_gradient(net, xi, y)
            else:
                with torch.no_grad():
                    net(torch.from_numpy(xi))
    return run


def compare_speed(x, y, params, repeats, only="") -> list[dict]:
    x32 = x.astype(np.float32)
    p32 = jax.tree.map(lambda v: np.asarray(v, np.float32), params)
    net = TorchNet(params, torch.float32).eval()
    model = jax.jit(lambda v: jax_model(p32, v))
    grad = jlrp.gradient(lambda v: jax_model(p32, v))
    explain = jax.jit(lambda v, t: grad(v, target=t))
    maps = np.asarray(explain(x32, y))
    common = dict(model=net, x_batch=nchw(x32), y_batch=y, a_batch=nchw(maps), channel_first=True, device="cpu",
                  batch_size=len(x), explain_func=torch_gradient)
    plain = dict(normalise=False, abs=False, disable_warnings=True, display_progressbar=False)
    explain_p = lambda p, v: jlrp.gradient(jax_model, argnums=1)(p, v, target=y)
    key = jax.random.key(0)
    n = len(x)
    copies = auto_chunk(x32.size, None)  # copies of the batch per model call in jlrp's programs (default chunk)
    fwd = lambda v, t: model(v)
    flops_fwd = jax.jit(lambda v: jax_model(p32, v)).lower(x32).compile().cost_analysis()["flops"] / n
    flops_grad = jax.jit(lambda v: grad(v, target=y)).lower(x32).compile().cost_analysis()["flops"] / n
    # name: (Quantus call, its warm-up (the same code on fewer steps), jlrp call, model calls of 64 images both
    # make, forward (False) or gradient (True), jlrp's copies per call)
    work = {
        "region perturbation 4x4 (64 regions, MoRF)": (
            lambda k=64: quantus.RegionPerturbation(patch_size=4, regions_evaluation=k, perturb_baseline="black",
                                                    **plain)(**common, softmax=False),
            lambda: E.perturbation_curve(model, x32, maps, y, region=4, baseline="min"), 1 + 64, False, copies),
        "faithfulness correlation (100 x 224 px)": (
            lambda k=100: quantus.FaithfulnessCorrelation(nr_runs=k, subset_size=224, perturb_baseline="black",
                                                          return_aggregate=False, **plain)(**common, softmax=False),
            lambda: E.faithfulness_correlation(model, x32, maps, y, key=key, baseline="min"), 1 + 100, False, copies),
        "max-sensitivity (200 samples)": (
            lambda k=200: quantus.MaxSensitivity(nr_samples=k, **plain)(**common),
            lambda: E.max_sensitivity(explain, x32, y, maps, key=key, normalise=True), 200, True, copies),
        "randomisation test (MPRT, 3 layers)": (
            lambda _=None: quantus.MPRT(layer_order="top_down", abs=True, normalise=False, disable_warnings=True,
                                        display_progressbar=False)(**common),
            lambda: E.parameter_randomization(explain_p, p32, x32, key, order=["dense", "conv1", "conv0"]),
            1 + 3, True, 1),
    }
    log = CompileLog()
    logging.getLogger("jax._src.dispatch").addHandler(log)
    rows = []
    for name, (q_fn, j_fn, calls, is_grad, chunk) in work.items():
        if only not in name:
            continue
        jax.config.update("jax_log_compiles", True)
        log.names.clear()
        first = _call(j_fn)  # jlrp's first call: compiles (the programs it compiles are counted)
        warm_compiles = list(log.names)
        jax.config.update("jax_log_compiles", False)
        q_fn(2)  # Quantus's warm-up on 2 steps (torch's first calls of a shape are slow)
        xla = xla_model_calls(explain if is_grad else fwd, x32, y, calls, chunk)
        torch_floor = torch_model_calls(net, x32, y, calls, is_grad)
        torch_floor()
        jax.config.update("jax_log_compiles", True)
        log.names.clear()
        times = {"quantus": [], "jlrp": [], "torch_calls": [], "xla_calls": []}
        for _ in range(repeats):  # interleaved, so that load from other processes hits every side alike
            times["jlrp"].append(_call(j_fn))
            times["quantus"].append(_call(q_fn))
            times["xla_calls"].append(_call(xla))
            times["torch_calls"].append(_call(torch_floor))
        later_compiles = [c for c in log.names if c != "run"]
        load = os.getloadavg()[0]
        jax.config.update("jax_log_compiles", False)
        med = {k: statistics.median(v) for k, v in times.items()}
        gflop = calls * n * (flops_grad if is_grad else flops_fwd) / 1e9
        rows.append(dict(work=name, quantus_s=med["quantus"], jlrp_s=med["jlrp"], ratio=med["quantus"] / med["jlrp"],
                         jlrp_first_call_s=first, compiles_first_call=len(warm_compiles),
                         programs_first_call=sorted(set(warm_compiles)), compiles_later_calls=len(later_compiles),
                         model_calls=f"{calls} x {n} {'gradients' if is_grad else 'forward passes'}", gflop=gflop,
                         torch_calls_s=med["torch_calls"], xla_calls_s=med["xla_calls"],
                         bound=med["quantus"] / med["xla_calls"], load=load, times=times))
        print(f"  {name:44s} quantus {med['quantus']:8.3f} s   jlrp {med['jlrp']:8.4f} s   x{rows[-1]['ratio']:6.2f}  "
              f"(first call {first:.2f} s, {len(warm_compiles)} compilation(s) {sorted(set(warm_compiles))}, later "
              f"{len(later_compiles)}); model calls alone: torch {med['torch_calls']:.3f} s, XLA "
              f"{med['xla_calls']:.3f} s ({gflop:.1f} GFLOP)", flush=True)
    logging.getLogger("jax._src.dispatch").removeHandler(log)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/quantus-compare"), help="results folder")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per metric (Quantus, jlrp, model calls)")
    p.add_argument("--skip-equality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--only", default="", help="speed: only the work whose name contains this text")
    p.add_argument("--torch-threads", type=int, default=2, help="torch's CPU threads (XLA uses every core)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    data = jlrp.datasets.shapes(64, size=32, seed=0)
    x = np.asarray(data.x, np.float32).astype(np.float64)  # float32 numbers: torch.Tensor keeps them exactly
    y, mask = np.asarray(data.y), np.asarray(data.mask).reshape(64, 32, 32).astype(bool)
    params = make_params(0)
    out = {"versions": dict(quantus=quantus.__version__, torch=torch.__version__, jax=jax.__version__,
                            numpy=np.__version__)}
    if not args.skip_equality:
        print("equality (float64):", flush=True)
        out["equality"] = compare_numbers(x, y, mask, params)
    if not args.skip_speed:
        print("speed (float32, 64 images 32x32):", flush=True)
        out["speed"] = compare_speed(x, y, params, args.repeats, args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1))
    lines = [f"# jlrp vs Quantus ({', '.join(f'{k} {v}' for k, v in out['versions'].items())})", ""]
    if "equality" in out:
        lines += ["| metric | settings | max abs difference | largest value | note |", "|---|---|---:|---:|---|"]
        lines += [f"| {r['metric']} | {r['settings']} | {r['max_abs_diff']:.1e} | {r['scale']:.3g} | {r['note']} |"
                  for r in out["equality"]]
        lines.append("")
    if "speed" in out:
        lines += [f"Speed: float32, {len(x)} images 32x32, medians of {args.repeats} interleaved rounds after a "
                  f"warm-up; torch {torch.get_num_threads()} threads. *First call*: jlrp's first call, compilation "
                  "included (in brackets: minus a later call). *Model calls alone*: only the forward passes or "
                  "gradients each side must make, in its own framework (jlrp's chunking), timed in the same rounds. "
                  "*Bound*: Quantus / XLA model calls, the speed-up of a jlrp without any overhead. *Load*: the "
                  "machine's 1-minute load average during the rounds (other processes share the cores).", "",
                  "| work | Quantus (s) | jlrp (s) | speed-up | first call (s) | compilations (first / later) | "
                  "model calls | GFLOP | torch model calls (s) | XLA model calls (s) | bound | load |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in out["speed"]:
            first = r["jlrp_first_call_s"]
            lines.append(f"| {r['work']} | {r['quantus_s']:.3f} | {r['jlrp_s']:.3f} | {r['ratio']:.2f}x | "
                         f"{first:.2f} ({first - r['jlrp_s']:.2f}) | {r['compiles_first_call']} / "
                         f"{r['compiles_later_calls']} | {r['model_calls']} | {r['gflop']:.1f} | "
                         f"{r['torch_calls_s']:.3f} | {r['xla_calls_s']:.3f} | {r['bound']:.2f}x | "
                         f"{r['load']:.1f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
