"""Concepts: Concept Relevance Propagation (CRP, Achtibat et al., Nature Machine Intelligence 2023) and
relevance / activation maximisation, vmapped.

Heatmaps say *where*; concepts say *what*. A concept is a channel of a conv layer, a unit of a dense layer, or
any mask on a layer's output (soft channel weights such as a direction, a spatial region). Conditioning on it
keeps only the relevance that flows through it: the relevance arriving at the layer's output is multiplied by
the mask before the layer's rule runs, for any composite. Masks enter only the backward pass, so thousands of
conditions are one vmapped backward pass over a single forward (in chunks, to bound memory)::

    cond = jlrp.concepts.conditional(model.apply, jlrp.composites.epsilon_plus_flat(), argnums=1)
    cond.layers(params, x)                                         # where concepts can live (LayerInfo)
    maps = cond(params, x, target=y, conditions={jlrp.module_path("Conv_1"): "all"})   # (C, *x.shape)
    per_channel = cond.concept_relevance(params, x, layer=jlrp.module_path("Conv_1"), target=y)  # (N, C)
    flow = cond.attribution_graph(params, x, upper=jlrp.module_path("Conv_2"),
                                  lower=jlrp.module_path("Conv_1"), target=y)          # (C2, N, C1)
    refs = jlrp.concepts.maximize(cond, batches, params, layer=jlrp.module_path("Conv_1"), k=8)
    picture = jlrp.concepts.atlas(cond, params, x[:1], references=refs)                # uint8 RGB

* :func:`conditional` / :class:`Conditional`: conditional heatmaps (conditions at one or more layers),
  per-concept relevance at a layer with top-k, and the attribution graph between the concepts of two layers.
* :func:`maximize`: relevance maximisation (the samples for which a concept is most relevant to the
  explained class) or activation maximisation over a data set streamed in batches (progress bar, batches
  split over the local devices when there are several), with each reference's input-space crop and
  conditional heatmap: :class:`References` (``save`` / :func:`load`, ``.npz``).
* :func:`atlas`: a figure for one prediction: its most relevant concepts, each with its conditional heatmap
  and its reference crops.

Layers are selected like composite entries: by ``LayerInfo.index``, a kind name that matches one layer
('last', 'dense', ...), :func:`jlrp.module_path`, :func:`jlrp.param_path` or a callable on ``LayerInfo``.
Concepts live in top-level layers (not inside ``scan`` / ``cond`` bodies); the layer's output has the batch
axis first and the channel axis at ``axis`` (default -1, Flax's layout).
"""
from jlrp._src.concepts import Conditional, References, atlas, conditional, load, maximize

__all__ = ["Conditional", "References", "atlas", "conditional", "load", "maximize"]
