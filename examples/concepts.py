"""Which concepts does a CNN use for each class? Concept Relevance Propagation on the synthetic shapes.

    python examples/concepts.py                       # writes into /tmp/jlrp-concepts (about a minute, 2 cores)
    python examples/concepts.py --out DIR --steps 300

1. Trains a small CNN (conv-relu x2, max pool, conv-relu, global average pool, dense) on
   :func:`jlrp.datasets.shapes` (a square, circle, triangle or cross decides the class; rings distract).
2. Per class, the channels of the last conv layer that carry the most relevance for that class (mean over the
   held-out images of the class, ``Conditional.concept_relevance``).
3. Relevance maximisation over the held-out images (:func:`jlrp.concepts.maximize`): the top-k reference
   examples of every channel, with the crop around its most relevant neuron and its conditional heatmap.
4. Prints, per class, its top concepts with their share of the layer's relevance and how many of their
   reference crops show that class's shape (against chance: the same crops on every image), and writes one
   concept atlas per class (``atlas-<class>.png``: a correctly classified image, its top concepts, their
   conditional heatmaps and reference crops) and ``references.npz`` into ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

import jlrp


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(4)(x.mean((1, 2)))


def train(model: CNN, data: jlrp.datasets.Dataset, steps: int, seed: int):
    params = jax.jit(model.init)(jax.random.key(seed), data.x[:1])
    opt = optax.adam(5e-3)

    @jax.jit
    def step(params, state, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()  # noqa: E731
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for idx in np.random.default_rng(seed).integers(0, len(data), (steps, 32)):
        params, state = step(params, state, data.x[idx], data.y[idx])
    return params


def shows_shape(box, i: int, cls: int, data: jlrp.datasets.Dataset) -> bool:
    """The crop is of an image of class ``cls``, at least a quarter of it is the deciding shape, and it holds
    more of the shape than of the distractor rings."""
    t, l, b, r = box
    on, off = data.mask[i, t:b, l:r].sum(), data.info["distractor_mask"][i, t:b, l:r].sum()
    return bool(data.y[i] == cls and on >= 0.25 * (b - t) * (r - l) and on > off)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/jlrp-concepts"), help="output folder")
    p.add_argument("--steps", type=int, default=600, help="training steps (adam, minibatches of 32)")
    p.add_argument("--size", type=int, default=24, help="image side")
    p.add_argument("--k", type=int, default=6, help="reference examples per concept")
    p.add_argument("--concepts", type=int, default=3, help="concepts per class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    train_set = jlrp.datasets.shapes(2048, size=args.size, seed=args.seed)
    test = jlrp.datasets.shapes(512, size=args.size, seed=args.seed + 1)
    model = CNN()
    params = train(model, train_set, args.steps, args.seed)
    predicted = np.asarray(jax.jit(model.apply)(params, test.x).argmax(-1))
    names = test.info["class_names"]
    print(f"held-out accuracy {np.mean(predicted == test.y):.3f}")

    cond = jlrp.concepts.conditional(model.apply, jlrp.composites.epsilon_plus_flat(), argnums=1)
    layer = jlrp.module_path("Conv_2")
    per = np.asarray(jax.jit(lambda p, x: cond.concept_relevance(p, x, layer=layer, target=test.y))(params, test.x))
    refs = jlrp.concepts.maximize(cond, test.batches(128), params, layer=layer, k=args.k, total=len(test))
    args.out.mkdir(parents=True, exist_ok=True)
    refs.save(args.out / "references.npz")

    summary = {}
    for cls, name in enumerate(names):
        mean = per[test.y == cls].mean(0)
        top = np.argsort(-mean)[:args.concepts]
        hits = [shows_shape(b, i, cls, test) for c in top for b, i in zip(refs.boxes[refs.row(c)],
                                                                           refs.indices[refs.row(c)])]
        chance = np.mean([shows_shape(b, j, cls, test) for c in top for b in refs.boxes[refs.row(c)]
                          for j in range(len(test))])
        shares = ", ".join(f"channel {c} ({mean[c] / mean.sum():+.0%})" for c in top)
        print(f"{name:9s} top concepts: {shares}; reference crops showing a {name}: {np.mean(hits):.0%} "
              f"(chance {chance:.0%})")
        right = np.flatnonzero((test.y == cls) & (predicted == cls))
        if right.size:
            picture = jlrp.concepts.atlas(cond, params, test.x[right[:1]], references=refs, target=cls,
                                          n_concepts=args.concepts, tile=64)
            jlrp.image.save_png(args.out / f"atlas-{name}.png", picture)
        summary[name] = {"concepts": top.tolist(), "rate": float(np.mean(hits)), "chance": float(chance)}
    print(f"written to {args.out}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
