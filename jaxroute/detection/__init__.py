"""Adversarial-example detectors over numpy features (CDRPs, activations); one fit / score shape."""
from jaxroute.detection.detector import (
    CLASSIFIERS, Detector, TreeDetector, detection_auc, evaluate_outputs, evaluate_protocol, paired_features,
    real_vs_adv,
)
from jaxroute.detection.plots import plot_detection
from jaxroute.detection.scores import SCALAR_SCORES, scalar_aucs

__all__ = [
    "CLASSIFIERS", "Detector", "SCALAR_SCORES", "TreeDetector", "detection_auc", "evaluate_outputs",
    "evaluate_protocol", "paired_features", "plot_detection", "real_vs_adv", "scalar_aucs",
]
