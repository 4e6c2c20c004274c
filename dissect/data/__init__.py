"""Broden-format datasets: reading, checking and streaming images (DESIGN.md §2)."""

from dissect.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NETDISSECT_MEAN,
    NETDISSECT_STD,
    check_normalisation,
)
from dissect.data.broden import (
    BrodenDataset,
    Problem,
    decode_segmentation,
    encode_labels,
    pad_segmentations,
    parse_dataset,
)
from dissect.data.check import check_dataset
from dissect.data.vocab import Concept, Vocabulary

#: Names of :mod:`dissect.data.loader`, imported on first use: the loader needs torch, and
#: reading or checking a dataset must not pay for it.
_LOADER_NAMES = ("collate_segmented", "image_tensor", "make_loader")


def __getattr__(name: str) -> object:
    if name in _LOADER_NAMES:
        from dissect.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'dissect.data' has no attribute {name!r}")

__all__ = [
    "BrodenDataset",
    "Problem",
    "Vocabulary",
    "Concept",
    "check_dataset",
    "decode_segmentation",
    "encode_labels",
    "parse_dataset",
    "pad_segmentations",
    "make_loader",
    "collate_segmented",
    "image_tensor",
    "check_normalisation",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NETDISSECT_MEAN",
    "NETDISSECT_STD",
]
