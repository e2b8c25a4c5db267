"""Property-based tests: jlrp on hundreds of random small models (tests/modelgen.py: plain jnp, linen, NNX and
Equinox; conv 1D/2D/3D, pooling, residuals, concatenation, norms, tokens, FiLM, scans, jitted blocks, bf16
casts), checked against oracles that need no hand-written reference:

1. LRP-0 equals input x gradient on every piecewise-linear float64 model, for every explained input;
2. the transformed forward is bit-identical to the model, eagerly and under jax.jit;
3. the report balances, sum(initial) - sum(R at the inputs) == sum(absorbed);
4. relevance is finite (bf16 casts, all-zero inputs and dead ReLUs included);
5. relevance under jax.jit equals the eager relevance;
6. a model with scans or jitted blocks is explained like its twin (scans unrolled, jitted blocks inlined):
   position selectors ('first', conv_index 0) must mean the same scanned or unrolled.

Cost: XLA compiles are most of the time (eager jlrp compiles every new primitive, shape and parameters; jit
compiles whole programs), so the models come in groups that share a structure and differ in their values
(modelgen.VALUE_SETS each). Per structure, one compiled program computes every explanation that oracles 1,
3, 4 and 6 need (several oracles on one trace) and runs once per model; jax.jit of the model and of its
transform are compiled once and run per model. The eager oracles (2 eagerly, 5) run on the first model of a
structure: jlrp runs the same plan, hence the same operations, for all its models. Each structure is
explained with LRP-0 and one preset composite, rotating with the structure index; oracle 5 runs on every
JIT_EVERY-th structure.

A failing id starts with its seed; ``modelgen.generate(seed)`` rebuilds the model:
``python -c "import sys; sys.path.insert(0, 'tests'); import modelgen; print(modelgen.generate(SEED))"``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jlrp  # noqa: E402
import modelgen  # noqa: E402

DEFAULT_MODELS = 300  # 30 structures of modelgen.VALUE_SETS (10) models
SLOW_MODELS = 1200  # 120 more structures, behind the slow marker
JIT_EVERY = 5  # jit vs eager relevance: every JIT_EVERY-th structure

# LRP-0 on every layer with an LRP rule: dense, conv, elementwise affine maps ('affine': unfoldable BatchNorm
# and scales), sums and pooling, residual adds; max pooling keeps its gradient, ReLUs pass. Its stabiliser is
# 1e-30, not zero()'s default 1e-12: a stabiliser moves a unit's relevance by eps / |z| relative, which
# reaches the oracle's 1e-9 at |z| ~ 1e-3 (measured: random models 1e-9 to 1.2e-8 off input x gradient with
# 1e-12, 1e-16 with 1e-30). 1e-30 still keeps z = 0 finite, in float32 too.
LRP0_KINDS = ("dense", "conv", "affine", "sum", "add")
LRP0 = jlrp.Composite([(lambda layer: layer.kind in LRP0_KINDS, jlrp.rules.zero(1e-30))], name="lrp0")
COMPOSITES = {
    "lrp0": LRP0,
    "epsilon_plus": jlrp.composites.epsilon_plus(),
    "epsilon_plus_flat": jlrp.composites.epsilon_plus_flat(),
    "epsilon_gamma_box": jlrp.composites.epsilon_gamma_box(*modelgen.BOUNDS),
    "epsilon_alpha2_beta1": jlrp.composites.epsilon_alpha2_beta1(),
}
PRESETS = [name for name in COMPOSITES if name != "lrp0"]

IXG_RTOL = 1e-9  # LRP-0 vs input x gradient, relative to the largest |input x gradient|
CLOSURE_RTOL = 1e-8  # report closure, relative to max(1, |sum of the initial relevance|)
JIT_RTOL = 1e-10  # jit vs eager relevance, relative to the largest |eager relevance|
# model vs its unrolled / inlined twin, relative to the largest |twin relevance|. The twin is another program
# (a scan body is compiled on its own), and alpha-beta relevance is ill-conditioned on these small random
# models (measured: a 1e-15 relative change of the input moves it by up to 2e-10): 1e-10 would flag rounding.
# A rule or position selector that differs between the two moves relevance by far more than 1e-8 (the
# smallest stabiliser the presets use is 1e-6).
TWIN_RTOL = 1e-8


# --------------------------------------------------------------------------------------------------------
# One evaluation per structure, shared by the oracles of its models

# The explanations are compared with tolerances, so they are compiled at XLA's backend optimisation level
# 0: half the compile time, which is most of the suite's time (the bit-identity oracles use default jit).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _once(method):
    """A lazily computed attribute. A failure is kept too and raised again on every access: a structure that
    jlrp cannot explain costs one attempt, and every test that needs the result reports the error."""
    name = method.__name__

    @functools.wraps(method)
    def get(self):
        if name not in self._results:
            try:
                self._results[name] = (True, method(self), None)
            except Exception as error:  # noqa: BLE001 (raised again below, in each test that needs it)
                self._results[name] = (False, error, error.__traceback__)
        ok, value, traceback = self._results[name]
        if not ok:  # with its own traceback each time (raising it again would stack them up)
            raise value.with_traceback(traceback)
        return value
    return property(get)


def _leaves(tree) -> tuple:
    return tuple(np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(tree))


def _input_x_gradient(fn, args, argnums, target):
    """x * d(sum of the target logits)/dx for each explained input, by jax.grad (independent of jlrp).
    The gradient is taken with respect to every argument: with the parameters closed over instead, NNX's
    scan refuses their variables under jax.jit ('Cannot extract graph node from different trace level')."""
    def target_logit(*args):
        return fn(*args)[jnp.arange(target.shape[0]), target].sum()
    grads = jax.grad(target_logit, argnums=tuple(range(len(args))), allow_int=True)(*args)  # (Equinox's
    # BatchNorm state holds a boolean)
    return tuple(args[a] * grads[a] for a in argnums)


def _balance(report) -> dict:
    """the report's closure terms: sum(initial) - sum(R at the inputs) - sum(absorbed)"""
    initial = jnp.sum(report.initial)
    absorbed = sum(layer.absorbed for layer in report.layers)
    closure = initial - sum(jnp.sum(r) for r in jax.tree_util.tree_leaves(report.relevance)) - absorbed
    return dict(relevance=report.relevance, initial=initial, absorbed=absorbed, closure=closure)


def _compile_and_run(fn, argsets):
    """fn compiled once (FAST_COMPILE) and run on each argument tuple (they share shapes), as numpy"""
    compiled = jax.jit(fn).lower(*argsets[0]).compile(FAST_COMPILE)
    return [jax.tree.map(lambda a: np.asarray(a, np.float64), compiled(*args)) for args in argsets]


class Evaluation:
    """Everything the oracles need for the models of one structure (modelgen.VALUE_SETS seeds), computed on
    first use. Explanations: one compiled program per structure, run for each model; eager runs only where
    the oracle is about eager execution."""

    def __init__(self, index: int):
        self.structure = modelgen.generate_structure(index)
        self.models = [modelgen.generate(index * modelgen.VALUE_SETS + v) for v in range(modelgen.VALUE_SETS)]
        self.preset = PRESETS[index % len(PRESETS)]
        self.composites = ("lrp0", self.preset)
        self._results = {}

    @functools.cached_property
    def built(self) -> list:
        return [m.build() for m in self.models]

    @functools.cached_property
    def explainer(self):
        """jlrp.lrp with the preset, for the eager oracles"""
        return jlrp.lrp(self.built[0].fn, COMPOSITES[self.preset], argnums=self.built[0].argnums)

    @_once
    def explained(self) -> list:
        """per model: each composite's relevance and report closure, and input x gradient (piecewise-linear
        structures), from one compiled program"""
        # the models share the structure, so the first model's function serves every model's parameters;
        # explainers of its own: jlrp caches its plan per explainer, and these are first traced under jit
        # whatever ran before (so that no result depends on the order of the tests)
        fn, argnums = self.built[0].fn, self.built[0].argnums
        explainers = {name: jlrp.report(fn, COMPOSITES[name], argnums=argnums) for name in self.composites}

        def explain(args, target):
            results = {name: _balance(explain(*args, target=target)) for name, explain in explainers.items()}
            if self.structure.piecewise_linear:
                results["input_x_gradient"] = _input_x_gradient(fn, args, argnums, target)
            return results
        return _compile_and_run(explain, [(b.args, m.target) for b, m in zip(self.built, self.models)])

    @_once
    def eager_forward(self) -> tuple:
        """the first model's output and its preset transform's, eagerly (one model per structure: jlrp runs
        the same plan, hence the same operations, for every model of the structure)"""
        built = self.built[0]
        return np.asarray(built.fn(*built.args)), np.asarray(self.explainer.transformed(*built.args))

    @_once
    def twin(self) -> list:
        """per model: the relevance of its twin (scans unrolled, jitted blocks inlined), per composite"""
        twins = [m.build(unroll=True) for m in self.models]
        fn, argnums = twins[0].fn, twins[0].argnums
        explainers = {name: jlrp.lrp(fn, COMPOSITES[name], argnums=argnums) for name in self.composites}

        def explain(args, target):
            return {name: explain(*args, target=target) for name, explain in explainers.items()}
        return _compile_and_run(explain, [(t.args, m.target) for t, m in zip(twins, self.models)])

    @_once
    def jitted_forward(self) -> list:
        """per model: jax.jit(fn) and jax.jit of the preset's transform, with default compile options"""
        fn = self.built[0].fn
        # a transform of its own, first traced under jit whatever ran before (like the bundle's explainers)
        transformed = jax.jit(jlrp.transform(fn, COMPOSITES[self.preset], argnums=self.built[0].argnums))
        fn = jax.jit(fn)
        return [(np.asarray(fn(*b.args)), np.asarray(transformed(*b.args))) for b in self.built]

    @_once
    def eager_relevance(self) -> tuple:
        """the first model's relevance under the preset, eagerly"""
        return _leaves(self.explainer(*self.built[0].args, target=self.models[0].target))


@functools.lru_cache(maxsize=None)
def evaluation(index: int) -> Evaluation:
    return Evaluation(index)


def model_evaluation(seed: int) -> tuple[modelgen.Model, Evaluation, int]:
    """the model of ``seed``, its structure's evaluation and its position among the structure's models"""
    index, v = divmod(seed, modelgen.VALUE_SETS)
    ev = evaluation(index)
    return ev.models[v], ev, v


# --------------------------------------------------------------------------------------------------------
# Parametrisation: the models an oracle applies to, with readable ids; seeds past DEFAULT_MODELS are slow

def models(applies=lambda structure: True, first_of_structure: bool = False):
    """the seeds whose structure the oracle applies to (only the first model of each structure for the
    oracles that run eagerly: see Evaluation.eager_forward)"""
    params = []
    for seed in range(DEFAULT_MODELS + SLOW_MODELS):
        structure = modelgen.generate_structure(seed // modelgen.VALUE_SETS)
        if applies(structure) and not (first_of_structure and seed % modelgen.VALUE_SETS):
            params.append(pytest.param(seed, id=modelgen.model_id(seed),
                                       marks=pytest.mark.slow if seed >= DEFAULT_MODELS else ()))
    return params


def _max_abs(arrays) -> float:
    return max((float(np.max(np.abs(a))) if a.size else 0.0) for a in arrays)


def _relative_error(values, reference) -> float:
    """max |values - reference| over all inputs, relative to max |reference| (inf if the reference is all
    zero and the values are not)"""
    diff = _max_abs([np.asarray(v, np.float64) - np.asarray(r, np.float64) for v, r in zip(values, reference)])
    if diff == 0.0:
        return 0.0
    scale = _max_abs(reference)
    return diff / scale if scale > 0 else float("inf")


# --------------------------------------------------------------------------------------------------------
# 1. LRP-0 == input x gradient on piecewise-linear models

@pytest.mark.parametrize("seed", models(lambda s: s.piecewise_linear))
def test_lrp0_equals_input_x_gradient(seed):
    model, ev, v = model_evaluation(seed)
    relevance = _leaves(ev.explained[v]["lrp0"]["relevance"])
    reference = _leaves(ev.explained[v]["input_x_gradient"])
    errors = [_relative_error((r,), (g,)) for r, g in zip(relevance, reference)]
    assert max(errors) <= IXG_RTOL, (
        f"{model}: LRP-0 vs input x gradient, relative error per explained input {errors}; "
        f"sum R = {[float(r.sum()) for r in relevance]}, sum IxG = {[float(g.sum()) for g in reference]}")


# --------------------------------------------------------------------------------------------------------
# 2. The transformed forward is the model's forward, bit for bit

@pytest.mark.parametrize("seed", models(first_of_structure=True))
def test_forward_is_bit_identical_eagerly(seed):
    model, ev, _ = model_evaluation(seed)
    expected, out = ev.eager_forward
    assert np.array_equal(out, expected), (
        f"{model}: eager transform(fn, {ev.preset}) differs from eager fn, max |diff| "
        f"{float(np.max(np.abs(out - expected)))}")


@pytest.mark.parametrize("seed", models())
def test_forward_is_bit_identical_under_jit(seed):
    model, ev, v = model_evaluation(seed)
    expected, out = ev.jitted_forward[v]
    assert np.array_equal(out, expected), (
        f"{model}: jit(transform(fn, {ev.preset})) differs from jit(fn), max |diff| "
        f"{float(np.max(np.abs(out - expected)))}")


# --------------------------------------------------------------------------------------------------------
# 3. The report balances (float64 models)

@pytest.mark.parametrize("seed", models(lambda s: s.float64))
def test_report_balances(seed):
    model, ev, v = model_evaluation(seed)
    unbalanced = {name: (float(ev.explained[v][name]["closure"]), float(ev.explained[v][name]["initial"]))
                  for name in ev.composites
                  if not abs(ev.explained[v][name]["closure"]) < CLOSURE_RTOL * max(1.0, abs(ev.explained[v][name]["initial"]))}
    assert not unbalanced, f"{model}: report closure (closure, sum initial) per composite: {unbalanced}"


# --------------------------------------------------------------------------------------------------------
# 4. Finite relevance, bf16 casts, zero inputs and dead ReLUs included

@pytest.mark.parametrize("seed", models())
def test_relevance_is_finite(seed):
    model, ev, v = model_evaluation(seed)
    not_finite = [name for name in ev.composites
                  if not all(np.all(np.isfinite(r)) for r in _leaves(ev.explained[v][name]["relevance"]))]
    assert not not_finite, f"{model}: NaN or inf relevance under {not_finite}"


# --------------------------------------------------------------------------------------------------------
# 5. jit == eager

@pytest.mark.parametrize("seed", models(lambda s: s.float64 and s.index % JIT_EVERY == 0, first_of_structure=True))
def test_jit_relevance_equals_eager(seed):
    model, ev, v = model_evaluation(seed)
    error = _relative_error(_leaves(ev.explained[v][ev.preset]["relevance"]), ev.eager_relevance)
    assert error <= JIT_RTOL, f"{model}: jit vs eager relevance under {ev.preset}: relative error {error}"


# --------------------------------------------------------------------------------------------------------
# 6. Scanned and jitted blocks explain like their unrolled / inlined twin

@pytest.mark.parametrize("seed", models(lambda s: s.float64 and s.has_twin))
def test_model_explains_like_its_unrolled_twin(seed):
    model, ev, v = model_evaluation(seed)
    errors = {}
    for name in ev.composites:
        error = _relative_error(_leaves(ev.explained[v][name]["relevance"]), _leaves(ev.twin[v][name]))
        if not error <= TWIN_RTOL:
            errors[name] = error
    assert not errors, f"{model}: relative error against the unrolled / inlined twin per composite: {errors}"


# --------------------------------------------------------------------------------------------------------
# The oracles can fail, and the generator is what it says

def test_oracles_detect_wrong_explanations():
    """On a model with biases, LRP-epsilon is not input x gradient, the report's absorbed share is not zero
    (without it the closure would be off), and another composite's relevance is not the twin's."""
    index = next(s.index for s in map(modelgen.generate_structure, range(DEFAULT_MODELS // modelgen.VALUE_SETS))
                 if s.piecewise_linear and s.has_twin)
    ev = evaluation(index)
    model, built, explained = ev.models[0], ev.built[0], ev.explained[0]
    epsilon = jlrp.lrp(built.fn, jlrp.rules.epsilon(0.5), argnums=built.argnums)(*built.args, target=model.target)
    assert _relative_error(_leaves(epsilon), _leaves(explained["input_x_gradient"])) > 1e-3
    assert abs(explained[ev.preset]["absorbed"]) > 1e-3
    assert _relative_error(_leaves(explained["lrp0"]["relevance"]), _leaves(ev.twin[0][ev.preset])) > 1e-3


@pytest.mark.parametrize("seed", [0, 7] + [pytest.param(s, marks=pytest.mark.slow) for s in range(11, 400, 9)])
def test_generator_is_reproducible_and_families_compute_the_same_function(seed):
    """The same seed gives the same model, and every family (and every twin) computes the same function."""
    model, again = modelgen.generate(seed), modelgen.generate(seed)
    assert again.id == model.id and again.tags == model.tags
    assert all(np.array_equal(again.values[n][k], v[k]) for n, v in model.values.items() for k in v)
    assert np.array_equal(again.x, model.x) and np.array_equal(again.target, model.target)
    outputs = {}
    for family in modelgen.FAMILIES:
        structure = dataclasses.replace(model.structure, family=family)
        for unroll in (False, True):
            built = dataclasses.replace(model, structure=structure).build(unroll)
            outputs[family, unroll] = np.asarray(built.fn(*built.args))
    reference = outputs["jnp", False]
    tol = 1e-10 if model.structure.float64 else 2e-2
    for key, out in outputs.items():
        np.testing.assert_allclose(out, reference, rtol=tol, atol=tol * np.max(np.abs(reference)), err_msg=str(key))


def test_generated_models_cover_every_feature():
    """The default run covers every family, dimensionality, variant and feature of the generator."""
    tags = {tag for seed in range(DEFAULT_MODELS) for tag in modelgen.generate(seed).tags}
    wanted = {"jnp", "linen", "nnx", "equinox", "0d", "1d", "2d", "3d", "random", "dead", "zeros", "dense",
              "conv1d", "conv2d", "conv3d", "stride", "dilation", "groups", "kernel1", "kernel2", "padding-SAME",
              "padding-VALID", "padding-explicit", "explicit-pad", "maxpool", "avgpool", "residual",
              "concat-branches", "token-learned", "token-constant", "batchnorm", "batchnorm-before-conv",
              "norm-after-conv", "groupnorm", "layernorm", "scale-then-bias", "film", "broadcast-input", "scan",
              "jit", "bf16"}
    assert wanted <= tags, wanted - tags
