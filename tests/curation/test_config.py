"""pipelines.yaml validation: unknown keys, wrong types and out-of-range values fail naming their path."""

import copy
import dataclasses

import pytest
import yaml

from curation.config import Config, ConfigError, config_hash, field, from_dict, load_config


@pytest.fixture(scope="module")
def raw():
    with open("pipelines.yaml") as f:
        return yaml.safe_load(f)


def _load(tmp_path, data):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_config(p)


def test_shipped_config_is_valid():
    cfg = load_config("pipelines.yaml")
    assert cfg.default_source in cfg.sources
    assert [s.stage for s in cfg.pipelines["default"]][0] == "scenes"


def test_unknown_top_level_key(tmp_path, raw):
    data = copy.deepcopy(raw)
    data["outptu_dir"] = "x"
    with pytest.raises(ConfigError, match=r"unknown key outptu_dir; allowed keys at <root>: .*output_dir"):
        _load(tmp_path, data)


def test_unknown_stage_param_names_path(tmp_path, raw):
    data = copy.deepcopy(raw)
    data["pipelines"]["default"][0]["params"] = {"no_such_param": 1}
    with pytest.raises(ConfigError, match=r"pipelines\.default\[0\]\.params\.no_such_param"):
        _load(tmp_path, data)


def test_unknown_stage_lists_allowed(tmp_path, raw):
    data = copy.deepcopy(raw)
    data["pipelines"]["default"][1]["stage"] = "qualty"
    with pytest.raises(ConfigError, match=r"pipelines\.default\[1\]\.stage: unknown stage 'qualty'.*quality"):
        _load(tmp_path, data)


def test_wrong_type(tmp_path, raw):
    data = copy.deepcopy(raw)
    data["ray"]["num_cpus"] = "two"
    with pytest.raises(ConfigError, match=r"ray\.num_cpus: expected an integer, got 'two'"):
        _load(tmp_path, data)


def test_out_of_range_resource(tmp_path, raw):
    data = copy.deepcopy(raw)
    data["pipelines"]["default"][0]["resources"]["batch_size"] = 0
    msg = r"pipelines\.default\[0\]\.resources\.batch_size: 0 is out of range"
    with pytest.raises(ConfigError, match=msg):
        _load(tmp_path, data)


def test_bad_source_kind(tmp_path, raw):
    data = copy.deepcopy(raw)
    data["sources"]["sample"]["kind"] = "youtube"
    with pytest.raises(ConfigError, match=r"sources\.sample\.kind: 'youtube' is not allowed; allowed values"):
        _load(tmp_path, data)


def test_default_pipeline_must_exist(tmp_path, raw):
    data = copy.deepcopy(raw)
    data["default_pipeline"] = "nope"
    with pytest.raises(ConfigError, match="default_pipeline"):
        _load(tmp_path, data)


@dataclasses.dataclass
class _Thresholds:
    low: float = field(0.5, ge=0.0, le=1.0)
    mode: str = field("a", choices=("a", "b"))
    band: list[float] = field([0.1, 0.9], ge=0.0, le=1.0)


def test_out_of_range_threshold():
    with pytest.raises(ConfigError, match=r"stage\.params\.low: 1\.5 is out of range; must be <= 1\.0"):
        from_dict(_Thresholds, {"low": 1.5}, "stage.params")
    with pytest.raises(ConfigError, match=r"x\.band: \[0\.1, 2\.0\] is out of range"):
        from_dict(_Thresholds, {"band": [0.1, 2.0]}, "x")
    with pytest.raises(ConfigError, match=r"x\.mode: 'c' is not allowed"):
        from_dict(_Thresholds, {"mode": "c"}, "x")
    assert from_dict(_Thresholds, {"low": 1}, "x").low == 1.0  # ints are fine where floats are expected


def test_yaml_is_read_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(yaml.YAMLError):
        load_config(p)


def test_config_hash_tracks_params():
    cfg = load_config("pipelines.yaml")
    h = config_hash(cfg, "default")
    cfg.pipelines["default"][0].params["x"] = 1
    assert config_hash(cfg, "default") != h
    assert isinstance(cfg, Config)
