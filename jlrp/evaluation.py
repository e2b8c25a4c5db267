"""Evaluating explanations as jitted batch programs: perturbation curves (pixel flipping, region
perturbation; MoRF / LeRF / random), AOPC, localisation against ground-truth masks, dataset loops, and
the model-parameter randomisation sanity check (is an explanation about the model or an artifact?)."""
from jlrp._src.evaluation import (aopc, aopc_difference, evaluate_dataset, mask_fraction, normalized_aopc,
                                  perturbation_curve, pixel_flipping, relevance_mass_accuracy,
                                  relevance_rank_accuracy)
from jlrp._src.sanity import parameter_randomization, randomize, rank_correlation

__all__ = ["aopc", "aopc_difference", "evaluate_dataset", "mask_fraction", "normalized_aopc",
           "parameter_randomization", "perturbation_curve", "pixel_flipping", "randomize", "rank_correlation",
           "relevance_mass_accuracy", "relevance_rank_accuracy"]
