"""The `dissect` command line: a thin layer over the API (DESIGN.md §9).

A usage error or bad input exits with status 2 and one message; an internal failure exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dissect
from dissect.errors import DissectError, OptionError

EXIT_USAGE = 2
EXIT_INTERNAL = 1
#: Import names of the packages dissect needs (setup.py install_requires).
DEPENDENCIES = ("torch", "torchvision", "numpy", "scipy", "h5py", "dask", "distributed", "PIL",
                "jinja2", "tqdm", "captum")



def _run_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The run directory, spelled ``--run RUN_DIR`` by every command (``--out`` also works
    where DESIGN.md §9 spells it so)."""
    parser.add_argument("--run", "--out", dest="out", required=required, metavar="RUN_DIR",
                        help="run directory")


def _quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (they are also off when stderr is not a terminal)")


def _attribution_list(text: str) -> tuple[str, ...]:
    """``saliency,ig`` -> ("saliency", "ig"); ``none`` -> ()."""
    from dissect.config import ATTRIBUTION_METHODS

    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if names in ((), ("none",)):
        return ()
    unknown = [v for v in names if v not in ATTRIBUTION_METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; expected "
                                         f"{','.join(ATTRIBUTION_METHODS)} or none")
    return names


def _ignore_index(text: str) -> int | None:
    """``--ignore-index``: a mask value 1..65535, or ``none``."""
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a mask value or none, got {text!r}") from None
    if not 0 < value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a mask value 1..65535 or none, got {value}")
    return value


def named_paths(values: Sequence[str], option: str, default: str | None) -> dict[str, str]:
    """``["object=masks/obj", "part=masks/part"]`` -> {category: path}. An item without
    ``CAT=`` takes the category ``default`` (OptionError when there is none, or twice)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or "/" in name or "\\" in name:
            name, path = default or "", value
            if not name:
                raise OptionError(f"{option} {value}: name the category, as CAT={value}")
        if name in out:
            raise OptionError(f"{option}: category {name!r} is given twice")
        out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; run options come from dissect.config."""
    from dissect.config import (
        ATTRIBUTION_METHODS,
        EXPLAIN_GROUPS,
        EXPLAIN_METHODS,
        IMAGENET_MEAN,
        IMAGENET_STD,
        add_options,
        float_triple,
        size_pair,
    )

    parser = argparse.ArgumentParser(
        prog="dissect", description="What the units of a vision model detect, and what they do.")
    parser.add_argument("--version", action="version", version=f"dissect {dissect.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dataset = sub.add_parser("dataset", help="make or check a Broden-format dataset")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    toy = dsub.add_parser("toy", help="generate the toy dataset")
    toy.add_argument("--out", required=True, help="dataset directory to write")
    toy.add_argument("--n-images", type=int, default=600, help="images (default 600)")
    toy.add_argument("--size", type=int, default=112, help="image size (default 112)")
    toy.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    toy.add_argument("--train-model", action="store_true",
                     help="also train the toy model (state_dict saved beside the dataset)")
    check = dsub.add_parser("check", help="list every problem of a dataset")
    check.add_argument("path", help="dataset directory")
    masks = dsub.add_parser("from-masks", help="a Broden-format dataset from images and index-"
                                               "mask PNGs (one folder per category)")
    masks.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    masks.add_argument("--masks", nargs="+", default=[], metavar="[CAT=]DIR",
                       help="index-mask folder of a category, the images' tree (pixel value k = "
                            "class k; a folder without CAT= is category 'object')")
    masks.add_argument("--classes", nargs="+", default=[], metavar="[CAT=]FILE",
                       help="class list of a category, one name per line (first line: value 1, "
                            "unless it is 'background'); without CAT= it is the one mask "
                            "category's")
    masks.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    masks.add_argument("--image-labels", metavar="FILE.csv",
                       help="image-level labels, CSV image,category,label")
    masks.add_argument("--ignore-index", type=_ignore_index, default=255,
                       help="mask value that is unlabeled besides 0, or none (default 255)")
    masks.add_argument("--split-file", metavar="FILE.csv",
                       help="CSV image,split (default: every image in train)")
    masks.add_argument("--size", type=size_pair, metavar="S|H,W",
                       help="resize the images to S or H,W (default: keep; one size for all)")
    masks.add_argument("--allow-missing-masks", action="store_true",
                       help="an image without a mask in a category is unlabeled there")
    _quiet_option(masks)
    segment = dsub.add_parser("segment", help="a Broden-format dataset from an image folder "
                                              "labeled by a segmentation model")
    segment.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    segment.add_argument("--segmenter", required=True, metavar="MODEL",
                         help="torchvision segmentation architecture (e.g. "
                              "deeplabv3_resnet50), package.module:callable, or a TorchScript "
                              "file; output (B, C, H, W) logits or a dict with 'out'")
    segment.add_argument("--weights", help="state_dict checkpoint (loaded with weights_only)")
    segment.add_argument("--classes", required=True, metavar="FILE",
                         help="one class name per output channel (a first 'background' line "
                              "is unlabeled)")
    segment.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write "
                                                                     "(resumed when partial)")
    segment.add_argument("--category", default="object",
                         help="category of the labels (default object)")
    segment.add_argument("--min-confidence", type=float, default=0.5,
                         help="pixels whose softmax probability is below it are unlabeled "
                              "(default 0.5)")
    segment.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    segment.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    segment.add_argument("--size", type=size_pair, metavar="S|H,W",
                         help="resize the images to S or H,W (default: keep)")
    segment.add_argument("--mean", type=float_triple, default=IMAGENET_MEAN,
                         help="the segmenter's normalisation mean r,g,b (default ImageNet's)")
    segment.add_argument("--std", type=float_triple, default=IMAGENET_STD,
                         help="the segmenter's normalisation std r,g,b (default ImageNet's)")
    _quiet_option(segment)

    layers = sub.add_parser("layers", help="list a model's layers with output shapes")
    layers.add_argument("model", help="torchvision architecture name, package.module:callable, "
                                      "or a TorchScript file")
    layers.add_argument("--weights", help="state_dict checkpoint (loaded with weights_only)")
    layers.add_argument("--num-classes", type=int, help="output classes of a torchvision model")
    layers.add_argument("--input-size", type=size_pair, default=(224, 224),
                        help="S or H,W (default 224)")

    record = sub.add_parser("record", help="record layer activations into the cache")
    add_options(record, ("model", "record"), required=("model", "layers", "dataset"))
    _run_option(record)
    record.add_argument("--force", action="store_true",
                        help="record again, replacing caches made with another configuration "
                             "and every result computed from them")
    _quiet_option(record)

    tally = sub.add_parser("tally", help="thresholds and unit/concept IoU of recorded layers")
    _run_option(tally)
    tally.add_argument("--dataset", help="dataset (default: the run's)")
    tally.add_argument("--layers", nargs="+", help="layers (default: every recorded layer)")
    tally.add_argument("--force", action="store_true", help="recompute even when up to date")
    add_options(tally, ("tally",))
    _quiet_option(tally)

    ablate = sub.add_parser("ablate", help="per-class effects of removing units")
    _run_option(ablate)
    ablate.add_argument("--dataset", help="dataset (default: the run's)")
    ablate.add_argument("--layers", "--layer", dest="ablation_layers", nargs="+",
                        help="layers to ablate (default: the run's ablation layers, else every "
                             "recorded layer)")
    add_options(ablate, ("ablate",), skip=("ablation_layers",))
    ablate.add_argument("--scheduler", help="Dask scheduler (default: the run's)")
    _quiet_option(ablate)

    compose = sub.add_parser("compose", help="compositional labels (AND/OR/AND NOT formulas) "
                                             "of tallied layers")
    _run_option(compose)
    compose.add_argument("--layers", nargs="+", help="layers (default: every recorded layer)")
    add_options(compose, ("compose",), own="compose")
    compose.add_argument("--scheduler", help="Dask scheduler (default: the run's)")
    compose.add_argument("--device", help="torch device of the counting (default: the run's)")
    _quiet_option(compose)

    significance = sub.add_parser("significance", help="permutation p-values and q-values of "
                                                       "every unit's label")
    _run_option(significance)
    significance.add_argument("--layers", nargs="+",
                              help="layers (default: every recorded layer)")
    add_options(significance, ("significance",), own="significance")
    significance.add_argument("--scheduler", help="Dask scheduler (default: the run's)")
    significance.add_argument("--device", help="torch device (default: the run's)")
    _quiet_option(significance)

    explain = sub.add_parser("explain", help="which units and concepts of a layer made the "
                                             "model's predictions (heatmaps and shares)")
    _run_option(explain)
    explain.add_argument("--layer", required=True, help="a tallied layer of the run")
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="FILE",
                        help="image files (preprocessed as the run recorded its dataset)")
    source.add_argument("--dataset-images", type=int, metavar="N",
                        help="N images of the run's dataset, evenly spaced")
    source.add_argument("--class", dest="class_", metavar="K",
                        help="a class (output index or name): its concept profile over the "
                             "dataset images of that class")
    explain.add_argument("--target", metavar="CLASS",
                         help="class to explain (output index or name; default: each image's "
                              "top-1 output)")
    explain.add_argument("--method", choices=EXPLAIN_METHODS, default="grad_x_act",
                         help="unit contribution: gradient x activation, or Grad-CAM weights "
                              "(default grad_x_act)")
    explain.add_argument("--group-by", choices=EXPLAIN_GROUPS, default="label",
                         help="sum unit contributions by label or by category (default label)")
    explain.add_argument("--iou-threshold", type=float,
                         help="a unit counts for its label at this IoU (default: the tally's)")
    explain.add_argument("--top-k", type=int, default=5,
                         help="concept maps per image (default 5)")
    explain.add_argument("--attributions", type=_attribution_list, default=("saliency", "gradcam"),
                         help=f"input-space maps, comma-separated from "
                              f"{','.join(ATTRIBUTION_METHODS)}, or none (default "
                              f"saliency,gradcam)")
    explain.add_argument("--selection", choices=("true", "predicted"), default="true",
                         help="with --class: images labeled as the class (true) or predicted "
                              "as it (default true)")
    explain.add_argument("--name", help="name of the image set (explain/<name>.json)")
    explain.add_argument("--batch-size", type=int, help="images per pass (default: the run's)")
    explain.add_argument("--device", help="torch device (default: the run's)")
    _quiet_option(explain)

    compare = sub.add_parser("compare", help="a page comparing runs on one dataset (models, "
                                             "checkpoints, layers) side by side")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    compare.add_argument("--out", required=True, metavar="DIR",
                         help="folder to write the page into (index.html, compare.json)")

    report = sub.add_parser("report", help="render the HTML report of a run")
    report.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run directory")
    _run_option(report, required=False)

    run = sub.add_parser("run", help="record, tally, optional ablate, and report in one go")
    add_options(run, ("model", "record", "tally", "compose", "significance", "ablate", "run"),
                skip=("out",))
    _run_option(run, required=False)
    run.add_argument("--config", help="JSON file of run options (the command line wins)")
    run.add_argument("--force", action="store_true",
                     help="record and compute everything again")
    _quiet_option(run)

    demo = sub.add_parser("demo", help="the whole job on the toy dataset and toy model")
    demo.add_argument("--out", default="reports/demo", help="run directory (default "
                                                            "reports/demo)")
    demo.add_argument("--datasets", default="datasets",
                      help="where the toy dataset and model are made when missing (default "
                           "datasets)")
    _quiet_option(demo)
    return parser


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _run_config(run_dir: str, args: argparse.Namespace, stages: Sequence[str]) -> Any:
    """The run's saved config with the options of ``stages`` given on the command line applied.

    Nothing is saved here: the caller saves the config once its stage has succeeded, so a bad
    option never sticks in run.json.
    """
    from dissect.config import config_from_options, given_options, options_of
    from dissect.rundir import RunDir

    config = RunDir(run_dir).config()
    return config_from_options(given_options(args, options_of(stages) + ["dataset"]),
                               base=config)


def cmd_dataset(args: argparse.Namespace) -> int:
    if args.dataset_command == "toy":
        from dissect.toy import generate_toy_dataset, train_toy_model

        path = generate_toy_dataset(args.out, n_images=args.n_images, size=args.size,
                                    seed=args.seed)
        print(f"toy dataset: {path}")
        if args.train_model:
            print(f"toy model: {train_toy_model(path, seed=args.seed)}")
        return 0
    if args.dataset_command == "from-masks":
        return _from_masks(args)
    if args.dataset_command == "segment":
        return _segment(args)
    from dissect.data import check_dataset

    problems = check_dataset(args.path)
    for problem in problems:
        print(f"{Path(args.path) / problem.file}"
              f"{'' if problem.line is None else f', line {problem.line}'}: {problem.message}")
    if problems:
        print(f"{len(problems)} problem(s) in {args.path}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.path}: no problems")
    return 0


def _from_masks(args: argparse.Namespace) -> int:
    from dissect.data.from_masks import dataset_from_masks

    masks = named_paths(args.masks, "--masks", "object")
    only = next(iter(masks)) if len(masks) == 1 else None
    classes = named_paths(args.classes, "--classes", only)
    path = dataset_from_masks(args.images, masks, classes, args.out,
                              image_labels=args.image_labels, ignore_index=args.ignore_index,
                              split_file=args.split_file, size=args.size,
                              progress=_progress(args),
                              allow_missing_masks=args.allow_missing_masks)
    print(f"dataset: {path} (check it with `dissect dataset check {path}`)")
    return 0


def _segment(args: argparse.Namespace) -> int:
    from dissect.segment import segment_images

    path = segment_images(args.images, args.segmenter, args.classes, args.out,
                          weights=args.weights, category=args.category,
                          min_confidence=args.min_confidence, batch_size=args.batch_size,
                          device=args.device, progress=_progress(args), size=args.size,
                          mean=args.mean, std=args.std)
    print(f"dataset: {path} (check it with `dissect dataset check {path}`)")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from dissect.record import describe_layers

    print(describe_layers(args.model, args.weights, (3, *args.input_size), args.num_classes))
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from dissect.config import config_from_options, given_options, options_of
    from dissect.run import record_stage
    from dissect.rundir import RunDir

    run = RunDir(args.out)
    base = None
    if run.exists():
        try:            # keep the run's tally and ablation options
            base = run.config()
        except DissectError:        # not a readable run: record_stage reports what is wrong
            base = None
    config = config_from_options(given_options(args, options_of(("model", "record", "run"))),
                                 base=base)
    paths = record_stage(config, force=args.force, progress=_progress(args))
    for layer, path in paths.items():
        print(f"{layer}: {path}")
    return 0


def cmd_tally(args: argparse.Namespace) -> int:
    from dissect.run import tally_stage
    from dissect.tally import format_detectors

    config = _run_config(args.out, args, ("tally",))
    results = tally_stage(config, args.layers, force=args.force, save_config=True,
                          progress=_progress(args))
    for layer, result in results.items():
        print(f"{format_detectors(result)}; {Path(args.out) / layer / 'tally.csv'}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from dissect.run import ablation_stage

    config = _run_config(args.out, args, ("ablate",))
    if args.scheduler:
        config = dataclasses.replace(config, scheduler=args.scheduler)
    if "concept" in config.ablation_studies and not config.concept:
        raise OptionError("--study concept needs --concept NAME")
    options = {"dataset": str(Path(args.dataset).resolve())} if args.dataset else {}
    results = ablation_stage(config, save_config=True, progress=_progress(args), **options)
    for layer, studies in results.items():
        for study, result in studies.items():
            print(f"{layer}: {study} study written to {result.csv_path}")
    return 0


def _stage_command(args: argparse.Namespace, stage: str) -> tuple[Any, list[str]]:
    """The run's config with this command's options (and --scheduler/--device) applied."""
    config = _run_config(args.out, args, (stage,))
    changes = {k: getattr(args, k) for k in ("scheduler", "device") if getattr(args, k, None)}
    return (dataclasses.replace(config, **changes) if changes else config), []


def cmd_compose(args: argparse.Namespace) -> int:
    from dissect.run import compose_stage, format_composition

    config, summary = _stage_command(args, "compose")
    results = compose_stage(config, args.layers, progress=_progress(args), summary=summary,
                            save_config=True)
    for layer, result in results.items():
        print(f"{format_composition(result)}; {Path(args.out) / layer / 'compositional.csv'}")
    return 0


def cmd_significance(args: argparse.Namespace) -> int:
    from dissect.run import format_significance, significance_stage

    config, summary = _stage_command(args, "significance")
    results = significance_stage(config, args.layers, progress=_progress(args),
                                 summary=summary, save_config=True)
    for layer, result in results.items():
        print(f"{format_significance(result)}; {Path(args.out) / layer / 'significance.csv'}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from dissect.run import explain_stage

    if args.top_k < 0:
        raise OptionError(f"--top-k: expected a number >= 0, got {args.top_k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise OptionError(f"--batch-size: expected a positive number, got {args.batch_size}")
    summary: list[str] = []
    path = explain_stage(args.out, args.layer, images=args.images or (),
                         dataset_images=args.dataset_images, class_=args.class_,
                         target=args.target, method=args.method, group_by=args.group_by,
                         iou_threshold=args.iou_threshold, top_k=args.top_k,
                         attributions=args.attributions, name=args.name,
                         batch_size=args.batch_size, device=args.device,
                         selection=args.selection, progress=_progress(args),
                         summary=summary)
    for line in summary:
        print(line)
    print(f"explanations: {path}")
    if path.parent.name != "classes":
        print(f"see them in the report: dissect report {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dissect.report import compare_runs

    print(f"comparison: {compare_runs(args.runs, args.out)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dissect.run import report_stage

    run_dir = args.run_dir or args.out
    if not run_dir:
        raise OptionError("report: name the run directory (dissect report RUN_DIR)")
    print(f"report: {report_stage(run_dir)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from dissect.config import config_from_options, given_options
    from dissect.run import run_pipeline

    config = config_from_options(given_options(args), config_file=args.config)
    summary: list[str] = []
    index = run_pipeline(config, force=args.force, progress=_progress(args), summary=summary)
    for line in summary:
        print(line)
    print(f"report: {index}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dissect.demo import run_demo

    index = run_demo(args.out, datasets_dir=args.datasets, progress=not args.quiet)
    print(f"report: {index}")
    return 0


COMMANDS = {"dataset": cmd_dataset, "layers": cmd_layers, "record": cmd_record,
            "tally": cmd_tally, "compose": cmd_compose, "significance": cmd_significance,
            "ablate": cmd_ablate, "explain": cmd_explain, "compare": cmd_compare,
            "report": cmd_report, "run": cmd_run,
            "demo": cmd_demo}


def user_message(error: DissectError) -> str:
    """The message of ``error`` without the worker traceback torch's DataLoader wraps around an
    error raised in a decoding worker ("Caught DatasetError in DataLoader worker process 0.
    Original Traceback ...": the original message is the traceback's last line)."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """dissect's own warnings as one ``dissect: warning:`` line (no source location: they are
    about the user's data and model, not about a line of our code); others as Python shows
    them."""
    if category.__module__.split(".")[0] == "dissect":
        print(f"dissect: warning: {message}", file=file or sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dissect` and `python -m dissect`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except DissectError as error:
        print(f"dissect: error: {user_message(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dissect: interrupted; rerun the same command to resume (finished work is kept)",
              file=sys.stderr)
        return 130
    except BrokenPipeError:     # `dissect layers M | head`: the reader has gone, nothing to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in DEPENDENCIES:
            print(f"dissect: error: the Python package {error.name.split('.')[0]!r} is missing "
                  f"in {sys.executable}; run `make install` in the dissect checkout and use "
                  f".venv/bin/dissect (or `pip install -e .`)", file=sys.stderr)
            return EXIT_USAGE
        raise
    except OSError as error:  # a path given on the command line that cannot be used
        print(f"dissect: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # noqa: BLE001 -- report internal failures with their traceback
        traceback.print_exc()
        print("dissect: internal error (please report it with the traceback above)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
