"""Word-level explanations of two sentiment classifiers on synthetic text (``jlrp.datasets.text``).

Two models are trained on token ids whose label is decided by a few sentiment words:

* a text CNN: embedding -> 1-D conv over the sequence (kernel 3) -> relu -> global max pool over time -> dense;
* an MLP over the mean-pooled word embeddings.

Each is explained per word with three methods (Hechtlinger 2016; Bach et al. 2015):

* ``gradient``: the L2 norm over the embedding axis of d logit / d embedded sequence;
* ``input_x_gradient``: embedding * gradient, summed over the embedding axis;
* ``lrp``: LRP-epsilon on every dense/conv layer, explaining the token ids directly; jlrp reads the
  relevance at the embedding output and sums it over the embedding axis.

Integer ids have no gradient, so the gradient methods explain the *embedded* sequence: each model is
written as ``embed(ids)`` followed by ``body(embedded)``. A faithful explanation should put most of the
positive relevance for the predicted class on the sentiment words, far above their share of tokens.

Two things to expect: for these ReLU networks LRP-epsilon with a tiny epsilon coincides with input x
gradient (each layer's z_ij / z_j R_j reduces to x_i times the gradient), and mean pooling hands every
position the same gradient, so the plain gradient of the MLP cannot single out any word.

    python examples/text_classification.py --seed 0 --steps 600
"""
from __future__ import annotations

import argparse
import functools
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlrp

METHODS = ("gradient", "input_x_gradient", "lrp")
POSITIVE_WORDS = ("good", "great", "superb", "lovely")
NEGATIVE_WORDS = ("bad", "awful", "poor", "dull")


class TextCNN(nn.Module):
    """Embedding -> Conv1D(kernel 3) -> relu -> global max pool over time -> dense logits."""
    vocab: int
    dim: int = 16
    features: int = 64
    classes: int = 2

    def setup(self):
        self.embedding = nn.Embed(self.vocab, self.dim)
        self.conv = nn.Conv(self.features, (3,))  # 'SAME' padding: one output per position
        self.out = nn.Dense(self.classes)

    def embed(self, ids):
        return self.embedding(ids)

    def body(self, e):
        """Logits from an embedded sequence ``(N, T, dim)``."""
        return self.out(nn.relu(self.conv(e)).max(axis=1))

    def __call__(self, ids):
        return self.body(self.embed(ids))


class MeanMLP(nn.Module):
    """Embedding -> mean over the sequence -> dense -> relu -> dense logits (a bag of embeddings)."""
    vocab: int
    dim: int = 16
    hidden: int = 32
    classes: int = 2

    def setup(self):
        self.embedding = nn.Embed(self.vocab, self.dim)
        self.hidden_layer = nn.Dense(self.hidden)
        self.out = nn.Dense(self.classes)

    def embed(self, ids):
        return self.embedding(ids)

    def body(self, e):
        """Logits from an embedded sequence ``(N, T, dim)``."""
        return self.out(nn.relu(self.hidden_layer(e.mean(axis=1))))

    def __call__(self, ids):
        return self.body(self.embed(ids))


def load_data(seed: int = 0, n_train: int = 4000, n_test: int = 1000, seq_len: int = 16, vocab: int = 50):
    """Train and test splits of ``jlrp.datasets.text`` with disjoint seeds."""
    return (jlrp.datasets.text(n_train, seq_len, vocab, seed=2 * seed),
            jlrp.datasets.text(n_test, seq_len, vocab, seed=2 * seed + 1))


def train(model: nn.Module, data, steps: int = 600, seed: int = 0, lr: float = 1e-2, batch: int = 128):
    """Fit ``model`` with Adam on softmax cross-entropy; return its params."""
    params = model.init(jax.random.key(seed), data.x[:1])
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(data), batch)
        params, state = step(params, state, data.x[idx], data.y[idx])
    return params


def train_text_cnn(data, steps: int = 600, seed: int = 0):
    """Train a :class:`TextCNN` on ``data``; return ``(model, params)``."""
    model = TextCNN(data.info["vocab"])
    return model, train(model, data, steps, seed)


def train_mlp(data, steps: int = 600, seed: int = 0):
    """Train a :class:`MeanMLP` on ``data``; return ``(model, params)``."""
    model = MeanMLP(data.info["vocab"])
    return model, train(model, data, steps, seed)


def accuracy(model: nn.Module, params, data) -> float:
    return float((model.apply(params, data.x).argmax(-1) == data.y).mean())


@functools.cache
def explainer(model: nn.Module, method: str) -> Callable:
    """A jitted ``explain(params, ids, target=None) -> (N, T)`` per-word relevance for ``method``.

    Cached per (model, method): eager LRP dispatches every op of the rewritten backward pass one by one,
    which is several times slower than compiling it once.
    """
    if method == "lrp":
        # jlrp explains integer ids directly: relevance at the embedding output, summed over its axis.
        return jax.jit(jlrp.lrp(model.apply, jlrp.rules.epsilon(), argnums=1))
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")

    def body(params, e):
        return model.apply(params, e, method=model.body)

    attribute = (jlrp.gradient if method == "gradient" else jlrp.input_x_gradient)(body, argnums=1)

    @jax.jit
    def explain(params, ids, target=None):
        # ids have no gradient: differentiate body w.r.t. the embedded sequence, then reduce per word;
        # a gradient is a sign-free sensitivity (norm), input x gradient a signed contribution (sum)
        r = attribute(params, model.apply(params, ids, method=model.embed), target=target)
        return jnp.linalg.norm(r, axis=-1) if method == "gradient" else r.sum(-1)

    return explain


def word_relevance(method: str, model: nn.Module, params, ids, target=None) -> jax.Array:
    """Per-word relevance ``(N, T)`` for ``target`` (None: the predicted class) with one of ``METHODS``."""
    return explainer(model, method)(params, ids, target=target)


def positive_share(relevance, mask) -> float:
    """Share of the positive relevance (over the whole batch) that falls on the ``mask`` positions."""
    pos = np.maximum(np.asarray(relevance), 0.0)
    return float((pos * mask).sum() / pos.sum())


def word_names(vocab: int) -> list[str]:
    """A readable word for every id: 0 pad, 1-4 positive, 5-8 negative, the rest filler ``w09``...."""
    return ["<pad>", *POSITIVE_WORDS, *NEGATIVE_WORDS] + [f"w{i:02d}" for i in range(9, vocab)]


def render(ids, relevance, vocab: int) -> str:
    """One sentence as ``word(+0.12)`` tokens, scores normalised by the largest absolute score."""
    names = word_names(vocab)
    r = np.asarray(relevance, np.float64)
    r = r / (np.abs(r).max() + 1e-12)
    return " ".join(f"{names[int(i)]}({s:+.2f})" for i, s in zip(np.asarray(ids), r))


def evaluate(model: nn.Module, params, data) -> dict[str, float]:
    """Positive-relevance share on the sentiment words per method (the predicted class explained)."""
    return {m: positive_share(word_relevance(m, model, params, data.x), data.mask) for m in METHODS}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)

    train_data, test = load_data(args.seed)
    token_share = float(test.mask.mean())
    for name, fit in (("text CNN", train_text_cnn), ("mean-embedding MLP", train_mlp)):
        t0 = time.perf_counter()
        model, params = fit(train_data, args.steps, args.seed)
        print(f"\n== {name}: test accuracy {accuracy(model, params, test):.3f} "
              f"(trained in {time.perf_counter() - t0:.1f} s)")
        print(f"sentiment words are {token_share:.1%} of the tokens; share of positive relevance on them:")
        for method, share in evaluate(model, params, test).items():
            print(f"  {method:17s} {share:6.1%}  ({share / token_share:.1f}x the token share)")
        ids = test.x[:1]
        pred = int(model.apply(params, ids).argmax(-1)[0])
        print(f"example (label {test.info['class_names'][int(test.y[0])]}, "
              f"predicted {test.info['class_names'][pred]}):")
        for method in METHODS:
            print(f"  {method:17s} {render(ids[0], word_relevance(method, model, params, ids)[0], test.info['vocab'])}")


if __name__ == "__main__":
    main()
