"""`pipe reproduce`: the paper's tables as recipes, run end to end on miniature copies of MIMIC-CXR,
RSNA, SIIM and COVIDx in their published layouts, with BenchX-style split files, the tiny
encoders in place of the paper's, and tiny epochs; resumed after an interruption."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.datasets import READERS
from pipeline.datasets.readers import covidx
from pipeline.datasets.shared_splits import BENCHX_COUNTS
from pipeline.encoders import resolve_encoder_name
from stages import evaluate
from stages import train as train_adaptor
from stages.reproduce import stage
from stages.reproduce.spec import DATASETS, load_table, table_names
from stages.reproduce.steps import Context, eval_config, pretrain_config
from stages.train import trainer
from tests.helpers import pipe
from tests.helpers.layouts import (benchx_covidx_name, mini_covidx_cxr4, mini_mimic, mini_rsna, mini_siim_png,
                                   release_names, split_benchx_style, write_benchx)

TINY = ("dinov2-s=tiny-vit,dinov2-b=tiny-vit,resnet-ae=tiny-vit,bert=tiny-bert,biobert=tiny-bert,"
        "clinicalbert=tiny-bert,pubmedbert=tiny-bert,cxr-bert=tiny-bert")
PRETRAIN = ["epochs=2", "batch_size=16", "val_batch_size=64", "adaptor.d_model=32", "adaptor.n_heads=2",
            "adaptor.ffn_dim=64", "adaptor.dropout=0.0"]
EVAL = ["seeds=2", "heads.epochs=3", "heads.min_steps=10", "heads.patience=2", "bootstrap=50",
        "seg.channels=[8,8,8,8]", "seg.epochs=2", "seg.val_every=1", "seg.min_steps=4", "seg.batch_size=8"]


def test_every_recipe_validates_and_names_registered_encoders_and_readers(tmp_path):
    """Each cell of each table: its pre-training and evaluation configs load against the schemas, its
    encoders are registered, its datasets have readers, and its id is unique."""
    assert set(table_names()) >= {"classification", "segmentation"}
    for name in table_names():
        spec = load_table(name)
        ctx = Context(spec, tmp_path / "cache", tmp_path / "out", {k: f"{DATASETS[k].reader}:/data/{k}"
                                                                   for k in DATASETS})
        for row in spec.rows:
            for enc in (row.image, row.text):
                if enc:
                    assert resolve_encoder_name(enc).name == enc
            if spec.adaptor:
                cfg = pretrain_config(ctx, row)
                # the authors' two GPUs x 1,024 pairs, each scoring its own: 2,048 per step in two loss groups
                assert (cfg.batch_size, cfg.loss_groups, cfg.epochs, cfg.seed, cfg.optim.lr, cfg.optim.weight_decay,
                        cfg.optim.warmup_frac, cfg.adaptor.text_to_image_weight) == (2048, 2, 50, 42, 2e-5, 0.01, 0.02,
                                                                                     0.75)
                assert cfg.backbone == f"{row.image}-pad" and cfg.text_encoder == row.text
        cells = spec.cells()
        assert len({c.id for c in cells}) == len(cells)
        for cell in cells:
            cfg = eval_config(ctx, cell, {})
            assert cfg.fractions == [cell.fraction] and cfg.dataset.startswith(DATASETS[cell.column.data].reader)
            assert DATASETS[cell.column.data].reader in READERS
    table = load_table("classification")
    assert len(table.rows) == 15 and len(table.cells()) == 15 * 2 * 3 + 3 * 2 * 3
    rsna = load_config(evaluate.EvalConfig, "configs/paper/rsna_classification.yaml")
    covid = load_config(evaluate.EvalConfig, "configs/paper/covidx_classification.yaml")
    # shell/finetune-rsna.sh (512 per GPU x 2) and shell/finetune-covidx.sh (128 x 2), their epochs, no step cap
    assert (rsna.heads.lrs, rsna.heads.weight_decay, rsna.heads.batch_size, rsna.heads.epochs) == ([5e-5], 1e-4, 1024,
                                                                                                 100)
    assert (covid.heads.weight_decay, covid.heads.batch_size, covid.heads.patience) == (0.05, 256, 5)
    assert covid.classification.label_type == "multiclass" and rsna.heads.max_steps == covid.heads.max_steps == 0
    assert {c.metric for c in load_table("segmentation").columns} == {"dice_empty_is_one"}
    assert train_adaptor.TrainConfig is not None


def test_the_authors_pad_encoders_carry_their_bases_cost_card():
    """The plan's time of a -pad embedding is its base encoder's: the same network at the same input
    size, so the same card (costs live in encoder configs, not in a table keyed by name)."""
    from pipeline.encoders import list_encoders
    from stages.reproduce.steps import embed_rate

    padded = [c for c in list_encoders() if c.geometry == "pad-square"]
    assert {c.name for c in padded} >= {"dinov2-b-pad", "dinov2-s-pad224", "resnet-ae-pad", "tiny-vit-pad"}
    for c in padded:
        base = resolve_encoder_name(c.name.rsplit("-pad", 1)[0], "image")
        assert c.card == base.card and c.card.gflops and c.input_size == base.input_size
        assert embed_rate(c.name, "image") == embed_rate(base.name, "image") > 0


@pytest.mark.parametrize("fixed", [False, True], ids=["authors", "fixed"])
@pytest.mark.parametrize("table", ["classification", "segmentation"])
def test_every_setting_equals_the_authors_or_says_why(table, fixed, tmp_path):
    """The fidelity table holds every setting of every stage: ours is read from the configs the table
    runs, theirs from configs/paper/authors/, and a difference without a reason fails, as does a
    reason kept for a difference that is gone. Each file reference is cited at the commit read."""
    rows = stage.fidelity(stage.ReproduceConfig(table=table, cache=str(tmp_path / "cache"), fixed=fixed))
    assert len(rows) > 40
    assert [(r.stage, r.key, r.ours, r.authors) for r in rows if r.undocumented] == []
    assert [(r.stage, r.key) for r in rows if r.stale] == []
    assert all(r.why for r in rows if r.differs) and all(r.source for r in rows)
    assert all("@2414548c0b12" in r.source for r in rows if ".py:" in r.source or ".sh:" in r.source)
    stages = {r.stage for r in rows}
    assert stages >= ({"embed", "pretrain", "RSNA", "COVIDx"} if table == "classification" else {"SIIM", "RSNA"})
    by_key = {(r.stage, r.key): r for r in rows}
    if table == "classification":
        assert by_key[("pretrain", "loss_groups")].ours == (1 if fixed else 2)
        assert by_key[("pretrain", "adaptor.mode")].deliberate is fixed and ("flaw 1" in by_key[
            ("pretrain", "adaptor.mode")].why) is fixed
    else:
        assert by_key[("SIIM", "column.metric")].ours == ("dice_positive" if fixed else "dice_empty_is_one")
        assert by_key[("RSNA", "table:split_sources.rsna.mgca")].ours == "mgca-detection"


def test_a_setting_changed_from_the_authors_without_a_reason_is_named_and_fails(tmp_path):
    """``--fidelity`` reads our value from the configs as they would run, overrides included: one that
    leaves the authors' value is an undocumented difference, printed and exiting 1; ``--json`` gives
    the rows with the keys stage, key, ours, authors, source, deliberate, why."""
    r = pipe("reproduce", "classification", "--fidelity", "--json", "--cache", str(tmp_path / "cache"),
             "--pretrain-set", "optim.lr=1e-4", "--eval-set", "heads.patience=3", expect=1)
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(rows[0]) == {"stage", "key", "ours", "authors", "source", "deliberate", "why"}
    bad = {(x["stage"], x["key"]): x for x in rows if x["ours"] != x["authors"] and not x["deliberate"]}
    assert set(bad) == {("pretrain", "optim.lr"), ("RSNA", "heads.patience"), ("COVIDx", "heads.patience")}
    assert bad[("pretrain", "optim.lr")]["authors"] == 2e-5 and "shell/pretrain.sh:18@2414548c0b12" in \
        bad[("pretrain", "optim.lr")]["source"]
    assert "3 setting(s) differ from the authors' with no documented reason: pretrain optim.lr" in r.stderr
    ok = pipe("reproduce", "segmentation", "--fidelity", "--cache", str(tmp_path / "cache"))
    assert "| stage | key | ours | authors | source | deliberate | why |" in ok.stdout
    assert "| SIIM | seg.epochs | 100 | 100 | shell/segment-siim.sh:24@2414548c0b12 |" in ok.stdout


def test_the_documentation_shows_the_fidelity_tables_as_they_are():
    """docs/how-to/reproduce.md holds each table's fidelity table exactly as `--fidelity` prints it."""
    doc = (Path(__file__).resolve().parents[1] / "docs/how-to/reproduce.md").read_text()
    for table in ("classification", "segmentation"):
        r = pipe("reproduce", table, "--fidelity")
        body = r.stdout.strip().split("\n", 2)[2]  # the rows, without the bold title
        assert body in doc, (f"docs/how-to/reproduce.md is out of date: paste the output of "
                             f"`pipe reproduce {table} --fidelity` into it")


@pytest.fixture
def miniatures(tmp_path, monkeypatch):
    """The four datasets in their published layouts, BenchX-style lists for the three downstream ones."""
    benchx = tmp_path / "BenchX"
    mimic = mini_mimic(tmp_path / "mimic-cxr-jpg" / "2.0.0")
    rsna, ids = mini_rsna(tmp_path / "rsna")
    counts = write_benchx(benchx / "RSNA", **split_benchx_style(ids, [int(i % 3 == 0) for i in range(len(ids))]))
    for stem, n in counts.items():
        monkeypatch.setitem(BENCHX_COUNTS["rsna-pneumonia"], stem, n)
    siim, stems = mini_siim_png(tmp_path / "siim")
    train = [s for s in stems if "_train_" in s]
    counts = write_benchx(benchx / "SIIM", train=train[:24], val=train[24:], test=[s for s in stems if "_test_" in s],
                          train_1=[train[0], train[1]], train_10=train[:4])
    for stem, n in counts.items():
        monkeypatch.setitem(BENCHX_COUNTS["siim-pneumothorax"], stem, n)
    cov = mini_covidx_cxr4(tmp_path / "covidx")
    listed = {s: [benchx_covidx_name(s, n) for n in release_names(cov, s)[1:]] for s in ("train", "val", "test")}
    counts = write_benchx(benchx / "COVIDx", **listed, train_1=listed["train"][:2], train_10=listed["train"][:6])
    for stem, n in counts.items():
        monkeypatch.setitem(BENCHX_COUNTS["covidx"], stem, n)
    monkeypatch.setitem(covidx.RELEASES, "CXR-4", (40, 10, 10))
    return {"mimic": mimic, "rsna": rsna, "siim": siim, "covidx": cov, "benchx": benchx}


def reproduce(table: str, m: dict, cache: Path, out: Path, *extra: str, expect: int | None = 0):
    data = ",".join(f"{k}={m[k]}" for k in ("mimic", "rsna", "siim", "covidx"))
    args = ["reproduce", table, "--data", data, "--splits", f"benchx:{m['benchx']}", "--substitute", TINY,
            "--cache", str(cache), "--out", str(out), "--device", "cpu", "--json",
            *[a for p in PRETRAIN for a in ("--pretrain-set", p)], *[a for e in EVAL for a in ("--eval-set", e)],
            *extra]
    r = pipe(*args, expect=expect)
    return r, (json.loads(r.stdout.strip().splitlines()[-1]) if r.exit_code == 0 else None)


@pytest.mark.slow
def test_a_whole_table_on_miniatures_resumes_and_prints_the_paper_layout(miniatures, tmp_path, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "runs"
    only = ("--only", "dinov2-s+bert", "--only", "dinov2-s+none")
    # the plan lists every cell of the table, with the stores, the disk and the times
    _, plan = reproduce("classification", miniatures, cache, out, "--plan")
    ids = [s["id"] for s in plan["steps"]]
    assert {"dinov2-b+cxr-bert/covidx/10", "pretrain/resnet-ae+pubmedbert", "embed/mimic/text/tiny-bert"} <= set(ids)
    assert all(s["status"] == "to run" for s in plan["steps"]) and all(s["disk_bytes"] > 0 for s in plan["steps"]
                                                                          if s["kind"] == "embed")

    # a power cut in the second epoch of the pre-training
    real_epoch = trainer.Trainer._epoch

    def cut(self, epoch, tick):
        if epoch == 2:
            raise RuntimeError("power cut")
        return real_epoch(self, epoch, tick)
    monkeypatch.setattr(trainer.Trainer, "_epoch", cut)
    r, _ = reproduce("classification", miniatures, cache, out, *only, expect=None)
    assert isinstance(r.exception, RuntimeError) and (out / "pretrain/dinov2-s+bert/last.safetensors").is_file()
    monkeypatch.setattr(trainer.Trainer, "_epoch", real_epoch)
    _, plan = reproduce("classification", miniatures, cache, out, *only, "--plan")
    state = {s["id"]: s["status"] for s in plan["steps"]}
    assert state["pretrain/dinov2-s+bert"] == "resume after epoch 1 of 2"
    # the image encoders run in the authors' input geometry: <name>-pad
    assert state["embed/rsna/image/tiny-vit-pad"] == "done" and len(plan["steps"]) == 4 + 1 + 6 + 6  # embeds, Adaptor, cells

    r, res = reproduce("classification", miniatures, cache, out, *only)
    assert "resuming" in r.stderr and "pretrain/dinov2-s+bert" in res["ran"] and len(res["ran"]) == 13
    _check_classification_table(out)
    cell = json.loads((out / "cells/dinov2-s+bert/rsna/1/results.json").read_text())
    assert cell["split_source"] == f"benchx:{miniatures['benchx']}" and cell["dataset_version"].startswith("RSNA")
    train_1 = sorted((miniatures["benchx"] / "RSNA/train_1.txt").read_text().split())
    subsets = json.loads((out / "cells/dinov2-s+bert/rsna/1/subsets.json").read_text())
    assert all(sorted(s["0.01"]) == train_1 for s in subsets.values())  # BenchX's 1%, for every seed

    # finished cells are not run again; a cell cut short is run again, alone
    _, res = reproduce("classification", miniatures, cache, out, *only)
    assert res["ran"] == []
    (out / "cells/dinov2-s+bert/covidx/10/results.json").unlink()
    r, res = reproduce("classification", miniatures, cache, out, *only)
    assert res["ran"] == ["dinov2-s+bert/covidx/10"]

    # an Adaptor folder trained with another recipe is a conflict: the plan says so and the run refuses
    _, plan = reproduce("classification", miniatures, cache, out, *only, "--pretrain-set", "optim.lr=0.1", "--plan")
    assert {s["id"]: s["status"] for s in plan["steps"]}["pretrain/dinov2-s+bert"].startswith(
        "conflict: ") and "optim.lr differ" in json.dumps(plan["steps"])
    r, _ = reproduce("classification", miniatures, cache, out, *only, "--pretrain-set", "optim.lr=0.1", expect=2)
    assert "1 step(s) cannot run, e.g. pretrain/dinov2-s+bert: conflict" in r.output

    # the segmentation table: a decoder on the patch tokens, Dice under both conventions
    _, res = reproduce("segmentation", miniatures, cache, out / "seg", "--only", "dinov2-s")
    # SIIM's and RSNA's embeddings (whole images at 224 with 4 views warped as the authors' augmentation:
    # tiny-vit-pad224-ssr, not the classification's) and six cells whose decoders train on the views
    assert len(res["ran"]) == 2 + 6 and "embed/rsna/image/tiny-vit-pad224-ssr" in res["ran"]
    cell = json.loads((out / "seg/cells/dinov2-s+none/siim/100/results.json").read_text())
    assert cell["data"]["augmented_views"] == {"views": 4, "p": 0.5}
    md = (out / "seg/table.md").read_text()
    assert "Adaptor, DINOv2-B + BERT (published)" in md and "51.8" in md and "no Adaptor, dinov2-s (ran as tiny-vit)" in md
    assert "Dice on images with a non-empty mask" in md and "SIIM-ACR stage 1, PNG release" in md


def _check_classification_table(out: Path) -> None:
    md = (out / "table.md").read_text()
    ours = next(line for line in md.splitlines() if line.startswith("| Adaptor, dinov2-s (ran as tiny-vit) + bert"))
    assert ours.count("±") == 6 and "[" in ours  # six cells, each mean ± std [interval]
    assert "| MGCA ViT-B (published) | linear probe | 89.1 | 89.9 | 90.8 |" in md
    assert "| G2D (published) | linear probe | 92.2 | 92.9 | 93.6 | — | — | — |" in md
    assert "no Adaptor, dinov2-s (ran as tiny-vit) (ours)" in md and "…" in md  # rows not run yet are marked
    assert "mean ± std over 2 seeds" in md and "not the spread across seeds" in md
    assert "COVIDx CXR-4" in md and "splits: benchx:" in md
    assert "expected calibration error" in md and "centred on the estimate" in md
    table = json.loads((out / "table.json").read_text())
    assert table["table"] == "classification" and len(table["tables"]) == 2


def test_fixed_is_the_recipe_with_the_tables_fixes_in_a_folder_of_its_own(tmp_path):
    """``--fixed`` runs the table's fixes of the authors' flaws as overrides of their recipe (tokens mode
    and one loss over the step for classification; the pooled-pixel Dice choosing decoders, and the
    Dice on positive images as the reported metric, for segmentation), under runs/paper-fixed."""
    r = pipe("reproduce", "classification", "--fixed", "--plan", "--json", "--cache", str(tmp_path / "cache"))
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    pre = next(s for s in plan["steps"] if s["id"] == "pretrain/dinov2-b+bert")
    assert plan["out"] == "runs/paper-fixed" and "adaptor.mode=tokens" in pre["command"] and \
        "loss_groups=1" in pre["command"] and "configs/paper/pretrain.yaml" in pre["command"]
    seg = stage.context(stage.ReproduceConfig(table="segmentation", fixed=True, cache=str(tmp_path / "cache")))
    assert {c.metric for c in seg.spec.columns} == {"dice_positive"} and "seg.select=dice_global" in seg.eval_overrides
    assert {c.metric for c in load_table("segmentation").columns} == {"dice_empty_is_one"}
