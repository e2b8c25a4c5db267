"""Test-session setup.

Several test modules need float64 for their 1e-10 reference comparisons and enable it at import; since
pytest imports every module before running any test, x64 would otherwise be on or off depending on which
files are collected. Enabling it here makes a single file behave exactly like the whole suite. Tests that
check float32 / bfloat16 behaviour pass explicit dtypes.
"""
import jax

jax.config.update("jax_enable_x64", True)

# The model zoo (tests/zoo: Hugging Face, Keras, jimm, equimo, penzai, gemma models) needs the `zoo` extra
# (several GB with TensorFlow) and ~10 minutes: it runs on request, `JLRP_ZOO=1 python -m pytest tests/zoo`.
import os  # noqa: E402

collect_ignore = [] if os.environ.get("JLRP_ZOO") else ["zoo"]
