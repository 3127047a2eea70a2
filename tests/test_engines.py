"""DeepSpeed engine configs: the precision the fused KD head supports (issue 9: fp16 is refused at start)."""
import json

import pytest

from conftest import BASE, REPO
from distillery.config import Config
from distillery.engines import load_ds_config, student_ds_config, teacher_ds_config
from distillery.errors import ConfigError

FP16_MSG = ("fp16 is not supported: the fused KD head computes output-layer gradients in its forward, before the "
            "loss scale; use bf16 (ds_configs/zero3.json) or fp32")


@pytest.mark.parametrize("name", ["cpu", "zero2", "zero3", "zero3_offload"])
def test_shipped_ds_configs_load(name):
    ds = load_ds_config(str(REPO / "ds_configs" / f"{name}.json"))
    t = teacher_ds_config(ds, Config())
    assert t.get("bf16", {}).get("enabled", False) == ds.get("bf16", {}).get("enabled", False)
    assert "fp16" not in t


@pytest.mark.parametrize("section", [{"fp16": {"enabled": True, "loss_scale": 0}}, {"fp16": {"enabled": "auto"}},
                                     {"amp": {"enabled": True}}])
def test_fp16_is_refused_at_start(tmp_path, section):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, **section}))
    with pytest.raises(ConfigError) as e:
        load_ds_config(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path} enables {next(iter(section))}; ") and msg.endswith(FP16_MSG) and "\n" not in msg
    with pytest.raises(ConfigError, match="fp16 is not supported"):  # callers that build the dict themselves
        student_ds_config({"zero_optimization": {"stage": 3}, **section}, Config(), 1)
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        teacher_ds_config({"zero_optimization": {"stage": 3}, **section}, Config())


def test_fp16_disabled_or_bf16_is_accepted(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"enabled": False}, "bf16": {"enabled": True},
                                "zero_optimization": {"stage": 3}}))
    ds = load_ds_config(str(path))
    assert teacher_ds_config(ds, Config())["bf16"] == {"enabled": True}
    old = {"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 3}}  # DeepSpeed's older spelling
    assert teacher_ds_config(old, Config())["bf16"] == {"enabled": True}


def test_fp16_stops_the_trainer_before_anything_exists(tmp_path):
    import train
    path = tmp_path / "ds.json"
    path.write_text('{"fp16": {"enabled": true}, "zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        train.resolve(train.parse_args(["--ds_config", str(path), "data=/no/such/data",
                                        f"out_dir={tmp_path / 'runs'}", *BASE, "alpha=0"]))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, needle", [
    ('{"zero_optimization": {"stage": 3},}', r"is not valid JSON at line 1, column 36: .*; fix the file"),
    ('{"zero_optimization": {"stage": 3}\n', r"is not valid JSON at line 2, column 1: .*; fix the file"),
    ("", r"is not valid JSON at line 1, column 1"),
    ('[{"zero_optimization": {"stage": 3}}]', r"holds a list, not a JSON object of DeepSpeed settings"),
])
def test_ds_config_that_is_not_json_is_one_line(tmp_path, text, needle):
    """Issue 24 (8): a --ds_config that does not parse was a JSONDecodeError traceback."""
    import train
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as e:
        load_ds_config(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(ConfigError, match=needle):
        train.resolve(train.parse_args(["--ds_config", str(path), "data=/no/such/data",
                                        f"out_dir={tmp_path / 'runs'}", *BASE, "alpha=0"]))
    assert not (tmp_path / "runs").exists()
