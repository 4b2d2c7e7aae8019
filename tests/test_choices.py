"""Every choice the configs offer is one registry entry: the configs and the CLI accept exactly
the registries' names, and each entry does what it says."""
import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.devices import DEVICES
from pipeline.models.label_types import LABEL_TYPE_CHOICES, LABEL_TYPES
from stages.evaluate import EvalConfig
from stages.train import TrainConfig
from stages.train.residency import RESIDENCIES
from stages.train.step import STEP_MODES, StepError, check_step_mode


def _refused(cls, override: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [override])
    return str(e.value)


@pytest.mark.parametrize("cls", [TrainConfig, EvalConfig])
def test_devices_include_numbered_cuda_devices(cls):
    for name in [n for n in DEVICES if n != "cuda:N"] + ["cuda:0", "cuda:7"]:
        assert load_config(cls, None, [f"device={name}"]).device == name
    for bad in ("cuda:N", "cuda:x", "tpu", "cuda:-1"):
        msg = _refused(cls, f"device={bad}")
        assert "device: expected one of 'auto', 'cpu', 'cuda', 'cuda:N'" in msg, msg


def test_every_residency_and_step_mode_is_a_training_setting_and_nothing_else():
    for name in RESIDENCIES:
        assert load_config(TrainConfig, None, [f"resident={name}"]).resident == name
    for name in STEP_MODES:
        assert load_config(TrainConfig, None, [f"step={name}"]).step == name
    assert "resident: expected one of " + ", ".join(map(repr, RESIDENCIES)) in _refused(TrainConfig, "resident=disk")
    assert "step: expected one of " + ", ".join(map(repr, STEP_MODES)) in _refused(TrainConfig, "step=jit")


def test_the_cli_offers_the_registrys_residencies():
    from cli.train import Resident

    assert [r.value for r in Resident] == list(RESIDENCIES)


def test_residencies_say_where_the_arrays_go():
    assert {n: r.where for n, r in RESIDENCIES.items()} == {"auto": None, "ram": "ram", "gpu": "gpu", "none": "stream"}


def test_step_modes_refuse_where_they_cannot_run():
    for name, mode in STEP_MODES.items():
        if mode.graph:   # a CUDA graph needs a CUDA device, and one process
            with pytest.raises(StepError, match="needs a CUDA device"):
                check_step_mode(name, torch.device("cpu"), ddp=False)
            with pytest.raises(StepError, match="outside torchrun"):
                check_step_mode(name, torch.device("cuda"), ddp=True)
        else:            # the others run anywhere, under DDP too
            check_step_mode(name, torch.device("cpu"), ddp=True)
    with pytest.raises(StepError, match="not a step mode; use one of " + ", ".join(STEP_MODES)):
        check_step_mode("jit", torch.device("cpu"), ddp=False)


def test_label_types_score_and_train_as_their_classes_say():
    assert load_config(EvalConfig, None, []).classification.label_type == "auto"
    for name in LABEL_TYPE_CHOICES:
        assert load_config(EvalConfig, None, [f"classification.label_type={name}"]).classification.label_type == name
    assert "classification.label_type: expected one of 'auto', 'binary', 'multilabel', 'multiclass'" in _refused(
        EvalConfig, "classification.label_type=ordinal")
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([[0.0, 1.0, 0.0]])
    for kind in LABEL_TYPES.values():
        p = kind.scores(logits)
        if kind.exclusive:   # one class per item: the scores are a distribution, the loss a cross-entropy
            assert float(p.sum()) == pytest.approx(1.0)
            assert float(kind.loss(logits, y)) == pytest.approx(float(-torch.log_softmax(logits, 1)[0, 1]))
        else:                # every label its own 0/1 question; unknown (NaN) labels are left out of the loss
            assert torch.allclose(p, torch.sigmoid(logits))
            part = torch.tensor([[0.0, float("nan"), 1.0]])
            want = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, [0, 2]], part[0, [0, 2]])
            assert float(kind.loss(logits, part)) == pytest.approx(float(want))
        assert kind.table_keys(["a", "b"])[0] == kind.primary and "ece" in kind.table_keys(["a", "b"])


def test_every_label_type_has_its_metrics():
    from stages.evaluate.classify import METRICS, Labels, classification_metrics

    y = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float64)
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert set(METRICS) == set(LABEL_TYPES)
    for kind in LABEL_TYPES.values():
        names = ["x"] if kind.name == "binary" else ["a", "b"]
        yy, pp = (y[:, :1], p[:, :1]) if kind.name == "binary" else (y, p)
        m = classification_metrics(Labels(kind, names, yy, np.ones(len(y), bool)), yy, pp)
        assert m[kind.primary] == pytest.approx(1.0)   # a perfect ranking and a perfect arg-max
        assert set(kind.table_keys(names)) <= set(m)


def test_the_readmes_registries_exist():
    """Every `path:NAME` in the design notes' "One object per choice" table is a module-level name there."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "concepts" / "design.md").read_text()
    section = text[text.index("**One object per choice.**"):text.index("**Adding things.**")]
    named = re.findall(r"`([\w/]+\.py):(\w+)`", section)
    assert len(named) >= 10, named
    for path, name in named:
        file = root / path
        tree = ast.parse(file.read_text())
        defined = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                   for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
        assert name in defined, f"the design notes name {path}:{name}, which {file} does not define"


def test_each_task_owns_its_config_section():
    import dataclasses

    from stages.evaluate.tasks import TASKS

    sections = {f.name for f in dataclasses.fields(EvalConfig)}
    assert all(t.settings in sections and dataclasses.is_dataclass(getattr(EvalConfig(), t.settings))
               for t in TASKS.values())


def _flat_hash(cfg) -> str:
    """config_hash as it was before labels, label_type, rerank_k and prompts moved into their tasks'
    sections: the sha256 of the flat layout's canonical JSON (`pipe reproduce` compares it with the
    hash a results.json records, so it must not change)."""
    import hashlib
    import json

    from pipeline.config import to_dict

    d = to_dict(cfg)
    d["labels"], d["label_type"] = d["classification"]["labels"], d["classification"]["label_type"]
    d["rerank_k"], d["prompts"] = d["retrieval"]["rerank_k"], d["zero_shot"]["prompts"]
    for section in ("classification", "retrieval", "zero_shot"):
        del d[section]
    for key, default in (("augment", False), ("augment_p", 0.5)):   # added since: not in the layout at its default
        if d["seg"][key] == default:
            del d["seg"][key]
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("overrides", [
    [], ["labels=[effusion,nodule]", "label_type=binary"],
    ["task=zero-shot", "prompts=configs/prompts/chest_xray.yaml", "rerank_k=5", "seg.epochs=3"]])
def test_moved_evaluation_keys_still_work_and_keep_the_config_hash(overrides):
    from pipeline.config import config_hash

    old = load_config(EvalConfig, None, overrides)
    moved = {"labels": "classification.labels", "label_type": "classification.label_type",
             "rerank_k": "retrieval.rerank_k", "prompts": "zero_shot.prompts"}
    assert EvalConfig.MOVED == moved
    new = load_config(EvalConfig, None, [moved.get(o.split("=")[0], o.split("=")[0]) + "=" + o.split("=", 1)[1]
                                         for o in overrides])
    assert old == new and config_hash(new) == _flat_hash(new)
    # a setting added since (EvalConfig.ADDED) changes the hash once it leaves its default
    assert config_hash(load_config(EvalConfig, None, [*overrides, "seg.augment=true"])) != config_hash(old)


def test_a_moved_key_given_twice_in_one_file_names_the_new_key(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("labels: [a]\nclassification:\n  labels: [a]\n")
    assert load_config(EvalConfig, both, []).classification.labels == ["a"]
    both.write_text("labels: [a]\nclassification:\n  labels: [b]\n")
    with pytest.raises(ConfigError) as e:
        load_config(EvalConfig, both, [])
    assert "labels: moved to classification.labels, which is also given" in str(e.value)
    assert "write only classification.labels" in str(e.value)
    assert "classification.label_type: expected one of 'auto'" in _refused(EvalConfig, "label_type=ordinal")
    assert "retrieval.rerank_k: must be >= 0" in _refused(EvalConfig, "rerank_k=-1")


@pytest.mark.parametrize("preset", ["configs/paper/covidx_classification.yaml", "configs/paper/rsna_classification.yaml"])
def test_the_paper_presets_keep_their_config_hash(preset):
    from pipeline.config import config_hash

    cfg = load_config(EvalConfig, preset, [])
    assert cfg.classification.labels and config_hash(cfg) == _flat_hash(cfg)


def test_a_moved_key_follows_the_sources_order(tmp_path):
    new_style, old_style = tmp_path / "new.yaml", tmp_path / "old.yaml"
    new_style.write_text("classification:\n  labels: [a]\n")
    old_style.write_text("labels: [a]\n")
    for preset in (new_style, old_style):   # an override of either spelling beats a preset of either
        assert load_config(EvalConfig, preset, ["labels=[b]"]).classification.labels == ["b"]
        assert load_config(EvalConfig, preset, ["classification.labels=[b]"]).classification.labels == ["b"]


def test_one_list_of_modalities():
    from pipeline.api import export, model
    from pipeline.encoders.config import MODALITIES
    from stages.embed.modality import MODALITIES as EMBED_MODALITIES

    assert model.MODALITIES is export.MODALITIES is MODALITIES and tuple(EMBED_MODALITIES) == MODALITIES
