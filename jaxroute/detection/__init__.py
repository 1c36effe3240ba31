"""Adversarial-example detectors over numpy features (CDRPs, activations)."""
from jaxroute.detection.detector import (
    CLASSIFIERS, Detector, detection_auc, evaluate_protocol, fit_detector, real_vs_adv,
)

__all__ = ["CLASSIFIERS", "Detector", "detection_auc", "evaluate_protocol", "fit_detector", "real_vs_adv"]
