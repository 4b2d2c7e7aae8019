"""Typed records between the stages, and the registries that carry behaviour.

``tests/data/results-v1`` holds evaluation runs written before the records (results format 1,
by the code of that day: every task, a pooled and a tokens-mode Adaptor, the two trainings'
metrics), and ``tests/data/results-v1-report`` what `pipe report` made of them that day. The
loader reads them as today's records, and `pipe report` makes the same tables and the same
page of them: the figures did not change when their records did.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import InputError, MissingFileError
from pipeline.methods import METHOD_KINDS, VARIANTS, Method, adaptor_method
from pipeline.records import RESULTS_FORMAT, load_results, prediction_key, record_from_dict
from pipeline.records.legacy import identity
from tests.helpers import pipe

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "tests" / "data" / "results-v1"
V1_REPORT = ROOT / "tests" / "data" / "results-v1-report"
RUNS = ("classification-pooled", "retrieval-pooled", "retrieval-tokens", "segmentation-pooled", "zero-shot-pooled")


@pytest.fixture(scope="module")
def v1() -> dict:
    return {name: load_results(V1 / name) for name in RUNS}


# ------------------------------------------------------------------ the loader, on format 1
def test_the_loader_reads_results_written_before_the_records(v1):
    cls = v1["classification-pooled"]
    assert cls.task == "classification" and cls.format == RESULTS_FORMAT and cls.checkpoint.mode == "pooled"
    assert [m.method.kind for m in cls.methods] == ["adaptor", "backbone"]
    assert [m.features for m in cls.methods] == ["adaptor", "backbone"]
    macro = next(t for t in cls.tables if t.metric == "macro_auroc")
    assert (macro.task, macro.name, macro.unit) == ("classification", "macro AUROC", "%")
    assert [(c.name, c.fraction) for c in macro.columns] == [("50%", 0.5), ("100%", 1.0)]
    ours = macro.rows[0]
    assert (ours.method.kind, ours.method.mode, ours.method.head) == ("adaptor", "pooled", "mlp")
    assert ours.method.base == "Adaptor (pooled) tiny-vit + tiny-bert" and ours.method.short == "Adaptor, pooled"
    cell = cls.methods[0].heads["mlp"]["100%"]
    assert cell.fraction == 1.0 and cell.seeds == [0, 1]
    assert cell.summary["macro_auroc"].seeds == (0, 1) and cell.summary["macro_auroc"].n_seeds == 2
    assert ours.cell("100%").value == pytest.approx(cell.summary["macro_auroc"].value)
    assert cls.data_card.splits == {"train": 89, "valid": 8, "test": 23} and cls.data_card.failures.count == 0
    assert cls.provenance.versions["torch"] and cls.files["predictions"] == "predictions.npz"

    seg = v1["segmentation-pooled"]
    (decoder,) = seg.methods
    assert (decoder.method.variant, decoder.method.short, decoder.features) == ("raw-tokens", "pooled: raw tokens",
                                                                              "backbone")
    assert decoder.heads["decoder"]["100%"].fraction == 1.0  # format 1 wrote no fraction here: from the config
    empty = next(t for t in seg.tables if t.metric == "dice_empty_is_one").rows[-1]
    assert empty.method.kind == "all-empty" and METHOD_KINDS["all-empty"].order == 2

    rerank = v1["retrieval-tokens"].methods[1].method
    assert (rerank.kind, rerank.mode, rerank.variant, rerank.short) == ("adaptor", "tokens", "itm-rerank",
                                                                        "Adaptor, tokens+ITM")
    chance = v1["retrieval-pooled"].tables[0].rows[-1]
    assert chance.method.kind == "chance" and chance.cell("image→text R@10").value == pytest.approx(0.435)
    zs = v1["zero-shot-pooled"]
    assert [m.method.kind for m in zs.methods] == ["adaptor", "linear-map", "backbone"] and not zs.methods[0].heads


def test_a_format_1_name_means_what_evaluation_names_today():
    """The names format 1 recorded are read as the methods evaluation now names with their identity."""
    ours = adaptor_method("pooled", "tiny-vit", "tiny-bert")
    assert identity(ours.with_head("probe").name, [ours.name]) == ours.with_head("probe").to_dict()
    assert identity("no Adaptor tiny-vit (linear)", ["no Adaptor tiny-vit"])["kind"] == "backbone"
    assert identity("linear map, least squares (no training loop) a → b", [])["kind"] == "linear-map"
    assert identity("chance (12 candidates)", [])["kind"] == "chance"
    assert identity("something else", [])["kind"] == "other"


def test_records_go_back_to_the_data_they_came_from(v1):
    for name, rec in v1.items():
        again = record_from_dict(json.loads(json.dumps(rec.to_dict())))
        assert again == rec, name
        assert [t.to_dict() for t in again.tables] == [t.to_dict() for t in rec.tables]


def test_what_is_not_a_results_file_is_one_clear_error(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(InputError, match="not a results.json written by `pipe evaluate`"):
        load_results(tmp_path)
    newer = json.loads((V1 / "retrieval-pooled" / "results.json").read_text()) | {"format": RESULTS_FORMAT + 1}
    with pytest.raises(InputError, match="newer than this version reads"):
        record_from_dict(newer)
    with pytest.raises(InputError, match="no task and tables"):
        record_from_dict({"rows": []})
    broken = {"format": RESULTS_FORMAT, "task": "retrieval", "tables": [{"rows": []}]}
    with pytest.raises(InputError, match="not a complete results.json"):
        record_from_dict(broken)


# ----------------------------------------------------- `pipe report` of format 1, as it was
def test_pipe_report_of_old_results_makes_the_tables_and_page_of_their_day(tmp_path, monkeypatch):
    """report.html is that day's page but for one change made on purpose since: the classification tile of the
    glance shows the fewest labels (its first column, here 50%), where an Adaptor helps, not the most."""
    monkeypatch.chdir(ROOT)  # the runs are named as they were that day: tests/data/results-v1/<run>
    runs = str(V1.relative_to(ROOT))
    md = pipe("report", runs, "--format", "md").stdout
    assert md == (V1_REPORT / "report.md").read_text()
    got = list(csv.reader(io.StringIO(pipe("report", runs, "--format", "csv").stdout)))
    want = list(csv.reader(io.StringIO((V1_REPORT / "report.csv").read_text())))
    assert len(got) == len(want) > 80
    for g, w in zip(got, want):
        if g[2].startswith("chance"):  # its figure was text then; now the number it printed is in `value`
            assert g[5] and float(g[5]) == pytest.approx(float(g[4]) / 100) and w[5] == ""
            g[5] = ""
        assert g == w
    pipe("report", runs, "--html", str(tmp_path / "page.html"), "--format", "json")
    page = (tmp_path / "page.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 10  # the ROC cards and the curves are drawn
    page = re.sub(r'src="data:image/png;base64,[^"]*"', 'src="data:image/png;base64,"', page)
    page = re.sub(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}( · one file)", r"(time)\1", page)
    assert page == (V1_REPORT / "report.html").read_text()


def test_the_pages_stylesheet_is_package_data():
    import tomllib

    from stages.report.page import stylesheet

    css = stylesheet()
    assert css.startswith(":root{") and css.count("{") > 80 and "\n" in css
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "page.css" in data["stages.report"]


# ------------------------------------------------------------------------- the registries
def test_a_methods_kind_ranks_labels_and_colours_its_rows():
    from stages.report.figures import OURS, REFERENCE, Palette

    assert [k for k, kind in METHOD_KINDS.items() if kind.ours] == ["adaptor"]
    assert [k for k, kind in METHOD_KINDS.items() if not kind.measured] == ["chance"]
    ours = adaptor_method("tokens", "a", "b")
    assert ours.short == "Adaptor, tokens" and Method("no Adaptor a", "backbone").short == "no Adaptor"
    assert {v: dataclasses.replace(ours, variant=v).short for v in VARIANTS} == {
        "itm-rerank": "Adaptor, tokens+ITM", "raw-tokens": "tokens: raw tokens"}
    assert Method("x" * 50, "published").short == "x" * 38 + "…"
    palette = Palette()
    first = palette(ours.with_head("probe"))
    assert first == OURS[0] and palette(ours) == first and palette(ours.renamed(f"{ours.name} · run-b")) == first
    assert palette(adaptor_method("pooled", "a", "b")) == OURS[1]
    for kind, colour in REFERENCE.items():
        assert palette(Method(f"{kind} row", kind)) == colour
    native = Method("native joint space a + b", "native")   # a CLIP-style pair's own space: a reference row
    assert native.short == "native joint space" and native.type.order == 1 and palette(native) == REFERENCE["native"]


def test_each_task_says_its_order_main_tables_and_glance(v1, monkeypatch):
    from stages.evaluate import tasks
    from stages.report import load_runs
    from stages.report import page as P

    from pipeline.models.label_types import LABEL_TYPES
    from stages.evaluate.segment import TABLES

    for rec in v1.values():
        task = tasks.TASKS[rec.task]
        assert any(m in [t.metric for t in rec.tables] for m in task.glance), rec.task
        if task.glance_column:
            assert task.glance_column in rec.tables[0].column_names
    # every label type's own tables come first, its per-label AUROCs fold away; Dice two ways first
    assert set(tasks.TASKS["classification"].main_tables) == {k for t in LABEL_TYPES.values() for k in t.table_keys([])}
    assert set(tasks.TASKS["segmentation"].main_tables) < {key for key, _, _ in TABLES}
    runs = load_runs([V1])

    def order(results: str) -> list[str]:
        return re.findall(r"<h3>([^<]+)</h3>", results)

    assert order(P.Page(runs).results()) == ["Classification", "Segmentation", "Retrieval", "Zero-shot"]
    backwards = dict(reversed(tasks.TASKS.items()))
    backwards["classification"] = dataclasses.replace(backwards["classification"], main_tables=("ece",),
                                                      glance=("ece",))
    monkeypatch.setattr(tasks, "TASKS", backwards)
    monkeypatch.setattr(P, "TASKS", backwards)
    page = P.Page(runs).results()   # the results section: the tables and the glance
    assert order(page) == ["Zero-shot", "Retrieval", "Segmentation", "Classification"]
    assert "expected calibration error, 15 bins, lower is better · 50% labels" in page  # its glance: the fewest labels
    assert re.search(r"<summary>\d+ more classification tables \(macro AUROC, ", page)  # folded away


def test_every_report_format_renders_itself(tmp_path, monkeypatch):
    from cli.evaluate import ReportFormat
    from stages.report import load_runs, merged_tables
    from stages.report.formats import REPORT_FORMATS, for_file

    assert [f.value for f in ReportFormat] == list(REPORT_FORMATS)
    monkeypatch.chdir(ROOT)
    runs = load_runs([Path("tests/data/results-v1/retrieval-pooled")])
    tables = merged_tables(runs)
    for name, fmt in REPORT_FORMATS.items():
        if not fmt.terminal:
            assert pipe("report", str(runs.evals[0].path), "--format", name).stdout == fmt.render(runs, tables), name
        out = tmp_path / f"t{fmt.suffix or '.txt'}"
        pipe("report", str(runs.evals[0].path), "--out", str(out))
        assert out.read_text() == for_file(None, out).render(runs, tables)
    assert for_file(None, Path("a.csv")).name == "csv" and for_file(None, Path("a.txt")).name == "md"
    assert for_file(REPORT_FORMATS["table"], Path("a.json")).name == "json"
    assert for_file(REPORT_FORMATS["csv"], Path("a.json")).name == "csv"
    assert json.loads(REPORT_FORMATS["json"].render(runs, tables))["tables"][0]["rows"][0]["identity"]["kind"] == \
        "adaptor"


def test_a_residency_chooses_where_the_arrays_go_and_how_they_are_held():
    from stages.train.residency import PLACEMENTS, RESIDENCIES, ResidencyError, Room

    gib = 2**30
    gpu, cpu, small = Room(True, 10 * gib, 100 * gib), Room(False, 0, 100 * gib), Room(False, 0, 3 * gib)
    auto = RESIDENCIES["auto"]
    assert auto.choose(4 * gib, 4 * gib, gpu).name == "gpu"
    assert auto.choose(11 * gib, 11 * gib, gpu).name == "ram"        # more than the run's GPU budget
    assert auto.choose(4 * gib, 4 * gib, cpu).name == "ram"
    streamed = auto.choose(2 * gib, 2 * gib, small)                    # more than half the free RAM
    assert streamed.name == "stream" and not streamed.held and auto.fell_back(streamed)
    assert RESIDENCIES["ram"].choose(2 * gib, 2 * gib, small).name == "ram"  # asked for: up to 80%
    assert not RESIDENCIES["ram"].fell_back(PLACEMENTS["ram"])
    with pytest.raises(ResidencyError, match="--resident gpu needs a CUDA device; use --resident ram"):
        RESIDENCIES["gpu"].choose(1, 1, cpu)
    with pytest.raises(ResidencyError, match="needs 11.00 GiB but the cached arrays may take only 10.00 GiB more"):
        RESIDENCIES["gpu"].choose(11 * gib, 11 * gib, gpu)
    with pytest.raises(ResidencyError, match=r"needs 6.00 GiB \(2 process\(es\) on this machine\).*--resident none"):
        RESIDENCIES["ram"].choose(3 * gib, 6 * gib, small, copies=2)
    assert RESIDENCIES["none"].choose(100 * gib, 100 * gib, small).name == "stream"
    t = torch.zeros(3)
    assert PLACEMENTS["gpu"].hold(t, torch.device("meta")).device.type == "meta"  # the training device's memory
    assert PLACEMENTS["ram"].hold(t, torch.device("meta")) is t


def test_one_rule_decides_whether_a_run_resumes_another():
    from pipeline.config import config_hash, load_config, to_dict
    from stages.train import TrainConfig
    from stages.train.resume import differences, resume_key

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["dataset=demo", "backbone=tiny-vit",
                                                          "text_encoder=tiny-bert", "epochs=7", "device=cpu",
                                                          "resident=none"])
    assert config_hash(resume_key(to_dict(cfg))) == "381f026bd888ac79"  # what checkpoints of this config record
    other = load_config(TrainConfig, "configs/demo.yaml", ["dataset=demo", "backbone=tiny-vit",
                                                            "text_encoder=tiny-bert", "gather_negatives=false"])
    assert config_hash(resume_key(to_dict(other))) == "381e846a84666340"
    saved = to_dict(cfg)
    del saved["gather_negatives"]                          # a run from before the setting existed
    saved["adaptor"]["image_dim"] = 96                     # filled in from the cache at training
    assert differences(saved, to_dict(cfg)) == []
    assert differences(saved, to_dict(other)) == ["gather_negatives"]
    lr = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.1), epochs=9, out="elsewhere")
    assert differences(saved, to_dict(lr)) == ["optim.lr"]


def test_the_plans_row_bytes_read_the_stored_dtypes(monkeypatch):
    from pipeline.encoders import resolve_encoder_name
    from pipeline.encoders import stored
    from stages.reproduce import steps

    encoders = {n: resolve_encoder_name(n) for n in ("dinov2-s", "bert", "resnet-ae", "tiny-vit", "tiny-bert")}
    # what --plan said before the dtypes were read from pipeline/encoders/stored.py
    assert {n: steps.row_bytes(e) for n, e in encoders.items()} == {
        "dinov2-s": 198912, "bert": 175108, "resnet-ae": 11264, "tiny-vit": 38208, "tiny-bert": 8452}
    assert stored.store_spec(encoders["tiny-vit"])["dtype"] == {"tokens": "float16", "pooled": "float32"}
    monkeypatch.setitem(stored.STORED_DTYPES, "tokens", torch.float32)
    e = encoders["tiny-bert"]
    assert steps.row_bytes(e) == 8452 + e.max_tokens * e.embed_dim * 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Adaptor's run folder, saved as training saves one (no training: its weights are random)."""
    from pipeline.encoders import resolve_encoder_name
    from pipeline.encoders.stored import store_fingerprint
    from pipeline.models.adaptor import Adaptor, AdaptorConfig
    from pipeline.models.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("adaptor") / "run"
    run.mkdir()
    img, txt = resolve_encoder_name("tiny-vit"), resolve_encoder_name("tiny-bert")
    cfg = AdaptorConfig(image_dim=img.embed_dim, text_dim=txt.embed_dim, d_model=16, n_heads=2, ffn_dim=32)
    torch.manual_seed(0)
    meta = {"kind": "adaptor", "config": {"adaptor": dataclasses.asdict(cfg), "dataset": "elsewhere"}, "epoch": 1,
            "backbone": "tiny-vit", "text_encoder": "tiny-bert", "image_grid": [14, 14], "n_prefix": 1,
            "fingerprints": {"image": store_fingerprint(img, "cpu"), "text": store_fingerprint(txt, "cpu")}}
    save_checkpoint(run / "last.safetensors", Adaptor(cfg), meta)
    return run


def test_the_api_and_evaluation_load_an_adaptor_with_one_loader(checkpoint, tmp_path):
    from safetensors.torch import load_file

    from pipeline.api import load_adaptor
    from pipeline.api.export import export_adaptor
    from pipeline.models.checkpoint import save_checkpoint
    from stages.evaluate.features import FrozenAdaptor

    saved = load_file(str(checkpoint / "last.safetensors"))
    package = export_adaptor(checkpoint, tmp_path / "pkg").out
    for where in (checkpoint, checkpoint / "last.safetensors", package):
        frozen = FrozenAdaptor.load(where, torch.device("cpu"), tmp_path / "cache")
        api = load_adaptor(where, device="cpu")
        for model in (frozen.model, api.model):
            assert not model.training and set(model.state_dict()) == set(saved)
            assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved), where
        assert frozen.meta["fingerprints"] == api.source.checkpoint_meta["fingerprints"]
        assert frozen.meta["backbone"] == "tiny-vit" and frozen.grid == ((14, 14), 1)
    other = tmp_path / "head.safetensors"
    save_checkpoint(other, torch.nn.Linear(2, 2), {"kind": "head"})
    messages = []
    for load in (lambda: FrozenAdaptor.load(other, torch.device("cpu"), tmp_path), lambda: load_adaptor(other)):
        with pytest.raises(InputError) as e:
            load()
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "not an Adaptor checkpoint" in messages[0]


def test_the_npz_key_formats_are_written_once():
    assert prediction_key(0) == "m0" and prediction_key(1, "mlp", 0.01, 2) == "m1/mlp/1%/seed2"
    z = np.load(V1 / "classification-pooled" / "predictions.npz")
    assert prediction_key(0, "mlp", 1.0, 1) in z.files and prediction_key(1, "mlp", 0.5, 0) in z.files
