"""Stream a dataset through an explain function, batch by batch, into memory or a ``.npy`` memmap on disk."""
from __future__ import annotations

import inspect
import os
import warnings
import zlib
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _split(batch: Any) -> tuple[Any, Any]:
    """A batch is an array ``x``, or a tuple ``(x,)`` / ``(x, target)``."""
    if isinstance(batch, (tuple, list)):
        if not 1 <= len(batch) <= 2:
            raise ValueError(f"a batch must be an array or a tuple (x, target); got a tuple of {len(batch)}")
        return batch[0], (batch[1] if len(batch) == 2 else None)
    return batch, None


def _per_row(target: Any, n: int) -> bool:
    return target is not None and np.ndim(target) >= 1 and np.shape(target)[0] == n


def _pad(a: Any, size: int) -> Any:
    """Pad ``a`` along axis 0 to ``size`` rows by repeating its last row (results for the pad are dropped)."""
    k = size - a.shape[0]
    if k <= 0:
        return a
    xp = jnp if isinstance(a, jax.Array) else np
    return xp.concatenate([a, xp.repeat(a[-1:], k, axis=0)])


def _prepare(batch: Any) -> tuple[Any, Any, int, bool]:
    """``(x, target, n, per_row)`` of a batch; lists become NumPy arrays."""
    x, target = _split(batch)
    x = x if hasattr(x, "shape") else np.asarray(x)
    n = x.shape[0]
    rows = _per_row(target, n)
    if rows and not hasattr(target, "shape"):
        target = np.asarray(target)
    return x, target, n, rows


def _call(fn: Callable, args: tuple, argnum: int, x: Any, target: Any, first: bool) -> Any:
    """Dispatch ``fn`` on one batch; on the first batch a wrong call is explained."""
    call = (*args[:argnum], x, *args[argnum:])
    if not first:
        return fn(*call, target=target)  # dispatched asynchronously
    try:
        return fn(*call, target=target)
    except (TypeError, ValueError) as e:  # wrong arguments: the batch in the wrong place, ...
        raise TypeError(f"explain_dataset: {_call_text(args, argnum, x, target)} failed on the "
                        f"first batch with {type(e).__name__}: {e}\n{_CONVENTION}") from e


# The per-step exchange between processes (shard=True with jax.process_count() > 1): ints, then text.
_BATCH, _DONE, _ERROR = 0, 1, 2  # a process's status at a step
_TEXT = 1024  # bytes of text per process: its batch signature or its error message
_END = object()  # the end of an iterator


def _signature(x: Any, target: Any, rows: bool) -> str:
    """What must be equal on all processes for their batches to form one global batch."""
    def per_row(a: Any) -> str:
        return f"{np.dtype(a.dtype).name}[*{''.join(f', {d}' for d in a.shape[1:])}]"
    if rows:
        t = per_row(target)
    elif target is None:
        t = "None"
    else:  # one target for all rows: passed to every process's part of the program, so its value must agree
        a = np.asarray(target)
        t = f"{a.dtype.name}{list(a.shape)} crc32={zlib.crc32(a.tobytes()):08x}"
    return f"x={per_row(x)}, target={t}"


def _exchange(ints: list[int], text: str) -> tuple[np.ndarray, list[str]]:
    """All-gather every process's ``ints`` (rows of an int32 array) and ``text``: one small collective."""
    k = 4 * len(ints)
    raw = text.encode()
    if len(raw) > _TEXT:  # head and tail: the tail of an error from a compiled program holds its Python cause
        raw = raw[:300] + b" ... " + raw[-(_TEXT - 305):]
    buf = np.zeros(k + _TEXT, np.uint8)
    buf[:k] = np.asarray(ints, np.int32).view(np.uint8)
    buf[k:k + len(raw)] = np.frombuffer(raw, np.uint8)
    got = multihost_utils.process_allgather(buf)  # (processes, k + _TEXT)
    return (np.ascontiguousarray(got[:, :k]).view(np.int32),
            [bytes(row[k:]).rstrip(b"\0").decode(errors="replace") for row in got])


def _agree(ints: np.ndarray, texts: list[str], first: bool, error: Exception | None) -> None:
    """Raise, on every process alike, what the exchange of a step shows to be wrong on any process."""
    failed = [p for p in range(len(ints)) if ints[p, 0] == _ERROR]
    if failed:
        if error is not None:  # the process that failed raises its own error
            raise error
        raise RuntimeError("explain_dataset failed on " + "; ".join(f"process {p}: {texts[p]}" for p in failed))
    if first:
        empty = [p for p in range(len(ints)) if ints[p, 0] == _DONE]
        if len(empty) == len(ints):
            raise ValueError("explain_dataset: batches is empty on every process")
        if empty:  # its part of a global batch would be padding copied from its last batch, which it has not
            raise ValueError(f"explain_dataset: process(es) {empty} have no batches; with shard=True over "
                             f"{len(ints)} processes every process needs at least one batch")
        if len(set(ints[:, 5])) > 1:
            raise ValueError("explain_dataset: out= must be given on every process or on none (process 0 "
                             "writes the file)")
        if ints[0, 5] and ((ints[:, 3] < 0) & (ints[:, 4] < 0)).any():
            raise ValueError("explain_dataset(out=...) needs the number of samples on every process: pass "
                             "total= (the samples of this process's batches), or batches with a len()")
    if len(set(texts)) > 1:
        raise ValueError("explain_dataset: the processes' batches form one global batch, so their per-row shape, "
                         "dtype and target kind must agree (a process without more batches shows its last one): "
                         + "; ".join(f"process {p}: {t}" for p, t in enumerate(texts)))


def _trim_npy(path: str | os.PathLike, rows: int) -> None:
    """Shrink a ``.npy`` file's leading axis to ``rows`` in place: rewrite the header, truncate the data.

    numpy pads ``.npy`` headers so that the leading dimension can change without moving the data.
    """
    with open(path, "r+b") as f:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise RuntimeError(f"cannot trim {path}: .npy format version {version}")
        read, write = ((fmt.read_array_header_1_0, fmt.write_array_header_1_0) if version == (1, 0) else
                       (fmt.read_array_header_2_0, fmt.write_array_header_2_0))
        shape, fortran, dtype = read(f)
        offset = f.tell()
        header = {"descr": fmt.dtype_to_descr(dtype), "fortran_order": fortran,
                  "shape": (rows,) + tuple(shape[1:])}
        f.seek(0)
        write(f, header)
        if f.tell() != offset:  # cannot happen with numpy's padding; guard against a corrupt file anyway
            raise RuntimeError(f"could not rewrite the header of {path} in place")
        f.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def _describe(a: Any) -> str:
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return f"{getattr(a.dtype, 'name', a.dtype)}{list(a.shape)}"
    if a is None:
        return "None"
    leaves = jax.tree.leaves(a)
    return f"{type(a).__name__} ({len(leaves)} leaves)" if leaves else type(a).__name__


def _call_text(args: tuple, argnum: int, x: Any, target: Any) -> str:
    shown = [_describe(a) for a in args]
    shown.insert(argnum, f"x={_describe(x)}")
    return f"explain_fn({', '.join(shown)}, target={_describe(target)})"


_CONVENTION = ("explain_dataset calls explain_fn(*args[:argnum], x, *args[argnum:], target=target), the calling "
               "convention of every jlrp method: pass the model's other arguments after `batches`, e.g. "
               "explain_dataset(explain, batches, params) for explain = jlrp.lrp(model.apply, composite, "
               "argnums=1), or a closure: explain_dataset(lambda x, target: explain(params, x, target=target), "
               "batches)")


def _check_signature(fn: Callable, args: tuple, argnum: int) -> None:
    """Raise a clear TypeError when ``fn`` cannot be called the way explain_dataset calls it."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, some C callables: nothing to check up front
        return
    positional = list(args)
    positional.insert(argnum, "x")
    try:
        sig.bind(*positional, target=None)
    except TypeError as e:
        raise TypeError(f"explain_dataset: explain_fn{sig} cannot be called with {len(positional)} positional "
                        f"argument(s) and target=...: {e}. {_CONVENTION}") from None


def explain_dataset(explain_fn: Callable[..., jax.Array], batches: Iterable, *args: Any, argnum: int | None = None,
                    out: str | os.PathLike | None = None, shard: bool = False, progress: bool = True,
                    total: int | None = None, fixed_shape: bool = True) -> np.ndarray | np.memmap | None:
    """Explain every sample of ``batches`` and gather the relevance on the host (or on disk).

    Every batch ``x`` is explained by the call ``explain_fn(*args[:argnum], x, *args[argnum:], target=target)``:
    the calling convention of every jlrp method, so an explanation is passed as it is, with the model's other
    arguments (typically the parameters) after ``batches``::

        explain = jlrp.lrp(model.apply, jlrp.composites.epsilon_plus_flat(), argnums=1)
        relevance = jlrp.explain_dataset(jax.jit(explain), batches, params, out="relevance.npy", total=n)

    Args:
      explain_fn: called as above; returns relevance with ``relevance.shape[0] == x.shape[0]``. A function
        that is not already jitted is wrapped with ``jax.jit`` (jit's cache is reused per shape). A closure
        ``lambda x, target: explain(params, x, target=target)`` with no ``args`` works too.
      batches: an iterable of arrays ``x`` or tuples ``(x, target)`` (``target``: None, an int, or one class
        per row); ``target=None`` (batches without targets) explains the argmax. NumPy arrays, e.g. from a
        ``tf.data``/``grain``/``torch`` loader, are fine. With several processes: this process's batches.
      *args: the other positional arguments of ``explain_fn`` (e.g. ``params``), the same for every batch.
      argnum: the position of the batch among the positional arguments; default ``len(args)`` (after them, as
        in ``apply(params, x)``).
      out: optional path of a ``.npy`` file: results are written into it incrementally through
        ``np.lib.format.open_memmap`` and the returned array is a ``np.memmap`` on it (read it back later
        with ``np.load(out, mmap_mode='r')``). The file's size must be known up front: pass ``total``, or
        give ``batches`` a ``len()`` (number of batches), in which case ``len(batches) * first batch size``
        rows are reserved. Either way the file is trimmed to the samples actually seen (a warning is issued
        when an explicit ``total`` was too large); more samples than reserved is an error.
      shard: split every batch along its leading axis over all devices, ``jax.devices()``
        (``NamedSharding(mesh, P('batch'))`` on a 1-D mesh; ``args`` are replicated); a batch whose size is not
        a multiple of the number of devices is padded (by repeating its last sample) and the padding is
        trimmed from the result. With one process these are the local devices; with several processes
        (``jax.distributed``), see below.
      progress: show a tqdm progress bar (in samples; with several processes on process 0 only).
      total: number of samples in ``batches`` (for the progress bar and the size of ``out``).
      fixed_shape: pad batches smaller than the first one (typically the last) to the first one's size so
        that ``explain_fn`` compiles only once; the padding is trimmed from the result. Needs per-sample
        independent explanations (true for models in eval mode).

    Returns:
      The relevance of all samples concatenated along axis 0: a ``np.ndarray``, or the ``np.memmap`` on ``out``;
      with several processes and ``out``, None on every process but process 0.

    Raises:
      TypeError: ``explain_fn`` cannot be called as above (checked against its signature before the first
        batch), or its call on the first batch raised a ``TypeError`` or ``ValueError`` (typically: the batch
        landed where the parameters go because ``args`` were not passed); the message shows the call that was
        made, the original error is chained.
      ValueError: with several processes, also when their batches do not agree (per-row shape, dtype, target
        kind), a process has no batches, or ``out`` is given on some processes only.
      RuntimeError: with several processes, on the other processes when one fails (reading its batches,
        writing ``out``, ...): the message names the process and its error, which that process raises itself.

    The next batch is dispatched before the previous result is copied to the host, so loading, device
    compute and the host copy overlap.

    Several processes: with ``shard=True`` and ``jax.process_count() > 1`` (after ``jax.distributed.initialize()``)
    all processes work as one. Call ``explain_dataset`` on every process with the same ``explain_fn`` and
    ``args`` and *its own* part of the data; at every step each process contributes its next batch to one
    global batch over all devices of all processes (``jax.make_array_from_process_local_data``; process ``p``'s
    rows follow process ``p - 1``'s). The result is gathered in that order, step by step: step 0's batches of
    processes 0, 1, ..., then step 1's, ... So a list of batches dealt out round-robin,
    ``batches[jax.process_index()::jax.process_count()]``, comes back in the list's order; for another split
    reorder the rows yourself. Without ``out`` every process returns the whole result; with ``out`` process 0
    writes it (``total`` and ``len(batches)`` count each process's own samples and batches; the file holds their
    sum) and the other processes return None. The shards may be uneven: every step starts with a small
    all-gather of each process's batch size and signature (or "no more batches", or its error), so a process
    that has run out keeps taking part with padding rows until all have, and an error on one process is raised
    on all instead of leaving the others waiting in a collective. Every process needs at least one batch.
    Without ``shard`` each process streams its own batches independently, as with one process (give each
    process its own ``out``).
    """
    if not callable(explain_fn):
        raise TypeError(f"explain_dataset: explain_fn must be callable, got {type(explain_fn).__name__}. "
                        f"{_CONVENTION}")
    argnum = len(args) if argnum is None else argnum
    if isinstance(argnum, bool) or not isinstance(argnum, int) or not 0 <= argnum <= len(args):
        raise ValueError(f"explain_dataset: argnum must be an int in [0, {len(args)}] (the batch's position "
                         f"among {len(args)} other positional argument(s)), got {argnum!r}")
    _check_signature(explain_fn, args, argnum)
    fn = explain_fn if isinstance(explain_fn, jax.stages.Wrapped) else jax.jit(explain_fn)
    if total is None and hasattr(batches, "__len__"):
        n_batches = len(batches)  # type: ignore[arg-type]
    else:
        n_batches = None
    multi = shard and jax.process_count() > 1
    if out is not None and total is None and n_batches is None and not multi:  # multi: checked on all processes
        raise ValueError("explain_dataset(out=...) needs the number of samples: pass total=, or batches with a "
                         "len() (number of batches)")
    sharding = None
    if shard:
        if multi:  # ordered by process: process p's rows of a global batch follow process p - 1's
            devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
            mesh = Mesh(np.array(devices), ("batch",))
        else:
            devices = jax.local_devices()
            mesh = jax.make_mesh((len(devices),), ("batch",), devices=devices)
        sharding = NamedSharding(mesh, P("batch"))
        replicated = NamedSharding(mesh, P())
        args = jax.tree.map(lambda a: jax.device_put(a, replicated) if isinstance(a, (jax.Array, np.ndarray))
                            else a, args)

    bar = None
    if progress and not (multi and jax.process_index() != 0):
        from tqdm.auto import tqdm
        bar = tqdm(total=None if multi else total, unit="sample", desc="explain")

    chunks: list[np.ndarray] = []
    result: np.ndarray | None = None
    state = {"written": 0, "capacity": total, "exact": total is not None}  # exact: capacity from total=

    def store(r: Any, n: int) -> None:
        nonlocal result
        r = np.asarray(r)[:n]  # blocks on the device computation
        if out is None:
            chunks.append(r)
        else:
            if result is None:
                if state["capacity"] is None:  # inferred from len(batches) x the first batch size
                    state["capacity"] = n_batches * n
                result = np.lib.format.open_memmap(out, mode="w+", dtype=r.dtype,
                                                   shape=(state["capacity"],) + r.shape[1:])
            w = state["written"]
            if w + n > state["capacity"]:
                raise ValueError(f"more samples than the {state['capacity']} reserved in {out}: pass total= "
                                 f"(the number of samples)")
            result[w:w + n] = r
        state["written"] += n
        if bar is not None:
            bar.update(n)

    def run_local() -> None:
        size = None  # the padded size of the first batch
        pending = None
        for batch in batches:
            x, target, n, rows = _prepare(batch)
            padded = n
            if sharding is not None:
                padded = -(-n // len(sharding.device_set)) * len(sharding.device_set)
            if fixed_shape:
                size = padded if size is None else size
                padded = max(padded, size)
            if padded != n:
                x = _pad(x, padded)
                target = _pad(target, padded) if rows else target
            if sharding is not None:
                x = jax.device_put(x, sharding)
                if rows:
                    target = jax.device_put(target, sharding)
            r = _call(fn, args, argnum, x, target, first=pending is None)
            if pending is not None:
                store(*pending)
            pending = (r, n)
        if pending is not None:
            store(*pending)

    def run_global() -> None:
        """Several processes: every process runs the same collectives in the same order (see the docstring)."""
        me = jax.process_index()
        per_process = len(sharding.device_set) // jax.process_count()
        it = iter(batches)
        last = None  # this process's last (x, target, per_row, signature): its padding once it has run out
        exhausted = False
        error: Exception | None = None  # raised at the next exchange, on all processes
        size = None  # the first step's per-process size
        pending = None  # (the previous step's relevance, every process's rows in it, per-process size)
        step = 0
        while True:
            status, n, padded = _DONE, 0, 0
            if error is None and not exhausted:
                try:
                    batch = next(it, _END)
                    if batch is _END:
                        exhausted = True
                    else:
                        x, target, n, rows = _prepare(batch)
                        last = (np.asarray(x), np.asarray(target) if rows else target, rows,
                                _signature(x, target, rows))
                        status, padded = _BATCH, -(-n // per_process) * per_process
                except Exception as e:  # reported to the other processes, then raised
                    error = e
            text = f"{type(error).__name__}: {error}" if error is not None else (last[3] if last else "")
            ints, texts = _exchange([_ERROR if error is not None else status, n, padded,
                                     -1 if total is None else total, -1 if n_batches is None else n_batches,
                                     out is not None], text)
            _agree(ints, texts, step == 0, error)
            if step == 0:  # process 0's file holds all processes' samples
                state["capacity"] = int(sum(t if t >= 0 else nb * n0 for t, nb, n0 in ints[:, [3, 4, 1]].tolist()))
                state["exact"] = bool((ints[:, 3] >= 0).all())
                if bar is not None and state["exact"]:
                    bar.total = state["capacity"]
                    bar.refresh()
            running = bool((ints[:, 0] == _BATCH).any())
            if not running and pending is None:
                return
            r = None  # this step's relevance
            if running:
                local = int(ints[:, 2].max())
                if fixed_shape:
                    size = local if size is None else size
                    local = max(local, size)
                x, target, rows, _ = last
                x = jax.make_array_from_process_local_data(sharding, _pad(x[:local], local))
                if rows:
                    target = jax.make_array_from_process_local_data(sharding, _pad(target[:local], local))
                try:
                    r = _call(fn, args, argnum, x, target, first=step == 0)
                except Exception as e:  # raised at the next exchange, on all processes: an error of one
                    error = error or e  # process (jlrp's target check runs on process 0 only) must not strand the rest
            if pending is not None:
                prev, counts, k = pending
                try:
                    jax.block_until_ready(prev)
                except Exception as e:  # this process's part failed (asynchronously): raised at the
                    error = error or e  # next exchange; meanwhile it takes part in the gather with zeros
                    prev = jax.make_array_from_callback(prev.shape, prev.sharding,
                                                        lambda i, a=prev: np.zeros(a.shape, a.dtype)[i])
                everything = multihost_utils.process_allgather(prev, tiled=True)  # on every process
                try:
                    if out is None or me == 0:
                        store(np.concatenate([everything[p * k:p * k + c] for p, c in enumerate(counts)]),
                              int(counts.sum()))
                except Exception as e:  # e.g. out not writable: raised at the next exchange
                    error = error or e
            pending = (r, ints[:, 1].copy(), local) if running else None
            step += 1

    try:
        (run_global if multi else run_local)()
    finally:
        if bar is not None:
            bar.close()

    if multi and out is not None and jax.process_index() != 0:
        return None
    written = state["written"]
    if out is None:
        if not chunks:
            raise ValueError("explain_dataset: batches is empty")
        return np.concatenate(chunks)
    if result is None:
        raise ValueError("explain_dataset: batches is empty")
    result.flush()
    if written < state["capacity"]:
        if state["exact"]:
            given = f"the processes' total= add up to {state['capacity']}" if multi else f"total={total}"
            warnings.warn(f"explain_dataset: {given} but only {written} samples were seen; {out} is "
                          f"trimmed to {written}", stacklevel=2)
        del result
        _trim_npy(out, written)
        return np.load(out, mmap_mode="r+")
    return result

