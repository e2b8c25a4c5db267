"""One entry point: several explanation methods x several metrics over a data set, streamed batch by batch,
with a progress bar; the result is a table (Markdown / CSV, optionally a plot).

    results = jlrp.evaluation.evaluate(model, {"lrp": explain_lrp, "gradient": explain_grad}, batches,
                                       metrics=["faithfulness_correlation", "max_sensitivity", "pointing_game",
                                                "sparseness", "random_logit"], key=jax.random.key(0))
    print(results.markdown())
    results.save("/tmp/eval")                     # results.md, results.csv (and results.png with plot=True)

Every metric is a :class:`Metric`: a name, a category, a direction and a function of the batch context.
The registry :data:`METRICS` holds every metric of :mod:`jlrp.evaluation` with default settings;
``metric(name, **options)`` changes them (``metric("max_sensitivity", samples=20)``).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jlrp._src import evaluation as ev
from jlrp._src import metrics_axiomatic as ax
from jlrp._src import metrics_complexity as cx
from jlrp._src import metrics_faithfulness as fa
from jlrp._src import metrics_localisation as lo
from jlrp._src import metrics_randomisation as ra
from jlrp._src import metrics_robustness as ro
from jlrp._src.sanity import parameter_randomization

Array = jax.Array
CATEGORIES = ("faithfulness", "robustness", "localisation", "complexity", "randomisation", "axiomatic")


@dataclasses.dataclass(frozen=True)
class Context:
    """What a metric sees for one batch and method. ``explain(x, y)`` and ``model(x)`` are fixed per method
    (the same objects for every batch, so compiled programs are reused); ``explain_params(params, x, y)``
    and ``params`` exist when :func:`evaluate` was given ``params``."""
    model: Callable
    explain: Callable
    x: Array
    y: Array
    relevance: Array
    mask: Array | None
    key: Array
    params: Any = None
    explain_params: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Metric:
    """A column of the table: ``fn(context, **options) -> (N,)`` per-sample scores (NaN = undefined for a
    sample, left out of the mean). ``higher_is_better``: True / False, or None (no direction). ``needs``:
    ``"mask"`` and / or ``"params"``."""
    name: str
    category: str
    higher_is_better: bool | None
    fn: Callable[..., Array]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs: tuple[str, ...] = ()
    label: str = ""

    def __call__(self, ctx: Context) -> Array:
        return self.fn(ctx, **self.options)

    def with_options(self, **options: Any) -> "Metric":
        return dataclasses.replace(self, options={**self.options, **options})

    @property
    def header(self) -> str:
        arrow = {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]
        return (self.label or self.name.replace("_", " ")) + arrow


def _units(ctx: Context) -> int:
    return int(np.prod(ctx.relevance.shape[1:]))


def _classes(ctx: Context) -> int:
    return int(jax.eval_shape(ctx.model, ctx.x).shape[-1])


def _faithfulness_correlation(c, subset_size=None, **kw):
    size = subset_size or max(1, min(224, _units(c) // 4))
    return fa.faithfulness_correlation(c.model, c.x, c.relevance, c.y, key=c.key, subset_size=size, **kw)


def _monotonicity(c, features_in_step=None, samples=10, **kw):
    step = features_in_step or max(1, _units(c) // 64)
    return fa.monotonicity_correlation(c.model, c.x, c.relevance, c.y, key=c.key, samples=samples,
                                       features_in_step=step, **kw)


def _aopc(order):
    def fn(c, region=4, baseline="mean", **kw):
        curve = ev.perturbation_curve(c.model, c.x, c.relevance, c.y, order=order, region=region, baseline=baseline,
                                      key=c.key, **kw)
        return ev.aopc(curve)
    return fn


def _road(c, order="morf", **kw):
    return fa.road(c.model, c.x, c.relevance, c.y, order=order, key=c.key, **kw).mean(1)


def _infidelity(c, **kw):
    return fa.infidelity(c.model, c.x, c.relevance, c.y, key=c.key, **kw)


def _robust(fn, **defaults):
    def run(c, **kw):
        return fn(c.explain, c.x, c.y, c.relevance, key=c.key, **{**defaults, **kw})
    return run


def _output_stability(c, **kw):
    return ro.relative_output_stability(c.explain, c.x, c.y, c.relevance, key=c.key, model=c.model, **kw)


def _top_k(c, k=None, **kw):
    pixels = int(np.prod(np.shape(c.mask)[1:3] if np.ndim(c.mask) == 4 else np.shape(c.mask)[1:]))
    return lo.top_k_intersection(c.relevance, c.mask, k=k or max(1, pixels // 10), **kw)


def _mprt(smooth):
    def run(c, steps="last", spearman="signed", **kw):
        if smooth:
            kw.setdefault("samples", 10)
            res = ra.smooth_mprt(c.explain_params, c.params, c.x, c.key, target=c.y, **kw)
        else:
            res = parameter_randomization(c.explain_params, c.params, c.x, c.key, target=c.y, **kw)
        corr = res["spearman" if spearman == "signed" else "spearman_abs"]
        return corr[-1] if steps == "last" else corr.mean(0)
    return run


def _random_logit(c, **kw):
    return ra.random_logit(c.explain, c.x, c.y, c.relevance, num_classes=_classes(c), key=c.key, **kw)


#: every metric with its default settings; ``metric(name, **options)`` for other settings
METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("faithfulness_correlation", "faithfulness", True, _faithfulness_correlation, label="faithfulness corr."),
    Metric("monotonicity_correlation", "faithfulness", True, _monotonicity, label="monotonicity corr."),
    Metric("aopc_morf", "faithfulness", True, _aopc("morf"), label="MoRF AOPC"),
    Metric("aopc_lerf", "faithfulness", False, _aopc("lerf"), label="LeRF AOPC"),
    Metric("selectivity", "faithfulness", False,
           lambda c, **kw: fa.selectivity(c.model, c.x, c.relevance, c.y, **kw)),
    Metric("road", "faithfulness", False, _road, label="ROAD MoRF acc."),
    Metric("infidelity", "faithfulness", False, _infidelity),
    Metric("deletion_auc", "faithfulness", False,
           lambda c, **kw: fa.deletion_auc(c.model, c.x, c.relevance, c.y, **kw), label="deletion AUC"),
    Metric("insertion_auc", "faithfulness", True,
           lambda c, **kw: fa.insertion_auc(c.model, c.x, c.relevance, c.y, **kw), label="insertion AUC"),
    Metric("comprehensiveness", "faithfulness", True,
           lambda c, **kw: fa.comprehensiveness(c.model, c.x, c.relevance, c.y, **kw)),
    Metric("sufficiency", "faithfulness", False,
           lambda c, **kw: fa.sufficiency(c.model, c.x, c.relevance, c.y, **kw)),
    Metric("max_sensitivity", "robustness", False, _robust(ro.max_sensitivity), label="max-sensitivity"),
    Metric("avg_sensitivity", "robustness", False, _robust(ro.avg_sensitivity), label="avg-sensitivity"),
    Metric("local_lipschitz_estimate", "robustness", False, _robust(ro.local_lipschitz_estimate),
           label="local Lipschitz"),
    Metric("relative_input_stability", "robustness", False, _robust(ro.relative_input_stability), label="RIS"),
    Metric("relative_output_stability", "robustness", False, _output_stability, label="ROS"),
    Metric("pointing_game", "localisation", True, lambda c, **kw: lo.pointing_game(c.relevance, c.mask, **kw),
           needs=("mask",), label="pointing game"),
    Metric("attribution_localisation", "localisation", True,
           lambda c, **kw: lo.attribution_localisation(c.relevance, c.mask, **kw), needs=("mask",),
           label="attr. localisation"),
    Metric("top_k_intersection", "localisation", True, _top_k, needs=("mask",), label="top-k intersection"),
    Metric("relevance_mass_accuracy", "localisation", True,
           lambda c: ev.relevance_mass_accuracy(c.relevance, c.mask), needs=("mask",), label="mass accuracy"),
    Metric("relevance_rank_accuracy", "localisation", True,
           lambda c: ev.relevance_rank_accuracy(c.relevance, c.mask), needs=("mask",), label="rank accuracy"),
    Metric("mask_auc", "localisation", True, lambda c: lo.mask_auc(c.relevance, c.mask), needs=("mask",),
           label="mask AUC"),
    Metric("sparseness", "complexity", True, lambda c, **kw: cx.sparseness(c.relevance, **kw)),
    Metric("complexity", "complexity", False, lambda c, **kw: cx.complexity(c.relevance, **kw)),
    Metric("effective_complexity", "complexity", False, lambda c, **kw: cx.effective_complexity(c.relevance, **kw),
           label="effective complexity"),
    Metric("mprt", "randomisation", False, _mprt(False), needs=("params",), label="MPRT"),
    Metric("smooth_mprt", "randomisation", False, _mprt(True), needs=("params",), label="sMPRT"),
    Metric("random_logit", "randomisation", False, _random_logit, label="random logit"),
    Metric("completeness", "axiomatic", False,
           lambda c, **kw: jnp.abs(ax.completeness(c.model, c.x, c.relevance, c.y, **kw)), label="|completeness gap|"),
    Metric("non_sensitivity", "axiomatic", False,
           lambda c, **kw: ax.non_sensitivity(c.model, c.x, c.relevance, c.y, **kw), label="non-sensitivity"),
]}


@functools.lru_cache(maxsize=256)
def _jitted(fn: Callable) -> Callable:
    return jax.jit(fn)


def metric(name: str, **options: Any) -> Metric:
    """The registered metric ``name`` with ``options`` passed to its function (e.g. ``samples=20``)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {sorted(METRICS)}")
    return METRICS[name].with_options(**options)


@dataclasses.dataclass
class Results:
    """Per-sample scores ``per_sample[method][metric]`` ``(N,)`` over the whole data set, and the table of
    their means (NaN-ignoring: a sample without a mask has no localisation score)."""
    metrics: list[Metric]
    per_sample: dict[str, dict[str, np.ndarray]]
    seconds: dict[str, float]

    def mean(self) -> dict[str, dict[str, float]]:
        out = {}
        for method, scores in self.per_sample.items():
            out[method] = {}
            for m in self.metrics:
                v = scores.get(m.name)
                ok = None if v is None else v[np.isfinite(v)]
                out[method][m.name] = float(ok.mean()) if ok is not None and ok.size else math.nan
        return out

    def markdown(self, digits: int = 3) -> str:
        """A Markdown table: a row per method, a column per metric (arrows: which way is better), and a
        first row naming each column's category."""
        means = self.mean()
        head = "| method | " + " | ".join(m.header for m in self.metrics) + " |"
        cats = "| *category* | " + " | ".join(f"*{m.category}*" for m in self.metrics) + " |"
        rule = "|---|" + "---:|" * len(self.metrics)
        rows = [f"| {method} | " + " | ".join(f"{means[method][m.name]:.{digits}f}" for m in self.metrics) + " |"
                for method in means]
        return "\n".join([head, rule, cats, *rows])

    def csv(self) -> str:
        """CSV of the means: ``method`` then one column per metric name."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["method", *(m.name for m in self.metrics)])
        for method, row in self.mean().items():
            writer.writerow([method, *(repr(row[m.name]) for m in self.metrics)])
        return buf.getvalue()

    def plot(self, path: str | Path) -> Path:
        """A PNG with one small bar chart per metric (methods as bars; needs matplotlib)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        means, methods = self.mean(), list(self.per_sample)
        cols = min(4, len(self.metrics))
        rows = -(-len(self.metrics) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.35 * len(methods) * rows + 1.2 * rows),
                                 squeeze=False)
        for ax_, m in zip(axes.ravel(), self.metrics):
            ax_.barh(range(len(methods)), [means[k][m.name] for k in methods], color="tab:blue")
            ax_.set_yticks(range(len(methods)), methods if ax_ in axes[:, 0] else [""] * len(methods), fontsize=7)
            ax_.invert_yaxis()
            ax_.set_title(f"{m.header} ({m.category})", fontsize=8)
            ax_.tick_params(axis="x", labelsize=7)
        for ax_ in axes.ravel()[len(self.metrics):]:
            ax_.axis("off")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def save(self, out: str | Path, plot: bool = False) -> dict[str, Path]:
        """Writes ``results.md``, ``results.csv`` (and ``results.png``) into the folder ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / "results.md", "csv": out / "results.csv"}
        paths["markdown"].write_text(self.markdown() + "\n")
        paths["csv"].write_text(self.csv())
        if plot:
            paths["plot"] = self.plot(out / "results.png")
        return paths


def evaluate(model: Callable, methods: Mapping[str, Callable], batches: Iterable[tuple], *,
             metrics: Sequence[str | Metric] = ("faithfulness_correlation", "max_sensitivity", "pointing_game",
                                                "sparseness", "random_logit", "completeness"),
             key: Array | None = None, params: Any = None, progress: bool = True, out: str | Path | None = None,
             plot: bool = False, log: Callable[[str], None] | None = None) -> Results:
    """Evaluate several explanation methods with several metrics over a data set.

    Args:
      model: ``model(x) -> logits``; with ``params``: ``model(params, x)``.
      methods: ``{name: explain}`` with ``explain(x, y) -> relevance``; with ``params``:
        ``explain(params, x, y)`` (needed by the parameter randomisation metrics).
      batches: an iterable of ``(x, y)`` or ``(x, y, mask)`` (streamed: one batch in memory at a time).
        Localisation metrics are computed for batches that carry a mask.
      metrics: names from :data:`METRICS` or :class:`Metric` objects (``metric(name, **options)``).
      key: PRNG key for the random parts (folded with the batch, method and metric indices); default key 0.
      params: the model's parameters (then ``model`` and the methods take them first).
      progress: a tqdm progress bar over batches x methods.
      out: a folder to write ``results.md`` and ``results.csv`` into (and ``results.png`` with ``plot``).
      log: called with a line of text after each method of each batch (e.g. ``print``).

    Returns:
      :class:`Results` (``.markdown()``, ``.csv()``, ``.plot(path)``, ``.per_sample``, ``.mean()``).
    """
    chosen = [m if isinstance(m, Metric) else metric(m) for m in metrics]
    if len({m.name for m in chosen}) != len(chosen):
        raise ValueError("metric names must be unique (give a changed metric another name with "
                         "dataclasses.replace(metric, name=...))")
    if any("params" in m.needs for m in chosen) and params is None:
        raise ValueError("the parameter randomisation metrics need params= (and model(params, x), "
                         "explain(params, x, y))")
    key = jax.random.key(0) if key is None else key
    if params is not None:
        model_x = lambda x: model(params, x)
        explainers = {name: (lambda f: lambda x, y: f(params, x, y))(f) for name, f in methods.items()}
        model_x, explainers = jax.jit(model_x), {name: jax.jit(f) for name, f in explainers.items()}
    else:  # the same jitted objects for the same functions: later calls reuse the compiled programs
        model_x, explainers = _jitted(model), {name: _jitted(f) for name, f in methods.items()}
    per_sample: dict[str, dict[str, list]] = {name: defaultdict(list) for name in methods}
    seconds: dict[str, float] = defaultdict(float)
    import time

    batches = iter(batches)
    bar = tqdm(disable=not progress, desc="evaluating", unit="method")
    for b, (x, y, *rest) in enumerate(batches):
        x, y = ev.to_array(x), ev.to_array(y)
        mask = rest[0] if rest and rest[0] is not None else None
        for i, (name, explain) in enumerate(explainers.items()):
            start = time.perf_counter()
            relevance = explain(x, y)
            ctx = Context(model_x, explain, x, y, relevance, mask, jax.random.fold_in(key, b), params,
                          methods[name] if params is not None else None)
            for j, m in enumerate(chosen):
                if "mask" in m.needs and mask is None:
                    continue
                t = time.perf_counter()
                ctx_m = dataclasses.replace(ctx, key=jax.random.fold_in(ctx.key, j))
                per_sample[name][m.name].append(np.asarray(m(ctx_m), np.float64))
                seconds[m.name] += time.perf_counter() - t
            bar.update(1)
            bar.set_postfix(batch=b, method=name)
            if log is not None:
                log(f"  batch {b}: {name} evaluated on {len(chosen)} metrics in {time.perf_counter() - start:.1f} s")
    bar.close()
    results = Results(chosen, {name: {k: np.concatenate(v) for k, v in scores.items()}
                               for name, scores in per_sample.items()}, dict(seconds))
    if out is not None:
        results.save(out, plot=plot)
    return results
