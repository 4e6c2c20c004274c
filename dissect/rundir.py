"""A run directory: every path of DESIGN.md §4, ``run.json`` and the stage records.

:class:`RunDir` is the one place that spells a run's file names; every stage asks it. It also owns
reading and writing ``run.json`` (one validated reader: :meth:`RunDir.config`) and the per-stage
records (wall time, peak memory, the options and cache a result came from).

This module imports neither torch, Dask nor h5py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from dissect.config import RunConfig
from dissect.errors import CacheError

__all__ = ["RUN_SCHEMA_VERSION", "RunDir", "StageTiming", "stage_timer", "package_versions",
           "LAYER_OUTPUTS"]

RUN_SCHEMA_VERSION = 1

# File names of ``<run>/<layer>/`` (DESIGN.md §4). Modules that write one of these files into a
# directory they are given import its name from here.
DISSECTION_FILE = "dissection.h5"
TALLY_FILE = "tally.csv"
ABLATION_H5 = "ablation.h5"
ABLATION_CSV = "ablation.csv"
ABLATION_META = "ablation.json"
IMPORTANCE_CSV = "importance.csv"
COMPOSITIONAL_CSV = "compositional.csv"
COMPOSITIONAL_JSON = "compositional.json"
SIGNIFICANCE_CSV = "significance.csv"
SIGNIFICANCE_H5 = "significance.h5"

#: Files of ``<run>/<layer>/`` derived from the layer's cache: what ``record --force`` removes.
LAYER_OUTPUTS: tuple[str, ...] = (
    DISSECTION_FILE, TALLY_FILE, ABLATION_H5, ABLATION_CSV, ABLATION_META, IMPORTANCE_CSV,
    COMPOSITIONAL_CSV, COMPOSITIONAL_JSON, SIGNIFICANCE_CSV, SIGNIFICANCE_H5)


class RunDir:
    """The paths and records of one run directory.

    ``RunDir(path)`` does not touch the disk; :meth:`read` and :meth:`config` raise CacheError
    when ``run.json`` is missing or is not a dissect run record.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # --- paths (DESIGN.md §4) ---------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    def cache(self, layer: str) -> Path:
        """``cache/<layer>.h5`` (``/`` and ``\\`` in a layer name become ``_``)."""
        safe = layer.replace("/", "_").replace("\\", "_")
        return self.cache_dir / f"{safe}.h5"

    @staticmethod
    def eval_name(dataset: str | os.PathLike[str]) -> str:
        """The name of an ablation evaluation set in the run: its folder name (characters other
        than letters, digits, ``.``, ``_`` and ``-`` become ``_``) plus ``-`` and the first 8 hex
        digits of the sha256 of its absolute path, e.g. ``val-1a2b3c4d``: two sets of the same
        folder name in different places get different caches."""
        absolute = os.path.abspath(os.fspath(dataset))
        folder = os.path.basename(absolute.rstrip(os.sep)) or "root"
        safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_"
                       for c in folder).lstrip(".") or "set"
        return f"{safe[:64]}-{hashlib.sha256(absolute.encode()).hexdigest()[:8]}"

    def eval_dir(self, name: str) -> Path:
        """``cache/eval-<name>/``: where the activations of the ablation evaluation set ``name``
        (:meth:`eval_name`) are recorded; the recorder is given it as its run directory."""
        return self.cache_dir / f"eval-{name}"

    def eval_cache(self, layer: str, name: str) -> Path:
        """``cache/eval-<name>/cache/<layer>.h5``: the layer's activations on the evaluation set
        ``name`` (the recorder's cache path under :meth:`eval_dir`), with its own fingerprint."""
        return RunDir(self.eval_dir(name)).cache(layer)

    @property
    def outputs(self) -> Path:
        """``cache/outputs.h5``: the model outputs (logits) of the dataset."""
        return self.cache_dir / "outputs.h5"

    def layer_dir(self, layer: str) -> Path:
        """``<layer>/``: where a layer's results go."""
        return self.path / layer

    def dissection(self, layer: str) -> Path:
        return self.layer_dir(layer) / DISSECTION_FILE

    def tally(self, layer: str) -> Path:
        return self.layer_dir(layer) / TALLY_FILE

    def ablation_h5(self, layer: str) -> Path:
        return self.layer_dir(layer) / ABLATION_H5

    def ablation_csv(self, layer: str) -> Path:
        return self.layer_dir(layer) / ABLATION_CSV

    def ablation_meta(self, layer: str) -> Path:
        """``<layer>/ablation.json``: the companion metadata of ablation.csv (options,
        evaluation set, warnings)."""
        return self.layer_dir(layer) / ABLATION_META

    def importance(self, layer: str) -> Path:
        return self.layer_dir(layer) / IMPORTANCE_CSV

    def compositional_csv(self, layer: str) -> Path:
        return self.layer_dir(layer) / COMPOSITIONAL_CSV

    def compositional_json(self, layer: str) -> Path:
        return self.layer_dir(layer) / COMPOSITIONAL_JSON

    def significance_csv(self, layer: str) -> Path:
        return self.layer_dir(layer) / SIGNIFICANCE_CSV

    def significance_h5(self, layer: str) -> Path:
        return self.layer_dir(layer) / SIGNIFICANCE_H5

    @property
    def explain_dir(self) -> Path:
        """``explain/``: one ``<name>.json`` (and a ``<name>/`` of heatmaps) per image set."""
        return self.path / "explain"

    @property
    def class_profiles_dir(self) -> Path:
        """``explain/classes/``: one ``<name>.json`` per class concept profile
        (``dissect explain --class``)."""
        return self.explain_dir / "classes"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    def outputs_of(self, layer: str) -> list[Path]:
        """Every file derived from ``layer``'s cache (what ``record --force`` removes)."""
        return [self.layer_dir(layer) / name for name in LAYER_OUTPUTS]

    # --- run.json ---------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether ``run.json`` exists."""
        return self.run_json.is_file()

    def read(self) -> dict[str, Any]:
        """The contents of ``run.json``; CacheError when there is none or it is not a run
        record."""
        path = self.run_json
        if not path.is_file():
            raise CacheError(f"{path} does not exist: {self.path} is not a run directory "
                             f"(create one with `dissect record` or `dissect run`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CacheError(f"{path} is not valid JSON: {error}") from None
        except OSError as error:
            raise CacheError(f"cannot read {path}: {error}") from None
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict) \
                or not isinstance(data.get("config"), dict):
            raise CacheError(f"{path} is not a dissect run record (expected a JSON object with "
                             f"'config' and 'stages' objects); create the run with `dissect "
                             f"record` or `dissect run`")
        return data

    def config(self) -> RunConfig:
        """The validated :class:`RunConfig` of ``run.json``.

        ``out`` is this directory (resolved), not the path saved at record time, so a run
        directory that was moved or copied is read and written where it is now;
        ``thresholds`` is None (a thresholds file is given per command).
        """
        data = self.read()
        values = {**data["config"], "out": str(self.path.resolve()), "thresholds": None}
        return RunConfig.from_json(values, where=str(self.run_json))

    def write_config(self, config: RunConfig, *, device: str | None = None) -> Path:
        """Write (or update) ``run.json``: config, versions, device; stage records and cache
        fingerprints already there are kept. Per-command options (``saved=False``, e.g. a
        thresholds file) are stored as null: they never apply to a later command."""
        previous = self.read() if self.exists() else {}
        saved = {k: (v if RunConfig.__dataclass_fields__[k].metadata["option"].saved else None)
                 for k, v in config.to_json().items()}
        data = {**previous,
                "schema_version": RUN_SCHEMA_VERSION,
                "config": saved,
                "versions": package_versions(),
                "device": device or previous.get("device") or "cpu",
                "stages": previous.get("stages", {})}
        return self._save(data)

    def _save(self, data: dict[str, Any]) -> Path:
        """Write run.json whole (a partial file renamed into place): a reader never sees half."""
        self.path.mkdir(parents=True, exist_ok=True)
        temporary = self.run_json.with_suffix(".json.partial")
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        temporary.replace(self.run_json)
        return self.run_json

    def update(self, **entries: Any) -> None:
        """Set top-level entries of run.json (e.g. ``caches``), keeping the rest."""
        data = self.read()
        data.update(entries)
        self._save(data)

    # --- stage records ----------------------------------------------------------------------
    def stages(self) -> dict[str, Any]:
        """``run.json["stages"]``: name -> {wall_s, peak_rss_mb, options, ...}."""
        return dict(self.read().get("stages", {}))

    def record_stage(self, name: str, timing: StageTiming) -> None:
        """Store one stage's timing (and its ``extra``: options, cache) under ``name``."""
        data = self.read()
        data.setdefault("stages", {})[name] = timing.to_json()
        self._save(data)

    def caches(self) -> dict[str, Any]:
        """``run.json["caches"]``: layer -> the fingerprint of the cache recorded for it."""
        return dict(self.read().get("caches", {}))

    def drop_layer_outputs(self, layers: list[str] | tuple[str, ...]) -> list[Path]:
        """Remove every file derived from the caches of ``layers`` and their stage records
        (their caches were recorded again); returns the removed files."""
        removed = []
        for layer in layers:
            for path in self.outputs_of(layer):
                if path.exists():
                    path.unlink()
                    removed.append(path)
        data = self.read()
        stages = data.get("stages", {})
        stale = [key for key in stages if ":" in key and key.split(":", 1)[1] in layers]
        for key in stale:
            del stages[key]
        if stale:
            self._save(data)
        return removed


def package_versions() -> dict[str, str]:
    """Versions of dissect, Python and the packages it depends on."""
    import dissect

    versions = {"dissect": dissect.__version__, "python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "scipy", "h5py", "dask", "distributed",
                 "pillow", "jinja2", "captum"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class StageTiming:
    """Wall time and peak resident memory of one stage (filled in when the stage ends).

    ``peak_rss_mb`` is this process's peak during the stage; ``children_peak_rss_mb`` the
    largest peak of any finished child process (decoding workers, Dask process workers).
    ``extra`` holds what else the record keeps (options, cache fingerprint, layers).
    """

    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    children_peak_rss_mb: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 3), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "children_peak_rss_mb": round(self.children_peak_rss_mb, 1), **self.extra}


@contextlib.contextmanager
def stage_timer(interval: float = 0.05) -> Iterator[StageTiming]:
    """Measure a stage: wall time, and peak RSS of this process sampled every ``interval`` s.

    Where /proc is unavailable the peak falls back to the process's lifetime maximum.
    """
    timing = StageTiming()
    peak = [_rss_bytes() or 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], _rss_bytes() or 0)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield timing
    finally:
        stop.set()
        thread.join()
        timing.wall_s = time.perf_counter() - start
        measured = max(peak[0], _rss_bytes() or 0)
        if measured == 0:
            measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        timing.peak_rss_mb = measured / 2**20
        timing.children_peak_rss_mb = resource.getrusage(
            resource.RUSAGE_CHILDREN).ru_maxrss / 1024
