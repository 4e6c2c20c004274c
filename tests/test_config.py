"""The option table and the run directory (layer 1): one definition per option, one owner of
the paths."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest

from dissect.config import (
    ABLATION_RULES,
    STUDIES,
    UNION_RULES,
    RunConfig,
    add_options,
    check_quantile,
    config_from_options,
    default_of,
    options_of,
)
from dissect.errors import CacheError, OptionError
from dissect.rundir import LAYER_OUTPUTS, RunDir

BASE = dict(model="m", layers=("a",), dataset="/d", out="/o")


def _parser(stages):
    parser = argparse.ArgumentParser()
    add_options(parser, stages)
    return parser


def _action(parser, dest):
    return next(a for a in parser._actions if a.dest == dest)


def test_cli_choices_and_help_come_from_the_table():
    parser = _parser(("model", "record", "tally", "ablate", "run"))
    assert tuple(_action(parser, "union").choices) == UNION_RULES
    assert tuple(_action(parser, "rule").choices) == ABLATION_RULES
    assert tuple(_action(parser, "ablation_studies").choices) == STUDIES
    assert "--study" in _action(parser, "ablation_studies").option_strings
    # the help states the real default, written once (the field default)
    assert "(default 0.005)" in _action(parser, "quantile").help
    assert default_of("quantile") == 0.005
    # unset options stay None, so a --config file or run.json is not overridden
    args = parser.parse_args(["--layers", "x"])
    assert args.quantile is None and args.union is None and args.layers == ["x"]


def test_registries_of_the_implementations_agree_with_the_table():
    from dissect.ablation.hooks import rule_names
    from dissect.stats import UNION_RULES as counted

    assert tuple(rule_names()) == ABLATION_RULES
    assert tuple(counted) == UNION_RULES


def test_every_field_has_an_option_in_a_known_stage():
    from dissect.config import STAGES

    names = [f.name for f in dataclasses.fields(RunConfig)]
    assert sorted(options_of(STAGES)) == sorted(names)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "x", None])
def test_one_quantile_range(value):
    with pytest.raises(OptionError, match="--quantile"):
        check_quantile(value)
    with pytest.raises(OptionError, match="--quantile"):
        RunConfig(**BASE, quantile=value)


def test_a_misspelt_config_field_gets_a_did_you_mean(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**{k: list(v) if isinstance(v, tuple) else v
                                   for k, v in BASE.items()}, "batchsize": 8}))
    with pytest.raises(OptionError, match=r"did you mean 'batch_size'"):
        config_from_options({}, config_file=path)
    with pytest.raises(OptionError, match=r"--union: 'touch' is not one of .*did you mean"):
        RunConfig(**BASE, union="touch")


def test_config_layers_base_file_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch_size": 8, "quantile": 0.01}))
    config = config_from_options({"quantile": 0.02}, base=RunConfig(**BASE, batch_size=4,
                                                                     union="all"),
                                 config_file=path)
    assert (config.batch_size, config.quantile, config.union) == (8, 0.02, "all")


def test_rundir_names_every_derived_file_and_drops_them(tmp_path):
    run = RunDir(tmp_path)
    run.write_config(RunConfig(**{**BASE, "out": str(tmp_path)}))
    layer_files = {p.name for p in run.outputs_of("conv")}
    assert layer_files == set(LAYER_OUTPUTS)
    for method in ("dissection", "tally", "ablation_h5", "ablation_csv", "ablation_meta",
                   "importance", "compositional_csv", "compositional_json", "significance_csv",
                   "significance_h5"):
        assert getattr(run, method)("conv").name in layer_files
    run.layer_dir("conv").mkdir()
    for path in run.outputs_of("conv")[:3]:
        path.write_text("x")
    (run.layer_dir("conv") / "notes.txt").write_text("mine")
    data = run.read()
    data["stages"] = {"tally:conv": {}, "tally:other": {}, "record": {}}
    run._save(data)
    removed = run.drop_layer_outputs(["conv"])
    assert len(removed) == 3
    assert [p.name for p in run.layer_dir("conv").iterdir()] == ["notes.txt"]
    assert set(run.stages()) == {"tally:other", "record"}


def test_rundir_reader_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(CacheError, match="is not a run directory"):
        RunDir(tmp_path).config()
    (tmp_path / "run.json").write_text('{"stages": {}}')
    with pytest.raises(CacheError, match="not a dissect run record"):
        RunDir(tmp_path).read()
    (tmp_path / "run.json").write_text(json.dumps({"config": {**BASE, "layers": ["a"],
                                                              "rule": "half"}, "stages": {}}))
    with pytest.raises(OptionError, match="--rule: 'half'"):
        RunDir(tmp_path).config()


def test_tally_table_prints_compactly():
    from dissect.dissection import TallyTable

    rows = TallyTable({"unit": u + 1, "category": "object", "label": f"thing{u}",
                       "score": 0.5 / (u + 1), "object-iou": 0.1} for u in range(30))
    text = str(rows)
    assert text.splitlines()[0].split() == ["unit", "category", "label", "score"]
    assert "20 more rows" in text and len(text) < 1200
    assert rows[0]["unit"] == 1 and isinstance(rows, list)
    assert np.isclose(rows[1]["score"], 0.25)
