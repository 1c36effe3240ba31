"""Saliency: six methods with one signature, full weights or under any gates (class subnetworks).

Every method: ``method(model, gates, x, target, *, config=None, key=None) -> Explanation``
(:mod:`jaxroute.explain.methods`); :data:`METHODS` lists them by name.
:func:`explain_dataset` writes a data set's maps through the extraction job;
:mod:`jaxroute.explain.localization` scores maps against boxes (weakly supervised localization);
:func:`localize` measures it on paste-set canvases, full weights vs class subnetworks.
"""
from jaxroute.explain.job import explain_dataset, explanation_outputs, gather
from jaxroute.explain.localize import localize
from jaxroute.explain.methods import (
    METHODS, Explanation, GradCAMConfig, GradientConfig, IGConfig, SmoothGradConfig, deconvnet, explain,
    grad_cam, grad_cam_layer, grad_cam_map, gradient, guided_backprop, integrated_gradients, method_config,
    saliency_map, smoothgrad, smoothgrad_noise, target_logit_grad,
)
from jaxroute.routing.subnet import class_gates

__all__ = [
    "METHODS", "Explanation", "GradCAMConfig", "GradientConfig", "IGConfig", "SmoothGradConfig", "deconvnet",
    "explain", "explain_dataset", "explanation_outputs", "gather", "grad_cam", "grad_cam_layer", "grad_cam_map",
    "gradient", "guided_backprop", "integrated_gradients", "class_gates", "localize", "method_config", "saliency_map",
    "smoothgrad", "smoothgrad_noise", "target_logit_grad",
]
