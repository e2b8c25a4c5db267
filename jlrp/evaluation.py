"""Evaluating explanations as jitted batch programs: perturbation curves (pixel flipping, region
perturbation; MoRF / LeRF / random), AOPC, localisation against ground-truth masks, dataset loops."""
from jlrp._src.evaluation import (aopc, aopc_difference, evaluate_dataset, mask_fraction, normalized_aopc,
                                  perturbation_curve, pixel_flipping, relevance_mass_accuracy,
                                  relevance_rank_accuracy)

__all__ = ["aopc", "aopc_difference", "evaluate_dataset", "mask_fraction", "normalized_aopc",
           "perturbation_curve", "pixel_flipping", "relevance_mass_accuracy", "relevance_rank_accuracy"]
