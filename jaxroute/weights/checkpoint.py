"""Save and restore models with orbax-checkpoint, plus jaxroute metadata.

Layout of a saved model directory::

    PATH/variables/     orbax checkpoint of the Flax variables
    PATH/jaxroute.json  architecture, module fields (normalization, gate
                        placement, classes), input shape, class names

The JSON is written last and atomically, so a directory without it is an
interrupted save and is refused on restore.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from jaxroute.models.meta import ModelMeta
from jaxroute.utils.io import atomic_write_text
from jaxroute.weights.torch_import import CheckpointMismatchError, mismatch_message

META_FILE = "jaxroute.json"


def check_tree(expected: Mapping, got: Mapping, what: str = "checkpoint") -> None:
    """Compare two variable trees by flattened names and shapes; raise listing all differences."""
    e = {"/".join(k): tuple(np.shape(v)) for k, v in flatten_dict(dict(expected)).items()}
    g = {"/".join(k): tuple(np.shape(v)) for k, v in flatten_dict(dict(got)).items()}
    missing = [f"{k} {s}" for k, s in e.items() if k not in g]
    unexpected = [f"{k} {s}" for k, s in g.items() if k not in e]
    misshaped = [f"{k}: {what} {g[k]}, model {s}" for k, s in e.items() if k in g and g[k] != s]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(mismatch_message(what, missing, unexpected, misshaped))


def save_model(path: str | os.PathLike, variables: Mapping, meta: ModelMeta, overwrite: bool = False) -> Path:
    path = Path(path).absolute()
    if path.exists():
        if not path.is_dir():  # overwrite replaces a checkpoint folder, never another file
            raise ValueError(f"{path} exists and is not a checkpoint directory")
        if not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    variables = jax.tree_util.tree_map(np.asarray, dict(variables))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "variables", variables)
    ckptr.wait_until_finished()
    atomic_write_text(path / META_FILE, json.dumps(meta.to_json(), indent=2))
    return path


def read_meta(path: str | os.PathLike) -> ModelMeta:
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"model checkpoint directory not found: {path}")
    if not meta_file.is_file():
        raise ValueError(
            f"{path} is not a complete jaxroute checkpoint (no {META_FILE}; "
            "an interrupted save, or a directory of another tool)"
        )
    try:
        return ModelMeta.from_json(json.loads(meta_file.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"corrupt checkpoint metadata {meta_file}: {e}") from e


def restore_variables(path: str | os.PathLike, expected: Mapping | None = None) -> dict:
    """Restore the variable tree; if ``expected`` (a tree or its eval_shape) is
    given, check names and shapes against it."""
    path = Path(path).absolute()
    try:
        variables = ocp.StandardCheckpointer().restore(path / "variables")
    except Exception as e:  # orbax and tensorstore raise many types, often with multi-line messages
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not restore variables from {path / 'variables'} (damaged or not an orbax "
                         f"checkpoint): {first}") from e
    variables = jax.tree_util.tree_map(np.asarray, variables)
    if expected is not None:
        check_tree(expected, variables, what=f"checkpoint {path}")
    return variables
