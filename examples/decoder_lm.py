"""Next-token explanations of a small decoder LM with AttnLRP and CP-LRP, written as token heatmaps.

The model is a Llama-style decoder in plain JAX (RMSNorm, rotary positions, grouped-query causal attention,
SwiGLU MLPs), trained for next-token prediction on the embedded synthetic text (``jlrp.datasets.text``): each
sequence of words is followed by a verdict token, " positive" or " negative", decided by the sentiment words
in it (the other words are random filler, so the verdict is the one predictable token).

After training it explains the verdict the model predicts at the last position:

* ``attnlrp``: AttnLRP (``jlrp.composites.attnlrp()``), the softmax's own rule and the uniform product rule;
* ``cp_lrp``: CP-LRP (``jlrp.composites.cp_lrp()``), attention weights and gates held constant;
* ``contrastive``: AttnLRP of " positive" versus " negative" (the initial relevance ``logits * (e_a - e_b)``);

writes them as HTML and PNG token heatmaps, reports how much of the positive relevance falls on the sentiment
words (their share of the tokens is far lower), and lists the most relevant units of the residual stream.

    python examples/decoder_lm.py OUT_DIR [--steps 400] [--seed 0]
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlrp

WORDS = ["<pad>", "good", "great", "superb", "lovely", "bad", "awful", "poor", "dull"]
SEQ, VOCAB_WORDS, DIM, HEADS, KV_HEADS, MLP, LAYERS = 12, 40, 32, 4, 2, 64, 2
POSITIVE, NEGATIVE = VOCAB_WORDS, VOCAB_WORDS + 1  # the verdict tokens
VOCAB = VOCAB_WORDS + 2


def token_strings(ids) -> list[str]:
    names = WORDS + [f"w{i}" for i in range(len(WORDS), VOCAB_WORDS)] + ["positive", "negative"]
    return ["Ġ" + names[int(i)] for i in ids]  # byte-level BPE style: every token starts a word


def data(n: int, seed: int):
    """Token ids (n, SEQ + 1): the words and the verdict; labels; masks of the sentiment words."""
    d = jlrp.datasets.text(n, seq_len=SEQ, vocab=VOCAB_WORDS, seed=seed)
    verdict = np.where(d.y == 1, POSITIVE, NEGATIVE)
    return np.concatenate([d.x, verdict[:, None]], 1).astype(np.int32), d.y, d.mask


def init(key):
    hd = DIM // HEADS
    k = iter(jax.random.split(key, 8 * LAYERS + 4))
    n = lambda *s: jax.random.normal(next(k), s) / np.sqrt(s[0])
    block = lambda: {"norm1": jnp.ones(DIM), "wq": n(DIM, HEADS * hd), "wk": n(DIM, KV_HEADS * hd),
                     "wv": n(DIM, KV_HEADS * hd), "wo": n(HEADS * hd, DIM), "norm2": jnp.ones(DIM),
                     "gate": n(DIM, MLP), "up": n(DIM, MLP), "down": n(MLP, DIM)}
    return {"embed": n(VOCAB, DIM), "blocks": [block() for _ in range(LAYERS)], "norm": jnp.ones(DIM),
            "head": n(DIM, VOCAB)}


def rms_norm(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def rope(x):  # (B, T, heads, hd)
    hd, t = x.shape[-1], x.shape[1]
    angle = np.arange(t)[:, None] / 10000 ** (np.arange(0, hd, 2) / hd)[None]
    cos, sin = (np.concatenate([f(angle)] * 2, -1)[:, None].astype(np.float32) for f in (np.cos, np.sin))
    return x * cos + jnp.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin


def decoder(params, ids):
    """Logits (B, T, VOCAB) for every position."""
    b, t = ids.shape
    hd, group = DIM // HEADS, HEADS // KV_HEADS
    x = params["embed"][ids]
    causal = np.tril(np.ones((t, t), bool))
    for w in params["blocks"]:
        h = rms_norm(x, w["norm1"])
        q = rope((h @ w["wq"]).reshape(b, t, HEADS, hd))
        k = rope((h @ w["wk"]).reshape(b, t, KV_HEADS, hd))
        v = (h @ w["wv"]).reshape(b, t, KV_HEADS, hd)
        k, v = jnp.repeat(k, group, 2), jnp.repeat(v, group, 2)  # grouped-query attention
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
        attention = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), -1)
        x = x + jnp.einsum("bhts,bshd->bthd", attention, v).reshape(b, t, DIM) @ w["wo"]
        h = rms_norm(x, w["norm2"])
        x = x + (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]
    return rms_norm(x, params["norm"]) @ params["head"]


def next_token(params, ids):
    """The explained function: logits of the next token after ``ids`` (B, VOCAB)."""
    return decoder(params, ids)[:, -1]


def train(params, ids, steps: int, seed: int):
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state, batch):
        def loss(p):
            logits = decoder(p, batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state, rng = opt.init(params), np.random.default_rng(seed)
    for i in range(steps):
        params, state, value = step(params, state, jnp.asarray(ids[rng.integers(0, len(ids), 64)]))
        if i % 100 == 0 or i == steps - 1:
            print(f"step {i:4d}  next-token loss {float(value):.3f}")
    return params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder for the heatmaps")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=6, help="held-out sequences to draw")
    a = ap.parse_args(argv)
    out = Path(a.out)

    train_ids, _, _ = data(2048, a.seed)
    test_ids, labels, masks = data(256, a.seed + 1)
    params = train(init(jax.random.key(a.seed)), train_ids, a.steps, a.seed)
    prompts = jnp.asarray(test_ids[:, :-1])  # the words; the model predicts the verdict
    logits = jax.jit(next_token)(params, prompts)
    predicted = np.asarray(logits.argmax(-1))
    accuracy = float(np.mean(predicted == test_ids[:, -1]))
    print(f"held-out verdict accuracy: {accuracy:.3f} (chance 0.5)")

    explain = {name: jax.jit(jlrp.lrp(next_token, composite, argnums=1))
               for name, composite in (("attnlrp", jlrp.composites.attnlrp()), ("cp_lrp", jlrp.composites.cp_lrp()))}
    relevance = {name: np.asarray(e(params, prompts, target=predicted)) for name, e in explain.items()}
    contrast = jax.nn.one_hot(POSITIVE, VOCAB) - jax.nn.one_hot(NEGATIVE, VOCAB)  # ' positive' vs ' negative'
    relevance["contrastive"] = np.asarray(explain["attnlrp"](params, prompts, relevance=logits * contrast))

    share = masks.mean()
    for name, r in relevance.items():
        positive = np.maximum(r, 0)
        mass = float((positive * masks).sum() / positive.sum())
        print(f"{name:12s} positive relevance on sentiment words: {mass:.2f} (their share of tokens: {share:.2f})")

    # latent attribution from the same pass: the residual-stream units that mattered most for each verdict
    report = jax.jit(jlrp.report(next_token, jlrp.composites.attnlrp(), argnums=1))(params, prompts,
                                                                                    target=predicted)
    stream = [layer for layer in report.layers if layer.info.kind == "add"][-1]
    _, values, units = jlrp.composites.top_units(stream.relevance, 3)
    for i in range(3):
        print(f"sequence {i} ({'positive' if labels[i] else 'negative'}): top residual units "
              f"{np.asarray(units[i]).tolist()} with relevance " + ", ".join(f"{v:.3f}" for v in np.asarray(values[i])))

    texts = [token_strings(row) for row in test_ids[:a.show, :-1]]
    for name, r in relevance.items():
        title = {"contrastive": "AttnLRP: ' positive' vs ' negative'"}.get(
            name, f"{name}: why the predicted verdict")
        rows = r[:a.show]
        jlrp.image.save_token_html(out / f"{name}.html", texts, rows, title=title)
        jlrp.image.save_token_png(out / f"{name}.png", texts, rows, title=title)
        print(f"written: {out / (name + '.html')} and .png")
    return accuracy, relevance, masks


if __name__ == "__main__":
    main()
