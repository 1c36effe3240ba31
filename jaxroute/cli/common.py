"""What every ``jaxroute`` subcommand shares: the model and data flags, loading, output checks.

Subcommands live in their own modules (``jaxroute.cli.<topic>``), each with an
``add_parsers(sub)`` function that registers its parsers; they call a library
function and return ``(result_dict, human_text)``.  User errors are raised as
``ValueError`` (and the other types ``main`` catches) and end as one line with exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(result: dict, as_json: bool, human: str | None = None) -> None:
    if human:
        print(human)
    if as_json:
        print(json.dumps(result, sort_keys=True))


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="architecture name (see `jaxroute info`)")
    p.add_argument("--weights", help="jaxroute checkpoint dir, or a PyTorch .th/.pt/.pth file (needs torch)")
    p.add_argument("--gate-placement", choices=("post_act", "conv", "block"), default=None,
                   help="where the gates sit (default: the checkpoint's, else post_act)")


def add_data_args(p: argparse.ArgumentParser, split: str = "test") -> None:
    p.add_argument("--data", default="digits",
                   help="digits | path to an ImageFolder (split/class/*.jpg) or CIFAR-10 pickle folder | tfds:NAME")
    p.add_argument("--split", default=split)
    p.add_argument("--limit", type=int, default=None, help="use the first N samples (class-interleaved order)")
    p.add_argument("--data-dir", default=None, help="cache / tfds data dir")
    p.add_argument("--download", action="store_true", help="allow tfds to download (off by default)")
    add_preprocess_args(p)


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize", type=int, default=None,
                   help="image folders and tfds: shorter side resized to this many pixels (bilinear, antialiased) "
                        "before the centre crop (default: the model card's: 256 for ImageNet models, the input "
                        "size for CIFAR ones)")
    p.add_argument("--crop", type=int, default=None,
                   help="centre crop size (default: the model's input size)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out image files that do not decode (listed in the output manifest) instead of "
                        "stopping at the first one")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="processes decoding images for large or variable-size folders (default: cores - 1, "
                        "at most 8; 0 decodes on threads of this process)")


def model_from_args(args, need_weights: bool = False):
    """The GatedModel the arguments name."""
    from jaxroute.weights import load_model

    if need_weights and not args.weights and args.model != "digits_cnn":
        log(f"warning: no --weights given; {args.model} is randomly initialised")
    overrides = {}
    if getattr(args, "gate_placement", None):
        overrides["gate_placement"] = args.gate_placement
    import jax

    return load_model(args.model, args.weights, key=jax.random.key(getattr(args, "seed", 0)), **overrides)


def dataset_from_args(args, split=None, stream: bool = False, preprocess=None):
    from jaxroute.data import load_dataset

    workers = getattr(args, "decode_workers", None)
    if workers is not None and workers < 0:
        raise ValueError(f"--decode-workers must be >= 0, got {workers}")
    return load_dataset(args.data, args.split if split is None else split, limit=args.limit,
                        cache_dir=args.data_dir, download=args.download, stream=stream, preprocess=preprocess,
                        skip_bad=getattr(args, "skip_bad", False), workers=workers)


def preprocess_from_args(model_name: str, input_shape, args):
    """The model card's preprocessing, with the user's --resize/--crop."""
    from jaxroute.data.preprocess import preprocess_for

    return preprocess_for(model_name, input_shape, getattr(args, "resize", None), getattr(args, "crop", None))


def check_new_output(path, overwrite: bool) -> None:
    """A checkpoint directory about to be written: refuse an existing one (unless overwrite), check writability."""
    from pathlib import Path

    from jaxroute.utils.io import check_writable_dir

    path = Path(path)
    if path.exists() and not path.is_dir():  # --overwrite replaces checkpoint folders, never other files
        raise ValueError(f"output {path} exists and is not a directory")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")
    check_writable_dir(path.parent if str(path.parent) else Path("."))


def data_for(model, args, split=None, stream: bool = False):
    """The data set the arguments name, checked against the model."""
    from jaxroute.models.gated import check_dataset_fits

    ds = data_for_input(model.name, model.input_shape, args, split, stream)
    check_dataset_fits(model, ds)
    return ds


def data_for_input(model_name: str, input_shape, args, split=None, stream: bool = False):
    """The data set the arguments name, preprocessed for architecture ``model_name`` with input
    ``input_shape``; not yet checked against a model (commands whose model is costly to build
    load the data first, so that bad data arguments fail at once)."""
    pre = preprocess_from_args(model_name, input_shape, args)
    ds = dataset_from_args(args, split, stream=stream, preprocess=pre)
    explicit = getattr(args, "resize", None) is not None or getattr(args, "crop", None) is not None
    if explicit and (ds.info or {}).get("preprocess") != pre.to_json():
        raise ValueError(f"--resize/--crop apply to image folders and tfds data; {args.data!r} holds images "
                         "that are already preprocessed or arrays")
    return ds
