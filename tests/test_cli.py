"""The command line: exit codes, messages, and run.json handling."""

from __future__ import annotations

import json

import pytest
import torch

from dissect.cli import main, user_message
from dissect.errors import DatasetError, OptionError
from dissect.run import RunConfig, read_config, read_run, stage_timer, write_run_json


def test_dataset_check_clean_and_broken(broden_tiny, capsys):
    assert main(["dataset", "check", str(broden_tiny.root)]) == 0
    assert "no problems" in capsys.readouterr().out
    (broden_tiny.root / "images" / "img1.png").unlink()
    assert main(["dataset", "check", str(broden_tiny.root)]) == 2
    out = capsys.readouterr().out
    assert "index.csv, line 3: image images/img1.png is missing" in out


def test_bad_input_exits_2_with_one_message(tmp_path, capsys):
    assert main(["dataset", "check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dissect: error:") and "does not exist" in err
    assert main(["report", str(tmp_path)]) == 2
    assert "run.json does not exist" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tally"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["record", "--model", "m", "--layers", "a", "--dataset", "d", "--out", "o",
              "--mean", "1,2"])
    assert exit_info.value.code == 2
    assert "--mean" in capsys.readouterr().err


def test_run_config_validates_options(tmp_path):
    base = dict(model="m", layers=("a",), dataset="d", out=str(tmp_path))
    with pytest.raises(OptionError, match="--union: 'some'"):
        RunConfig(**base, union="some")
    with pytest.raises(OptionError, match="--quantile"):
        RunConfig(**base, quantile=1.5)
    with pytest.raises(OptionError, match="--layers"):
        RunConfig(**{**base, "layers": ()})
    with pytest.raises(OptionError, match="unknown field"):
        RunConfig.from_json({**base, "colour": 1})
    # a JSON value of the wrong type names its field (it used to fail deep inside, or, for
    # "logits": "no", to be taken as true)
    for field, value, expected in [("quantile", "abc", "a float"),
                                   ("logits", "no", "a bool"),
                                   ("batch_size", True, "an int"),
                                   ("n", [0.5], "a list of int values or null")]:
        with pytest.raises(OptionError, match=f"field '{field}' is .*; expected {expected}"):
            RunConfig.from_json({**base, field: value})
    assert RunConfig.from_json({**base, "resize": [224, 224], "n": None}).resize == (224, 224)


def test_run_json_round_trip_keeps_stages(tmp_path):
    config = RunConfig(model="m", layers=("a", "b"), dataset="d", out=str(tmp_path),
                       resize=(64, 64), categories=("object",))
    write_run_json(config, device="cpu", stages={"record": {"wall_s": 1.0}})
    assert read_config(tmp_path) == config
    write_run_json(config)
    data = read_run(tmp_path)
    assert data["stages"] == {"record": {"wall_s": 1.0}}
    assert data["device"] == "cpu" and data["versions"]["torch"]
    assert json.loads((tmp_path / "run.json").read_text())["config"]["layers"] == ["a", "b"]


def test_stage_timer_measures_wall_time_and_memory():
    from dissect.rundir import _rss_bytes

    before = _rss_bytes() / 2**20
    with stage_timer() as timing:
        block = bytearray(256 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
    assert timing.wall_s > 0
    # the peak is the stage's own 256 MB above what the process held before (torch alone is
    # more than 256 MB, so a bound on the peak alone could not fail)
    assert timing.peak_rss_mb - before >= 200


def test_layers_lists_names_types_and_output_shapes(capsys):
    assert main(["layers", "dissect.toy:toy_model", "--input-size", "64"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert lines["conv4"][1:] == ["Sequential", "64x8x8"]
    assert lines["fc"][1:] == ["Linear", "5"]
    assert main(["layers", "no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err


class _Refusing(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        raise DatasetError("images/x.png (index.csv, line 3) cannot be read: broken")


def test_an_error_in_a_decoding_worker_is_shown_without_the_workers_traceback():
    loader = torch.utils.data.DataLoader(_Refusing(), num_workers=1)
    with pytest.raises(DatasetError) as error:
        next(iter(loader))
    assert "Original Traceback" in str(error.value)          # what torch raises
    assert user_message(error.value) == ("images/x.png (index.csv, line 3) cannot be read: "
                                         "broken")
    assert user_message(OptionError("--quantile: 2")) == "--quantile: 2"


def test_dissect_warnings_are_one_line_without_a_source_location(toy_dataset, tmp_path,
                                                                 capsys):
    from dissect.cli import main

    assert main(["record", "--model", "dissect.toy:toy_model", "--layers", "conv4",
                 "--dataset", str(toy_dataset), "--out", str(tmp_path / "run"),
                 "--resize", "16", "--batch-size", "24"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    warned = [line for line in err if "2x2 unit maps" in line]
    assert len(warned) == 1 and warned[0].startswith("dissect: warning: layer 'conv4'")
    assert "SmallMapsWarning" not in "\n".join(err) and ".py:" not in "\n".join(err)
