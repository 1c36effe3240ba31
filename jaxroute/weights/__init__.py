"""Pretrained weights: PyTorch import, orbax checkpoints, one loader."""
from jaxroute.weights.checkpoint import check_tree, read_meta, restore_variables, save_model
from jaxroute.weights.loader import abstract_variables, load_model
from jaxroute.weights.torch_import import CheckpointMismatchError, load_torch_state_dict, torch_to_flax

__all__ = [
    "CheckpointMismatchError", "abstract_variables", "check_tree", "load_model", "load_torch_state_dict",
    "read_meta", "restore_variables", "save_model", "torch_to_flax",
]
