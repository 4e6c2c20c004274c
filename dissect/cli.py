"""The `dissect` command line: a thin layer over the API (DESIGN.md §9).

A usage error or bad input exits with status 2 and one message; an internal failure exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from dissect.errors import DissectError, OptionError

EXIT_USAGE = 2
EXIT_INTERNAL = 1



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


def _model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", required=required,
                        help="torchvision architecture name, package.module:callable, "
                             "or a TorchScript file")
    parser.add_argument("--weights", help="state_dict checkpoint (loaded with weights_only)")
    parser.add_argument("--num-classes", type=int, help="output classes of a torchvision model")


# Option defaults are None so that only the options given on the command line override a
# --config file; RunConfig holds the defaults (given in the help texts).
def _record_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--layers", nargs="+", required=required,
                        help="dotted module names, wildcards allowed (see `dissect layers`)")
    parser.add_argument("--dataset", required=required, help="Broden-format dataset directory")
    parser.add_argument("--out", required=required, help="run directory")
    parser.add_argument("--mean", type=float_triple, help="r,g,b on the 0..1 scale "
                        "(default ImageNet's)")
    parser.add_argument("--std", type=float_triple, help="r,g,b (default ImageNet's)")
    parser.add_argument("--resize", type=size_pair, help="resize images to S or H,W")
    parser.add_argument("--batch-size", type=int, help="images per batch (default 32)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float16", "float32"),
                        help="cache dtype (default float16)")
    parser.add_argument("--logits", action="store_true", help="also store model outputs")
    parser.add_argument("--autocast", choices=("bfloat16", "float16"),
                        help="run the forward under torch.autocast in this dtype")
    parser.add_argument("--channels-last", action="store_true",
                        help="run the model in the channels_last memory format")
    parser.add_argument("--force", action="store_true",
                        help="rebuild caches made with another configuration")


def _tally_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantile", type=float,
                        help="top quantile of activations that defines a unit's mask "
                             "(default 0.005)")
    parser.add_argument("--thresholds", help=".npy file of shape (U,) with one layer's "
                        "thresholds, for this command only (name the layer with --layers)")
    parser.add_argument("--union", choices=("touched", "annotated", "all"),
                        help="union rule of the IoU (default touched)")
    parser.add_argument("--categories", nargs="+", help="categories to use (default all)")
    parser.add_argument("--iou-threshold", type=float,
                        help="IoU at which a unit counts as a detector (default 0.04)")
    parser.add_argument("--scheduler",
                        help="threads (default), processes, synchronous, or tcp://host:port")


def _ablation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", help="image-level category (e.g. scene), a CSV of "
                        "image,class, or 'predicted'")
    parser.add_argument("--n", type=int_list, help="unit-set sizes, e.g. 1,2,4,8")
    parser.add_argument("--concept", help="concept name for --study concept")
    parser.add_argument("--class-names", help="file with one class name per model output "
                        "(when --classes gives output indices)")
    parser.add_argument("--repeats", type=int, help="random sets per size (default 5)")
    parser.add_argument("--rank-split", help="split that ranks units (default train)")
    parser.add_argument("--eval-split", help="split that measures effects (default val)")
    parser.add_argument("--rule", choices=("zero", "mean"), help="ablation rule (default zero)")
    parser.add_argument("--seed", type=int, help="seed of the random unit sets (default 0)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dissect", description="What the units of a vision model detect, and what they do.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dataset = sub.add_parser("dataset", help="make or check a Broden-format dataset")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    toy = dsub.add_parser("toy", help="generate the toy dataset")
    toy.add_argument("--out", required=True)
    toy.add_argument("--n-images", type=int, default=600)
    toy.add_argument("--size", type=int, default=112)
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--train-model", action="store_true",
                     help="also train the toy model (state_dict saved beside the dataset)")
    check = dsub.add_parser("check", help="list every problem of a dataset")
    check.add_argument("path")

    layers = sub.add_parser("layers", help="list a model's layers with output shapes")
    layers.add_argument("model")
    layers.add_argument("--weights")
    layers.add_argument("--num-classes", type=int)
    layers.add_argument("--input-size", type=size_pair, default=(224, 224))

    record = sub.add_parser("record", help="record layer activations into the cache")
    _model_options(record, required=True)
    _record_options(record, required=True)

    tally = sub.add_parser("tally", help="thresholds and unit/concept IoU of recorded layers")
    tally.add_argument("--run", required=True, help="run directory")
    tally.add_argument("--dataset", help="dataset (default: the run's)")
    tally.add_argument("--layers", nargs="+", help="layers (default: all recorded)")
    tally.add_argument("--force", action="store_true", help="recompute even when up to date")
    _tally_options(tally)

    ablate = sub.add_parser("ablate", help="per-class effects of removing units")
    ablate.add_argument("--run", required=True)
    ablate.add_argument("--dataset", help="dataset (default: the run's)")
    ablate.add_argument("--layer", required=True)
    ablate.add_argument("--study", required=True, choices=("single", "topn", "concept", "random"))
    ablate.add_argument("--scheduler", help="default: the run's")
    _ablation_options(ablate)

    report = sub.add_parser("report", help="render the HTML report of a run")
    report.add_argument("run_dir")

    run = sub.add_parser("run", help="record, tally, optional ablate, and report in one go")
    _model_options(run, required=False)
    _record_options(run, required=False)
    _tally_options(run)
    _ablation_options(run)
    run.add_argument("--ablate", action="store_true", help="also run ablation studies")
    run.add_argument("--study", nargs="+", choices=("single", "topn", "concept", "random"),
                     help="ablation studies (default single topn random)")
    run.add_argument("--ablation-layers", nargs="+",
                     help="layers to ablate (default: every recorded layer)")
    run.add_argument("--config", help="JSON file of RunConfig fields (command line wins)")

    demo = sub.add_parser("demo", help="the whole job on the toy dataset and toy model")
    demo.add_argument("--out", default="reports/demo")
    demo.add_argument("--datasets", default="datasets",
                      help="where the toy dataset and model are made (when missing)")
    return parser


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The options among ``names`` that were given on the command line (not None)."""
    values = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    return values


def _config_from_args(args: argparse.Namespace) -> Any:
    from dissect.run import RunConfig

    fields: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            loaded = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise OptionError(f"--config: cannot read {args.config}: {error}") from None
        if not isinstance(loaded, dict):
            raise OptionError(f"--config: {args.config} must hold a JSON object of run options")
        fields.update(loaded)
    fields.update(_given(args, ("model", "weights", "num_classes", "layers", "dataset", "mean",
                                "std", "resize", "device", "dtype", "batch_size", "quantile",
                                "thresholds", "union", "categories", "iou_threshold",
                                "scheduler", "classes", "rule", "repeats", "rank_split",
                                "eval_split", "n", "concept", "seed")))
    if getattr(args, "study", None):
        fields["ablation_studies"] = tuple(args.study)
    if getattr(args, "ablation_layers", None):
        fields["ablation_layers"] = tuple(args.ablation_layers)
    if getattr(args, "autocast", None):
        fields["autocast"] = args.autocast
    for flag in ("logits", "ablate", "channels_last"):
        if getattr(args, flag, False):
            fields[flag] = True
    if args.out:
        fields["out"] = args.out
    if str(fields.get("thresholds", "")).lower() == "none":
        fields["thresholds"] = None
    for key in ("dataset", "weights", "thresholds", "out"):
        if fields.get(key):
            fields[key] = str(Path(fields[key]).resolve())
    missing = [k for k in ("model", "layers", "dataset", "out") if not fields.get(k)]
    if missing:
        raise OptionError(f"missing option(s): {', '.join('--' + m for m in missing)}")
    return RunConfig.from_json({k: list(v) if isinstance(v, tuple) else v
                                for k, v in fields.items()})


def _updated_run_config(run_dir: str, args: argparse.Namespace, names: Sequence[str]) -> Any:
    """The run's saved config with the options given on the command line applied.

    Nothing is saved here: the caller saves the config once its stage has succeeded, so a bad
    option never sticks in run.json.
    """
    from dissect.run import read_config

    config = read_config(run_dir)
    changes = _given(args, names)
    if str(changes.get("thresholds", "")).lower() == "none":
        changes["thresholds"] = None
    for key in ("dataset", "thresholds"):
        if changes.get(key):
            changes[key] = str(Path(changes[key]).resolve())
    return dataclasses.replace(config, **changes) if changes else config


def cmd_dataset(args: argparse.Namespace) -> int:
    if args.dataset_command == "toy":
        from dissect.toy import generate_toy_dataset, train_toy_model

        path = generate_toy_dataset(args.out, n_images=args.n_images, size=args.size,
                                    seed=args.seed)
        print(f"toy dataset: {path}")
        if args.train_model:
            print(f"toy model: {train_toy_model(path, seed=args.seed)}")
        return 0
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


def cmd_layers(args: argparse.Namespace) -> int:
    from dissect.record import describe_layers

    print(describe_layers(args.model, args.weights, (3, *args.input_size), args.num_classes))
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from dissect.run import record_stage

    config = _config_from_args(args)
    config = _keep_later_stage_options(config)
    paths = record_stage(config, force=args.force)
    for layer, path in paths.items():
        print(f"{layer}: {path}")
    return 0


#: RunConfig fields `dissect record` sets; the rest (tally and ablation options) are kept
#: from the run's run.json when it records into an existing run.
RECORD_FIELDS = ("model", "weights", "num_classes", "layers", "dataset", "out", "mean", "std",
                 "resize", "batch_size", "device", "dtype", "logits", "autocast",
                 "channels_last")


def _keep_later_stage_options(config: Any) -> Any:
    """``config`` with the tally and ablation options of the run already in ``config.out``."""
    from dissect.run import read_config, run_json_path

    if not run_json_path(config.run_dir).is_file():
        return config
    try:
        previous = read_config(config.run_dir)
    except DissectError:        # not a readable run: record_stage reports what is wrong
        return config
    kept = {f.name: getattr(previous, f.name) for f in dataclasses.fields(previous)
            if f.name not in RECORD_FIELDS}
    return dataclasses.replace(config, **kept)


def cmd_tally(args: argparse.Namespace) -> int:
    from dissect.run import tally_stage

    config = _updated_run_config(args.run, args, ("dataset", "quantile", "thresholds", "union",
                                                  "categories", "iou_threshold", "scheduler"))
    results = tally_stage(config, args.layers, force=args.force, save_config=True)
    from dissect.tally import format_detectors

    for layer, result in results.items():
        print(f"{format_detectors(result)}; {Path(args.run) / layer / 'tally.csv'}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from dissect.ablation import run_ablation
    from dissect.run import read_config

    config = read_config(args.run)
    options = _given(args, ("dataset", "classes", "class_names", "n", "concept", "repeats",
                            "rank_split", "eval_split", "rule", "seed"))
    if "n" in options:
        options["n"] = list(options["n"])
    options["scheduler"] = args.scheduler or config.scheduler
    result = run_ablation(config.run_dir, args.layer, args.study, **options)
    print(f"{args.layer}: {args.study} study written to {result.csv_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dissect.run import report_stage

    print(f"report: {report_stage(args.run_dir)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from dissect.run import run_pipeline

    config = _config_from_args(args)
    print(f"report: {run_pipeline(config, force=args.force)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dissect.demo import run_demo

    index = run_demo(args.out, datasets_dir=args.datasets)
    print(f"report: {index}")
    return 0


COMMANDS = {"dataset": cmd_dataset, "layers": cmd_layers, "record": cmd_record,
            "tally": cmd_tally, "ablate": cmd_ablate, "report": cmd_report, "run": cmd_run,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dissect` and `python -m dissect`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DissectError as error:
        print(f"dissect: error: {user_message(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dissect: interrupted", file=sys.stderr)
        return 130
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
