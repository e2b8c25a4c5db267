"""Benchmark jlrp against the forward pass and ``jax.grad`` on the same model and batch.

    python benchmarks/run.py [--quick] [--full] [--out DIR]

Results (``results[-quick|-full].md`` and ``.json``) go to ``--out``, a folder outside the repository (default
``$XDG_CACHE_HOME/jlrp/benchmarks``, else ``/tmp/jlrp-benchmarks``): a run never changes tracked files.

For every (model, batch): jit, lower and compile each method (compile time = trace + lower + compile), read the
executable's memory (temp + output bytes) and FLOPs, run once to warm up, then take the median of ``--runs``
timed calls (``block_until_ready``). Ratios are to ``jax.grad`` of the target-logit sum w.r.t. the input.
See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jlrp  # noqa: E402
from models import KERAS, build  # noqa: E402

LRP = {
    "epsilon(0.25)": lambda: jlrp.rules.epsilon(0.25),
    "epsilon_plus_flat": lambda: jlrp.composites.epsilon_plus_flat(),
    "epsilon_gamma_box": lambda: jlrp.composites.epsilon_gamma_box(-3.0, 3.0),
    "epsilon_alpha2_beta1": lambda: jlrp.composites.epsilon_alpha2_beta1(),
}
METHODS = ["forward", "jax.grad", *LRP]
# Targets (ratio to jax.grad at batch 32 on CPU): time per method, compile, memory.
TIME_TARGET = {"epsilon(0.25)": 1.2, "epsilon_plus_flat": 1.2, "epsilon_gamma_box": 2.0, "epsilon_alpha2_beta1": 2.0}
COMPILE_TARGET, MEMORY_TARGET = 2.0, 1.5

QUICK = [("mlp", 8), ("mlp", 32), ("vgg16-64", 8), ("vgg16-64", 32), ("transformer", 8), ("transformer", 32)]
DEFAULT = [(m, b) for m in ("mlp", "transformer", "vgg16-64") for b in (1, 8, 32)] + [
    ("resnet18-224", 1), ("resnet18-224", 8), ("vgg16-224", 1), ("vgg16-224", 8)]
FULL_ONLY = [("resnet18-224", 32), ("vgg16-224", 32)]


@dataclasses.dataclass
class Row:
    model: str
    batch: int
    method: str
    ms: float | None = None  # median time per call
    min_ms: float | None = None  # fastest call (least disturbed by other load)
    runs: int = 0
    compile_s: float | None = None  # trace + lower + compile
    memory: int | None = None  # temp + output bytes of the executable
    flops: float | None = None  # XLA's cost analysis
    note: str = ""


def make_fn(method: str, apply):
    """``f(variables, x, target)`` for one method."""
    if method == "forward":
        return lambda v, x, t: apply(v, x)
    if method == "jax.grad":
        def grad(v, x, t):
            return jax.grad(lambda x: jnp.take_along_axis(apply(v, x), t[:, None], axis=1).sum())(x)
        return grad
    explain = jlrp.lrp(apply, LRP[method](), argnums=1)
    return lambda v, x, t: explain(v, x, target=t)


def _memory(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return None if m is None else int(m.temp_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # noqa: BLE001  (not implemented on every backend)
        return None


def _flops(compiled) -> float | None:
    try:
        c = compiled.cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return float(c["flops"]) if c and "flops" in c else None
    except Exception:  # noqa: BLE001
        return None


def compile_method(model: str, batch: int, method: str, fn, args):
    """Trace, lower and compile ``fn``; read memory and FLOPs; run once (warm-up). Returns (executable, row)."""
    row = Row(model, batch, method)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    row.compile_s = time.perf_counter() - t0
    row.memory, row.flops = _memory(compiled), _flops(compiled)
    jax.block_until_ready(compiled(*args))
    return compiled, row


def _call_time(c, args, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        out = c(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def time_methods(compiled: dict, args, runs: int, fill: float = 2.0, cap: int = 50) -> dict[str, list[float]]:
    """Per method, a list of >= ``runs`` times per call. Methods are timed round-robin, so that changes in
    machine load hit all of them alike. Fast calls (< 50 ms) are timed in blocks of back-to-back calls (the
    mean of a block is one sample), and rounds are repeated while they fit in ``fill`` seconds (<= ``cap``)."""
    t_round = time.perf_counter()
    block = {m: max(1, min(100, int(0.05 / _call_time(c, args, 1)))) for m, c in compiled.items()}
    rounds = max(runs, min(cap, int(fill / max(time.perf_counter() - t_round, 1e-9))))
    times: dict[str, list[float]] = {m: [] for m in compiled}
    for _ in range(rounds):
        for m, c in compiled.items():
            times[m].append(_call_time(c, args, block[m]))
    return times


def machine_info() -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    return (f"CPU: {cpu}; {os.cpu_count()} cores; {jax.devices()[0].platform} backend; python "
            f"{platform.python_version()}; jax {jax.__version__}, jaxlib {jax.lib.__version__}, flax "
            f"{flax.__version__}, jlrp {jlrp.__version__}")


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _fmt(v, spec: str, na: str = "n/a") -> str:
    return na if v is None else format(v, spec)


def _ratio(a, b) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def tables(rows: list[Row]) -> str:
    by = {(r.model, r.batch, r.method): r for r in rows}
    configs = list(dict.fromkeys((r.model, r.batch) for r in rows))
    out = ["### Time relative to jax.grad (median; lower is better)", "",
           "| model | batch | forward ms | jax.grad ms | " + " | ".join(LRP) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(LRP)]
    for m, b in configs:
        g = by.get((m, b, "jax.grad"))
        f = by.get((m, b, "forward"))
        cells = []
        for name in LRP:
            r = by.get((m, b, name))
            cell = _ratio(r.ms if r else None, g.ms if g else None)
            if b == 32 and cell != "n/a":
                cell += " ✓" if float(cell) <= TIME_TARGET[name] else " ✗"
            cells.append(cell)
        out.append(f"| {m} | {b} | {_fmt(f.ms if f else None, '.1f')} | {_fmt(g.ms if g else None, '.1f')} | "
                   + " | ".join(cells) + " |")
    out += ["", f"✓/✗: batch-32 target met (epsilon-type <= {TIME_TARGET['epsilon(0.25)']}x, gamma-box and "
            f"alpha-beta <= {TIME_TARGET['epsilon_gamma_box']}x).", "",
            "### All measurements", "",
            "| model | batch | method | time ms | min ms | x grad | compile s | x grad | memory MB | x grad | GFLOP "
            "| x grad |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = by.get((r.model, r.batch, "jax.grad"))
        cr, mr = _ratio(r.compile_s, g and g.compile_s), _ratio(r.memory, g and g.memory)
        if r.method in LRP and r.batch == 32:
            cr += "" if cr == "n/a" else (" ✓" if float(cr) <= COMPILE_TARGET else " ✗")
            mr += "" if mr == "n/a" else (" ✓" if float(mr) <= MEMORY_TARGET else " ✗")
        mem = None if r.memory is None else r.memory / 2 ** 20
        out.append(f"| {r.model} | {r.batch} | {r.method} | {_fmt(r.ms, '.2f')} | {_fmt(r.min_ms, '.2f')} | "
                   f"{_ratio(r.ms, g and g.ms)} | {_fmt(r.compile_s, '.2f')} | {cr} | {_fmt(mem, '.1f')} | {mr} | "
                   f"{_fmt(None if r.flops is None else r.flops / 1e9, '.3f')} | {_ratio(r.flops, g and g.flops)} |")
    notes = [f"- {r.model} batch {r.batch} {r.method}: {r.note}" for r in rows if r.note]
    return "\n".join(out + ([""] + notes if notes else []))


REPOSITORY = Path(__file__).resolve().parent.parent


def default_out() -> Path:
    """``$XDG_CACHE_HOME/jlrp/benchmarks`` if XDG_CACHE_HOME is set, else ``<tmp>/jlrp-benchmarks``."""
    cache = os.environ.get("XDG_CACHE_HOME")
    return Path(cache) / "jlrp" / "benchmarks" if cache else Path(tempfile.gettempdir()) / "jlrp-benchmarks"


def output_dir(out: str | os.PathLike | None) -> Path:
    """The results folder: ``out`` or :func:`default_out`; refused inside the repository (tracked files)."""
    folder = (Path(out).expanduser() if out else default_out()).resolve()
    if folder == REPOSITORY or REPOSITORY in folder.parents:
        raise SystemExit(f"--out {folder} is inside the repository ({REPOSITORY}): benchmark results are run "
                         f"output, write them elsewhere (default {default_out()})")
    return folder


def write_results(out: Path, text: str, rows: list) -> Path:
    """``text`` to ``out`` (markdown) and ``rows`` beside it as ``.json``, creating the folder; print the text."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(text)
    print(f"written: {out} and {out.with_suffix('.json').name}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="MLP, VGG-16 64x64 and transformer at batch 8 and 32")
    p.add_argument("--full", action="store_true", help="also ResNet-18 and VGG-16 at 224x224, batch 32")
    p.add_argument("--keras", action="store_true",
                   help="Keras applications at 64x64, batch 8 and 32 (ResNet50, ConvNeXtTiny, MobileNetV2, "
                        "EfficientNetB0; needs keras, the zoo extra)")
    p.add_argument("--runs", type=int, default=5, help="timed calls per method (median), after one warm-up")
    p.add_argument("--only", default="", help="comma-separated model names to keep (e.g. mlp,vgg16-64)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; configurations not started within it are skipped (default: none)")
    p.add_argument("--out", default=None, help=f"results folder outside the repository (default {default_out()})")
    a = p.parse_args(argv)
    configs = QUICK if a.quick else DEFAULT + (FULL_ONLY if a.full else [])
    configs += [(m, b) for m in KERAS for b in (8, 32)] if a.keras else []
    if a.only:
        configs = [c for c in configs if c[0] in a.only.split(",")]
    folder = output_dir(a.out)
    out = folder / ("results-quick.md" if a.quick else "results-full.md" if a.full else "results.md")

    start, load0 = time.perf_counter(), _load()
    rows: list[Row] = []
    skipped = [] if a.full or a.quick else [f"{m} batch {b}" for m, b in FULL_ONLY]
    for model, batch in configs:
        if a.budget is not None and time.perf_counter() - start > a.budget:
            skipped.append(f"{model} batch {batch} (over --budget)")
            continue
        apply, variables, x = build(model, batch)
        target = jnp.arange(batch, dtype=jnp.int32) % 10
        args = (variables, x, target)
        t_cfg = time.perf_counter()
        compiled, cfg_rows = {}, {}
        for method in METHODS:
            try:
                compiled[method], cfg_rows[method] = compile_method(model, batch, method,
                                                                    make_fn(method, apply), args)
            except Exception as e:  # noqa: BLE001  (report, keep going)
                cfg_rows[method] = Row(model, batch, method, note=f"failed: {type(e).__name__}: {e}"[:300])
        for method, ts in time_methods(compiled, args, a.runs).items():
            r = cfg_rows[method]
            r.ms, r.min_ms, r.runs = 1e3 * statistics.median(ts), 1e3 * min(ts), len(ts)
        for method in METHODS:
            r = cfg_rows[method]
            rows.append(r)
            print(f"[{time.perf_counter() - start:6.0f}s] {model:13s} b={batch:<3d} {method:21s} "
                  f"{_fmt(r.ms, '9.2f')} ms  compile {_fmt(r.compile_s, '6.2f')} s", file=sys.stderr)
        print(f"    {model} b={batch}: {time.perf_counter() - t_cfg:.0f} s, load {_load()}", file=sys.stderr,
              flush=True)
        del apply, variables, x, args, compiled
        jax.clear_caches()

    total = time.perf_counter() - start
    text = "\n".join([
        f"# jlrp benchmark ({'--quick' if a.quick else '--full' if a.full else 'default'})", "",
        machine_info(), "",
        f"Load average (1, 5, 15 min): {load0} at start, {_load()} at end. Wall time {total:.0f} s. "
        f"Medians of >= {a.runs} runs after two warm-up calls (fast models: up to 50 runs of back-to-back blocks "
        f"of calls; see benchmarks/README.md), methods timed round-robin; compile = trace + lower + XLA compile; "
        f"memory = temp + "
        f"output bytes from `compiled.memory_analysis()`; GFLOP from `compiled.cost_analysis()`.", "",
        tables(rows), "",
        ("Skipped: " + "; ".join(skipped) + ".") if skipped else "", ""])
    return write_results(out, text, [dataclasses.asdict(r) for r in rows])


if __name__ == "__main__":
    main()
