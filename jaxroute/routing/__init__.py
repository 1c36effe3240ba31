"""Routing: per-sample critical data routing paths (DGR), the pruning baselines (AWR, AAR) and,
as one more router, the calculation paths of a decoupled model (``controller``,
:mod:`jaxroute.routing.controller`).

Every router has one shape, ``router(model, x, *, config) -> Route``
(:mod:`jaxroute.routing.route`); :data:`ROUTERS` lists them by name.
"""
from jaxroute.routing.ablation import ablation_curve, ablation_mask
from jaxroute.routing.controller import ControllerConfig, controller_route
from jaxroute.routing.dgr import DGRConfig, dgr_loss, dgr_route, dgr_route_pair, dgr_trace
from jaxroute.routing.job import ROUTERS, route_dataset, route_outputs, router_config, summarize
from jaxroute.routing.plots import plot_ablation, plot_iterate_density, plot_layer_sparsity
from jaxroute.routing.metrics import layer_sparsity, routing_metrics, sparsity, topk_hits
from jaxroute.routing.pruning import PruneConfig, aar_route, activation_l1_scores, awr_route, weight_l1_scores
from jaxroute.routing.route import Route

__all__ = [
    "ControllerConfig", "DGRConfig", "PruneConfig", "ROUTERS", "Route", "aar_route", "ablation_curve", "ablation_mask",
    "activation_l1_scores", "awr_route", "controller_route", "dgr_loss", "dgr_route", "dgr_route_pair", "dgr_trace", "layer_sparsity", "plot_ablation",
    "plot_iterate_density", "plot_layer_sparsity",
    "route_dataset", "route_outputs", "router_config", "routing_metrics", "sparsity", "summarize", "topk_hits",
    "weight_l1_scores",
]
