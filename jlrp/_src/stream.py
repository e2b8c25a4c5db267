"""Stream a dataset through an explain function, batch by batch, into memory or a ``.npy`` memmap on disk."""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


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
                    total: int | None = None, fixed_shape: bool = True) -> np.ndarray | np.memmap:
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
        ``tf.data``/``grain``/``torch`` loader, are fine.
      *args: the other positional arguments of ``explain_fn`` (e.g. ``params``), the same for every batch.
      argnum: the position of the batch among the positional arguments; default ``len(args)`` (after them, as
        in ``apply(params, x)``).
      out: optional path of a ``.npy`` file: results are written into it incrementally through
        ``np.lib.format.open_memmap`` and the returned array is a ``np.memmap`` on it (read it back later
        with ``np.load(out, mmap_mode='r')``). The file's size must be known up front: pass ``total``, or
        give ``batches`` a ``len()`` (number of batches), in which case ``len(batches) * first batch size``
        rows are reserved. Either way the file is trimmed to the samples actually seen (a warning is issued
        when an explicit ``total`` was too large); more samples than reserved is an error.
      shard: split every batch along its leading axis over all local devices
        (``NamedSharding(make_mesh((n,), ('batch',)), P('batch'))``; ``args`` are replicated); a batch whose
        size is not a multiple of ``n`` is padded (by repeating its last sample) and the padding is trimmed
        from the result.
      progress: show a tqdm progress bar (in samples).
      total: number of samples in the dataset (for the progress bar and the size of ``out``).
      fixed_shape: pad batches smaller than the first one (typically the last) to the first one's size so
        that ``explain_fn`` compiles only once; the padding is trimmed from the result. Needs per-sample
        independent explanations (true for models in eval mode).

    Returns:
      The relevance of all samples concatenated along axis 0: a ``np.ndarray``, or the ``np.memmap`` on ``out``.

    Raises:
      TypeError: ``explain_fn`` cannot be called as above (checked against its signature before the first
        batch), or its call on the first batch raised a ``TypeError`` or ``ValueError`` (typically: the batch
        landed where the parameters go because ``args`` were not passed); the message shows the call that was
        made, the original error is chained.

    The next batch is dispatched before the previous result is copied to the host, so loading, device
    compute and the host copy overlap.

    Multi-host: call ``jax.distributed.initialize()`` on every host, let each host stream *its own* part of
    the dataset (e.g. ``dataset[jax.process_index()::jax.process_count()]``) with ``shard=True`` (the mesh is
    built from ``jax.local_devices()`` only, so no cross-host communication is involved) and write its own
    file, e.g. ``out=f"relevance-{jax.process_index():05d}.npy"``; concatenate or index the files afterwards.
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
    if out is not None and total is None and n_batches is None:
        raise ValueError("explain_dataset(out=...) needs the number of samples: pass total=, or batches with a "
                         "len() (number of batches)")
    sharding = None
    if shard:
        devices = jax.local_devices()
        mesh = jax.make_mesh((len(devices),), ("batch",), devices=devices)
        sharding = NamedSharding(mesh, P("batch"))
        replicated = NamedSharding(mesh, P())
        args = jax.tree.map(lambda a: jax.device_put(a, replicated) if isinstance(a, (jax.Array, np.ndarray))
                            else a, args)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="sample", desc="explain")

    chunks: list[np.ndarray] = []
    result: np.ndarray | None = None
    state = {"written": 0, "capacity": total}

    def store(r: jax.Array, n: int) -> None:
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

    size = None  # the padded size of the first batch
    pending = None
    try:
        for batch in batches:
            x, target = _split(batch)
            x = x if hasattr(x, "shape") else np.asarray(x)
            n = x.shape[0]
            rows = _per_row(target, n)
            if rows and not hasattr(target, "shape"):
                target = np.asarray(target)
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
            call = (*args[:argnum], x, *args[argnum:])
            if pending is None:  # the first batch: explain a failed call
                try:
                    r = fn(*call, target=target)
                except (TypeError, ValueError) as e:  # wrong arguments: the batch in the wrong place, ...
                    raise TypeError(f"explain_dataset: {_call_text(args, argnum, x, target)} failed on the "
                                    f"first batch with {type(e).__name__}: {e}\n{_CONVENTION}") from e
            else:
                r = fn(*call, target=target)  # dispatched asynchronously
            if pending is not None:
                store(*pending)
            pending = (r, n)
        if pending is not None:
            store(*pending)
    finally:
        if bar is not None:
            bar.close()

    written = state["written"]
    if out is None:
        if not chunks:
            raise ValueError("explain_dataset: batches is empty")
        return np.concatenate(chunks)
    if result is None:
        raise ValueError("explain_dataset: batches is empty")
    result.flush()
    if written < state["capacity"]:
        if total is not None:
            warnings.warn(f"explain_dataset: total={total} but only {written} samples were seen; {out} is "
                          f"trimmed to {written}", stacklevel=2)
        del result
        _trim_npy(out, written)
        return np.load(out, mmap_mode="r+")
    return result
