"""The checks every zoo model must pass, shared by ``test_zoo.py`` and ``benchmarks/zoo_table.py``.

Per composite (``epsilon_plus_flat``; ``epsilon_gamma_box(low, high)`` for image models; ``rules.epsilon()``
on every linear layer):

* ``eager``: ``jlrp.lrp`` runs without jit; the relevance has the explained input's shape and is finite.
* ``jit``: the same under ``jax.jit``.
* ``forward``: ``jlrp.transform(fn, composite)(params, x)`` is bit-identical to ``fn(params, x)``, eager and
  under ``jax.jit`` (each compared with the same mode of ``fn``; under jit the transform is compiled on its
  own, as a user runs a forward: in one program with a backward pass XLA fuses, hence rounds, the forward
  otherwise, whoever differentiates it, ``jax.grad`` included).
* ``closure``: with ``rep = jlrp.report(...)`` (eager),
  ``|sum(rep.initial) - sum(R_in) - sum(layer.absorbed)| / |sum(rep.initial)|`` is below 1e-5 for float32
  models (1e-2 for bfloat16 ones), and everything in the report is finite.

For token models whose library computes positions from the ids (RoBERTa, gemma) ``epsilon/positions``: the
token relevance equals that of the same model given those positions as constants (positions computed from
ids carry no relevance; tolerance as for the closure).

And on ReLU CNNs ``lrp0``: LRP-0 (``zero`` on linear layers, sums and adds) equals input x gradient of the
target logit to 1e-5 of its largest magnitude.

Jitted programs here are compiled with XLA's LLVM backend optimisation off
(``compiler_options={"xla_backend_optimization_level": 0}``): compiles dominate the zoo's run time and this
makes them about 3x faster. XLA's HLO passes (fusion, algebraic simplification) still run, so the jitted
forward is still a fused program compared with ``jax.jit(fn)`` compiled the same way;
``benchmarks/zoo_table.py`` repeats the jit checks at the default optimisation level.

Every check runs even when an earlier one failed; a failure records the exception's type and first lines or
the measured error. All of it runs with float32 JAX (``jax.enable_x64(False)``) inside the model's context
(e.g. jimm's explicit mesh).
"""
from __future__ import annotations

import dataclasses
import functools
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jlrp

CLOSURE_TOL = {"float32": 1e-5, "bfloat16": 1e-2}
O0 = {"xla_backend_optimization_level": 0}
LRP0_TOL = 1e-5


def composites(model) -> dict[str, Any]:
    out = {"epsilon_plus_flat": jlrp.composites.epsilon_plus_flat()}
    if model.kind == "image":
        out["epsilon_gamma_box"] = jlrp.composites.epsilon_gamma_box(*model.box)
    out["epsilon"] = jlrp.rules.epsilon()
    return out


def lrp0_composite():
    return jlrp.Composite([("linear", jlrp.rules.zero()), ("sum", jlrp.rules.zero()),
                           ("add", jlrp.rules.zero())])


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""  # the measured value, or the exception
    value: float | None = None
    seconds: float = 0.0


def describe(exc: BaseException, lines: int = 3) -> str:
    """An exception's type and the first lines of its message, plus where in jlrp / the library it arose."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    text = [t for t in text if t.strip()][:lines]
    frames = traceback.extract_tb(exc.__traceback__)
    where = [f for f in frames if "/jlrp/" in f.filename] or frames
    loc = f" [at {where[-1].filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{where[-1].lineno}]" \
        if where else ""
    return " | ".join(text)[:600] + loc


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(jnp.asarray(a, jnp.float32)))) for a in jax.tree_util.tree_leaves(tree)
               if jnp.issubdtype(jnp.result_type(a), jnp.inexact))


def _max_abs(a) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64)))) if np.size(a) else 0.0


def _bitwise_equal(a, b) -> tuple[bool, str]:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if len(la) != len(lb):
        return False, f"{len(la)} output leaves vs {len(lb)}"
    for u, v in zip(la, lb):
        u, v = np.asarray(u), np.asarray(v)
        if u.shape != v.shape or u.dtype != v.dtype:
            return False, f"output {u.shape} {u.dtype} vs {v.shape} {v.dtype}"
        if u.tobytes() != v.tobytes():
            diff = np.abs(u.astype(np.float64) - v.astype(np.float64))
            return False, f"not bit-identical: {int((u != v).sum())}/{u.size} values differ, max |diff| " \
                          f"{diff.max():.3g} (max |out| {_max_abs(v):.3g})"
    return True, "bit-identical"


def jit_run(f: Callable, *args, optimize: bool = False):
    """``jax.jit(f)(*args)``; unless ``optimize``, compiled with XLA's LLVM backend optimisation off (see the
    module docstring)."""
    lowered = jax.jit(f).lower(*args)
    return (lowered.compile() if optimize else lowered.compile(compiler_options=O0))(*args)


def closure(rep) -> float:
    """|sum(initial) - sum(R_in) - sum(absorbed)| / |sum(initial)| (float64 sums)."""
    r_out = float(np.sum(np.asarray(rep.initial, np.float64)))
    r_in = sum(float(np.sum(np.asarray(r, np.float64))) for r in jax.tree_util.tree_leaves(rep.relevance))
    absorbed = sum(float(np.asarray(l.absorbed, np.float64)) for l in rep.layers)
    return abs(r_out - r_in - absorbed) / max(abs(r_out), 1e-30)


def input_x_gradient(model, target, run_jit=jit_run) -> jax.Array:
    def logit(x):
        out = model.fn(model.params, x)
        return jnp.sum(jnp.take_along_axis(out, target[:, None], axis=-1))
    return model.x * run_jit(jax.grad(logit), model.x)


def run_checks(model, *, forward_jit: bool = True, optimize: bool = False,
               only: Callable[[str], bool] | None = None) -> list[Check]:
    """All checks for one zoo model (see the module docstring); never raises. ``optimize``: compile the
    jitted programs at XLA's default optimisation level; ``only``: run the checks whose name it accepts."""
    results: list[Check] = []
    run_jit = functools.partial(jit_run, optimize=optimize)

    def check(name: str, body: Callable[[], tuple[bool, str, float | None]]):
        if only is not None and not only(name):
            return
        t0 = time.perf_counter()
        try:
            ok, detail, value = body()
        except Exception as e:  # noqa: BLE001 - every failure is reported, never raised
            ok, detail, value = False, describe(e), None
        results.append(Check(name, bool(ok), detail, value, time.perf_counter() - t0))

    with jax.enable_x64(False), model.context():
        try:
            reference = model.fn(model.params, model.x)
            reference_jit = run_jit(model.fn, model.params, model.x)
            target = jnp.argmax(reference_jit, axis=-1)  # the explained class per sample
        except Exception as e:  # noqa: BLE001 - the model itself does not run
            return [Check("model runs", False, describe(e))]
        expected = jnp.shape(model.x)
        tol = CLOSURE_TOL[model.dtype]

        for cname, comp in composites(model).items():
            explain = jlrp.lrp(model.fn, comp, argnums=model.argnums)

            def relevance_ok(r, where):
                if jnp.shape(r) != expected:
                    return False, f"{where}: relevance shape {jnp.shape(r)}, expected {expected}", None
                if not _finite(r):
                    return False, f"{where}: relevance not finite ({int((~jnp.isfinite(r)).sum())} values)", None
                return True, f"max |R| {_max_abs(r):.3g}", _max_abs(r)

            check(f"{cname}/eager", lambda: relevance_ok(explain(model.params, model.x, target=target), "eager"))

            transformed = jlrp.transform(model.fn, comp, argnums=model.argnums)

            def under_jit():
                return relevance_ok(run_jit(lambda p, x, t: explain(p, x, target=t), model.params, model.x,
                                            target), "jit")

            check(f"{cname}/jit", under_jit)

            def forward():
                ok, detail = _bitwise_equal(transformed(model.params, model.x), reference)
                if not ok:
                    return False, f"eager: {detail}", None
                if forward_jit:
                    # the transform compiled alone, as a user runs the forward: a forward compiled together
                    # with a backward pass (which reads its intermediates) is fused, hence rounded, otherwise,
                    # whoever differentiates it (Keras VGG16: jax.grad and the model in one program give
                    # logits 5.8e-10 off the model's; bfloat16 models; several at XLA's default level)
                    out = run_jit(transformed, model.params, model.x)
                    ok, detail = _bitwise_equal(out, reference_jit)
                    if not ok:
                        return False, f"jit: {detail}", None
                return True, "bit-identical" + (" (eager and jit)" if forward_jit else " (eager)"), None

            check(f"{cname}/forward", forward)

            def conservation():
                rep = jlrp.report(model.fn, comp, argnums=model.argnums)(model.params, model.x, target=target)
                if not _finite((rep.relevance, rep.initial, [l.absorbed for l in rep.layers])):
                    return False, "report not finite", None
                err = closure(rep)
                return err < tol, f"closure {err:.3g} (tol {tol:g})", err

            check(f"{cname}/closure", conservation)

        if model.fn_constant_positions is not None:
            def positions():
                comp = jlrp.rules.epsilon()
                r = jlrp.lrp(model.fn, comp, argnums=model.argnums)(model.params, model.x, target=target)
                ref = jlrp.lrp(model.fn_constant_positions, comp, argnums=model.argnums)(
                    model.params, model.x, target=target)
                err = _max_abs(np.asarray(r, np.float64) - np.asarray(ref, np.float64)) / max(_max_abs(ref), 1e-30)
                return err < tol, f"max |R(ids) - R(ids, constant positions)| / max |R| = {err:.3g} (tol {tol:g})", \
                    err

            check("epsilon/positions", positions)

        if model.relu_cnn:
            def lrp0():
                r = jlrp.lrp(model.fn, lrp0_composite(), argnums=model.argnums)(model.params, model.x, target=target)
                ixg = input_x_gradient(model, target, run_jit)
                err = _max_abs(np.asarray(r, np.float64) - np.asarray(ixg, np.float64)) / max(_max_abs(ixg), 1e-30)
                return err < LRP0_TOL, f"max |LRP-0 - x*grad| / max |x*grad| = {err:.3g} (tol {LRP0_TOL:g})", err

            check("lrp0=x*grad", lrp0)
    return results


def summary(results: list[Check]) -> str:
    """One line per passed check; failed checks with the same message are listed together."""
    lines = [f"PASS {c.name} ({c.seconds:.1f}s): {c.detail}" for c in results if c.ok]
    failed: dict[str, list[str]] = {}
    for c in results:
        if not c.ok:
            failed.setdefault(c.detail, []).append(c.name)
    lines += [f"FAIL {', '.join(names)}: {detail}" for detail, names in failed.items()]
    return "\n".join(lines)


def build_and_check(model_id: str, optimize: bool = False) -> tuple[str | None, list[Check], float]:
    """Build a zoo model (once per process) and run its checks: ``(build error or None, checks, seconds)``.
    Never raises; picklable results (the test session runs this in worker processes)."""
    import zoo_models

    t0 = time.perf_counter()
    try:
        model = zoo_models.build(model_id)
    except Exception as e:  # noqa: BLE001 - reported by the caller
        return describe(e), [], time.perf_counter() - t0
    return None, run_checks(model, optimize=optimize), time.perf_counter() - t0
