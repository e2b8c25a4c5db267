"""A histogram-intersection kernel SVM over bag-of-words features of image patches, and its pixel-wise LRP
decomposition (Bach et al. 2015): decision value -> BoW dimensions -> local features -> pixels."""
from jlrp._src.svm import (BowConfig, BowSVM, SVMExplanation, bow, explain_svm, fit_svm, hik_kernel, kmeans,
                           kmeans_inertia, patch_descriptors, patch_footprints, train_bow_svm)

__all__ = ["BowConfig", "BowSVM", "SVMExplanation", "bow", "explain_svm", "fit_svm", "hik_kernel", "kmeans",
           "kmeans_inertia", "patch_descriptors", "patch_footprints", "train_bow_svm"]
