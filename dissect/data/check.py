"""`dissect dataset check`: list every problem of a dataset with its file and line."""

from __future__ import annotations

import os

from dissect.data.broden import BrodenDataset, Problem, parse_dataset
from dissect.errors import DatasetError


def check_dataset(root: str | os.PathLike[str]) -> list[Problem]:
    """Every problem of the dataset at ``root``: csv structure, label numbers, paths that escape
    the root, and every image and segmentation PNG decoded and compared with index.csv's sizes.

    Returns an empty list for a clean dataset.
    """
    parsed, problems = parse_dataset(root)
    dataset = BrodenDataset.from_parsed(parsed)
    for attribute, columns in (("image_size", "ih,iw"), ("seg_size", "sh,sw")):
        sizes = {getattr(entry, attribute) for entry in parsed.entries}
        if len(sizes) > 1:
            problems.append(Problem("index.csv", None,
                                    f"columns {columns} differ between images: {sorted(sizes)}"))
    for index, entry in enumerate(parsed.entries):
        for load in (dataset.load_image, dataset.load_segmentation):
            try:
                load(index)
            except DatasetError as error:     # the problem names the line: no second copy
                message = str(error).replace(f" ({dataset._where(index)})", "")
                problems.append(Problem("index.csv", entry.line, message))
    return problems
