"""Analysis of routing paths: numpy / scikit-learn over CDRP matrices."""
from jaxroute.analysis.divergence import class_mean_paths, layer_correlations, plot_correlations, rowwise_corr
from jaxroute.analysis.intra_class import centroid_distance, cluster_class, cluster_summary, plot_clusters
from jaxroute.analysis.layers import (
    embed_layers, layer_clustering_scores, plot_embeddings, plot_layer_scores, split_layers,
)

__all__ = [
    "centroid_distance", "class_mean_paths", "cluster_class", "cluster_summary", "embed_layers",
    "layer_clustering_scores", "layer_correlations",
    "plot_clusters", "plot_correlations", "plot_embeddings", "plot_layer_scores", "rowwise_corr",
    "split_layers",
]
