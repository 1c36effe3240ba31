"""Routing: per-sample critical data routing paths (DGR) and baselines."""
from jaxroute.routing.ablation import ablation_curve, ablation_mask, plot_ablation
from jaxroute.routing.baselines import (
    PruneResult, activation_l1_scores, prune_route, weight_l1_scores,
)
from jaxroute.routing.dgr import DGRConfig, RouteResult, dgr_loss, dgr_route
from jaxroute.routing.metrics import layer_sparsity, routing_metrics, sparsity, topk_hits

__all__ = [
    "DGRConfig", "PruneResult", "RouteResult", "ablation_curve", "ablation_mask",
    "activation_l1_scores", "dgr_loss", "dgr_route", "layer_sparsity", "plot_ablation",
    "prune_route", "routing_metrics", "sparsity", "topk_hits", "weight_l1_scores",
]
