"""explain_dataset: streamed == one big batch (unsharded, sharded over 4 host devices), memmap == in memory;
the README's call (an explanation plus its other arguments) works, a wrong signature is a clear error."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jlrp
from jlrp._src.stream import explain_dataset


from test_api import CNN  # the same small CNN as the API contract tests


def _setup(n=19, full=False):
    """An explain function ``(x, target=) -> relevance`` with params closed over, and a dataset of n samples
    (``full``: also the explanation ``explain(params, x, target=)`` and its params)."""
    model = CNN()
    x = np.asarray(jax.random.normal(jax.random.key(0), (n, 6, 6, 1)))
    params = model.init(jax.random.key(1), x[:1])
    explain = jlrp.lrp(model.apply, jlrp.composites.epsilon_plus_flat(), argnums=1)
    targets = np.arange(n) % 3
    fn = lambda x, target: explain(params, x, target=target)  # noqa: E731
    return (fn, x, targets, explain, params) if full else (fn, x, targets)


def _batches(x, t, size=8):  # 19 samples -> 8, 8, 3: the last batch is smaller
    return [(x[i:i + size], t[i:i + size]) for i in range(0, len(x), size)]


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


def test_stream_equals_one_batch_and_compiles_once():
    fn, x, t = _setup()
    traces = []

    def counted(x, target):
        traces.append(x.shape)
        return fn(x, target)

    big = jax.jit(fn)(x, t)
    r = explain_dataset(counted, _batches(x, t), progress=False)
    assert type(r) is np.ndarray and r.shape == x.shape
    _close(r, big)
    assert traces == [(8, 6, 6, 1)]  # the last batch is padded to the first one's size: one compilation
    r2 = explain_dataset(jax.jit(counted), _batches(x, t), progress=False, fixed_shape=False)
    _close(r2, big)
    # arrays without targets: the argmax is explained
    _close(explain_dataset(fn, [x[:10], x[10:]], progress=False), jax.jit(fn)(x, None))


def test_memmap_equals_in_memory(tmp_path):
    fn, x, t = _setup()
    mem = explain_dataset(fn, _batches(x, t), progress=False)
    # total inferred from len(batches) * first batch size (24), then trimmed to 19
    disk = explain_dataset(fn, _batches(x, t), out=tmp_path / "a.npy", progress=True)
    assert isinstance(disk, np.memmap)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), mem)
    assert os.path.getsize(tmp_path / "a.npy") == 128 + mem.nbytes
    # a generator with an explicit total
    disk = explain_dataset(fn, iter(_batches(x, t)), out=tmp_path / "b.npy", total=len(x), progress=False)
    np.testing.assert_array_equal(disk, mem)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy", mmap_mode="r"), mem)
    with pytest.warns(UserWarning, match="trimmed"):  # an explicit total that is too large
        disk = explain_dataset(fn, _batches(x, t), out=tmp_path / "e.npy", total=30, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), mem)
    with pytest.raises(ValueError, match="total="):
        explain_dataset(fn, iter(_batches(x, t)), out=tmp_path / "c.npy", progress=False)
    with pytest.raises(ValueError, match="more samples"):
        explain_dataset(fn, _batches(x, t), out=tmp_path / "d.npy", total=10, progress=False)


def test_sharded_stream_equals_one_batch():
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import sys; sys.path.insert(0, %r)
        import jax, numpy as np
        from test_stream import _setup, _batches, _close
        from jlrp._src.stream import explain_dataset
        assert len(jax.devices()) == 4, jax.devices()
        fn, x, t = _setup()
        seen = []

        def spy(x, target):
            jax.debug.inspect_array_sharding(x, callback=lambda s: seen.append(len(s.device_set)))
            return fn(x, target)

        big = jax.jit(fn)(x, t)
        for fixed in (True, False):  # without fixed_shape the last batch (3) is padded to 4 only
            seen.clear()
            r = explain_dataset(spy, _batches(x, t, size=6), shard=True, progress=False, fixed_shape=fixed)
            assert r.shape == x.shape
            _close(r, big)
            assert seen and set(seen) == {4}, seen
        # the README's call: the explanation itself, its params after the batches (replicated), sharded batches
        _, _, _, explain, params = _setup(full=True)
        r = explain_dataset(jax.jit(explain), _batches(x, t, size=6), params, shard=True, progress=False)
        _close(r, big)
        print("SHARDED-OK")
    """) % os.path.dirname(__file__)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "SHARDED-OK" in proc.stdout, proc.stdout + proc.stderr


def test_readme_call_explanation_with_its_arguments(tmp_path):
    """README: ``explain_dataset(jax.jit(explain), batches, params, out=..., total=n)`` for a jlrp explanation."""
    fn, x, t, explain, params = _setup(full=True)
    big = jax.jit(fn)(x, t)
    r = jlrp.explain_dataset(jax.jit(explain), _batches(x, t), params, out=tmp_path / "r.npy", total=len(x),
                             progress=False)
    _close(r, big)
    _close(np.load(tmp_path / "r.npy"), big)
    # the batch elsewhere than last: argnum
    r = explain_dataset(lambda x, p, target: explain(p, x, target=target), _batches(x, t), params, argnum=0,
                        progress=False)
    _close(r, big)
    # batches without targets: target=None (the argmax)
    _close(explain_dataset(explain, [x[:10], x[10:]], params, progress=False), jax.jit(fn)(x, None))


def test_wrong_signature_is_a_clear_error():
    fn, x, t, explain, params = _setup(full=True)
    # the failure of issue 15: the parameters were not passed, so the batch lands where they go
    with pytest.raises(TypeError, match=r"failed on the first batch.*\n.*pass the model's other arguments") as e:
        explain_dataset(explain, _batches(x, t), progress=False)
    assert "x=float64[8, 6, 6, 1]" in str(e.value) and "target=int64[8]" in str(e.value)
    # a function that does not take target= (the old (x, t) convention), checked before any batch
    with pytest.raises(TypeError, match=r"cannot be called with 1 positional argument\(s\) and target=") as e:
        explain_dataset(lambda x, t: fn(x, t), _batches(x, t), progress=False)
    assert "explain_fn(*args[:argnum], x, *args[argnum:], target=target)" in str(e.value)
    # too many arguments for the function's signature
    with pytest.raises(TypeError, match="cannot be called with 2 positional"):
        explain_dataset(fn, _batches(x, t), params, progress=False)
    with pytest.raises(TypeError, match="must be callable"):
        explain_dataset(None, _batches(x, t), progress=False)
    with pytest.raises(ValueError, match="argnum"):
        explain_dataset(explain, _batches(x, t), params, argnum=2, progress=False)
