"""Concept Relevance Propagation: many channel conditions as one vmapped call vs one jitted call per condition.

    python benchmarks/crp_speed.py [--out DIR] [--conditions 512] [--chunk 32] [--layer Conv_12] [--runs 3]

VGG-16 (benchmarks/models.py) at 64x64, batch 1, composite epsilon_plus_flat, explaining class 0. The
conditions are the channels of one conv layer (default: the last, Conv_12, 512 channels at 4x4). Two ways:

* ``separate``: one jitted function of the channel id (compiled once), called once per condition;
* ``vmapped``: one call of ``jlrp.concepts.Conditional`` computing all conditions: it compiles one program that
  vmaps ``--chunk`` conditions (the forward pass is shared, only the backward pass is batched) and runs it on
  the chunks from a Python loop (inside a jit the chunks would run in ``lax.map``, several times slower on CPU).

Both give the same heatmaps (checked on a few channels). Reported: the first call (compile + run), the median
wall time and the median process CPU time per condition of each way (CPU time is less disturbed by other load)
and their ratios; written as ``crp_speed.json`` and ``crp_speed.md`` into ``--out`` (outside the repository;
default ``$XDG_CACHE_HOME/jlrp/benchmarks``, else ``/tmp/jlrp-benchmarks``).

Measured (2-core Xeon, load average 7-9 from other processes, jax 0.10.2): 877 ms wall / 448 ms CPU per
separate call, 141 ms wall / 74 ms CPU per condition vmapped in chunks of 32: 6.2x wall, 6.1x CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlrp  # noqa: E402
from models import build  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def timed(f, *args) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = os.environ.get("XDG_CACHE_HOME")
    default = Path(cache) / "jlrp" / "benchmarks" if cache else Path(tempfile.gettempdir()) / "jlrp-benchmarks"
    ap.add_argument("--out", type=Path, default=default)
    ap.add_argument("--conditions", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--layer", default="Conv_12")
    ap.add_argument("--runs", type=int, default=3, help="timed calls of the vmapped program")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    if out == ROOT or ROOT in out.parents:
        ap.error(f"--out {out} is inside the repository; pick a folder outside it")

    apply, variables, x = build("vgg16-64", 1)
    cond = jlrp.concepts.conditional(apply, jlrp.composites.epsilon_plus_flat(), argnums=1, chunk_size=a.chunk)
    layer = jlrp.module_path(a.layer)
    info = cond.layer(variables, x, layer=layer)
    n = a.conditions
    if n > info.output_shape[-1]:
        ap.error(f"--conditions {n}: {a.layer} has {info.output_shape[-1]} channels")
    print(f"VGG-16 64x64, batch 1; {n} channel conditions at #{info.index} {info.module} {info.output_shape}, "
          f"chunks of {a.chunk}", file=sys.stderr)

    separate = jax.jit(lambda v, x, c: cond(v, x, target=0, conditions={layer: c[None]})[0])
    vmapped = lambda v, x: cond(v, x, target=0, conditions={layer: np.arange(n)})  # noqa: E731
    compile_separate = timed(separate, variables, x, jnp.int32(0))[0]
    compile_vmapped = timed(vmapped, variables, x)[0]

    together = vmapped(variables, x)
    for c in (0, n // 2, n - 1):  # the same heatmaps both ways
        np.testing.assert_allclose(separate(variables, x, jnp.int32(c)), together[c], rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(together[c]).max()))

    one = [timed(separate, variables, x, jnp.int32(c)) for c in range(n)]
    every = [timed(vmapped, variables, x) for _ in range(a.runs)]
    med = lambda ts, k: statistics.median(t[k] for t in ts)  # noqa: E731
    per_separate, per_vmapped = med(one, 0), med(every, 0) / n
    cpu_separate, cpu_vmapped = med(one, 1), med(every, 1) / n
    result = {
        "model": "vgg16-64", "batch": 1, "composite": "epsilon_plus_flat", "layer": f"#{info.index} {info.module}",
        "layer_output": list(info.output_shape), "conditions": n, "chunk": a.chunk,
        "first_call_s": {"separate": compile_separate, "vmapped": compile_vmapped},
        "separate_ms_per_condition": 1e3 * per_separate, "separate_min_ms": 1e3 * min(t[0] for t in one),
        "vmapped_ms_total": 1e3 * med(every, 0), "vmapped_ms_per_condition": 1e3 * per_vmapped,
        "separate_cpu_ms_per_condition": 1e3 * cpu_separate, "vmapped_cpu_ms_per_condition": 1e3 * cpu_vmapped,
        "speedup_per_condition": per_separate / per_vmapped, "cpu_speedup_per_condition": cpu_separate / cpu_vmapped,
        "target": 5.0,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average": os.getloadavg(), "jax": jax.__version__, "devices": str(jax.devices())}}
    table = (f"| way | wall per condition (ms) | CPU per condition (ms) | wall for {n} (s) | first call (s) |\n"
             f"|---|---:|---:|---:|---:|\n"
             f"| {n} separate jitted calls | {1e3 * per_separate:.1f} | {1e3 * cpu_separate:.1f} | "
             f"{n * per_separate:.1f} | {compile_separate:.1f} |\n"
             f"| one vmapped call (chunks of {a.chunk}) | {1e3 * per_vmapped:.1f} | {1e3 * cpu_vmapped:.1f} | "
             f"{med(every, 0):.1f} | {compile_vmapped:.1f} |\n\n"
             f"speed-up per condition: {result['speedup_per_condition']:.1f}x wall, "
             f"{result['cpu_speedup_per_condition']:.1f}x CPU time (target >= 5x); load average "
             f"{', '.join(f'{l:.1f}' for l in result['machine']['load_average'])} on {os.cpu_count()} cores\n")
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crp_speed.json").write_text(json.dumps(result, indent=2))
    (out / "crp_speed.md").write_text(table)
    print(f"written to {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
