"""Every run option, once: its stage, help text, choices, default and check (DESIGN.md §9).

:class:`RunConfig` is the resolved configuration of a run (saved as ``run.json["config"]``). Each
of its fields carries an :class:`Option` in its dataclass metadata; the command line
(:func:`add_options`), ``run.json`` validation (:meth:`RunConfig.from_json`), ``--config FILE.json``
merging (:func:`config_from_options`) and the Python API defaults are all generated from it, so
an option's choices and default are written in this file only.

This module imports neither torch, Dask nor h5py: reading a config must stay cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dissect.errors import OptionError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NETDISSECT_MEAN",
    "NETDISSECT_STD",
    "UNION_RULES",
    "DTYPES",
    "AUTOCAST_DTYPES",
    "STUDIES",
    "ABLATION_RULES",
    "SCHEDULERS",
    "FORMULA_OPS",
    "SEARCHES",
    "NEGATIONS",
    "LAYOUTS",
    "EXPLAIN_METHODS",
    "EXPLAIN_GROUPS",
    "ATTRIBUTION_METHODS",
    "STAGES",
    "Option",
    "RunConfig",
    "check_quantile",
    "check_iou_threshold",
    "default_of",
    "check_scheduler",
    "check_normalisation",
    "check_choice",
    "add_options",
    "options_of",
    "config_from_options",
    "RECORDING_FIELDS",
]

# --- the registries of names (implementations register under these names) -----------------

#: torchvision's ImageNet normalisation (0..1 RGB scale): the default of every run.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: NetDissect-Lite's own preprocessing.
NETDISSECT_MEAN: tuple[float, float, float] = (0.48898, 0.46545, 0.42956)
NETDISSECT_STD: tuple[float, float, float] = (0.224, 0.224, 0.224)

#: Union rules of the IoU (DESIGN.md §3 step 3).
UNION_RULES: tuple[str, ...] = ("touched", "annotated", "all")
#: Cache dtypes and autocast dtypes.
DTYPES: tuple[str, ...] = ("float16", "float32")
AUTOCAST_DTYPES: tuple[str, ...] = ("bfloat16", "float16")
#: Ablation studies (DESIGN.md §6); ``dissect.ablation.run_ablation`` implements each.
STUDIES: tuple[str, ...] = ("single", "topn", "concept", "random")
#: Ablation rules; ``dissect.ablation.hooks`` registers a fill function under each name.
ABLATION_RULES: tuple[str, ...] = ("zero", "mean")
#: Local Dask schedulers; a ``tcp://host:port`` address of a dask.distributed scheduler also works.
SCHEDULERS: tuple[str, ...] = ("threads", "processes", "synchronous")
#: Operators of compositional formulas (DESIGN.md §10), their search and NOT semantics.
FORMULA_OPS: tuple[str, ...] = ("or", "and", "and_not")
SEARCHES: tuple[str, ...] = ("beam", "exact")
NEGATIONS: tuple[str, ...] = ("global", "annotated")
#: How layer outputs become (B, U, h, w) unit maps (dissect.record.LayoutOptions).
LAYOUTS: tuple[str, ...] = ("auto", "nchw", "nhwc", "tokens")
#: How a unit's contribution to a logit is measured (DESIGN.md §11), and how units are grouped.
EXPLAIN_METHODS: tuple[str, ...] = ("grad_x_act", "gradcam")
EXPLAIN_GROUPS: tuple[str, ...] = ("label", "category")
#: Input-space maps of `dissect explain` (captum).
ATTRIBUTION_METHODS: tuple[str, ...] = ("saliency", "gradcam", "ig", "occlusion")
#: Which command sets an option (and the order of the help groups).
STAGES: tuple[str, ...] = ("model", "record", "tally", "ablate", "compose", "significance",
                           "run")


# --- checks shared by the CLI, run.json and the Python API ----------------------------------

def check_choice(option: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``; else OptionError naming the option, the value,
    the allowed values and a close match."""
    if value in choices:
        return str(value)
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise OptionError(f"{option}: {value!r} is not one of {', '.join(choices)}{hint}")


def check_quantile(quantile: Any, option: str = "--quantile") -> float:
    """The top quantile q that defines a unit's mask: a number with 0 < q < 1 (OptionError)."""
    try:
        value = float(quantile)
    except (TypeError, ValueError):
        raise OptionError(f"{option}: expected a number in (0, 1), got {quantile!r}") from None
    if not 0.0 < value < 1.0:
        raise OptionError(f"{option}: expected a number in (0, 1), got {quantile!r}")
    return value


def check_scheduler(scheduler: str) -> str:
    """``scheduler`` when it is a local scheduler name or a ``tcp://host:port`` address."""
    if isinstance(scheduler, str) and (scheduler in SCHEDULERS
                                       or scheduler.startswith(("tcp://", "tls://"))):
        return scheduler
    raise OptionError(f"--scheduler: {scheduler!r} is not one of {', '.join(SCHEDULERS)} or "
                      f"tcp://host:port of a dask.distributed scheduler")


def check_normalisation(mean: Sequence[float], std: Sequence[float]
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validate ``mean`` and ``std``: three numbers each, mean in [0, 1] (the 0..1 pixel scale:
    pixels are divided by 255 first), std positive and finite; NaN is refused."""
    mean_t = tuple(float(v) for v in mean)
    std_t = tuple(float(v) for v in std)
    if len(mean_t) != 3 or not all(0.0 <= v <= 1.0 for v in mean_t):
        raise OptionError(f"--mean: expected three values r,g,b in [0, 1] (the 0..1 pixel "
                          f"scale; divide 0..255 values by 255), got {mean_t}")
    if len(std_t) != 3 or not all(0.0 < v < float("inf") for v in std_t):
        raise OptionError(f"--std: expected three positive finite values r,g,b, got {std_t}")
    return mean_t, std_t


def _positive(option: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and (isinstance(value, bool) or int(value) < 1):
            raise OptionError(f"{option}: expected a positive integer, got {value!r}")
    return check


def check_iou_threshold(value: Any) -> float:
    """The IoU cut-off of a detector: a number in [0, 1] (OptionError)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise OptionError(f"--iou-threshold: expected a number in [0, 1], got {value!r}")
    return number


def _candidates(value: Any) -> None:
    if value != "all" and not (isinstance(value, str) and value.isdigit() and int(value) > 0):
        raise OptionError(f"--candidates: expected 'all' or a positive number of labels, got "
                          f"{value!r}")


def _alpha(value: Any) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise OptionError(f"--alpha: expected a number in (0, 1), got {value!r}")


def _not_negative(option: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OptionError(f"{option}: expected an integer >= 0, got {value!r}")
    return check


def _sizes(value: Any) -> None:
    if value is not None and (not value or min(value) < 1):
        raise OptionError(f"--n: expected positive set sizes like 1,2,4, got {value!r}")


# --- argparse value parsers (named in Option.parse) ------------------------------------------

def float_triple(text: str) -> tuple[float, float, float]:
    """Parse ``r,g,b`` (three numbers) for --mean / --std."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers r,g,b, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers r,g,b, got {text!r}")
    return values  # type: ignore[return-value]


def int_list(text: str) -> list[int]:
    """Parse ``1,2,4`` for --n."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def size_pair(text: str) -> tuple[int, int]:
    """Parse ``S`` or ``H,W`` for --resize / --input-size."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or H,W, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected S or H,W with positive sizes, got {text!r}")
    return values[0], values[1]


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str, "int": int, "float": float, "float_triple": float_triple,
    "int_list": int_list, "size_pair": size_pair}


# --- the option table ----------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """How one RunConfig field appears on the command line and is checked.

    Attributes
    ----------
    stage: the command that sets it (one of :data:`STAGES`).
    help: the help text (the default is appended from the field's default).
    choices: allowed values (from a registry of names above), or None.
    flag: the command-line flag (default ``--`` + the field name with dashes).
    parse: name of the value parser (``str``, ``int``, ``float``, ``float_triple``,
        ``int_list``, ``size_pair``, or ``flag`` for a store-true switch).
    many: takes several values (``nargs='+'``).
    check: extra check of a value (raises OptionError).
    path: a path, stored absolute.
    saved: kept in run.json (False: applies to one command only, e.g. ``--thresholds``).
    own_flag: the flag in the stage's own command, where it differs from ``flag`` (``dissect
        compose --categories`` is ``dissect run --compose-categories``).
    """

    stage: str
    help: str
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    parse: str = "str"
    many: bool = False
    check: Callable[[Any], Any] | None = None
    path: bool = False
    saved: bool = True
    own_flag: str | None = None


def _option(stage: str, help: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field of RunConfig with its :class:`Option` in the metadata."""
    meta = {"option": Option(stage, help, **kwargs)}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, resolved. Saved as ``run.json["config"]``.

    Paths are stored absolute. ``layers`` are dotted module names (patterns are resolved before
    recording). Tally options follow DESIGN.md §3; ablation options §6. The field metadata
    (:class:`Option`) is the single definition of each option's help, choices and checks.
    """

    model: str = _option("model", "torchvision architecture name, package.module:callable, or "
                                  "a TorchScript file")
    layers: tuple[str, ...] = _option("record", "dotted module names, wildcards allowed (see "
                                                "`dissect layers MODEL`)", many=True)
    dataset: str = _option("record", "Broden-format dataset directory", path=True)
    out: str = _option("run", "run directory", flag="--run", path=True)
    weights: str | None = _option("model", "state_dict checkpoint (loaded with weights_only); "
                                            "without it the model is randomly initialised",
                                  None, path=True)
    num_classes: int | None = _option("model", "output classes of a torchvision model", None,
                                      parse="int", check=_positive("--num-classes"))
    mean: tuple[float, float, float] = _option("record", "normalisation mean r,g,b on the 0..1 "
                                                         "scale", IMAGENET_MEAN,
                                               parse="float_triple")
    std: tuple[float, float, float] = _option("record", "normalisation std r,g,b",
                                              IMAGENET_STD, parse="float_triple")
    resize: tuple[int, int] | None = _option("record", "resize images to S or H,W (a model with "
                                                       "a fixed input size needs it)", None,
                                             parse="size_pair")
    batch_size: int = _option("record", "images per batch", 32, parse="int",
                              check=_positive("--batch-size"))
    device: str | None = _option("record", "cpu, cuda, cuda:1 ... (default: cuda when "
                                           "available)", None)
    dtype: str = _option("record", "cache dtype", "float16", choices=DTYPES)
    logits: bool = _option("record", "also store the model outputs", False, parse="flag")
    autocast: str | None = _option("record", "run the forward under torch.autocast in this "
                                             "dtype", None, choices=AUTOCAST_DTYPES)
    channels_last: bool = _option("record", "run the model in the channels_last memory format",
                                  False, parse="flag")
    layout: str = _option("record", "how layer outputs become unit maps: auto (4-D as NCHW, "
                                    "3-D as ViT tokens), nchw, nhwc (channel-last, e.g. Swin), "
                                    "tokens", "auto", choices=LAYOUTS)
    drop_tokens: int | None = _option("record", "leading class/register tokens of a token layer "
                                                "to leave out (default: the tokens beyond the "
                                                "grid)", None, parse="int",
                                      check=_not_negative("--drop-tokens"))
    token_grid: tuple[int, int] | None = _option("record", "patch grid H,W of a token layer "
                                                           "(default: input size / patch size)",
                                                 None, parse="size_pair")
    patch_size: tuple[int, int] | None = _option("record", "patch size P or H,W of a token layer "
                                                           "(default: read from the model)", None,
                                                 parse="size_pair")
    quantile: float = _option("tally", "top quantile of activations that defines a unit's mask",
                              0.005, parse="float", check=check_quantile)
    thresholds: str | None = _option("tally", ".npy file of shape (U,) with one layer's "
                                              "thresholds, for this command only (name the "
                                              "layer with --layers)", None, path=True,
                                     saved=False)
    union: str = _option("tally", "union rule of the IoU", "touched", choices=UNION_RULES)
    categories: tuple[str, ...] | None = _option("tally", "categories to use (default all)",
                                                 None, many=True)
    iou_threshold: float = _option("tally", "IoU at which a unit counts as a detector", 0.04,
                                   parse="float", check=check_iou_threshold)
    scheduler: str = _option("tally", "Dask scheduler: threads, processes, synchronous, or "
                                      "tcp://host:port", "threads", check=check_scheduler)
    ablate: bool = _option("run", "also run the ablation studies", False, parse="flag")
    classes: str | None = _option("ablate", "class source: an image-level category (e.g. "
                                            "scene), a CSV image,class, or 'predicted' (default: "
                                            "scene when the dataset has it, else predicted)", None)
    class_names: str | None = _option("ablate", "text file with one class name per model output, "
                                                "in output order (when the outputs are in another "
                                                "order than the dataset's labels)", None,
                                      path=True)
    ablation_studies: tuple[str, ...] = _option("ablate", "ablation studies",
                                                ("single", "topn", "random"), flag="--study",
                                                many=True, choices=STUDIES)
    ablation_layers: tuple[str, ...] | None = _option("ablate", "layers to ablate (default: "
                                                                "every recorded layer)", None,
                                                      many=True)
    eval_dataset: str | None = _option("ablate", "measure ablation effects on this labeled set: "
                                                 "an ImageFolder tree (one folder per class) or "
                                                 "a Broden-format dataset (default: the "
                                                 "dissection dataset)", None, path=True)
    rule: str = _option("ablate", "ablation rule", "zero", choices=ABLATION_RULES)
    repeats: int = _option("ablate", "random unit sets per size", 5, parse="int",
                           check=_positive("--repeats"))
    rank_split: str = _option("ablate", "split that ranks units (all: every image)", "train")
    eval_split: str = _option("ablate", "split that measures effects (all: every image)", "val")
    n: tuple[int, ...] | None = _option("ablate", "unit-set sizes, e.g. 1,2,4,8 (default 1, 2, "
                                                  "4, ... up to half the units)", None,
                                        parse="int_list", check=_sizes)
    concept: str | None = _option("ablate", "concept name for --study concept", None)
    seed: int = _option("ablate", "seed of the random unit sets", 0, parse="int")
    compose: bool = _option("run", "also compute compositional labels after the tally",
                            False, parse="flag")
    max_length: int = _option("compose", "most leaves (labels) in a formula", 3, parse="int",
                              check=_positive("--max-length"))
    beam: int = _option("compose", "formulas kept per unit at each step of the beam search",
                        5, parse="int", check=_positive("--beam"))
    ops: tuple[str, ...] = _option("compose", "operators of formulas", FORMULA_OPS, many=True,
                                   choices=FORMULA_OPS)
    compose_categories: tuple[str, ...] | None = _option(
        "compose", "categories whose labels may be leaves (default: the tally's)", None,
        many=True, own_flag="--categories")
    candidates: str = _option("compose", "labels tried as leaves: all, or the K best single "
                                         "labels of each unit", "all", check=_candidates)
    search: str = _option("compose", "beam search, or exact search with bounds (slower, "
                                     "optimal)", "beam", choices=SEARCHES)
    negation: str = _option("compose", "NOT c is the complement over every pixel (global) or "
                                       "only inside images annotated in c's category",
                            "global", choices=NEGATIONS)
    significance: bool = _option("run", "also test every label against a permutation null "
                                        "after the tally", False, parse="flag")
    permutations: int = _option("significance", "permutations of the null", 100, parse="int",
                                check=_positive("--permutations"))
    significance_seed: int = _option("significance", "seed of the permutations", 0,
                                     parse="int", own_flag="--seed")
    alpha: float = _option("significance", "false discovery rate of the Benjamini-Hochberg "
                                           "q-values", 0.05, parse="float", check=_alpha)
    ci: bool = _option("significance", "also a bootstrap confidence interval of each label's "
                                       "IoU", False, parse="flag")
    select_split: str | None = _option("significance", "choose each unit's label on this split "
                                                       "(held-out labels; default every image)",
                                       None)
    significance_eval_split: str | None = _option(
        "significance", "report IoU and p of the label on this split (with --select-split)",
        None, own_flag="--eval-split")

    def __post_init__(self) -> None:
        if not self.layers:
            raise OptionError("--layers: name at least one layer (see `dissect layers MODEL`)")
        check_normalisation(self.mean, self.std)
        for item in dataclasses.fields(self):
            option: Option = item.metadata["option"]
            value = getattr(self, item.name)
            flag = option.flag or "--" + item.name.replace("_", "-")
            if value is None:
                if "None" not in str(item.type):
                    raise OptionError(f"{flag}: a value is needed (got None)")
                continue
            if option.choices is not None:
                for one in (value if option.many else (value,)):
                    check_choice(flag, one, option.choices)
            if option.check is not None:
                option.check(value)
        if "concept" in self.ablation_studies and self.ablate and not self.concept:
            raise OptionError("--study concept needs --concept NAME")

    @property
    def run_dir(self) -> Path:
        """The run directory (``out``)."""
        return Path(self.out)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values (tuples as lists); per-command fields (thresholds) left
        out when ``saved`` is False in their Option."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "run config") -> RunConfig:
        """A RunConfig from JSON values; OptionError naming an unknown field (with a close
        match) or a value of the wrong type."""
        names = [f.name for f in dataclasses.fields(cls)]
        for name in data:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise OptionError(f"{where}: unknown field {name!r}{hint}; known: "
                                  f"{', '.join(sorted(names))}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for name, value in data.items():
            _check_field_type(where, name, types[name], value)
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        missing = [n for n in ("model", "layers", "dataset", "out") if not values.get(n)]
        if missing:
            raise OptionError(f"missing option(s): {', '.join(_flag(m) for m in missing)}")
        return cls(**values)


#: Settings every layer cache of one run shares (what the activations depend on).
RECORDING_FIELDS: tuple[str, ...] = ("model", "weights", "num_classes", "dataset", "mean", "std",
                                     "resize", "dtype", "autocast")

_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _flag(name: str) -> str:
    option: Option = _FIELDS[name].metadata["option"]
    return option.flag or "--" + name.replace("_", "-")


def _check_field_type(where: str, name: str, annotation: str, value: Any) -> None:
    """OptionError naming the field (and its flag) when a JSON value does not have the field's
    type (``annotation`` is the RunConfig annotation text, e.g. ``'tuple[int, ...] | None'``)."""
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
        raise OptionError(f"{where}: field {name!r} is {value!r} (option {_flag(name)}); expected "
                          f"{expected}" + (" or null" if "None" in options else ""))


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def default_of(name: str) -> Any:
    """The default of RunConfig field ``name`` (what the Python API uses when it is omitted)."""
    return _FIELDS[name].default


def options_of(stages: Iterable[str]) -> list[str]:
    """RunConfig field names set by the given stages, in table order."""
    wanted = set(stages)
    return [name for name, item in _FIELDS.items() if item.metadata["option"].stage in wanted]


def _default_text(item: dataclasses.Field) -> str:
    default = item.default
    if default is None or default is dataclasses.MISSING or default is False:
        return ""
    if isinstance(default, tuple):
        default = ",".join(str(v) for v in default) if item.metadata["option"].parse != "str" \
            else " ".join(str(v) for v in default)
    return f" (default {default})"


def add_options(parser: argparse.ArgumentParser, stages: Iterable[str], *,
                required: Sequence[str] = (), skip: Sequence[str] = (),
                own: str | None = None) -> None:
    """Add the command-line options of ``stages`` to ``parser``, generated from RunConfig.

    Values default to None (so that only options given on the command line override a
    ``--config`` file or the run's run.json); the help text states the real default. ``own``
    names the stage whose command this is: its options use their ``own_flag``.
    """
    for name in options_of(stages):
        if name in skip:
            continue
        item = _FIELDS[name]
        option: Option = item.metadata["option"]
        own_flag = option.own_flag if own is not None and option.stage == own else None
        flags = [own_flag or option.flag or "--" + name.replace("_", "-")]
        if name == "out":
            flags.append("--out")       # DESIGN.md §9 spells it --out for record and run
        kwargs: dict[str, Any] = {"help": option.help + _default_text(item), "dest": name}
        if option.parse == "flag":
            kwargs.update(action="store_true", default=None)
        else:
            kwargs["type"] = _PARSERS[option.parse]
            if option.choices is not None:
                kwargs["choices"] = option.choices
            if option.many:
                kwargs["nargs"] = "+"
            if name in required:
                kwargs["required"] = True
        parser.add_argument(*flags, **kwargs)


def given_options(args: argparse.Namespace, names: Iterable[str] | None = None
                  ) -> dict[str, Any]:
    """The RunConfig options given on the command line (not None), as JSON values, with paths
    made absolute."""
    values: dict[str, Any] = {}
    for name in names if names is not None else _FIELDS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        if _FIELDS[name].metadata["option"].path and isinstance(value, str):
            value = None if value.lower() == "none" else str(Path(value).resolve())
        values[name] = value
    return values


def path_options() -> list[str]:
    """The fields that hold paths (stored absolute)."""
    return [f.name for f in dataclasses.fields(RunConfig) if f.metadata["option"].path]


def config_from_options(options: Mapping[str, Any], *, base: RunConfig | Mapping[str, Any]
                        | None = None, config_file: str | os.PathLike[str] | None = None
                        ) -> RunConfig:
    """A RunConfig from ``base`` (a config or JSON object), then ``config_file`` (a JSON object
    of fields), then ``options`` (JSON values; they win)."""
    fields: dict[str, Any] = {}
    if base is not None:
        fields.update(base.to_json() if isinstance(base, RunConfig) else dict(base))
    if config_file is not None:
        import json

        try:
            loaded = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise OptionError(f"--config: cannot read {config_file}: {error}") from None
        if not isinstance(loaded, dict):
            raise OptionError(f"--config: {config_file} must hold a JSON object of run options")
        for key in path_options():
            if isinstance(loaded.get(key), str):
                loaded[key] = str(Path(loaded[key]).resolve())
        fields.update(loaded)
        where = f"--config {config_file}"
    else:
        where = "run config"
    fields.update(options)
    return RunConfig.from_json(fields, where=where)
