"""What a model checkpoint says about its model: architecture, input, normalization, gates."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """Architecture name and the module fields and data facts that belong to the weights."""

    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gate_placement: str = "post_act"
    class_names: tuple[str, ...] | None = None
    source: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "ModelMeta":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        for k in ("input_shape", "mean", "std", "class_names"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def module_overrides(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "mean": self.mean, "std": self.std,
                "gate_placement": self.gate_placement}


def default_meta(name: str, source: str = "", **overrides) -> ModelMeta:
    """The model card's metadata for architecture ``name``, with ``overrides`` (None = keep)."""
    from jaxroute.models.registry import model_card

    card = model_card(name)
    kw = dict(arch=name, input_shape=card.input_shape, num_classes=card.num_classes,
              mean=tuple(card.mean), std=tuple(card.std), class_names=card.class_names, source=source)
    kw.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None})
    if overrides.get("num_classes") not in (None, card.num_classes) and "class_names" not in overrides:
        kw["class_names"] = None
    return ModelMeta(**kw)
