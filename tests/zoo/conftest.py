"""The zoo's shared fixture: every selected model is built and checked once per test session.

The checks are dominated by XLA compiles (each primitive compiles once in eager mode; each jitted
explanation once), which are single-threaded: the session fixture therefore runs the models in
``JLRP_ZOO_WORKERS`` worker processes (default 2, one per core of the CI machine; spawned, never forked),
submitting them in test order, and each test waits for its model's results. ``JLRP_ZOO_WORKERS=0`` runs
everything in the test process instead (for debugging). Either way each model is built once per session,
with float32 JAX (``jax.enable_x64(False)`` around every build and check: the repository's test session
turns x64 on, which these libraries are not written for). A model whose library is not installed fails its
test (install the ``test`` extra): nothing is skipped.
"""
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras (also in the workers)

import pytest  # noqa: E402

import zoo_checks  # noqa: E402

TEST_NAME = "test_zoo_model"


def _selected_ids(session) -> list[str]:
    return [item.callspec.params["model_id"] for item in session.items
            if getattr(item, "originalname", None) == TEST_NAME and hasattr(item, "callspec")]


@pytest.fixture(scope="session")
def zoo_results(request):
    """``zoo_results(model_id) -> (build error or None, [zoo_checks.Check], seconds)``."""
    workers = int(os.environ.get("JLRP_ZOO_WORKERS", "2"))
    if workers <= 0:
        cache = {}

        def in_process(model_id):
            if model_id not in cache:
                cache[model_id] = zoo_checks.build_and_check(model_id)
            return cache[model_id]

        yield in_process
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = {}
    for model_id in _selected_ids(request.session):
        futures.setdefault(model_id, pool.submit(zoo_checks.build_and_check, model_id))

    def from_pool(model_id):
        if model_id not in futures:
            futures[model_id] = pool.submit(zoo_checks.build_and_check, model_id)
        return futures[model_id].result()

    yield from_pool
    pool.shutdown(wait=True, cancel_futures=True)
