"""The zoo table: every model of tests/zoo explained by jlrp, as a Markdown table.

    python benchmarks/zoo_table.py [--slow] [--only ID,ID] [--runs N] [--out DIR]

For each model of ``tests/zoo/zoo_models.py`` (family x model): builds it, runs the zoo's checks
(``tests/zoo/zoo_checks.py``; here every jitted program is compiled at XLA's default optimisation level,
the tests compile with LLVM optimisation off), then times each composite's jitted ``jlrp.lrp`` against
``jax.grad`` of the target logits on the same model and batch (median of ``--runs`` calls after a warm-up;
image models: the gradient w.r.t. the input; token models: w.r.t. the float parameters, since token ids have
no gradient, so their ratio compares different work). The gradient is taken of the model's traced program
(``jax.make_jaxpr``), the program jlrp explains: jimm's NNX models refuse ``jax.grad`` of the function
itself. Columns: works (checks passed), the conservation closure of each composite
``|sum(R_out) - sum(R_in) - sum(absorbed)| / |sum(R_out)|``, LRP-0 vs input x gradient on ReLU CNNs, the time
ratios, and the failed checks; every failure's text follows the table.

The table and the raw numbers (``zoo_table.md``, ``zoo_table.json``) go to ``--out``, a folder outside the
repository (default ``/tmp/jlrp-zoo``); progress goes to stderr. ``--slow`` adds the Keras applications
(ResNet50, VGG16, MobileNetV2, EfficientNetB0, DenseNet121, ConvNeXtTiny; 16-90 s each to build on 2 cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests" / "zoo"))
os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.extend import core as jax_core  # noqa: E402

import jlrp  # noqa: E402
import zoo_checks  # noqa: E402
import zoo_models  # noqa: E402

DEFAULT_OUT = Path("/tmp/jlrp-zoo")
SHORT = {"epsilon_plus_flat": "ε+♭", "epsilon_gamma_box": "γ□", "epsilon": "ε"}
PACKAGES = ["jax", "jaxlib", "flax", "transformers", "keras", "jax-image-models", "equimo", "equinox", "penzai",
            "gemma"]


@dataclasses.dataclass
class Result:
    family: str
    name: str
    kind: str = ""
    dtype: str = ""
    note: str = ""
    build_s: float | None = None
    build_error: str = ""
    checks: list = dataclasses.field(default_factory=list)  # zoo_checks.Check as dicts
    grad_ms: float | None = None
    lrp_ms: dict = dataclasses.field(default_factory=dict)  # composite -> median ms
    timing_errors: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


def output_dir(out: str | None) -> Path:
    folder = (Path(out).expanduser() if out else DEFAULT_OUT).resolve()
    if folder == REPOSITORY or REPOSITORY in folder.parents:
        raise SystemExit(f"--out {folder} is inside the repository ({REPOSITORY}): the table is run output, "
                         f"write it elsewhere (default {DEFAULT_OUT})")
    return folder


def _median_ms(compiled, args, runs: int) -> float:
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _grad_baseline(model, target):
    """jax.grad of the target logits: w.r.t. the input (images) or the float parameters (token ids)."""
    def logits(params, x):
        out = model.fn(params, x)
        return jnp.sum(jnp.take_along_axis(out, target[:, None], axis=-1).astype(jnp.float32))

    # the model's traced program (its jaxpr, as jlrp sees it): jax.grad of an NNX model whose modules are
    # merged inside the function (jimm's nnx.scan) refuses to run at another trace level; the program is
    # the same, so is its gradient
    closed = jax.make_jaxpr(logits)(model.params, model.x)
    program = jax_core.jaxpr_as_fun(closed)

    def traced(params, x):
        return program(*jax.tree_util.tree_leaves((params, x)))[0]

    # token ids have no gradient: differentiate w.r.t. the parameters instead (allow_int: integer leaves)
    return jax.jit(jax.grad(traced, argnums=1 if model.kind == "image" else 0, allow_int=True))


def time_model(model, result: Result, runs: int, working: set[str]):
    with jax.enable_x64(False), model.context():
        out = jax.jit(model.fn)(model.params, model.x)
        target = jnp.argmax(out, axis=-1)
        args = (model.params, model.x)
        try:
            grad = _grad_baseline(model, target).lower(*args).compile()
            result.grad_ms = _median_ms(grad, args, runs)
        except Exception as e:  # noqa: BLE001
            result.timing_errors["jax.grad"] = zoo_checks.describe(e)
            return
        for cname, comp in zoo_checks.composites(model).items():
            if cname not in working:
                continue
            explain = jlrp.lrp(model.fn, comp, argnums=model.argnums)
            try:
                compiled = jax.jit(lambda p, x: explain(p, x, target=target)).lower(*args).compile()
                result.lrp_ms[cname] = _median_ms(compiled, args, runs)
            except Exception as e:  # noqa: BLE001
                result.timing_errors[cname] = zoo_checks.describe(e)


def run_model(model_id: str, runs: int) -> Result:
    spec = zoo_models.BY_ID[model_id]
    result = Result(spec.family, spec.name)
    t0 = time.perf_counter()
    try:
        model = zoo_models.build(model_id)
    except Exception as e:  # noqa: BLE001
        result.build_error = zoo_checks.describe(e)
        result.seconds = time.perf_counter() - t0
        return result
    result.build_s = time.perf_counter() - t0
    result.kind, result.dtype, result.note = model.kind, model.dtype, model.note
    checks = zoo_checks.run_checks(model, optimize=True)
    result.checks = [dataclasses.asdict(c) for c in checks]
    working = {c for c in zoo_checks.composites(model)
               if any(k.name == f"{c}/jit" and k.ok for k in checks)}
    time_model(model, result, runs, working)
    result.seconds = time.perf_counter() - t0
    return result


def _cell_closure(result: Result, cname: str) -> str:
    for c in result.checks:
        if c["name"] == f"{cname}/closure":
            if c["value"] is None:
                return "✗ error"
            return f"{c['value']:.1e}" + ("" if c["ok"] else " ✗")
    return "–"


def _cell_lrp0(result: Result) -> str:
    for c in result.checks:
        if c["name"] == "lrp0=x*grad":
            return "✗ error" if c["value"] is None else f"{c['value']:.1e}" + ("" if c["ok"] else " ✗")
    return "–"


def _failed_names(result: Result) -> str:
    failed = [c["name"] for c in result.checks if not c["ok"]]
    return ", ".join(failed) if failed else ""


def table(results: list[Result]) -> str:
    names = list(SHORT)
    lines = ["| family | model | input | works | closure " + " / ".join(SHORT[n] for n in names)
             + " | LRP-0 = x·∇ | time / jax.grad " + " / ".join(SHORT[n] for n in names) + " | failed checks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.build_error:
            lines.append(f"| {r.family} | {r.name} | | ✗ build | | | | could not build: {r.build_error[:120]} |")
            continue
        passed = sum(c["ok"] for c in r.checks)
        works = f"{'✓' if passed == len(r.checks) else '✗'} {passed}/{len(r.checks)}"
        closures = " / ".join(_cell_closure(r, n) for n in names)
        ratios = " / ".join(f"{r.lrp_ms[n] / r.grad_ms:.2f}" if n in r.lrp_ms and r.grad_ms else "–"
                            for n in names)
        kind = f"{r.kind}" + (f" ({r.dtype})" if r.dtype != "float32" else "")
        lines.append(f"| {r.family} | {r.name} | {kind} | {works} | {closures} | {_cell_lrp0(r)} | {ratios} | "
                     f"{_failed_names(r)} |")
    return "\n".join(lines)


def failures(results: list[Result]) -> str:
    out = []
    for r in results:
        items = ([f"build: {r.build_error}"] if r.build_error else []) + \
            [f"{c['name']}: {c['detail']}" for c in r.checks if not c["ok"]] + \
            [f"timing {k}: {v}" for k, v in r.timing_errors.items()]
        if items:
            out.append(f"- **{r.family} / {r.name}**")
            out.extend(f"  - {i}" for i in items)
    return "\n".join(out) if out else "None."


def versions() -> str:
    found = []
    for p in PACKAGES:
        try:
            found.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            found.append(f"{p} (not installed)")
    return ", ".join(found)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slow", action="store_true", help="also the Keras applications (slow to build)")
    p.add_argument("--only", default="", help="comma-separated model ids, e.g. transformers-vit,jimm-vit")
    p.add_argument("--runs", type=int, default=5, help="timed calls per method (median), after a warm-up")
    p.add_argument("--out", default=None, help=f"output folder outside the repository (default {DEFAULT_OUT})")
    a = p.parse_args(argv)
    folder = output_dir(a.out)
    ids = [i for i, s in zoo_models.BY_ID.items() if a.slow or not s.slow]
    if a.only:
        wanted = a.only.split(",")
        unknown = [w for w in wanted if w not in zoo_models.BY_ID]
        if unknown:
            raise SystemExit(f"unknown model ids {unknown}; known: {', '.join(zoo_models.BY_ID)}")
        ids = [i for i in ids if i in wanted] + [w for w in wanted if w not in ids]

    start = time.perf_counter()
    results: list[Result] = []
    out = folder / "zoo_table.md"
    folder.mkdir(parents=True, exist_ok=True)
    for model_id in ids:
        r = run_model(model_id, a.runs)
        results.append(r)
        passed = sum(c["ok"] for c in r.checks)
        print(f"[{time.perf_counter() - start:6.0f}s] {model_id:32s} {passed}/{len(r.checks)} checks "
              f"({r.seconds:.0f} s){' build failed' if r.build_error else ''}", file=sys.stderr, flush=True)
        jax.clear_caches()
        text = report(results, time.perf_counter() - start, done=len(results) == len(ids))
        out.write_text(text)  # after every model: a long run leaves a partial table
        out.with_suffix(".json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    print(text)
    print(f"written: {out} and {out.with_suffix('.json').name}", file=sys.stderr)
    return out


def report(results: list[Result], total: float, done: bool) -> str:
    n_ok = sum(1 for r in results if r.checks and all(c["ok"] for c in r.checks) and not r.build_error)
    return "\n".join([
        "# jlrp model zoo" + ("" if done else " (partial: run still in progress)"), "",
        f"{n_ok} of {len(results)} models pass every check. Python {platform.python_version()} on "
        f"{os.cpu_count()} cores ({jax.devices()[0].platform}); {versions()}, jlrp {jlrp.__version__}. "
        f"Wall time {total:.0f} s; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}.", "",
        "works: checks passed (per composite: eager, jit, forward bit-identical, report closure; LRP-0 on ReLU "
        "CNNs; token relevance independent of positions computed from the ids). closure: "
        "|ΣR_out − ΣR_in − Σabsorbed| / |ΣR_out| of `jlrp.report` (tolerance 1e-5 float32, 1e-2 bfloat16). "
        "time: median of the jitted `jlrp.lrp` over `jax.grad` of the target logits (w.r.t. the input for "
        "images, the float parameters for token models: different work) of the model's traced program. "
        "ε+♭ = epsilon_plus_flat, γ□ = epsilon_gamma_box "
        "(images only), ε = rules.epsilon() on every linear layer.", "",
        table(results), "", "## Failures", "", failures(results), ""])


if __name__ == "__main__":
    main()
