"""explain_dataset over 2 processes (jax.distributed on one machine, CPU collectives through gloo, 2 forced host
devices per process: 4 global devices) with uneven shards equals the single-process result, in memory and
written to one .npy by process 0; bad input is the same clear error on both processes, never a hang."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

import jlrp

N, FEATURES, CLASSES = 19, 10, 3


def mlp(params, x):
    return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def setup():
    """The explanation, float32 params (the same in every process), the data and its batches of 3:
    3, 3, 3, 3, 3, 3, 1 rows."""
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(FEATURES, 16)), "b1": 0.1 * rng.normal(size=16),
              "w2": rng.normal(size=(16, CLASSES)), "b2": 0.1 * rng.normal(size=CLASSES)}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    t = (np.arange(N) % CLASSES).astype(np.int32)
    batches = [(x[i:i + 3], t[i:i + 3]) for i in range(0, N, 3)]
    return jlrp.lrp(mlp, jlrp.composites.epsilon_plus_flat(), argnums=1), params, batches


WORKER = textwrap.dedent("""
    import json, sys
    import jax
    process, port, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # default in jax 0.10, explicit anyway
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)
    sys.path.insert(0, %r)
    import numpy as np
    from test_distributed import setup
    from jlrp import explain_dataset
    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    explain, params, batches = setup()
    fn = jax.jit(explain)
    report = {}

    def run(name, mine, *args, **kw):
        try:
            r = explain_dataset(fn, mine, *args, shard=True, **{"progress": False, **kw})
            report[name] = None if r is None else "array"
            if r is not None:
                np.save(f"{tmp}/{name}-{process}.npy", np.asarray(r))
        except Exception as e:
            report[name] = f"{type(e).__name__}: {e}"

    # round-robin: process 0 has 4 batches (the last of 1 row), process 1 has 3
    run("memory", batches[process::2], params)
    # contiguous: process 0 has 2 batches, process 1 has 5 (the last of 1 row); process 0 writes the file
    run("file", batches[:2] if process == 0 else batches[2:], params, out=f"{tmp}/relevance.npy", progress=True)
    # one target for all rows, and every step at its own size: the last step pads process 0's batch of 1 row
    # to 2 (its 2 devices) and cuts the padding of process 1, which has run out, to 2
    run("loose", [(x, 1) for x, _ in batches[process::2]], params, fixed_shape=False)
    # bad input: per-row shapes that differ, a process without batches, a file process 0 cannot write,
    # the params forgotten (fails on every process), a target out of range on process 1's second batch only
    # (jlrp's check, a jax.debug.callback, runs on process 0 only: its error must reach process 1)
    x, t = batches[0]
    run("shapes", [(x, t)] if process == 0 else [(x[:, :5], t)], params)
    run("empty", batches[process::2] if process == 0 else [], params)
    run("unwritable", batches[process::2], params, out=f"{tmp}/no-such-dir/relevance.npy")
    run("no-params", batches[process::2])
    mine = batches[process::2]
    if process == 1:
        mine[1] = (mine[1][0], mine[1][1] + 7)
    run("target", mine, params)
    with open(f"{tmp}/report-{process}.json", "w") as f:
        json.dump(report, f)
""") % os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path, timeout=120):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = []
    try:
        for i, p in enumerate(procs):
            stdout, stderr = p.communicate(timeout=timeout)
            logs.append(f"--- process {i} (exit {p.returncode}) ---\n{stdout}\n{stderr[-4000:]}")
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [f"--- process {i} ---\n{p.communicate()[1][-4000:]}" for i, p in enumerate(procs)]
        raise AssertionError(f"the 2 processes did not finish within {timeout} s\n" + "\n".join(logs)) from None
    log = "\n".join(logs)
    assert all(p.returncode == 0 for p in procs), log
    return [json.loads((tmp_path / f"report-{i}.json").read_text()) for i in range(2)], log


def test_two_processes_equal_one(tmp_path):
    explain, params, batches = setup()
    reference = jlrp.explain_dataset(jax.jit(explain), batches, params, progress=False)  # one process
    assert reference.shape == (N, FEATURES) and np.abs(reference).sum() > 0
    (r0, r1), log = _run_two_processes(tmp_path)

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=log)

    # round-robin batches come back in the list's order, on both processes
    assert r0["memory"] == r1["memory"] == "array", log
    for i in range(2):
        close(np.load(tmp_path / f"memory-{i}.npy"), reference)
    loose = jlrp.explain_dataset(jax.jit(explain), [(x, 1) for x, _ in batches], params, progress=False)
    assert r0["loose"] == r1["loose"] == "array", log
    for i in range(2):
        close(np.load(tmp_path / f"loose-{i}.npy"), loose)
    # contiguous split: steps interleave the processes' batches (process 0's then process 1's at every step)
    assert r0["file"] == "array" and r1["file"] is None, log
    rows = np.split(np.arange(N), np.arange(3, N, 3))  # the rows of every batch
    p0, p1 = rows[:2], rows[2:]
    order = np.concatenate(p0[:1] + p1[:1] + p0[1:2] + p1[1:])
    close(np.load(tmp_path / "relevance.npy"), reference[order])
    # bad input: the same clear error on both processes
    for r in (r0, r1):
        assert r["shapes"].startswith("ValueError") and "x=float32[*, 10]" in r["shapes"] \
            and "x=float32[*, 5]" in r["shapes"], log
        assert r["empty"].startswith("ValueError: explain_dataset: process(es) [1] have no batches"), log
        assert r["no-params"].startswith("TypeError: explain_dataset: explain_fn(x=float32[8, 10], "
                                         "target=int32[8]) failed on the first batch"), log  # the global batch
    assert r0["unwritable"].startswith("FileNotFoundError"), log
    assert r1["unwritable"].startswith("RuntimeError: explain_dataset failed on process 0: FileNotFoundError"), log
    assert "out of range" in r0["target"] and "out of range" in r1["target"], log
    assert r1["target"].startswith("RuntimeError: explain_dataset failed on process 0"), log
