"""AttnLRP and CP-LRP against ``jax.grad`` on decoder LMs: a GPT-2-small-shaped and a Llama-shaped model.

    python benchmarks/transformer_speed.py [--layers 12] [--batch 8] [--seq 128,512] [--runs 3] [--out DIR]

Random float32 weights. GPT-2 small: 12 layers, width 768, 12 heads, MLP 3072 (GELU), LayerNorm, learned
positions, biases, vocabulary 50257 (tied head). Llama-shaped at the same width: 12 layers, 12 query heads
sharing 4 key/value heads (GQA), rotary positions, RMSNorm, SwiGLU MLP 2048, no biases, vocabulary 32000.
Both explain the next token at the last position; the input is the token embedding's output (so jax.grad has a
float input to differentiate; LRP reads token relevance there too).

For each model and sequence length: trace + lower + compile each method (compile time), read the executable's
memory (temp + output bytes, ``compiled.memory_analysis()``), then time the methods round-robin (median of
>= ``--runs`` calls after a warm-up). Ratios are to ``jax.grad`` of the target logits w.r.t. the input.
Targets (issue 12): time <= 1.15x, memory <= 1.3x. Results go to ``--out`` (outside the repository).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlrp  # noqa: E402
from run import _load, compile_method, machine_info, output_dir, time_methods, write_results  # noqa: E402

TIME_TARGET, MEMORY_TARGET = 1.15, 1.3


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    width: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    llama: bool  # RMSNorm, SwiGLU, rotary, no biases (else LayerNorm, GELU, learned positions, biases)


SHAPES = {"gpt2-small": Shape("gpt2-small", 12, 768, 12, 12, 3072, 50257, False),
          "llama": Shape("llama", 12, 768, 12, 4, 2048, 32000, True)}


def init(s: Shape, seq: int, seed: int = 0):
    keys = iter(jax.random.split(jax.random.key(seed), 16 * s.layers + 8))
    n = lambda *shape: 0.02 * jax.random.normal(next(keys), shape, jnp.float32)
    hd = s.width // s.heads
    block = lambda: {"wq": n(s.width, s.heads * hd), "wk": n(s.width, s.kv_heads * hd),
                     "wv": n(s.width, s.kv_heads * hd), "wo": n(s.heads * hd, s.width), "w1": n(s.width, s.mlp),
                     "w2": n(s.mlp, s.width), "g1": 1 + n(s.width), "g2": 1 + n(s.width),
                     **({"wu": n(s.width, s.mlp)} if s.llama else {
                         "b1": n(s.width), "b2": n(s.width), "bq": n(s.heads * hd), "bk": n(s.kv_heads * hd),
                         "bv": n(s.kv_heads * hd), "bo": n(s.width), "c1": n(s.mlp), "c2": n(s.width)})}
    p = {"blocks": [block() for _ in range(s.layers)], "g": 1 + n(s.width), "head": n(s.width, s.vocab)}
    if not s.llama:
        p |= {"b": n(s.width), "pos": n(seq, s.width)}
    return p


def model(s: Shape):
    """``f(params, x) -> next-token logits (B, vocab)`` from the token embedding's output x (B, T, width)."""
    hd, group = s.width // s.heads, s.heads // s.kv_heads

    def norm(x, g, b=None):
        if s.llama:
            return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g
        c = x - x.mean(-1, keepdims=True)
        return c * jax.lax.rsqrt((c * c).mean(-1, keepdims=True) + 1e-5) * g + b

    def rope(x):  # (B, T, heads, hd)
        t = x.shape[1]
        freq = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
        angle = np.arange(t)[:, None] * freq[None]
        cos, sin = (np.concatenate([f(angle)] * 2, -1)[:, None].astype(np.float32) for f in (np.cos, np.sin))
        rot = jnp.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rot * sin

    def dense(x, w, b=None):
        return x @ w if b is None else x @ w + b

    def apply(p, x):
        b_, t = x.shape[:2]
        if not s.llama:
            x = x + p["pos"]
        mask = np.tril(np.ones((t, t), bool))
        for w in p["blocks"]:
            h = norm(x, w["g1"], w.get("b1"))
            q = dense(h, w["wq"], w.get("bq")).reshape(b_, t, s.heads, hd)
            k = dense(h, w["wk"], w.get("bk")).reshape(b_, t, s.kv_heads, hd)
            v = dense(h, w["wv"], w.get("bv")).reshape(b_, t, s.kv_heads, hd)
            if s.llama:
                q, k = rope(q), rope(k)
            q = q.reshape(b_, t, s.kv_heads, group, hd)
            scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / np.sqrt(hd).astype(np.float32)
            a = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), -1)
            o = jnp.einsum("bkgts,bskd->btkgd", a, v).reshape(b_, t, s.width)
            x = x + dense(o, w["wo"], w.get("bo"))
            h = norm(x, w["g2"], w.get("b2"))
            if s.llama:
                m = jax.nn.silu(h @ w["w1"]) * (h @ w["wu"])
            else:
                m = jax.nn.gelu(dense(h, w["w1"], w["c1"]))
            x = x + dense(m, w["w2"], w.get("c2"))
        return norm(x[:, -1], p["g"], p.get("b")) @ p["head"]

    return apply


def methods(apply):
    grad = lambda p, x, t: jax.grad(lambda x: jnp.take_along_axis(apply(p, x), t[:, None], 1).sum())(x)
    out = {"jax.grad": grad}
    for name, comp in (("attnlrp", jlrp.composites.attnlrp()), ("cp_lrp", jlrp.composites.cp_lrp())):
        explain = jlrp.lrp(apply, comp, argnums=1)
        out[name] = lambda p, x, t, e=explain: e(p, x, target=t)
    return out


def _ratio(a, b):
    return None if a is None or b is None else a / b


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-small,llama")
    ap.add_argument("--layers", type=int, default=None, help="override the number of blocks (default: 12)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", default="128,512", help="comma-separated sequence lengths")
    ap.add_argument("--runs", type=int, default=3, help="timed calls per method (median), after a warm-up")
    ap.add_argument("--out", default=None, help="results folder outside the repository")
    a = ap.parse_args(argv)
    folder = output_dir(a.out)
    start, load0 = time.perf_counter(), _load()
    rows = []
    for name in a.models.split(","):
        shape = SHAPES[name] if a.layers is None else dataclasses.replace(SHAPES[name], layers=a.layers)
        for seq in map(int, a.seq.split(",")):
            p = init(shape, seq)
            x = 0.5 * jax.random.normal(jax.random.key(1), (a.batch, seq, shape.width), jnp.float32)
            target = jnp.arange(a.batch, dtype=jnp.int32) * 7 % shape.vocab
            args = (p, x, target)
            compiled, res = {}, {}
            for method, fn in methods(model(shape)).items():
                compiled[method], row = compile_method(name, a.batch, method, fn, args)
                res[method] = {"compile_s": row.compile_s, "memory": row.memory}
            for method, ts in time_methods(compiled, args, a.runs, fill=0.0).items():
                res[method] |= {"ms": 1e3 * statistics.median(ts), "runs": len(ts)}
            g = res["jax.grad"]
            for method, r in res.items():
                rows.append({"model": name, "layers": shape.layers, "seq": seq, "batch": a.batch, "method": method,
                             **r, "time_x": _ratio(r["ms"], g["ms"]), "memory_x": _ratio(r["memory"], g["memory"]),
                             "compile_x": _ratio(r["compile_s"], g["compile_s"])})
                print(f"[{time.perf_counter() - start:6.0f}s] {name} L={shape.layers} T={seq} {method:9s} "
                      f"{r['ms']:9.1f} ms ({rows[-1]['time_x']:.2f}x)  memory {rows[-1]['memory_x']:.2f}x  "
                      f"compile {r['compile_s']:.1f} s", file=sys.stderr, flush=True)
            del compiled, args, p, x
            jax.clear_caches()

    lines = ["# AttnLRP / CP-LRP vs jax.grad on decoder LMs", "", machine_info(), "",
             f"Load average (1, 5, 15 min): {load0} at start, {_load()} at end; wall "
             f"{time.perf_counter() - start:.0f} s; batch {a.batch}, medians of >= {a.runs} calls. Targets: time <= "
             f"{TIME_TARGET}x, memory <= {MEMORY_TARGET}x jax.grad.", "",
             "| model | layers | seq | method | ms | time / grad | memory MB | memory / grad | compile s "
             "| compile / grad |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ok = lambda v, lim: "" if r["method"] == "jax.grad" or v is None else (" ✓" if v <= lim else " ✗")
        lines.append(f"| {r['model']} | {r['layers']} | {r['seq']} | {r['method']} | {r['ms']:.1f} | "
                     f"{r['time_x']:.2f}{ok(r['time_x'], TIME_TARGET)} | {r['memory'] / 2 ** 20:.0f} | "
                     f"{r['memory_x']:.2f}{ok(r['memory_x'], MEMORY_TARGET)} | {r['compile_s']:.1f} | "
                     f"{r['compile_x']:.2f} |")
    text = "\n".join(lines) + "\n"
    return write_results(folder / "transformer_speed.md", text, rows)


if __name__ == "__main__":
    main()
