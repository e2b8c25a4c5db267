"""Every model of the zoo (tests/zoo/zoo_models.py) explained by jlrp: see zoo_checks.py for the checks.

One test per model. All of a model's checks run; the test fails listing every failed check with its
measured error or exception. The Keras applications (16-90 s to build each) are marked slow
(``pytest -m slow tests/zoo``); two small Keras models of the same layers run by default.
"""
import pytest

import zoo_checks
import zoo_models

PARAMS = [pytest.param(model_id, marks=[pytest.mark.slow] if spec.slow else [], id=model_id)
          for model_id, spec in zoo_models.BY_ID.items()]


@pytest.mark.parametrize("model_id", PARAMS)
def test_zoo_model(zoo_results, model_id):
    build_error, results, seconds = zoo_results(model_id)
    if build_error is not None:  # a model that cannot be built is a failure, never a skip
        pytest.fail(f"{model_id}: could not build the model: {build_error}", pytrace=False)
    failed = [c for c in results if not c.ok]
    if failed:
        pytest.fail(f"{model_id}: {len(failed)} of {len(results)} checks failed ({seconds:.0f} s):\n"
                    + zoo_checks.summary(results), pytrace=False)
