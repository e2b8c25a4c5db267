"""Every model of the zoo (tests/zoo/zoo_models.py) explained by jlrp: see zoo_checks.py for the checks.

One test per model. All of a model's checks run; the test fails listing every failed check with its
measured error or exception. The Keras applications (16-90 s to build each) are marked slow
(``pytest -m slow tests/zoo``); two small Keras models of the same layers run by default.

The repository's default test run (CI) checks one or two models of every family, ``IN_EVERY_RUN``: the whole
zoo takes ~11 minutes on 2 cores (most of it compiling each operation of the eager explanations), the suite
is meant to stay near 15. ``JLRP_ZOO=1`` selects every model.
"""
import os

import pytest

import zoo_checks
import zoo_models

# per family the models that cost least while covering what only a real library shows: its own calling
# convention, parameter containers and layer spellings (each 13-70 s of single-core time)
IN_EVERY_RUN = (
    "transformers-distilbert",  # Flax linen transformer, token ids, attention masks
    "transformers-resnet",      # Flax linen CNN with batch norm: LRP-0 == input x gradient
    "keras-mini-relu-cnn",      # Keras 3 stateless_call: conv, batch norm, pooling; LRP-0 == input x gradient
    "jimm-clip-text",           # Flax NNX under an explicit mesh (reshard), token ids placed on the mesh
    "equimo-vit-registers",     # Equinox ViT with register tokens
    "penzai-llama",             # penzai named axes: token ids not the leading embedding axes
    "gemma-gemma3-f32",         # gemma library: positions computed from the ids carry no relevance
)
ALL = bool(os.environ.get("JLRP_ZOO"))

PARAMS = [pytest.param(model_id, marks=[pytest.mark.slow] if spec.slow else [], id=model_id)
          for model_id, spec in zoo_models.BY_ID.items() if ALL or model_id in IN_EVERY_RUN]


@pytest.mark.parametrize("model_id", PARAMS)
def test_zoo_model(zoo_results, model_id):
    build_error, results, seconds = zoo_results(model_id)
    if build_error is not None:  # a model that cannot be built is a failure, never a skip
        pytest.fail(f"{model_id}: could not build the model: {build_error}", pytrace=False)
    failed = [c for c in results if not c.ok]
    if failed:
        pytest.fail(f"{model_id}: {len(failed)} of {len(results)} checks failed ({seconds:.0f} s):\n"
                    + zoo_checks.summary(results), pytrace=False)
