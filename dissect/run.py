"""A run: its resolved configuration, ``run.json``, and the whole pipeline in one call.

``run_dir/run.json`` records the resolved config, package versions, the device and each stage's
wall time and peak memory (DESIGN.md §4). Later commands (`tally`, `ablate`, `report`) read the
model, weights, preprocessing and dataset from it, so they need not be repeated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

from dissect.data import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset, check_normalisation
from dissect.errors import CacheError, OptionError

RUN_SCHEMA_VERSION = 1
UNION_RULES = ("touched", "annotated", "all")
DTYPES = ("float16", "float32")
ABLATION_STUDIES = ("single", "topn", "concept", "random")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, resolved. Saved as ``run.json["config"]``.

    Paths are stored absolute. ``layers`` are dotted module names (patterns are resolved before
    recording). Tally options follow DESIGN.md §3; ablation options §6.
    """

    model: str
    layers: tuple[str, ...]
    dataset: str
    out: str
    weights: str | None = None
    num_classes: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: tuple[int, int] | None = None
    batch_size: int = 32
    device: str | None = None
    dtype: str = "float16"
    logits: bool = False
    autocast: str | None = None
    channels_last: bool = False
    quantile: float = 0.005
    thresholds: str | None = None
    union: str = "touched"
    categories: tuple[str, ...] | None = None
    iou_threshold: float = 0.04
    scheduler: str = "threads"
    ablate: bool = False
    classes: str | None = None
    ablation_studies: tuple[str, ...] = ("single", "topn", "random")
    ablation_layers: tuple[str, ...] | None = None
    rule: str = "zero"
    repeats: int = 5
    rank_split: str = "train"
    eval_split: str = "val"
    n: tuple[int, ...] | None = None
    concept: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.layers:
            raise OptionError("--layers: name at least one layer (see `dissect layers MODEL`)")
        check_normalisation(self.mean, self.std)
        if self.autocast not in (None, "bfloat16", "float16"):
            raise OptionError(f"--autocast: {self.autocast!r} is not one of bfloat16, float16")
        if self.dtype not in DTYPES:
            raise OptionError(f"--dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.union not in UNION_RULES:
            raise OptionError(f"--union: {self.union!r} is not one of {', '.join(UNION_RULES)}")
        if not 0.0 < self.quantile < 1.0:
            raise OptionError(f"--quantile: expected a value in (0, 1), got {self.quantile}")
        if self.batch_size < 1:
            raise OptionError(f"--batch-size: expected a positive integer, got {self.batch_size}")
        if self.rule not in ("zero", "mean"):
            raise OptionError(f"--rule: {self.rule!r} is not one of zero, mean")
        for study in self.ablation_studies:
            if study not in ABLATION_STUDIES:
                raise OptionError(f"--study: {study!r} is not one of {', '.join(ABLATION_STUDIES)}")
        if "concept" in self.ablation_studies and self.ablate and not self.concept:
            raise OptionError("--study concept needs --concept NAME")
        from dissect.parallel import check_scheduler

        check_scheduler(self.scheduler)

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise OptionError(f"run config: unknown field(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(names))}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for name, value in data.items():
            _check_field_type(name, types[name], value)
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise OptionError(f"run config: {error}") from None


_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_field_type(name: str, annotation: str, value: Any) -> None:
    """OptionError naming the field when a JSON value does not have the field's type
    (``annotation`` is the RunConfig annotation text, e.g. ``'tuple[int, ...] | None'``)."""
    options = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in options:
        return
    kind = options[0]

    def fits(item: Any, scalar: str) -> bool:
        return isinstance(item, _SCALARS[scalar]) and (scalar == "bool"
                                                       or not isinstance(item, bool))

    if kind.startswith("tuple["):
        items = [t.strip() for t in kind[len("tuple["):-1].split(",") if t.strip() != "..."]
        ok = isinstance(value, (list, tuple)) and all(fits(v, items[0]) for v in value)
        expected = f"a list of {items[0]} values"
    else:
        ok = fits(value, kind)
        expected = (("an " if kind == "int" else "a ") + kind
                    + (" (true or false)" if kind == "bool" else ""))
    if not ok:
        raise OptionError(f"run config: field {name!r} is {value!r}; expected {expected}"
                          + (" or null" if "None" in options else ""))


def run_json_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "run.json"


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The contents of ``run_dir/run.json``; CacheError when there is none."""
    path = run_json_path(run_dir)
    if not path.is_file():
        raise CacheError(f"{path} does not exist: {run_dir} is not a run directory "
                         f"(create one with `dissect record` or `dissect run`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CacheError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        raise CacheError(f"{path} is not a dissect run record (expected a JSON object with "
                         f"'config' and 'stages' objects); create the run with `dissect record` "
                         f"or `dissect run`")
    return data


def read_config(run_dir: str | os.PathLike[str]) -> RunConfig:
    """The :class:`RunConfig` saved in ``run_dir/run.json``.

    ``out`` is ``run_dir`` itself (resolved), not the path saved at record time, so a run
    directory that was moved or copied is read and written where it is now. ``thresholds`` is
    None: a thresholds file is given per command (see :func:`write_run_json`).
    """
    data = read_run(run_dir)
    if not isinstance(data.get("config"), dict):
        raise CacheError(f"{run_json_path(run_dir)} has no 'config' object; it was not written "
                         f"by dissect (create the run with `dissect record` or `dissect run`)")
    # thresholds are never kept (write_run_json); run.json of earlier versions may name a file
    config = {**data["config"], "out": str(Path(run_dir).resolve()), "thresholds": None}
    return RunConfig.from_json(config)


def package_versions() -> dict[str, str]:
    """Versions of dissect, Python and the packages it depends on."""
    import dissect

    versions = {"dissect": dissect.__version__, "python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "scipy", "h5py", "dask", "distributed",
                 "pillow", "jinja2"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def write_run_json(config: RunConfig, *, device: str | None = None,
                   stages: dict[str, Any] | None = None) -> Path:
    """Write (or update) ``run.json``: config, versions, device; stages already there are kept.

    ``thresholds`` is not kept: a thresholds file belongs to one layer and one command (the
    stage record of the layer it was used for names its sha256), so a later command never
    applies it to another layer.
    """
    path = run_json_path(config.run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = read_run(config.run_dir) if path.is_file() else {}
    data = {
        "schema_version": RUN_SCHEMA_VERSION,
        "config": dataclasses.replace(config, thresholds=None).to_json(),
        "versions": package_versions(),
        "device": device or previous.get("device") or "cpu",
        "stages": {**previous.get("stages", {}), **(stages or {})},
    }
    return _save_run(path, data)


def _save_run(path: Path, data: dict[str, Any]) -> Path:
    """Write run.json whole (a partial file renamed into place), so a reader never sees half."""
    temporary = path.with_suffix(".json.partial")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)
    return path


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
        # worker processes (DataLoader, Dask processes): the largest any child reached so far
        timing.children_peak_rss_mb = resource.getrusage(
            resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _record_stage(run_dir: Path, name: str, timing: StageTiming) -> None:
    data = read_run(run_dir)
    data.setdefault("stages", {})[name] = timing.to_json()
    _save_run(run_json_path(run_dir), data)


def _device_name(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_dataset(config: RunConfig) -> BrodenDataset:
    """The run's dataset, every image (cache rows are dataset images), chosen categories."""
    return BrodenDataset(config.dataset, categories=config.categories)


def record_stage(config: RunConfig, *, force: bool = False, progress: bool = True
                 ) -> dict[str, Path]:
    """Record the activations of every layer of ``config`` (resuming a partial cache)."""
    from dissect.record import load_model, record_activations, resolve_layers

    dataset = BrodenDataset(config.dataset)
    model = load_model(config.model, config.weights, config.num_classes)
    layers = tuple(resolve_layers(model, config.layers))
    if layers != config.layers:
        config = dataclasses.replace(config, layers=layers)
    _check_same_recording(config)
    device = _device_name(config.device)
    with stage_timer() as timing:
        paths = record_activations(
            model, dataset, list(layers), config.run_dir, mean=config.mean, std=config.std,
            resize=config.resize, batch_size=config.batch_size, device=device,
            dtype=config.dtype, logits=config.logits, force=force, progress=progress,
            model_spec=config.model, autocast=config.autocast,
            channels_last=config.channels_last)
    # run.json is written only once the recorder accepted the run directory, so a refused run
    # (a cache from another model, say) leaves the earlier run's record untouched.
    write_run_json(_merge_layers(config), device=device)
    _remember_caches(config.run_dir, paths)
    if force:
        _drop_results(config.run_dir, layers)
    timing.extra["layers"] = list(layers)
    _record_stage(config.run_dir, "record", timing)
    return paths


def _remember_caches(run_dir: Path, paths: dict[str, Path]) -> None:
    """Keep each recorded layer's cache fingerprint in run.json (``caches``), so that later
    stages can tell this run's caches from files put in their place."""
    from dissect.record import open_cache

    data = read_run(run_dir)
    caches = data.setdefault("caches", {})
    for layer, path in paths.items():
        caches[layer] = open_cache(path).fingerprint
    _save_run(run_json_path(run_dir), data)


def _check_cache(config: RunConfig, layer: str, fingerprint: dict[str, Any],
                 expected: dict[str, Any] | None, cache: Path) -> None:
    """CacheError unless ``cache`` (its ``fingerprint``) is the one recorded for ``layer`` in
    this run (``expected``: run.json's ``caches[layer]``, None for runs of earlier versions)."""
    from dissect.record.cache import LAYOUT_FIELDS, changed_fields

    if expected is None:          # runs of earlier versions: what the config says
        expected = {"layer": layer, "model": config.model}
        fingerprint = {k: fingerprint.get(k) for k in expected}
    changed = [k for k in changed_fields(fingerprint, expected) if k not in LAYOUT_FIELDS]
    if changed:
        raise CacheError(f"{cache} is not the cache recorded for layer {layer!r} in this run "
                         f"(changed: {', '.join(changed)}); record it again with `dissect "
                         f"record ... --layers {layer} --force`")


def _drop_results(run_dir: Path, layers: Sequence[str]) -> None:
    """Remove what was computed from the earlier caches of ``layers`` (recorded again with
    --force): their dissection, tally and ablation files and stage records, so that no later
    command or report mixes them with the new activations."""
    from dissect.ablation.result import ABLATION_CSV, ABLATION_H5
    from dissect.tally import DISSECTION_FILE, TALLY_FILE

    for layer in layers:
        for name in (DISSECTION_FILE, TALLY_FILE, ABLATION_H5, ABLATION_CSV):
            (run_dir / layer / name).unlink(missing_ok=True)
    data = read_run(run_dir)
    stages = data.get("stages", {})
    stale = [key for key in stages if key in {f"{kind}:{layer}" for layer in layers
                                              for kind in ("tally", "ablate")}]
    if stale:
        for key in stale:
            del stages[key]
        _save_run(run_json_path(run_dir), data)


#: Settings every layer cache of one run shares (what the activations depend on).
RECORDING_FIELDS = ("model", "weights", "num_classes", "dataset", "mean", "std", "resize",
                    "dtype", "autocast")


def _earlier_layers(config: RunConfig) -> tuple[dict[str, Any], list[str]]:
    """(run.json's config, or {}; the layers recorded into ``config.out`` before, with a cache,
    that this recording leaves as they are)."""
    if not run_json_path(config.run_dir).is_file():
        return {}, []
    from dissect.record import cache_path

    previous = read_run(config.run_dir).get("config") or {}
    return previous, [layer for layer in previous.get("layers", [])
                      if layer not in config.layers
                      and cache_path(config.run_dir, layer).is_file()]


def _check_same_recording(config: RunConfig) -> None:
    """OptionError when the run directory holds other layers recorded with other settings.

    run.json has one model, dataset and preprocessing for the whole run (later commands read
    them), so a layer added to a run must be recorded like the layers already there.
    """
    previous, others = _earlier_layers(config)
    mine = {k: v for k, v in config.to_json().items() if k in RECORDING_FIELDS}
    changed = [k for k in RECORDING_FIELDS if k in previous and previous[k] != mine[k]]
    if others and changed:
        raise OptionError(
            f"--out {config.run_dir} holds layer(s) {', '.join(others)} recorded with other "
            f"{', '.join(changed)} ({', '.join(f'{k}={previous[k]!r}' for k in changed)}); "
            f"record into another --out, or give the same settings, or record every layer "
            f"again (--layers {' '.join([*others, *config.layers])} --force)")


def _merge_layers(config: RunConfig) -> RunConfig:
    """Keep layers recorded earlier into the same run directory (:func:`_check_same_recording`
    made sure they were recorded with the same settings)."""
    _, earlier = _earlier_layers(config)
    return dataclasses.replace(config, layers=tuple(earlier) + config.layers)


def _tally_options(config: RunConfig) -> dict[str, Any]:
    return {"quantile": config.quantile, "thresholds": config.thresholds, "union": config.union,
            "categories": list(config.categories) if config.categories else None,
            "iou_threshold": config.iou_threshold}


def tally_stage(config: RunConfig, layers: Sequence[str] | None = None, *,
                force: bool = False, save_config: bool = False) -> dict[str, Any]:
    """Dissect each layer from its cache; a layer already tallied with the same options, the
    same cache and the same thresholds file is skipped unless ``force``.

    With ``save_config`` the config (its tally options) is written to run.json once every
    layer succeeded.
    """
    from dissect.record import cache_path, open_cache
    from dissect.tally import dissect_layer, load_dissection

    dataset = open_dataset(config)
    recorded_dataset = dataset.fingerprint(selection=False)
    results = {}
    run = read_run(config.run_dir)
    stages, recorded = run.get("stages", {}), run.get("caches", {})
    layers = list(layers or config.layers)
    if config.thresholds and len(layers) != 1:
        raise OptionError(f"--thresholds: {config.thresholds} holds one layer's thresholds; "
                          f"choose that layer with --layers (this run has {', '.join(layers)})")
    for layer in layers:
        if layer not in config.layers:
            raise OptionError(f"--layers: {layer!r} was not recorded in {config.run_dir}; "
                              f"recorded: {', '.join(config.layers)}")
        cache = cache_path(config.run_dir, layer)
        info = open_cache(cache)
        cached_dataset = (info.fingerprint or {}).get("dataset")
        if cached_dataset != recorded_dataset:
            raise CacheError(
                f"{cache} was recorded on another dataset than {config.dataset} (its index or "
                f"label files differ); tally the dataset it was recorded on, or record again")
        _check_cache(config, layer, dict(info.fingerprint or {}), recorded.get(layer), cache)
        options = {**_tally_options(config), "cache": _fingerprint_text(info),
                   "thresholds_sha256": _file_sha256(config.thresholds)}
        name = f"tally:{layer}"
        layer_dir = config.run_dir / layer
        if not force and stages.get(name, {}).get("options") == options and \
                (layer_dir / "dissection.h5").is_file():
            try:
                results[layer] = load_dissection(layer_dir)
                continue
            except CacheError:      # damaged (e.g. a disk filled up): compute it again
                pass
        with stage_timer() as timing:
            results[layer] = dissect_layer(
                cache, dataset, layer=layer, quantile=config.quantile,
                thresholds=config.thresholds, union=config.union,
                iou_threshold=config.iou_threshold, scheduler=config.scheduler,
                device=config.device, out_dir=layer_dir)
        timing.extra["options"] = options
        _record_stage(config.run_dir, name, timing)
    if save_config:
        write_run_json(config)
    return results


def _file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as error:
        raise OptionError(f"--thresholds: cannot read {path}: {error}") from None


def _fingerprint_text(info: Any) -> str:
    fingerprint = getattr(info, "fingerprint", "")
    return fingerprint if isinstance(fingerprint, str) else json.dumps(fingerprint, sort_keys=True)


def ablation_stage(config: RunConfig, layers: Sequence[str] | None = None) -> None:
    """Run the configured ablation studies on each layer (``ablation_layers`` by default)."""
    from dissect.ablation import run_ablation

    for layer in layers or config.ablation_layers or config.layers:
        with stage_timer() as timing:
            for study in config.ablation_studies:
                run_ablation(config.run_dir, layer, study, classes=config.classes,
                             rule=config.rule, repeats=config.repeats,
                             rank_split=config.rank_split, eval_split=config.eval_split,
                             scheduler=config.scheduler, seed=config.seed,
                             n=list(config.n) if config.n else None, concept=config.concept)
        timing.extra["studies"] = list(config.ablation_studies)
        _record_stage(config.run_dir, f"ablate:{layer}", timing)


def report_stage(run_dir: str | os.PathLike[str]) -> Path:
    """Render the HTML report of a run; returns the path of index.html."""
    run_dir = Path(run_dir)
    read_run(run_dir)  # a clear error before anything else when run_dir is not a run
    from dissect.report import render_report

    with stage_timer() as timing:
        index = render_report(run_dir)
    _record_stage(run_dir, "report", timing)
    return index


def run_pipeline(config: RunConfig, *, force: bool = False, progress: bool = True) -> Path:
    """Record, tally, (ablate,) report. Resumes whatever is already done. Returns index.html."""
    record_stage(config, force=force, progress=progress)
    config = dataclasses.replace(read_config(config.run_dir), thresholds=config.thresholds)
    tally_stage(config, force=force)
    if config.ablate:
        ablation_stage(config)
    return report_stage(config.run_dir)
