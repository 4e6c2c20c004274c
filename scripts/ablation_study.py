"""The PNAS 2020 unit-ablation study (Bau et al.) on the toy scene classifier.

Builds the toy dataset and trains the toy model when missing (``dissect.toy.ensure_toy``), records
one layer, dissects it, then runs three ablation studies with :func:`dissect.ablation.run_ablation`:

- ``single``: every unit removed alone (evaluated on the val split);
- ``topn``: per scene class, units ranked by the drop in the class's recall (the PNAS "class
  accuracy") when removed alone on the train split; on the val split, the top N removed
  (``<class>:topN``) and only the top N kept (``<class>:keepN``, every other unit removed);
- ``random``: N random units removed, repeated with a seed, as the baseline of the top-N removal.

For each class it prints a table over N and two verdicts. At the verdict size (default: the
largest N):

- *top units matter*: removing the class's top N units lowers its recall by at least twice the
  mean drop for N random units and by more than that mean plus two standard deviations;
- *top units suffice*: keeping only the class's top N units keeps at least 2/3 of the class's
  balanced-accuracy margin above chance (0.5) — recall alone would reward a model that calls
  every image this class.

    python scripts/ablation_study.py [--out DIR] [--layer conv4] [--n 1,2,4,8,16] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dissect.ablation import AblationResult, importance_table, run_ablation  # noqa: E402
from dissect.ablation.runner import parse_sizes  # noqa: E402


def verdicts(topn: AblationResult, random: AblationResult, class_name: str,
             size: int) -> tuple[bool, bool, dict[str, float]]:
    """(top units matter, top units suffice, the numbers) for one class and set size."""
    c = topn.class_index(class_name)
    metrics, random_metrics = topn.metrics, random.metrics
    top_row = topn.set_names.index(f"{class_name}:top{size}")
    keep_row = topn.set_names.index(f"{class_name}:keep{size}")
    random_rows = [i for i, name in enumerate(random.set_names)
                   if name.startswith(f"random{size}#")]
    base_recall = metrics["recall"][0, c]
    top_drop = base_recall - metrics["recall"][top_row, c]
    random_drops = random_metrics["recall"][0, c] - random_metrics["recall"][random_rows, c]
    base_margin = metrics["balanced_accuracy"][0, c] - 0.5
    keep_margin = metrics["balanced_accuracy"][keep_row, c] - 0.5
    numbers = {"recall": base_recall, "top_drop": top_drop,
               "random_mean": float(random_drops.mean()), "random_std": float(random_drops.std()),
               "keep_recall": metrics["recall"][keep_row, c],
               "balanced": metrics["balanced_accuracy"][0, c],
               "keep_balanced": metrics["balanced_accuracy"][keep_row, c]}
    matters = bool(top_drop >= 2 * numbers["random_mean"]
                   and top_drop > numbers["random_mean"] + 2 * numbers["random_std"])
    suffices = bool(base_margin > 0 and keep_margin >= 2 / 3 * base_margin)
    return matters, suffices, numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="work directory (default: a temporary one)")
    parser.add_argument("--n-images", type=int, default=600)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--layer", default="conv4")
    parser.add_argument("--n", default="1,2,4,8,16", help="set sizes")
    parser.add_argument("--verdict-n", type=int, help="set size of the verdicts (default: the "
                        "largest of --n)")
    parser.add_argument("--rule", default="zero", choices=("zero", "mean"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default="threads")
    args = parser.parse_args(argv)

    sizes = parse_sizes(args.n) or []
    verdict_n = args.verdict_n if args.verdict_n is not None else max(sizes)
    if verdict_n not in sizes:
        parser.error(f"--verdict-n {verdict_n} is not one of --n {args.n}")

    from dissect.run import RunConfig, record_stage, tally_stage
    from dissect.toy import ensure_toy

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ablation_study_"))
    dataset, weights = ensure_toy(work / "toybroden", n_images=args.n_images, size=args.size,
                                  seed=0, train=True)
    config = RunConfig(model="dissect.toy:toy_model", weights=str(Path(weights).resolve()),
                       layers=(args.layer,), dataset=str(Path(dataset).resolve()),
                       out=str((work / "run").resolve()), scheduler=args.scheduler)
    record_stage(config, progress=False)
    tally_stage(config)
    options = dict(classes="scene", n=args.n, scheduler=args.scheduler, rule=args.rule)
    single = run_ablation(config.run_dir, args.layer, "single", **options)
    topn = run_ablation(config.run_dir, args.layer, "topn", **options)
    random = run_ablation(config.run_dir, args.layer, "random", repeats=args.repeats,
                          seed=args.seed, **options)
    print(f"toy model, layer {args.layer}: {len(single.set_names) - 1} units, "
          f"{single.counts.n_total} val images, rule {args.rule}; results in "
          f"{config.run_dir / args.layer}")
    print("recall per class; drop = baseline recall - recall after the ablation")
    summary = []
    for name in topn.class_names:
        c = topn.class_index(name)
        print(f"\n{name} (n = {topn.n[c]}, baseline recall "
              f"{topn.metrics['recall'][0, c]:.3f}, balanced accuracy "
              f"{topn.metrics['balanced_accuracy'][0, c]:.3f}); top units "
              f"{', '.join(map(str, topn.ranking[c, :max(sizes)]))}")
        print(f"  {'N':>3} {'top-N drop':>10} {'random drop (mean +- std)':>26} "
              f"{'keep-N recall':>13} {'keep-N bal.acc':>14}")
        for size in sizes:
            matters, suffices, x = verdicts(topn, random, name, size)
            print(f"  {size:>3} {x['top_drop']:>10.3f} {x['random_mean']:>15.3f} +- "
                  f"{x['random_std']:<7.3f} {x['keep_recall']:>13.3f} {x['keep_balanced']:>14.3f}")
        matters, suffices, _ = verdicts(topn, random, name, verdict_n)
        summary.append((name, matters, suffices))
        print(f"  N = {verdict_n}: removing the top units hurts far more than random: "
              f"{'yes' if matters else 'no'}; keeping only them leaves the class mostly intact: "
              f"{'yes' if suffices else 'no'}")
    from dissect.tally import load_dissection

    rows = importance_table(topn.ranking, topn.class_names, damage=topn.damage,
                            dissection=load_dissection(config.run_dir / args.layer))
    print("\nmost important units (in the top 4 of most classes) and their labels:")
    for row in rows[:8]:
        iou = f"{row['iou']:.3f}" if row["iou"] != "" else "-"
        print(f"  unit {row['unit']:>3}: {row['n_classes']} classes ({row['classes']}), "
              f"label {row['label'] or '-'} ({row['category'] or '-'}, IoU {iou})")
    matters_all = sum(m for _, m, _ in summary)
    suffices_all = sum(s for _, _, s in summary)
    print(f"\nsummary at N = {verdict_n}: top units matter for {matters_all}/{len(summary)} "
          f"classes; top units suffice for {suffices_all}/{len(summary)} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
