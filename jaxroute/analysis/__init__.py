"""Analysis of routing paths: numpy / scikit-learn over CDRP matrices (figures in ``plots``)."""
from jaxroute.analysis.classes import derangement, first_per_class, load_first_per_class, per_class_counts
from jaxroute.analysis.divergence import attack_correlations, class_mean_paths, layer_correlations, rowwise_corr
from jaxroute.analysis.intra_class import centroid_distance, cluster_class, cluster_summary
from jaxroute.analysis.layers import (
    depth_trend, embed_layers, embed_paths, layer_clustering_scores, layer_fractions, neighbour_fraction,
    split_layers,
)
from jaxroute.analysis.paths import class_paths_from, dense, path_stats
from jaxroute.analysis.plots import (plot_clusters, plot_correlations, plot_embeddings, plot_layer_profiles,
                                     plot_layer_scores, plot_neuron_tops)
from jaxroute.analysis.wordnet import choose_pairs, correlation_matrix, wordnet_distances

__all__ = [
    "attack_correlations", "centroid_distance", "choose_pairs", "class_mean_paths", "class_paths_from",
    "cluster_class", "cluster_summary", "correlation_matrix", "dense", "depth_trend", "derangement",
    "first_per_class", "load_first_per_class",
    "embed_layers", "embed_paths", "layer_clustering_scores", "layer_correlations", "layer_fractions",
    "neighbour_fraction", "path_stats", "per_class_counts", "plot_clusters", "plot_correlations", "plot_embeddings",
    "plot_layer_profiles", "plot_layer_scores", "plot_neuron_tops", "rowwise_corr", "split_layers", "wordnet_distances",
]
