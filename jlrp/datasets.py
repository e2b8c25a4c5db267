"""Small synthetic data sets with known ground truth, for testing and evaluating explanations.

Everything is generated in memory from a seed (``np.random.default_rng``): no downloads, and the
same arguments always give bit-identical arrays. Each generator returns a :class:`Dataset` whose
``mask`` (where applicable) marks the input elements that actually decide the label, so that an
explanation can be scored against the truth.

* :func:`shapes` - images with one class-deciding shape among class-neutral distractors.
* :func:`pattern_toy` - the 2-D signal + distractor toy problem of PatternNet (Kindermans et al. 2017).
* :func:`fields` - smooth 2-D fields with or without a localised anomaly ("Fact or Artifact?",
  Landt-Hayen et al. 2023).
* :func:`text` - token sequences whose label is decided by a few sentiment words.
"""
from jlrp._src.datasets import Dataset, fields, pattern_toy, shapes, text

__all__ = ["Dataset", "shapes", "pattern_toy", "fields", "text"]
