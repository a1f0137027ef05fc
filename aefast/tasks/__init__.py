"""What people do with autoencoders: anomaly detection, segmentation, dimensionality reduction."""
from aefast.tasks.anomaly import (BEST_DIGITS, AnomalyMap, AnomalyReport, Detector, DetectorVariant,
                                  RestorationObjective, SeedSummary, anomaly_maps, anomaly_scores, best_f1_threshold,
                                  detect, evaluate_anomaly, reconstruct, split_metrics, training_corruption)
from aefast.tasks.dimred import PCAComparison, codes, compare_with_pca, fit_linear_autoencoder, principal_angles
from aefast.tasks.metrics import aupro, image_auroc, pixel_auroc, pro_curve, region_labels
from aefast.tasks.segmentation import SegmentationReport, dice, evaluate_segmentation, iou, predict_masks

__all__ = ["BEST_DIGITS", "AnomalyMap", "AnomalyReport", "Detector", "DetectorVariant", "PCAComparison",
           "RestorationObjective", "SeedSummary", "SegmentationReport", "anomaly_maps", "anomaly_scores", "aupro",
           "best_f1_threshold", "codes", "compare_with_pca", "detect", "dice", "evaluate_anomaly",
           "evaluate_segmentation", "fit_linear_autoencoder", "image_auroc", "iou", "pixel_auroc", "predict_masks",
           "principal_angles", "pro_curve", "reconstruct", "region_labels", "split_metrics", "training_corruption"]
