"""jlrp against Zennit side by side: the same relevance and the wall time of the same explanation.

Optional: needs PyTorch (CPU), Zennit and jlrp's dependencies in one environment kept apart from the
project's (e.g. ``python -m venv /tmp/zvenv && /tmp/zvenv/bin/pip install torch zennit jax flax optax pillow
&& /tmp/zvenv/bin/pip install --no-deps -e .``), then

    /tmp/zvenv/bin/python benchmarks/zennit_compare.py [--batch 8,32] [--width 0.25] [--runs 5] [--out DIR]

Model: VGG-16 (configuration D: 13 3x3 convs, 5 max pools, three dense layers) with every width scaled by
``--width``, 64x64x3 inputs, random float32 weights drawn once in numpy and loaded into both: a
``torch.nn.Sequential`` (NCHW) and a plain-JAX function (NHWC; the same weights transposed). Methods:
the gradient of the target logit (``torch.autograd.grad`` / ``jax.grad``), EpsilonPlusFlat and
EpsilonGammaBox(-3, 3) (Zennit's composites with its ``Gradient`` attributor / ``jlrp.composites``' presets
of the same names, jitted). Initial relevance: the one-hot of the target (Zennit's convention; passed to jlrp
as ``relevance=``).

Equality: in the same run, each jlrp relevance is compared with Zennit's on the same batch, in float64 on both
sides (the torch model in double, the JAX one under ``jax.enable_x64``): max |difference| / max |R|. In
float32 a max pool whose two largest inputs are within rounding of each other can pick another winner on
either side (a different pixel gets that window's gradient); the float32 column gives the median over the
batch of the same per-sample ratio. Speed: every method is called
round-robin ``--runs`` times after a warm-up (compilation is not timed; reported apart), medians printed with
the ratio Zennit / jlrp and each side's ratio to its own gradient. torch uses all cores
(``torch.set_num_threads``), as XLA does. The 1-minute load is recorded: torch's OpenMP threads slow down far
more than XLA's under load. Results go to ``--out`` (zennit_compare.md / .json), never into the repository.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jlrp  # noqa: E402
from run import _flops, _load, machine_info, output_dir, write_results  # noqa: E402

CONFIG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
SIZE, CLASSES, LOW, HIGH = 64, 1000, -3.0, 3.0


def weights(width: float, seed: int = 0) -> list:
    """[(kind, W, b)] in torch's layouts (conv OIHW, dense (out, in)); He-normal, small random biases."""
    rng, layers, c = np.random.default_rng(seed), [], 3
    for v in CONFIG_D:
        if v == "M":
            layers.append(("pool", None, None))
            continue
        o = max(1, int(v * width))
        layers.append(("conv", rng.normal(0, np.sqrt(2 / (9 * c)), (o, c, 3, 3)), rng.normal(0, 0.01, o)))
        c = o
    dims = [c * (SIZE // 32) ** 2, int(4096 * width), int(4096 * width), CLASSES]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(("dense", rng.normal(0, np.sqrt(2 / a), (b, a)), rng.normal(0, 0.01, b)))
    return [(k, None if w is None else w.astype(np.float32), None if b is None else b.astype(np.float32))
            for k, w, b in layers]


def torch_model(layers) -> torch.nn.Module:
    mods, dense = [], 0
    n_dense = sum(k == "dense" for k, _, _ in layers)
    for kind, w, b in layers:
        if kind == "pool":
            mods.append(torch.nn.MaxPool2d(2))
            continue
        if kind == "dense" and dense == 0:
            mods.append(torch.nn.Flatten())
        m = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1) if kind == "conv" else \
            torch.nn.Linear(w.shape[1], w.shape[0])
        m.weight.data, m.bias.data = torch.from_numpy(w), torch.from_numpy(b)
        mods.append(m)
        dense += kind == "dense"
        if kind == "conv" or dense < n_dense:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods).eval()


def jax_model(layers):
    """``f(params, x) -> logits`` (x NHWC); params in JAX layouts (HWIO, (in, out)). Flattening follows
    torch's NCHW order, so the dense weights are shared as they are."""
    params = [None if w is None else (jnp.asarray(w.transpose(2, 3, 1, 0) if k == "conv" else w.T), jnp.asarray(b))
              for k, w, b in layers]
    kinds = [k for k, _, _ in layers]

    def f(params, x):
        n_dense = kinds.count("dense")
        for i, (kind, p) in enumerate(zip(kinds, params)):
            if kind == "pool":
                x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            elif kind == "conv":
                x = jax.nn.relu(jax.lax.conv_general_dilated(x, p[0], (1, 1), "SAME",
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")) + p[1])
            else:
                if x.ndim == 4:
                    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch's flatten order
                x = x @ p[0] + p[1]
                n_dense -= 1
                if n_dense:
                    x = jax.nn.relu(x)
        return x

    return f, params


def zennit_method(model, composite):
    def run(x, onehot):
        with Gradient(model=model, composite=composite) as attributor:
            return attributor(x, onehot)[1]
    return run


def torch_gradient(model):
    def run(x, onehot):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(model(x), x, onehot)[0]
    return run


def torch_methods(model, x) -> dict:
    """The torch side per method: the gradient and Zennit's two composites (z^B bounds shaped like ``x``)."""
    box = (torch.full_like(x, LOW), torch.full_like(x, HIGH))
    return {"gradient": torch_gradient(model), "epsilon_plus_flat": zennit_method(model, EpsilonPlusFlat()),
            "epsilon_gamma_box": zennit_method(model, EpsilonGammaBox(*box))}


def _torch_name(method: str) -> str:
    return "torch" if method == "gradient" else "zennit"


def _jax_name(method: str) -> str:
    return "jax" if method == "gradient" else "jlrp"


def _per_sample(torch_nchw, jax_nhwc) -> float:
    """Median over the batch of max |difference| / max |R| per sample."""
    z = torch_nchw.transpose(0, 2, 3, 1).reshape(len(torch_nchw), -1)
    j = np.asarray(jax_nhwc).reshape(len(z), -1)
    return float(np.median(np.abs(z - j).max(1) / np.maximum(np.abs(z).max(1), 1e-30)))


def equality64(layers, x, onehot) -> dict[str, float]:
    """Per method, max |R_zennit - R_jlrp| / max |R_zennit| with both models in float64."""
    layers64 = [(k, None if w is None else w.astype(np.float64), None if b is None else b.astype(np.float64))
                for k, w, b in layers]
    tmodel = torch_model(layers64).double()
    xt, ot = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(onehot.astype(np.float64))
    torch_side = torch_methods(tmodel, xt)
    out = {}
    with jax.enable_x64(True):
        f, params = jax_model(layers64)
        xj, oj = jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float64), jnp.asarray(onehot, jnp.float64)
        jax_side = {"gradient": jax.vjp(lambda x: f(params, x), xj)[1](oj)[0],
                    "epsilon_plus_flat": jlrp.lrp(f, jlrp.composites.epsilon_plus_flat(), argnums=1)(
                        params, xj, relevance=oj),
                    "epsilon_gamma_box": jlrp.lrp(f, jlrp.composites.epsilon_gamma_box(LOW, HIGH), argnums=1)(
                        params, xj, relevance=oj)}
        for name, fn in torch_side.items():
            z = fn(xt, ot).numpy().transpose(0, 2, 3, 1)
            out[name] = float(np.abs(z - np.asarray(jax_side[name])).max() / max(np.abs(z).max(), 1e-30))
    return out


def _time(fn, block) -> float:
    t = time.perf_counter()
    out = fn()
    block(out)
    return time.perf_counter() - t


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="8,32")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    folder = output_dir(a.out)
    torch.set_num_threads(os.cpu_count())
    layers = weights(a.width)
    tmodel, (f, params) = torch_model(layers), jax_model(layers)
    load0, rows = _load(), []
    for batch in map(int, a.batch.split(",")):
        rng = np.random.default_rng(batch)
        x = rng.uniform(LOW, HIGH, (batch, 3, SIZE, SIZE)).astype(np.float32)
        target = rng.integers(0, CLASSES, batch)
        onehot = np.eye(CLASSES, dtype=np.float32)[target]
        xt, ot = torch.from_numpy(x), torch.from_numpy(onehot)
        xj, oj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(onehot)
        torch_side = torch_methods(tmodel, xt)
        jax_side = {"gradient": lambda p, x, r: jax.vjp(lambda x: f(p, x), x)[1](r)[0],
                    "epsilon_plus_flat": jlrp.lrp(f, jlrp.composites.epsilon_plus_flat(), argnums=1),
                    "epsilon_gamma_box": jlrp.lrp(f, jlrp.composites.epsilon_gamma_box(LOW, HIGH), argnums=1)}
        compiled, compile_s, flops = {}, {}, {}
        for name, fn in jax_side.items():
            call = fn if name == "gradient" else (lambda p, x, r, fn=fn: fn(p, x, relevance=r))
            t = time.perf_counter()
            compiled[name] = jax.jit(call).lower(params, xj, oj).compile()
            compile_s[name], flops[name] = time.perf_counter() - t, _flops(compiled[name])
        calls = {}
        for name in torch_side:
            calls[(_torch_name(name), name)] = (lambda fn=torch_side[name]: fn(xt, ot), lambda out: None)
            calls[(_jax_name(name), name)] = (
                lambda c=compiled[name]: c(params, xj, oj), jax.block_until_ready)
        results = {k: fn() for k, (fn, _) in calls.items()}  # warm-up, and the float32 relevance compared
        equal32 = {name: _per_sample(results[(_torch_name(name), name)].numpy(), results[(_jax_name(name), name)])
                   for name in torch_side}
        equal = equality64(layers, x, onehot)
        times = {k: [] for k in calls}
        for _ in range(a.runs):
            for k, (fn, block) in calls.items():
                times[k].append(_time(fn, block))
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        for name in torch_side:
            zk, jk = (_torch_name(name), name), (_jax_name(name), name)
            row = {"batch": batch, "method": name, "torch_ms": ms[zk], "jax_ms": ms[jk], "speedup": ms[zk] / ms[jk],
                   "torch_x_own_grad": ms[zk] / ms[("torch", "gradient")],
                   "jax_x_own_grad": ms[jk] / ms[("jax", "gradient")], "max_rel_diff_f64": equal[name],
                   "median_rel_diff_f32": equal32[name],
                   "jax_compile_s": compile_s[name], "jax_flops_x_grad": flops[name] / flops["gradient"]}
            rows.append(row)
            print(f"batch {batch:3d} {name:18s} torch/zennit {row['torch_ms']:8.1f} ms  jax/jlrp {row['jax_ms']:8.1f} ms"
                  f"  zennit/jlrp {row['speedup']:.2f}x  rel diff {equal[name]:.1e} (f64)", file=sys.stderr, flush=True)
    lines = ["# jlrp vs Zennit, side by side", "", machine_info() + f"; torch {torch.__version__}", "",
             f"VGG-16 width {a.width}, 64x64, float32; medians of {a.runs} interleaved calls; load (1, 5, 15 min) "
             f"{load0} at start, {_load()} at end.", "",
             "| batch | method | torch/Zennit ms | JAX/jlrp ms | Zennit / jlrp | torch x own grad | jlrp x own grad "
             "| jlrp FLOPs x grad | rel diff f64 (max) | rel diff f32 (median) | jlrp compile s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['method']} | {r['torch_ms']:.1f} | {r['jax_ms']:.1f} | {r['speedup']:.2f} | "
                     f"{r['torch_x_own_grad']:.2f} | {r['jax_x_own_grad']:.2f} | {r['jax_flops_x_grad']:.2f} | "
                     f"{r['max_rel_diff_f64']:.1e} | {r['median_rel_diff_f32']:.1e} | {r['jax_compile_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    return write_results(folder / "zennit_compare.md", text, rows)


if __name__ == "__main__":
    main()
