"""Broden-format datasets: reading, checking and streaming images (DESIGN.md §2)."""

from dissect.data.broden import (
    BrodenDataset,
    Problem,
    decode_segmentation,
    pad_segmentations,
    parse_dataset,
)
from dissect.data.check import check_dataset
from dissect.data.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NETDISSECT_MEAN,
    NETDISSECT_STD,
    check_normalisation,
    collate_segmented,
    image_tensor,
    make_loader,
)
from dissect.data.vocab import Concept, Vocabulary

__all__ = [
    "BrodenDataset",
    "Problem",
    "Vocabulary",
    "Concept",
    "check_dataset",
    "decode_segmentation",
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
