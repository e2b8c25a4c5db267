"""Absolute speed on whatever JAX runs on: a batch sweep on the default backend (GPU, TPU or the CPU).

    python benchmarks/accelerator.py [--models vgg16-224,resnet18-224,transformer] [--batches 1,8,32,128]
                                     [--methods jax.grad,epsilon_plus_flat,epsilon_gamma_box] [--out DIR]

The same file runs unchanged on every backend: it explains with ``jax.jit(jlrp.lrp(...))`` on the default
device (``jax.devices()[0]``), so on a GPU or TPU host it measures the accelerator, and on a machine without
one it falls back to the CPU with a smaller default sweep (64x64 VGG-16 and the small transformer, batches
1-32), since the 224x224 models at large batches take minutes per call on a few cores.

Per model and batch: compile time, then the median of ``--runs`` round-robin calls per method; printed and
written as milliseconds per call, inputs per second, the ratio to ``jax.grad`` and the executable's memory,
with the device kind in the header. A batch that does not fit in memory is recorded as such and the sweep
of that model stops there. Results go to ``--out`` (accelerator-<platform>.md / .json), never into the
repository.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

from models import build  # noqa: E402
from run import (_load, compile_method, machine_info, make_fn, output_dir, time_methods,  # noqa: E402
                 write_results)

ACCELERATOR_DEFAULTS = ("vgg16-224,resnet18-224,transformer", "1,8,32,128,256")
CPU_DEFAULTS = ("vgg16-64,transformer", "1,8,32")


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None)
    ap.add_argument("--batches", default=None)
    ap.add_argument("--methods", default="jax.grad,epsilon_plus_flat,epsilon_gamma_box")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    folder = output_dir(a.out)
    device = jax.devices()[0]
    defaults = CPU_DEFAULTS if device.platform == "cpu" else ACCELERATOR_DEFAULTS
    models, batches = (a.models or defaults[0]).split(","), [int(b) for b in (a.batches or defaults[1]).split(",")]
    methods = a.methods.split(",")
    load0, rows = _load(), []
    for model in models:
        for batch in batches:
            apply, variables, x = build(model, batch)
            t = jax.numpy.arange(batch) % 10
            args = (variables, x, t)
            try:
                compiled, info = {}, {}
                for m in methods:
                    compiled[m], info[m] = compile_method(model, batch, m, make_fn(m, apply), args)
                times = time_methods(compiled, args, a.runs, fill=0.0)
            except Exception as error:  # noqa: BLE001 - only running out of memory ends a sweep quietly
                if not _out_of_memory(error):
                    raise
                rows.append({"model": model, "batch": batch, "method": "*", "note": "out of memory"})
                print(f"{model} batch {batch}: out of memory; larger batches skipped", file=sys.stderr)
                break
            grad_ms = 1e3 * statistics.median(times["jax.grad"]) if "jax.grad" in times else None
            for m in methods:
                ms = 1e3 * statistics.median(times[m])
                rows.append({"model": model, "batch": batch, "method": m, "ms": ms, "per_s": 1e3 * batch / ms,
                             "x_grad": ms / grad_ms if grad_ms else None, "memory": info[m].memory,
                             "compile_s": info[m].compile_s})
                print(f"{model:14s} b={batch:4d} {m:18s} {ms:9.2f} ms  {1e3 * batch / ms:9.1f}/s"
                      + (f"  {ms / grad_ms:.2f}x grad" if grad_ms else ""), file=sys.stderr, flush=True)
            del compiled, args
            jax.clear_caches()
    lines = [f"# jlrp batch sweep on {device.platform} ({device.device_kind})", "", machine_info(), "",
             f"Medians of >= {a.runs} round-robin calls after compilation; load (1, 5, 15 min) {load0} at start, "
             f"{_load()} at end.", "",
             "| model | batch | method | ms / call | inputs / s | x jax.grad | memory MB | compile s |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['note']} | | | | | |")
            continue
        mem = "n/a" if r["memory"] is None else f"{r['memory'] / 2 ** 20:.0f}"
        ratio = "" if r["x_grad"] is None else f"{r['x_grad']:.2f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['ms']:.2f} | {r['per_s']:.1f} | {ratio} | "
                     f"{mem} | {r['compile_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    return write_results(folder / f"accelerator-{device.platform}.md", text, rows)


if __name__ == "__main__":
    main()
