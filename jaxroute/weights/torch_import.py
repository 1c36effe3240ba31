"""Import PyTorch state dicts into Flax variables.

torch is needed only here (``pip install jaxroute[torch]``); converted
variables are saved with :mod:`jaxroute.weights.checkpoint` and used without
torch afterwards.

The models in :mod:`jaxroute.models` name their Flax modules after the
PyTorch modules, with numeric path parts joined to their parent
(``layer1.0.conv1`` -> ``layer1_0/conv1``, ``features.0`` -> ``features_0``),
so one generic mapping serves every architecture:

=====================  ===================================  ==================
PyTorch tensor         Flax variable                        transform
=====================  ===================================  ==================
conv ``weight`` OIHW   ``params/<path>/kernel`` HWIO        transpose(2,3,1,0)
linear ``weight``      ``params/<path>/kernel`` (in, out)   transpose
``bias``               ``params/<path>/bias``
BN ``weight``          ``params/<path>/scale``
BN ``running_mean``    ``batch_stats/<path>/mean``
BN ``running_var``     ``batch_stats/<path>/var``
``num_batches_tracked``  (dropped)
=====================  ===================================  ==================
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxroute.models.base import flax_path


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model: lists every difference."""


def mismatch_message(what: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    """One line naming the differences (the first 20 of each kind); the command line prints errors as one line."""
    parts = [f"{label} ({len(items)}): " + "; ".join(items[:20]) + (" ..." if len(items) > 20 else "")
             for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
             if items]
    return f"{what} does not match the model: " + " | ".join(parts)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint (zip or legacy pickle) into ``{name: ndarray}``.

    Loads with ``weights_only=True`` (no arbitrary code from the file) on the
    CPU; unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers and
    strips the ``module.`` prefix that ``DataParallel`` adds.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "importing PyTorch checkpoints needs torch: pip install 'jaxroute[torch]' "
            "(convert once with `jaxroute convert`, then torch is not needed)"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's message may advise weights_only=False, i.e. unpickling an untrusted file: never relay it.
        raise ValueError(f"{path} is not a PyTorch checkpoint of tensors (torch.load with weights_only=True, "
                         f"which runs no code from the file, refused it: {type(e).__name__})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            continue
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:  # numpy has no bfloat16
            v = v.float()
        out[k.removeprefix("module.")] = v.numpy()
    if not out:
        raise ValueError(f"{path} contains no tensors")
    return out




def torch_to_flax(state_dict: Mapping[str, np.ndarray], target: Mapping) -> dict:
    """Convert ``state_dict`` into a variable tree shaped like ``target``.

    ``target`` is the model's variables (e.g. from ``init_model`` or
    ``jax.eval_shape``); only its structure and shapes are used.  Raises
    :class:`CheckpointMismatchError` listing missing, unexpected and
    mis-shaped tensors.
    """
    flat_target = {k: v for k, v in flatten_dict(dict(target)).items()}
    # flax path (without collection, leaf) -> collection/leaf names present
    converted: dict[tuple, np.ndarray] = {}
    unexpected, misshaped = [], []
    used = set()
    for name, value in state_dict.items():
        if name.endswith("num_batches_tracked"):
            continue
        module, _, leaf = name.rpartition(".")
        path = flax_path(module)
        candidates = {
            "weight": [("params", "kernel"), ("params", "scale")],
            "bias": [("params", "bias")],
            "running_mean": [("batch_stats", "mean")],
            "running_var": [("batch_stats", "var")],
        }.get(leaf, [])
        key = None
        for coll, fleaf in candidates:
            k = (coll, *path, fleaf)
            if k in flat_target:
                key = k
                break
        if key is None:
            unexpected.append(f"{name} {tuple(value.shape)}")
            continue
        arr = np.asarray(value, np.float32)
        if key[-1] == "kernel":
            arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T
        want = tuple(flat_target[key].shape)
        if arr.shape != want:
            misshaped.append(f"{name}: checkpoint {tuple(value.shape)} -> {arr.shape}, model expects {want}")
            used.add(key)  # present, only mis-shaped: report it once, not also as missing
            continue
        converted[key] = arr
        used.add(key)
    missing = ["/".join(k) + f" {tuple(v.shape)}" for k, v in flat_target.items() if k not in used]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(mismatch_message("checkpoint", missing, unexpected, misshaped))
    return jax.tree_util.tree_map(np.asarray, unflatten_dict(converted))
