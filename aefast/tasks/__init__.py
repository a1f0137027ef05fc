"""What people do with autoencoders: anomaly detection, segmentation, dimensionality reduction."""
from aefast.tasks.anomaly import (AnomalyReport, anomaly_maps, anomaly_scores, best_f1_threshold, evaluate_anomaly,
                                  image_auroc, pixel_auroc, reconstruct)
from aefast.tasks.dimred import PCAComparison, codes, compare_with_pca, fit_linear_autoencoder, principal_angles
from aefast.tasks.segmentation import SegmentationReport, dice, evaluate_segmentation, iou, predict_masks

__all__ = ["AnomalyReport", "PCAComparison", "SegmentationReport", "anomaly_maps", "anomaly_scores",
           "best_f1_threshold", "codes", "compare_with_pca", "dice", "evaluate_anomaly", "evaluate_segmentation", "fit_linear_autoencoder",
           "image_auroc", "iou", "pixel_auroc", "predict_masks", "principal_angles", "reconstruct"]
