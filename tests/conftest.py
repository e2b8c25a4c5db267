"""Test-session setup.

Several test modules need float64 for their 1e-10 reference comparisons and enable it at import; since
pytest imports every module before running any test, x64 would otherwise be on or off depending on which
files are collected. Enabling it here makes a single file behave exactly like the whole suite. Tests that
check float32 / bfloat16 behaviour pass explicit dtypes.
"""
import os

# XLA's backend (LLVM) optimisation level 0 for the whole suite: compiling is most of its time, and level 0
# compiles about a quarter faster. It changes only machine-code optimisation; the HLO passes (fusion, layout),
# which decide whether two programs round alike, are unaffected, so the bit-identity tests keep their meaning.
# Benchmarks and the demo run at XLA's default. Subprocesses inherit the flag unless they set XLA_FLAGS.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

# The model zoo (tests/zoo: Hugging Face, Keras, jimm, equimo, penzai, gemma models; the `test` extra installs
# them) runs one or two models per family by default; `JLRP_ZOO=1 python -m pytest -n0 tests/zoo` runs all.
