"""pipelines.yaml validation: unknown keys, wrong types and out-of-range values fail naming their path."""

import copy
import dataclasses

import pytest
import yaml

from curation.config import Config, ConfigError, config_hash, field, from_dict, load_config
from curation.runner import load_pipeline_config


@pytest.fixture(scope="module")
def raw():
    with open("pipelines.yaml") as f:
        return yaml.safe_load(f)


def _load(tmp_path, data):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_pipeline_config(p)


def test_shipped_config_is_valid():
    cfg = load_pipeline_config("pipelines.yaml")
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
    marker = tmp_path / "pwned"
    p.write_text(f"output_dir: x\nmodels_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:2:13: the tag !!python/object/apply:os.system is not allowed"), msg
    assert "\n" not in msg and not marker.exists()  # one line, and nothing was run


@pytest.mark.parametrize(
    "text,line,what",
    [
        ("output_dir: x\nsources: [1, 2\nray: {}\n", 3, "expected ',' or ']'"),
        ("output_dir: x\n  models_dir: y\n", 2, "mapping values are not allowed here"),
        ('output_dir: "open\n', 2, "found unexpected end of stream"),
        ("output_dir: x\n\t- y\n", 2, "found character '\\t' that cannot start any token"),
    ],
)
def test_malformed_yaml_is_one_line_with_file_and_line(tmp_path, text, line, what):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}:") and what in msg and "\n" not in msg, msg


def test_training_config_yaml_errors_are_config_errors(tmp_path):
    from training.config import load_config as load_train_config

    p = tmp_path / "train.yaml"
    p.write_text("model:\n  depth: !!python/name:os.system\n")
    with pytest.raises(ConfigError, match=rf"^{p}:2:10: the tag !!python/name:os.system is not allowed"):
        load_train_config(p)
    p.write_text("model: {depth: 2\n")
    with pytest.raises(ConfigError, match=rf"^{p}:2:1: .*flow mapping"):
        load_train_config(p)


def test_cli_prints_one_line_for_a_bad_yaml(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "bad.yaml"
    p.write_text("output_dir: x\nsources: [1, 2\nray: {}\n")
    for cmd in (
        [sys.executable, "-m", "curation.run", "--config", str(p)],
        [sys.executable, "training/run.py", "--config", str(p), "--no-ray"],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1, (cmd, r.stderr[-2000:])
        assert lines[0].startswith(f"config error: {p}:3:"), lines


def test_config_hash_tracks_params():
    cfg = load_config("pipelines.yaml")
    h = config_hash(cfg, "default")
    cfg.pipelines["default"][0].params["x"] = 1
    assert config_hash(cfg, "default") != h
    assert isinstance(cfg, Config)


def test_validating_the_config_does_not_import_torch():
    """Config errors and the source check come first and fast: loading pipelines.yaml imports every
    stage and backend module, none of which may pull in torch or scipy at import time."""
    import subprocess
    import sys

    code = (
        "import sys; from curation.runner import load_pipeline_config; "
        "load_pipeline_config('pipelines.yaml'); "
        "print(sorted(m for m in ('torch', 'scipy', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
