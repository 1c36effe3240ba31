"""Metrics of routing paths (DGR paper, Table 1): agreement, accuracy, sparsity."""
from __future__ import annotations

import numpy as np

from jaxroute.models.gates import GateSpec


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-logits, axis=-1)[:, :k]
    return np.any(top == labels[:, None], axis=1)


def sparsity(cdrp: np.ndarray) -> np.ndarray:
    """Per-sample fraction of gates > 0 (the paper's 'sparsity': lower is sparser)."""
    return np.mean(np.asarray(cdrp) > 0, axis=-1)


def layer_sparsity(cdrp: np.ndarray, spec: GateSpec) -> dict[str, float]:
    return {n: float(np.mean(g > 0)) for n, g in spec.split(np.asarray(cdrp)).items()}


def routing_metrics(cdrp, full_logits, gated_logits, labels, spec: GateSpec | None = None) -> dict:
    """Table-1 numbers for one routing method over N samples."""
    full_logits, gated_logits = np.asarray(full_logits), np.asarray(gated_logits)
    labels = np.asarray(labels)
    sp = sparsity(cdrp)
    out = {
        "n": int(len(labels)),
        "top1_agreement": float(np.mean(full_logits.argmax(-1) == gated_logits.argmax(-1))),
        "full_top1": float(np.mean(topk_hits(full_logits, labels, 1))),
        "full_top5": float(np.mean(topk_hits(full_logits, labels, 5))),
        "top1_accuracy": float(np.mean(topk_hits(gated_logits, labels, 1))),
        "top5_accuracy": float(np.mean(topk_hits(gated_logits, labels, 5))),
        "sparsity": float(sp.mean()) if len(sp) else float("nan"),
        "sparsity_std": float(sp.std()) if len(sp) else float("nan"),
    }
    if spec is not None:
        out["layer_sparsity"] = layer_sparsity(cdrp, spec)
    return out
