"""Evaluating explanations as jitted batch programs, for images ``(N, H, W[, C])`` and token sequences
``(N, T)`` / ``(N, T, D)``, in six categories (definitions and papers: docs/evaluation.md):

- faithfulness: perturbation curves (pixel flipping, region perturbation; MoRF / LeRF / random), AOPC,
  faithfulness and monotonicity correlation, selectivity, ROAD, infidelity, insertion / deletion AUC,
  comprehensiveness / sufficiency;
- robustness: max / average sensitivity, local Lipschitz estimate, relative input / output stability;
- localisation: relevance mass / rank accuracy, pointing game, attribution localisation, top-k
  intersection, mask AUC;
- complexity: sparseness (Gini), complexity (entropy), effective complexity;
- randomisation: model parameter randomisation (MPRT, one compiled program), smooth MPRT, random logit;
- axiomatic: completeness, non-sensitivity, input invariance;

and :func:`evaluate`, several methods x several metrics over a data set, as a table.
"""
from jlrp._src.evaluation import (aopc, aopc_difference, evaluate_dataset, mask_fraction, normalized_aopc,
                                  perturbation_curve, pixel_flipping, relevance_mass_accuracy,
                                  relevance_rank_accuracy)
from jlrp._src.metrics_axiomatic import completeness, input_invariance, non_sensitivity
from jlrp._src.metrics_common import ssim
from jlrp._src.metrics_complexity import complexity, effective_complexity, sparseness
from jlrp._src.metrics_faithfulness import (comprehensiveness, deletion_auc, faithfulness_correlation, infidelity,
                                            insertion_auc, insertion_deletion_curve, monotonicity_correlation,
                                            noisy_linear_imputation, road, selectivity, sufficiency)
from jlrp._src.metrics_localisation import attribution_localisation, mask_auc, pointing_game, top_k_intersection
from jlrp._src.metrics_randomisation import random_logit, smooth_mprt
from jlrp._src.metrics_robustness import (avg_sensitivity, local_lipschitz_estimate, max_sensitivity,
                                          relative_input_stability, relative_output_stability)
from jlrp._src.metrics_suite import METRICS, Metric, Results, evaluate, metric
from jlrp._src.sanity import parameter_randomization, randomize, rank_correlation

__all__ = [
    "METRICS", "Metric", "Results", "aopc", "aopc_difference", "attribution_localisation", "avg_sensitivity",
    "complexity", "completeness", "comprehensiveness", "deletion_auc", "effective_complexity", "evaluate",
    "evaluate_dataset", "faithfulness_correlation", "infidelity", "input_invariance", "insertion_auc",
    "insertion_deletion_curve", "local_lipschitz_estimate", "mask_auc", "mask_fraction", "max_sensitivity",
    "metric", "monotonicity_correlation", "non_sensitivity", "noisy_linear_imputation", "normalized_aopc",
    "parameter_randomization", "perturbation_curve", "pixel_flipping", "pointing_game", "random_logit",
    "randomize", "rank_correlation", "relative_input_stability", "relative_output_stability",
    "relevance_mass_accuracy", "relevance_rank_accuracy", "road", "selectivity", "smooth_mprt", "sparseness",
    "ssim", "sufficiency", "top_k_intersection",
]
