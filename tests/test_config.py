"""The config system: presets, dotted overrides, validation with every error at once."""
from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from pipeline.config import ConfigError, config_hash, load_config, save_config, to_dict
from pipeline.models.adaptor import AdaptorConfig


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass(frozen=True)
class Optim:
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.02


@dataclass(frozen=True)
class Data:
    root: str  # required
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    split: Literal["train", "valid", "test"] = "train"


@dataclass(frozen=True)
class Pretrain:
    data: Data
    optim: Optim = field(default_factory=Optim)
    adaptor: AdaptorConfig = field(default_factory=lambda: AdaptorConfig(mode="tokens", grid_pool=8))
    epochs: int = 50
    seed: int = 42
    out_dir: Optional[Path] = None
    precision: Precision = Precision.bf16
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    note: str | None = None


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def errors_of(**kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(Pretrain, **kw)
    return str(info.value)


def test_defaults_and_nested_overrides():
    cfg = load_config(Pretrain, overrides=["data.root=/x", "optim.lr=1e-4", "adaptor.d_model=96"])
    assert cfg.data.root == "/x" and cfg.data.split == "train"
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.01  # siblings kept
    # a nested dataclass starts from its field's default instance, not the class defaults
    assert cfg.adaptor.mode == "tokens" and cfg.adaptor.grid_pool == 8 and cfg.adaptor.d_model == 96


def test_precedence_defaults_base_preset_overrides(tmp_path):
    preset = write_yaml(tmp_path / "p.yaml", {"epochs": 3, "seed": 7, "optim": {"lr": 0.5}})
    cfg = load_config(
        Pretrain,
        preset=preset,
        overrides=["seed=9"],
        base={"data": {"root": "b"}, "epochs": 1, "seed": 1, "optim": {"weight_decay": 0.2}},
    )
    assert cfg.data.root == "b"  # base only
    assert cfg.epochs == 3  # preset beats base
    assert cfg.seed == 9  # override beats preset
    assert cfg.optim == Optim(lr=0.5, weight_decay=0.2)  # merged key by key
    assert cfg.optim.warmup == 0.02  # default kept


def test_type_coercion():
    cfg = load_config(Pretrain, overrides=[
        "data.root=r", "optim.lr=1", "optim.betas=[0.8, 1]", "data.fractions=[0.01,0.1]",
        "out_dir=runs/a", "precision=fp32", "tags=[a, b]", "weights={x: 1, y: 0.5}", "note=",
    ])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for float
    assert cfg.optim.betas == (0.8, 1.0)
    assert cfg.data.fractions == (0.01, 0.1) and isinstance(cfg.data.fractions, tuple)
    assert cfg.out_dir == Path("runs/a")
    assert cfg.precision is Precision.fp32
    assert cfg.tags == ["a", "b"]
    assert cfg.weights == {"x": 1.0, "y": 0.5}
    assert cfg.note is None
    # YAML 1.1 reads "1e-4" as a string; a float field still takes it
    assert load_config(Pretrain, overrides=["data.root=r", "optim.lr=1e-4"]).optim.lr == 1e-4


def test_wrong_types_are_reported_with_key_and_expectation():
    msg = errors_of(overrides=["data.root=r", "epochs=abc", "optim.lr=fast", "tags=[1]",
                               "optim.betas=[0.9]", "data.root=5", "adaptor.dropout=true"])
    assert "epochs: expected int, got str 'abc'" in msg
    assert "optim.lr: expected float, got str 'fast'" in msg
    assert "tags[0]: expected str, got int 1" in msg
    assert "optim.betas: expected tuple[float, float] (2 items), got 1 items" in msg
    assert 'data.root: expected str, got int 5 (quote it: root="5")' in msg
    assert "adaptor.dropout: expected float, got bool True" in msg


def test_literal_error_lists_the_choices():
    msg = errors_of(overrides=["data.root=r", "data.split=val", "adaptor.mode=token", "precision=fp8"])
    assert "data.split: expected one of 'train', 'valid', 'test', got str 'val'" in msg
    assert "adaptor.mode: expected one of 'pooled', 'tokens', got str 'token'" in msg
    assert "precision: expected one of 'fp32', 'bf16', got str 'fp8'" in msg


def test_unknown_key_at_depth_suggests_the_closest(tmp_path):
    preset = write_yaml(tmp_path / "p.yaml", {"data": {"root": "r"}, "adaptor": {"mdoe": "tokens"}})
    msg = errors_of(preset=preset, overrides=["optm.lr=1", "zzz=1"])
    assert "adaptor.mdoe: unknown key; did you mean 'adaptor.mode'?" in msg
    assert "Valid keys under 'adaptor': d_model, dropout, ffn_dim" in msg
    assert "optm: unknown key; did you mean 'optim'?" in msg
    assert "zzz: unknown key. Valid keys at the top level: adaptor, data, epochs" in msg


def test_all_problems_are_collected_in_one_message(tmp_path):
    preset = write_yaml(tmp_path / "p.yaml", {"optim": {"lr": "x", "betaz": [1, 2]}, "epochs": 2.5})
    with pytest.raises(ConfigError) as info:
        load_config(Pretrain, preset=preset, overrides=["seed=abc", "nokeyvalue", "adaptor.n_heads=5"])
    err = info.value
    msg = str(err)
    expected = [
        "optim.lr: expected float, got str 'x'",
        "optim.betaz: unknown key; did you mean 'optim.betas'?",
        "epochs: expected int, got float 2.5",
        "seed: expected int, got str 'abc'",
        "override 'nokeyvalue': expected key=value",
        "data: missing required value (expected a mapping (Data))",
        "adaptor.d_model: 768 is not divisible by n_heads=5",
    ]
    for line in expected:
        assert line in msg, line
    assert msg.startswith(f"{len(err.problems)} problems in Pretrain config (from {preset} and the command line):")
    assert len(err.problems) == len(expected)
    assert len(msg.splitlines()) == len(expected) + 1  # one problem per line
    assert isinstance(err, ValueError)


def test_missing_required_value():
    msg = errors_of()
    assert "data: missing required value (expected a mapping (Data))" in msg
    msg = errors_of(overrides=["data.split=test"])
    assert "data.root: missing required value (expected str)" in msg


def test_override_through_a_scalar_and_bad_preset(tmp_path):
    # defaults are not in the merged mapping, so this builds {"epochs": {"x": 1}}
    msg = errors_of(overrides=["epochs.x=1", "data.root=r"])
    assert "epochs: expected int, got a mapping" in msg
    msg = errors_of(base={"data": {"root": "r"}, "seed": 3}, overrides=["seed.x=1"])
    assert "seed.x: cannot set it, seed is int 3, not a mapping" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    assert "not valid YAML" in errors_of(preset=bad)
    assert "expected a mapping at the top, got a list of 2" in errors_of(
        preset=write_yaml(tmp_path / "l.yaml", [1, 2]))
    assert "preset 'no/such.yaml': no such file" in errors_of(preset="no/such.yaml")


def test_round_trip_through_to_dict(tmp_path):
    cfg = load_config(Pretrain, overrides=[
        "data.root=r", "out_dir=runs/x", "precision=fp32", "weights={a: 2.0}", "tags=[t]",
    ])
    plain = to_dict(cfg)
    assert plain["optim"]["betas"] == [0.9, 0.999]  # tuples become lists
    assert plain["out_dir"] == "runs/x" and plain["precision"] == "fp32"
    json.dumps(plain)
    assert load_config(Pretrain, base=plain) == cfg
    assert load_config(Pretrain, base=cfg) == cfg
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Pretrain, preset=path) == cfg


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    first = load_config(Pretrain, overrides=["data.root=one"])
    save_config(first, path)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        save_config(load_config(Pretrain, overrides=["data.root=two"]), path)
    assert path.read_text() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temp left


def test_config_hash_is_stable_and_sensitive():
    a = load_config(Pretrain, overrides=["data.root=r"])
    b = load_config(Pretrain, base={"data": {"root": "r"}})
    c = load_config(Pretrain, overrides=["data.root=r", "optim.lr=3e-5"])
    assert config_hash(a) == config_hash(b) == config_hash(to_dict(a))
    assert config_hash(a) != config_hash(c)
    assert len(config_hash(a)) == 16
    assert config_hash({"x": 1, "y": 2}) == config_hash({"y": 2, "x": 1})


def test_loads_a_flat_dataclass_from_a_preset(tmp_path):
    preset = write_yaml(tmp_path / "a.yaml", {"mode": "tokens", "image_dim": 384, "grid_pool": 8})
    cfg = load_config(AdaptorConfig, preset=preset, overrides=["dropout=0"])
    assert cfg == AdaptorConfig(mode="tokens", image_dim=384, grid_pool=8, dropout=0.0)
