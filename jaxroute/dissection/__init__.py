"""Network dissection: the Broden format, an offline CIFAR concept set, and dissection of any gate point.

``read_broden`` / ``write_broden`` (:mod:`.broden`), ``dissect`` and its pieces
(:mod:`.dissect`), ``build_concepts`` (:mod:`.concepts`), and the resumable
``dissect_to_dir`` (:mod:`.job`) behind ``jaxroute dissect``.
"""
from jaxroute.dissection.broden import Broden, BrodenError, Label, Record, read_broden, write_broden
from jaxroute.dissection.dissect import (DissectConfig, LayerResult, Tally, dissect, pillow_bilinear_weights,
                                         tally_batch, tally_csv, unit_thresholds, upsample_bilinear)
from jaxroute.dissection.job import dissect_to_dir

__all__ = ["Broden", "BrodenError", "DissectConfig", "Label", "LayerResult", "Record", "Tally", "dissect",
           "dissect_to_dir", "pillow_bilinear_weights", "read_broden", "tally_batch", "tally_csv",
           "unit_thresholds", "upsample_bilinear", "write_broden"]
