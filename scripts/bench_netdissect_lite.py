"""Time NetDissect-Lite's own quantile and tally on `scripts/bench_tally.py`'s data.

NetDissect-Lite (github.com/CSAILVision/NetDissect-Lite) is not a dependency and is not
vendored: pass a checkout of it with ``--checkout``. Per layer shape the script runs, in one
fresh process, its ``FeatureOperator.quantile_threshold`` (a KLL-style sketch) and
``FeatureOperator.tally`` (``settings.PARALLEL = 1``, its default and its recommendation; its
label prefetcher keeps its own worker processes) on the activation cache and the Broden-layout
dataset that ``bench_tally.py --workdir DIR`` generated, and prints one JSON line per shape:
seconds per 1000 images of each stage (the cache is read into memory as float32 before the
timing, as NetDissect-Lite's memmapped features would be) and the largest relative difference
of its sketch thresholds from the exact ``numpy.quantile``.

Its code was written for SciPy < 1.3, NumPy 1 and Python < 3.7, so the script supplies, without
changing its files: ``scipy.misc.imread`` (PIL decode; uint16 so that ``R + G * 256`` does not
overflow under NumPy 2's casting rules, as uint8 did not under NumPy 1's), ``scipy.misc.imresize``
(``mode='F'``: PIL's bilinear resize of a float image, what SciPy's did), ``numpy.NaN``, a
``settings`` module, a ``SegmentationPrefetcher.batches`` that ends instead of raising
StopIteration inside a generator (a RuntimeError since Python 3.7), and a view of the dataset
whose label.csv omits the row of label 0 (as Broden's does; NetDissect-Lite cannot parse its
empty category).

Usage::

    python scripts/bench_tally.py --workdir /tmp/bt                   # generates the data
    python scripts/bench_netdissect_lite.py --checkout ~/NetDissect-Lite --workdir /tmp/bt
    python scripts/bench_tally.py --workdir /tmp/bt --netdissect-lite ~/NetDissect-Lite
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

SHAPES = "512x7,256x14,128x28,64x56"


def dataset_view(data: Path, view: Path) -> Path:
    """``view``: links to every file of the dataset ``data``, but label.csv without label 0."""
    view.mkdir(parents=True, exist_ok=True)
    for item in data.iterdir():
        link = view / item.name
        if item.name != "label.csv" and not link.exists():
            link.symlink_to(item.resolve())
    lines = (data / "label.csv").read_text().splitlines(keepends=True)
    (view / "label.csv").write_text("".join(
        line for line in lines if not line.startswith("0,")))
    return view


def install_shims(data: Path, output: Path) -> None:
    """The modules and names NetDissect-Lite imports that today's SciPy/NumPy lack."""
    import scipy
    from PIL import Image

    misc = types.ModuleType("scipy.misc")
    misc.imread = lambda path, *args, **kwargs: np.array(Image.open(path)).astype(np.uint16)

    def imresize(array: np.ndarray, size: tuple[int, int], interp: str = "bilinear",
                 mode: str | None = None) -> np.ndarray:
        image = Image.fromarray(np.asarray(array, dtype=np.float32), mode="F")
        return np.array(image.resize((size[1], size[0]), resample=Image.BILINEAR))

    misc.imresize = imresize
    sys.modules["scipy.misc"] = misc
    scipy.misc = misc
    np.NaN = np.nan                                     # removed in NumPy 2
    settings = types.ModuleType("settings")
    settings.__dict__.update(
        GPU=False, TEST_MODE=False, QUANTILE=0.005, PARALLEL=1, IMG_SIZE=224,
        CATAGORIES=["color", "object", "part", "material", "scene", "texture"],
        DATA_DIRECTORY=str(data), OUTPUT_FOLDER=str(output), INDEX_FILE="index.csv",
        TALLY_BATCH_SIZE=16, TALLY_AHEAD=4, BATCH_SIZE=128, WORKERS=2)
    sys.modules["settings"] = settings


def measure(checkout: Path, workdir: Path, units: int, side: int) -> dict[str, float]:
    """NetDissect-Lite's quantile and tally on one layer shape, in this process."""
    import h5py

    data = dataset_view(workdir / "dataset", workdir / "netdissect_lite" / "dataset")
    install_shims(data, workdir / "netdissect_lite" / "out")
    sys.path.insert(0, str(checkout))
    from feature_operation import FeatureOperator  # NetDissect-Lite's
    from loader.data_loader import SegmentationData, SegmentationPrefetcher

    def batches(self: SegmentationPrefetcher):             # type: ignore[no-untyped-def]
        while (batch := self.fetch_batch()) is not None:
            yield batch

    SegmentationPrefetcher.batches = batches
    with h5py.File(workdir / "cache" / f"layer_{units}x{side}.h5", "r") as file:
        features = file["acts"][:].astype(np.float32)               # (N, U, h, w)
    operator = FeatureOperator.__new__(FeatureOperator)     # its __init__ also loads images
    operator.data = SegmentationData(str(data), categories=sys.modules["settings"].CATAGORIES)
    start = time.perf_counter()
    thresholds = operator.quantile_threshold(features)
    quantile_s = time.perf_counter() - start
    start = time.perf_counter()
    operator.tally(features, thresholds)
    tally_s = time.perf_counter() - start
    exact = np.quantile(np.moveaxis(features, 1, 0).reshape(units, -1), 0.995, axis=1)
    n = len(features)
    return {"n": n, "quantile_s_per_1000": quantile_s * 1000 / n,
            "tally_s_per_1000": tally_s * 1000 / n,
            "sketch_max_relative_error": float(np.max(np.abs(thresholds - exact)
                                                      / np.maximum(np.abs(exact), 1e-12)))}


def run(checkout: Path, workdir: Path, units: int, side: int) -> dict[str, float]:
    """:func:`measure` in a fresh process (its output, NetDissect-Lite's progress lines, is
    dropped); returns its figures."""
    command = [sys.executable, str(Path(__file__).resolve()), "--checkout", str(checkout),
               "--workdir", str(workdir), "--shapes", f"{units}x{side}", "--in-process"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, required=True,
                        help="a NetDissect-Lite checkout (its feature_operation.py)")
    parser.add_argument("--workdir", type=Path, required=True,
                        help="bench_tally.py's --workdir (dataset/ and cache/)")
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.checkout / "feature_operation.py").is_file():
        parser.error(f"--checkout: {args.checkout} holds no feature_operation.py")
    for part in args.shapes.split(","):
        units, _, side = part.strip().partition("x")
        cache = args.workdir / "cache" / f"layer_{units}x{side}.h5"
        if not cache.is_file():
            parser.error(f"--workdir: {cache} is missing (run bench_tally.py --workdir "
                         f"{args.workdir} --shapes {part.strip()} first)")
        if args.in_process:
            print(json.dumps(measure(args.checkout, args.workdir, int(units), int(side))))
        else:
            print(json.dumps({"shape": part.strip(),
                              **run(args.checkout, args.workdir, int(units), int(side))}),
                  flush=True)


if __name__ == "__main__":
    main()
