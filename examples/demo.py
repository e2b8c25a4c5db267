"""jlrp showcase: train a small CNN, explain it with LRP and gradient methods, and measure the explanations.

    python examples/demo.py                      # about a minute on 2 CPU cores
    python examples/demo.py --quick --out /tmp/q  # tiny settings (used by the tests)

What it does:

1. Trains a small CNN (conv-relu-conv-relu-maxpool-conv-relu-global average pool-dense, flax.linen + optax
   adam) on :func:`jlrp.datasets.shapes`: 32x32 images holding one class-deciding shape (square, circle,
   triangle, cross) among class-neutral distractor rings, with a ground-truth mask of the deciding shape.
2. Explains the first ``--batch-size`` *correctly classified* held-out images for their label with every
   method in :data:`METHODS` (gradient, input x gradient, Integrated Gradients, LRP-epsilon, three LRP
   composites and a random baseline).
3. Scores each explanation by region perturbation (MoRF and LeRF AOPC, Samek et al. 2017), by
   localisation against the mask (relevance mass / rank accuracy, Arras et al. 2022) and by the model
   randomisation sanity check (rank correlation with the explanation of a model whose parameters were all
   redrawn, Adebayo et al. 2018: high means the map ignores what the model learned); then, with
   :func:`jlrp.evaluation.evaluate`, by one or two metrics of every category of docs/evaluation.md
   (faithfulness, robustness, localisation, complexity, randomisation, axiomatic) as a second table; and
   writes ``heatmaps.png``, ``curves.png``, ``results.md`` and ``metrics.csv`` into ``--out``.
4. Checks the claims the README makes (PASS/FAIL, with the numbers): on this model and seed, the MoRF AOPC
   of every LRP composite beats the gradient's, which beats random order; and the relevance mass accuracy
   of every LRP composite is more than twice the mask's area fraction (what random relevance scores).

Adding a method is one entry in :data:`METHODS`: a column label and a function that builds an
``explain(x, y) -> relevance`` from the trained model (:class:`Context`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlrp

Array = jax.Array
Explain = Callable[[Array, Array], Array]  # (x, labels) -> relevance shaped like x


# ------------------------------------------------------------------------------------------------------
# model and training
# ------------------------------------------------------------------------------------------------------

class CNN(nn.Module):
    """conv-relu-conv-relu-maxpool-conv-relu-global average pool-dense.

    Global average pooling (rather than flatten) makes the classifier translation-invariant, which suits
    shapes at random positions and keeps the dense layer small.
    """
    num_classes: int
    width: int = 8  # channels 8-16-16: trains in well under a minute on 2 CPU cores, > 99 % accuracy

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def train(model: CNN, x: np.ndarray, y: np.ndarray, *, steps: int, batch: int, lr: float, seed: int):
    """Adam on the softmax cross-entropy, ``steps`` minibatches of ``batch`` images (reshuffled each epoch)."""
    params = model.init(jax.random.key(seed), jnp.asarray(x[:1]))
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = model.apply(p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(len(x)), 0
    for _ in range(steps):
        if pos + batch > len(x):  # new epoch: reshuffle, and never a short batch (one compiled shape)
            order, pos = rng.permutation(len(x)), 0
        idx = order[pos:pos + batch]
        pos += batch
        params, opt_state, _ = step(params, opt_state, x[idx], y[idx])
    return params


def predict(model: CNN, params: Any, x: np.ndarray, chunk: int = 500) -> np.ndarray:
    """Predicted classes, in chunks so that large held-out sets stay small in memory."""
    apply = jax.jit(model.apply)
    return np.concatenate([np.asarray(apply(params, x[i:i + chunk]).argmax(-1)) for i in range(0, len(x), chunk)])


# ------------------------------------------------------------------------------------------------------
# explanation methods: the extension point
# ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Context:
    """Everything a method may need to build its explain function.

    ``train_x`` is there for methods that learn from data (e.g. PatternAttribution's signal estimators);
    ``low``/``high`` bound the input values (for the z^B rule of the first layer).
    """
    model: CNN
    params: Any
    train_x: np.ndarray
    low: float
    high: float
    seed: int
    ig_steps: int

    def logits(self, x: Array) -> Array:
        return self.model.apply(self.params, x)

    def lrp(self, composite: Any) -> Explain:
        """LRP with ``composite``, explaining ``x`` (argument 1 of ``model.apply(params, x)``)."""
        explain = jlrp.lrp(self.model.apply, composite, argnums=1)
        return lambda x, y: explain(self.params, x, target=y)


@dataclasses.dataclass(frozen=True)
class Method:
    """A column of the results: a short label and a builder from the trained model.

    Labels must fit above a 128 px heatmap tile; they use hyphens rather than spaces, which PIL's default
    font draws so narrow that words run together. ``composite`` marks the LRP composites that the README's
    claims are about.
    """
    label: str
    build: Callable[[Context], Explain]
    composite: bool = False


def _random(c: Context) -> Explain:
    """Uniform random relevance in [0, 1): ranks regions in random order; scores the chance level."""
    key = jax.random.key(c.seed)
    return lambda x, y: jax.random.uniform(key, x.shape, x.dtype)


def _attribution(method: Callable, **options: Any) -> Callable[[Context], Explain]:
    """A builder for a gradient-family method of ``jlrp`` (target = the label)."""
    def build(c: Context) -> Explain:
        explain = method(c.logits, **options)
        return lambda x, y: explain(x, target=y)
    return build


def _integrated_gradients(c: Context) -> Explain:
    # baseline 0: the (noise-free) background of shapes, and the mean of the standardised fields
    explain = jlrp.integrated_gradients(c.logits, steps=c.ig_steps, baseline=0.0)
    return lambda x, y: explain(x, target=y)


def _pattern_attribution(c: Context) -> Explain:
    """PatternAttribution (Kindermans et al. 2017): two-component signal patterns fitted on the training
    images with one streaming pass, then the backward pass with weights replaced by W * a+."""
    batches = (c.train_x[i:i + 500] for i in range(0, len(c.train_x), 500))
    patterns = jlrp.patterns.fit(c.model.apply, (c.params, c.train_x[:1]), batches, argnums=1)
    explain = jlrp.patterns.patternattribution(c.model.apply, patterns, argnums=1)
    return lambda x, y: explain(c.params, x, target=y)


#: name (as used by ``--methods``) -> Method. Insertion order is the column order of the outputs.
#: To add a method, add one entry.
METHODS: dict[str, Method] = {
    "gradient": Method("gradient", _attribution(jlrp.gradient)),
    "input_x_gradient": Method("input*grad", _attribution(jlrp.input_x_gradient)),
    "integrated_gradients": Method("integr-grad", _integrated_gradients),
    "lrp_epsilon": Method("LRP-eps-0.25", lambda c: c.lrp(jlrp.rules.epsilon(0.25))),
    "epsilon_plus_flat": Method("eps-plus-flat", lambda c: c.lrp(jlrp.composites.epsilon_plus_flat()),
                                composite=True),
    "epsilon_gamma_box": Method("eps-gamma-box",
                                lambda c: c.lrp(jlrp.composites.epsilon_gamma_box(c.low, c.high)),
                                composite=True),
    "alpha2_beta1": Method("eps-a2-b1", lambda c: c.lrp(jlrp.composites.epsilon_alpha2_beta1()),
                           composite=True),
    "pattern_attribution": Method("PatternAttr", _pattern_attribution),
    "random": Method("random", _random),
}


# ------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------

def load(dataset: str, n: int, seed: int) -> jlrp.datasets.Dataset:
    """``n`` 32x32 images of ``dataset`` (NHWC, one channel) with their ground-truth masks."""
    if dataset == "shapes":
        return jlrp.datasets.shapes(n, size=32, seed=seed)
    if dataset == "fields":
        return jlrp.datasets.fields(n, size=32, seed=seed)
    raise ValueError(f"unknown dataset {dataset!r}")


# ------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------

def evaluate(logits: Callable, x: Array, y: Array, mask: np.ndarray, relevance: Array, *, region: int,
             baseline: str) -> dict[str, Any]:
    """Perturbation curves and localisation scores of one method on the explained batch (means over images).

    Localisation is averaged over images whose mask is not empty (in ``fields`` only anomalies have one).
    """
    morf = jlrp.evaluation.perturbation_curve(logits, x, relevance, y, order="morf", region=region,
                                              baseline=baseline)
    lerf = jlrp.evaluation.perturbation_curve(logits, x, relevance, y, order="lerf", region=region,
                                              baseline=baseline)
    has = mask.reshape(len(mask), -1).any(1)
    mass = np.asarray(jlrp.evaluation.relevance_mass_accuracy(relevance, mask))[has]
    rank = np.asarray(jlrp.evaluation.relevance_rank_accuracy(relevance, mask))[has]
    area = np.asarray(jlrp.evaluation.mask_fraction(mask))[has]
    nan = float("nan")  # no image with a mask in the batch (possible for fields): nothing to localise
    return {
        "curve_morf": np.asarray(morf).mean(0),
        "aopc_morf": float(jlrp.evaluation.aopc(morf).mean()),
        "aopc_lerf": float(jlrp.evaluation.aopc(lerf).mean()),
        "aopc_diff": float(jlrp.evaluation.aopc_difference(morf, lerf).mean()),
        "naopc_morf": float(jlrp.evaluation.normalized_aopc(morf).mean()),
        "mass": float(mass.mean()) if has.any() else nan,
        "rank": float(rank.mean()) if has.any() else nan,
        "area": float(area.mean()) if has.any() else nan,
    }


def category_metrics(args: argparse.Namespace) -> list[jlrp.evaluation.Metric]:
    """The second table: one or two metrics of each category (definitions: docs/evaluation.md)."""
    m = jlrp.evaluation.metric
    return [
        m("faithfulness_correlation", runs=args.faithfulness_runs, subset_size=224,
          baseline="mean" if args.baseline == "blur" else args.baseline),  # subsets are scattered: no blur
        m("deletion_auc"), m("insertion_auc"),
        m("max_sensitivity", samples=args.sensitivity_samples, radius=0.1),
        m("pointing_game"), m("mask_auc"),
        m("sparseness"), m("complexity"),
        m("random_logit"),
        m("completeness"),
    ]


def check_claims(results: dict[str, dict[str, Any]]) -> list[tuple[bool, str]]:
    """The README's claims, each as (passed, line with the numbers). Only claims whose methods ran."""
    claims = []
    composites = [m for m in results if METHODS[m].composite]
    if "gradient" in results and "random" in results:
        g, r = results["gradient"]["aopc_morf"], results["random"]["aopc_morf"]
        for m in composites:
            a = results[m]["aopc_morf"]
            claims.append((a > g > r, f"MoRF AOPC {m} > gradient > random: {a:.3f} > {g:.3f} > {r:.3f}"))
    for m in composites:
        mass, area = results[m]["mass"], results[m]["area"]
        claims.append((mass > 2 * area, f"relevance mass accuracy {m} > 2 x mask area: "
                                        f"{mass:.3f} > 2 x {area:.3f} = {2 * area:.3f}"))
    return claims


# ------------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------------

def _gray(img: np.ndarray) -> np.ndarray:
    """(H, W, 1) image -> uint8 (H, W), min-max scaled per image (the data is not clipped to [0, 1])."""
    a = img[..., 0].astype(np.float64)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    return np.rint(255 * a).astype(np.uint8)


def example_rows(y: np.ndarray, rows: int) -> list[int]:
    """Indices of ``rows`` examples, cycling through the classes so that every class is shown."""
    by_class = [list(np.flatnonzero(y == c)) for c in np.unique(y)]
    picked: list[int] = []
    while len(picked) < min(rows, len(y)):
        for idx in by_class:
            if idx and len(picked) < rows:
                picked.append(idx.pop(0))
    return picked


def write_heatmaps(path: Path, x: np.ndarray, mask: np.ndarray, y: np.ndarray, relevance: dict[str, np.ndarray],
                   class_names: Sequence[str], rows: int, scale: int) -> None:
    """Rows = example images; columns = input, ground-truth mask, then each method's heatmap (bwr, symmetric
    normalisation per image: red = positive, blue = negative, white = 0)."""
    picked = example_rows(y, rows)
    tiles = []
    for i in picked:
        row = [_gray(x[i]), np.where(mask[i], 255, 0).astype(np.uint8)]
        row += [jlrp.image.heatmap(relevance[m][i], cmap="bwr", mode="symmetric") for m in relevance]
        tiles.append(row)
    labels = ["input", "mask"] + [METHODS[m].label for m in relevance]
    image = jlrp.image.grid(tiles, row_labels=[class_names[y[i]] for i in picked], col_labels=labels,
                            pad=4, scale=scale)
    jlrp.image.save_png(path, image)


def write_curves(path: Path, results: dict[str, dict[str, Any]], region: int, baseline: str) -> None:
    """Mean MoRF curve per method: the steeper and lower, the faster the method found the evidence."""
    curves = {METHODS[m].label: r["curve_morf"] for m, r in results.items()}
    jlrp.image.plot_curves(curves, path, xlabel=f"{region}x{region} regions perturbed (most relevant first)",
                           ylabel="target logit (mean)", title=f"MoRF region perturbation, baseline '{baseline}'")


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown table of :func:`evaluate`'s means, a row per method (arrows: which way is better)."""
    lines = ["| method | MoRF AOPC ↑ | LeRF AOPC ↓ | MoRF − LeRF ↑ | normalised MoRF AOPC ↑ "
             "| mass accuracy ↑ | rank accuracy ↑ | mask area | randomised model ↓ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in results.items():
        lines.append(f"| {m} | {r['aopc_morf']:.3f} | {r['aopc_lerf']:.3f} | {r['aopc_diff']:.3f} | "
                     f"{r['naopc_morf']:.3f} | {r['mass']:.3f} | {r['rank']:.3f} | {r['area']:.3f} | "
                     f"{r['randomized']:.3f} |")
    return "\n".join(lines)


def write_results(path: Path, args: argparse.Namespace, table: str, claims: list[tuple[bool, str]],
                  info: dict[str, Any], metrics_table: str = "") -> None:
    text = [
        "# jlrp demo results", "",
        f"Dataset `{args.dataset}` (seed {args.seed}): {info['n_train']} training images, "
        f"{info['n_test']} held-out images. CNN trained for {args.steps} adam steps of {args.train_batch} "
        f"images: held-out accuracy **{info['accuracy']:.1%}**.", "",
        f"Explained: the first {info['n_explained']} correctly classified held-out images, for their label. "
        f"Perturbation: {args.region}x{args.region} regions, all {info['n_regions']} of them, replaced by the "
        f"'{args.baseline}' baseline; AOPC in logit units. Localisation against the mask of the deciding "
        f"object ({info['n_masked']} images with a non-empty mask); 'mask area' is the mask's area fraction, "
        f"which random relevance scores on both accuracies (in expectation). 'randomised model': rank "
        f"correlation (Spearman, per image, mean) with the same method's explanation of the model with every "
        f"parameter redrawn; near 1 means the map does not depend on what the model learned (the random "
        f"baseline uses a fixed key and ignores the model: 1).", "",
        table, "",
        "## By category", "",
        f"`jlrp.evaluation.evaluate` on the same images and maps: faithfulness correlation (Bhatt et al. 2020; "
        f"{args.faithfulness_runs} random subsets of 224 pixels replaced by the '{args.baseline}' baseline), "
        f"deletion / insertion AUC of the class probability (Petsiuk et al. 2018; one image row per step, "
        f"deletion to 0, insertion from a blurred copy), max-sensitivity (Yeh et al. 2019; "
        f"{args.sensitivity_samples} copies uniform in an L-inf ball of radius 0.1, unnormalised), pointing "
        f"game (Zhang et al. 2018) and mask AUC (ROC AUC of the map as a detector of the mask), sparseness "
        f"(Gini of |R|) and complexity (entropy of |R|), random logit (SSIM between the maps of the label "
        f"and of a random other class, Sixt et al. 2020), |completeness gap| (|sum R - (f(x) - f(0))| in "
        f"logits, Sundararajan et al. 2017). Definitions and papers: docs/evaluation.md.", "",
        metrics_table, "",
        "## Claims", "",
        *[f"- {'PASS' if ok else 'FAIL'}: {line}" for ok, line in claims], "",
        "## Timing", "",
        *[f"- {k}: {v:.1f} s" for k, v in info["timing"].items()], "",
    ]
    path.write_text("\n".join(text))


# ------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------

#: --quick: enough to exercise every code path in seconds (the model is barely trained)
QUICK = dict(train_size=400, steps=100, batch_size=8, n_test=200, ig_steps=8, rows=4, sensitivity_samples=2,
             faithfulness_runs=10)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("shapes", "fields"), default="shapes",
                   help="shapes: 4 classes, mask = the deciding shape; fields: anomaly yes/no, mask = the anomaly")
    p.add_argument("--methods", default="all", help=f"'all' or a comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--out", type=Path, default=Path("jlrp-demo-output"), help="output folder")
    p.add_argument("--batch-size", type=int, default=64,
                   help="number of held-out (correctly classified) images explained and evaluated")
    p.add_argument("--train-size", type=int, default=4000, help="number of training images")
    p.add_argument("--steps", type=int, default=1000, help="training steps (adam minibatches)")
    p.add_argument("--train-batch", type=int, default=32, help="training minibatch size")
    p.add_argument("--lr", type=float, default=3e-3, help="adam learning rate")
    p.add_argument("--n-test", type=int, default=1000, help="held-out images for the accuracy")
    p.add_argument("--region", type=int, default=4, help="side of the square regions perturbed")
    p.add_argument("--baseline", default="mean", choices=("mean", "zero", "blur"),
                   help="value that replaces a perturbed region ('mean' per image)")
    p.add_argument("--ig-steps", type=int, default=32, help="Integrated Gradients steps")
    p.add_argument("--sensitivity-samples", type=int, default=10,
                   help="perturbed copies re-explained per image for max-sensitivity")
    p.add_argument("--faithfulness-runs", type=int, default=100,
                   help="random subsets per image for the faithfulness correlation")
    p.add_argument("--rows", type=int, default=6, help="example images in heatmaps.png")
    p.add_argument("--scale", type=int, default=4, help="enlargement of the heatmap tiles")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and the random baseline")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for tests: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    names = ",".join(METHODS) if args.methods == "all" else args.methods
    args.methods = [m.strip() for m in names.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the per-method results, the claims and the paths written."""
    args = parse_args(argv)
    timing: dict[str, float] = {}
    start = time.perf_counter()

    # --- data and model ------------------------------------------------------------------------------
    train_set = load(args.dataset, args.train_size, args.seed)
    test_set = load(args.dataset, args.n_test, args.seed + 1)  # another seed: unseen images
    n_classes = len(train_set.info["class_names"])
    model = CNN(n_classes)
    t = time.perf_counter()
    params = train(model, train_set.x, train_set.y, steps=args.steps, batch=args.train_batch, lr=args.lr,
                   seed=args.seed)
    jax.block_until_ready(params)
    timing["training"] = time.perf_counter() - t
    pred = predict(model, params, test_set.x)
    accuracy = float((pred == test_set.y).mean())
    print(f"trained in {timing['training']:.1f} s: held-out accuracy {accuracy:.1%} ({len(test_set)} images)")

    # --- the explained batch: correctly classified held-out images ------------------------------------
    chosen = np.flatnonzero(pred == test_set.y)[:args.batch_size]
    if len(chosen) == 0:
        raise RuntimeError("the model classified no held-out image correctly: train longer (--steps)")
    x, y, mask = jnp.asarray(test_set.x[chosen]), jnp.asarray(test_set.y[chosen]), test_set.mask[chosen]
    ctx = Context(model, params, train_set.x, float(train_set.x.min()), float(train_set.x.max()), args.seed,
                  args.ig_steps)
    logits = jax.jit(ctx.logits)  # one function object: the curves' compiled programs are reused

    relevance, results, explainers = {}, {}, {}
    t = time.perf_counter()
    for name in args.methods:
        explainers[name] = jax.jit(METHODS[name].build(ctx))
        relevance[name] = np.asarray(explainers[name](x, y))
        print(f"  explained with {name} ({time.perf_counter() - t:.1f} s)", flush=True)
    timing["explaining (incl. compilation)"] = time.perf_counter() - t
    t = time.perf_counter()
    # the sanity check: the same methods on the model with every parameter redrawn (same scale per leaf)
    noise = jlrp.evaluation.randomize(params, list(params["params"]), jax.random.key(args.seed + 7))
    random_ctx = dataclasses.replace(ctx, params=noise)
    for name in args.methods:
        results[name] = evaluate(logits, x, y, mask, jnp.asarray(relevance[name]), region=args.region,
                                 baseline=args.baseline)
        shuffled = jax.jit(METHODS[name].build(random_ctx))(x, y)
        results[name]["randomized"] = float(jlrp.evaluation.rank_correlation(relevance[name], shuffled).mean())
        print(f"  perturbation curves, localisation, randomised model: {name} "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
    timing["evaluating"] = time.perf_counter() - t
    t = time.perf_counter()
    print("metrics by category (jlrp.evaluation.evaluate):", flush=True)
    by_category = jlrp.evaluation.evaluate(
        logits, explainers, [(x, y, mask)], metrics=category_metrics(args), key=jax.random.key(args.seed + 11),
        progress=False, log=lambda line: print(line.replace("batch 0: ", ""), flush=True))
    metrics_table = by_category.markdown()
    timing["metrics by category"] = time.perf_counter() - t

    # --- outputs --------------------------------------------------------------------------------------
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {"heatmaps": args.out / "heatmaps.png", "curves": args.out / "curves.png",
             "results": args.out / "results.md", "metrics": args.out / "metrics.csv"}
    paths["metrics"].write_text(by_category.csv())
    write_heatmaps(paths["heatmaps"], np.asarray(x), mask, np.asarray(y), relevance,
                   train_set.info["class_names"], args.rows, args.scale)
    write_curves(paths["curves"], results, args.region, args.baseline)
    timing["total"] = time.perf_counter() - start

    table = results_table(results)
    claims = check_claims(results)
    n_regions = -(-x.shape[1] // args.region) * -(-x.shape[2] // args.region)
    info = dict(n_train=len(train_set), n_test=len(test_set), accuracy=accuracy, n_explained=len(chosen),
                n_regions=n_regions, n_masked=int(mask.reshape(len(mask), -1).any(1).sum()), timing=timing)
    write_results(paths["results"], args, table, claims, info, metrics_table)

    print(f"\nexplained {len(chosen)} correctly classified held-out images\n")
    print(table + "\n")
    print(metrics_table + "\n")
    for ok, line in claims:
        print(f"{'PASS' if ok else 'FAIL'}: {line}")
    print("\n" + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))
    for path in paths.values():
        print(f"wrote {path}")
    return dict(results=results, claims=claims, paths=paths, accuracy=accuracy, timing=timing,
                metrics=by_category)


if __name__ == "__main__":
    main(sys.argv[1:])
