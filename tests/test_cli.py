"""The fastlm command: info and a quick benchmark run write what they promise; train-lm's options
are TrainConfig's fields."""

import dataclasses
import json
import re

import pytest

from fastlm import cli
from fastlm.train import TrainConfig


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "backends:", "cpu"):
        assert word in out


@pytest.mark.slow
def test_bench_quick_writes_results(tmp_path, capsys):
    assert cli.main(["bench", "--op", "norm", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    rows = doc["ops"]["norm"]["rows"]
    impls = {r["impl"] for r in rows}
    assert {"torch", "torch.compile"} <= impls
    assert {r["pass_"] for r in rows} == {"fwd", "bwd", "fwdbwd"}
    assert all(r["ms"] > 0 and r["rate"] > 0 for r in rows)
    assert doc["ops"]["norm"]["ceiling"]["copy_GBps"] > 0
    assert list(tmp_path.glob("*.png"))
    assert "x eager" in capsys.readouterr().out


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--op", "nope"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_train_lm_options_are_train_config_fields(capsys):
    """`fastlm train-lm` without options trains TrainConfig(), and its help shows each field's default."""
    assert cli.train_config(cli.parser().parse_args(["train-lm"])) == TrainConfig()
    with pytest.raises(SystemExit):
        cli.main(["train-lm", "--help"])
    text = capsys.readouterr().out
    options = {m.group(1): " ".join(m.group(2).split())
               for m in re.finditer(r"^  (--[a-z0-9-]+)(.*?)(?=^  -|\Z)", text, re.M | re.S)}
    for f in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig(), f.name)
        flag = "--" + ("no-" if default is True else "") + f.name.replace("_", "-")
        assert flag in options, flag
        assert f.metadata["help"].split()[-1] in options[flag], flag
        if default is not None and not isinstance(default, (bool, dict)):
            assert options[flag].endswith(f"(default: {default})"), (flag, options[flag])
