"""Zero-shot classification: prompt pairs per finding, scored through the Adaptor's text path.

Each image's score for a finding is its mean cosine similarity to the finding's positive
prompts minus its mean similarity to the negative prompts; AUROC per finding on the test
split. Prompts are texts, so they are embedded into (and read from) the text cache. The
test scores go to ``predictions.npz`` (``m<i>``: method ``i``'s ``[n, findings]`` scores).
"""
from __future__ import annotations

import numpy as np

from core.errors import InputError
from pipeline.methods import Method
from pipeline.prompts import finding_scores, prompt_layout
from pipeline.records import MethodResult, prediction_key
from stages.evaluate import metrics as M
from stages.evaluate import native
from stages.evaluate.context import EvalContext, TaskResult
from stages.evaluate.plots import roc_grid
from stages.evaluate.prompts import PromptError, embed_texts_store, load_prompts, prompt_path
from stages.evaluate.retrieve import LINEAR_MAP, adaptor_similarity, linear_map_similarity, raw_similarity
from stages.evaluate.tables import Table, add_estimates_row, interval_note, make_table


def _findings(ctx: EvalContext, prompts: dict) -> list[str]:
    labels = ctx.data.label_names
    if not labels:
        raise PromptError(f"dataset {ctx.dataset_name!r} has no labels, so zero-shot predictions cannot be scored. "
                          "Add 0/1 label columns named like the findings in the prompt file and re-run `pipe embed`.")
    found = [f for f in prompts if f in labels]
    if not found:
        raise PromptError(f"none of the prompt file's findings ({', '.join(prompts)}) is a label of "
                          f"{ctx.dataset_name!r} ({', '.join(labels)}). Add prompts for its labels to a YAML file "
                          "and pass prompts=PATH.")
    missing = [f for f in labels if f not in prompts]
    if missing:
        ctx.note(f"labels without prompts are not scored: {', '.join(missing)}")
    return found


def prompt_device(ctx: EvalContext) -> str:
    """Where the prompts are encoded: into the store the reports are in, so in its arithmetic.
    Reports embedded on CUDA (bf16 autocast, recorded in the store's spec) need the prompts
    encoded on CUDA too, on the device this evaluation was given (``cuda:1`` stays ``cuda:1``);
    reports embedded on the CPU need the CPU."""
    if not ctx.data.text.attrs["spec"].get("compute"):
        return "cpu"
    if ctx.device.type != "cuda":
        raise PromptError(f"the reports of {ctx.dataset_name!r} were embedded on CUDA (bf16), so the zero-shot prompts "
                          f"must be encoded there too, and this evaluation runs on {ctx.device}: pass --device cuda "
                          "(or cuda:N), or embed the dataset on the CPU")
    return str(ctx.device)


def prompt_rows(ctx: EvalContext, prompts: dict, findings: list[str]) -> tuple[np.ndarray, dict]:
    """Text-store rows of every prompt, and per finding the positions of its positive/negative prompts."""
    texts, where = prompt_layout(prompts, findings)
    store, rows = embed_texts_store(texts, ctx.text_encoder, ctx.root, prompt_device(ctx))
    if store.fingerprint != ctx.data.text.fingerprint:
        raise PromptError(f"the prompts were embedded with a {ctx.text_encoder} configuration (fingerprint "
                          f"{store.fingerprint[:16]}) other than the dataset's reports' "
                          f"({ctx.data.text.fingerprint[:16]}); re-run `pipe embed` for the dataset with this version")
    return rows, where


def figures(ctx: EvalContext, scores: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict:
    values = {f: M.auroc(y[f], s) for f, s in scores.items()}
    values["macro"] = float(np.nanmean(list(values.values()))) if np.isfinite(list(values.values())).any() else np.nan

    def resampled(w):
        per = {f: M.auroc(y[f], s, w) for f, s in scores.items()}
        return {**per, "macro": np.nanmean(np.stack(list(per.values())), axis=0)}

    cis = M.bootstrap_cis(resampled, len(next(iter(scores.values()))), ctx.cfg.bootstrap, ctx.cfg.seed, ctx.cfg.ci)
    return {"auroc": values, "ci": {k: list(v) for k, v in cis.items()}}


def run(ctx: EvalContext) -> TaskResult:
    prompts = load_prompts(ctx.cfg.zero_shot.prompts)
    findings = _findings(ctx, prompts)
    test = ctx.positions()["test"]
    if not len(test):
        raise InputError(f"no items in the {ctx.cfg.test_split!r} split; check the split column or set test_split=...")
    rows, where = prompt_rows(ctx, prompts, findings)
    y = {f: ctx.data.items[f"label.{f}"].to_numpy(np.float64)[test] for f in findings}
    img_rows = ctx.image_rows[test]
    methods, curves, saved = [], {}, {}
    sims = []
    if ctx.adaptor is not None:
        sims.append((ctx.adaptor_method(), "adaptor", adaptor_similarity(ctx, img_rows, ctx.data.text, rows), None))
    if native.applies(ctx):   # the pair's own joint space: the baseline an Adaptor must beat
        sims.append((ctx.native_method(with_text=True), native.NATIVE,
                     native.similarity(ctx, img_rows, ctx.data.text, rows), None))
    sims.append((Method(f"{LINEAR_MAP} {ctx.backbone} → {ctx.text_encoder}", "linear-map"), "linear-map",
                 linear_map_similarity(ctx, img_rows, ctx.data.text, rows), None))
    sim, why = raw_similarity(ctx, img_rows, ctx.data.text, rows)
    sims.append((ctx.baseline_method(with_text=True), "backbone", sim, why))
    for method, kind, sim, why in sims:
        m = {"note": why} if why else {}
        if why:
            ctx.note(f"{method.name}: {why}")
        if sim is not None:
            scores = finding_scores(sim, where)
            saved[prediction_key(len(methods))] = np.stack([scores[f] for f in findings], 1).astype(np.float32)
            m.update(figures(ctx, scores, y))
            for f, s in scores.items():
                fpr, tpr = M.roc_curve(y[f], s)
                curves.setdefault(f, []).append((f"{method.name} (AUROC {m['auroc'][f]:.3f})", fpr, tpr))
        methods.append(MethodResult(method, kind, figures=m))
    result = TaskResult(methods=methods, tables=[_table(ctx, methods, findings, len(test))])
    result.data = {"splits": {"test": int(len(test))}, "prompts": str(prompt_path(ctx.cfg.zero_shot.prompts)),
                   "findings": findings, "n_prompts": {f: {k: len(v) for k, v in prompts[f].items()} for f in findings},
                   "positives": {f: int(np.nansum(y[f])) for f in findings}}
    title = f"zero-shot ROC · {ctx.dataset_name} · {ctx.scored}"
    result.plots.append(str(roc_grid(curves, ctx.out / "roc.png", title)))
    result.files["predictions"] = ctx.out / "predictions.npz"
    np.savez_compressed(result.files["predictions"], ids=ctx.data.items.id.to_numpy()[test].astype(str),
                        y=np.stack([y[f] for f in findings], 1), label_names=np.array(findings), **saved)
    return result


def _table(ctx: EvalContext, methods: list[MethodResult], findings: list[str], n_test: int) -> Table:
    cols = findings + ["macro"]
    t = make_table("zero-shot", f"AUROC on {ctx.scored}", "auroc", cols,
                   interval_note(ctx.cfg.ci, n_test, ctx.cfg.bootstrap))
    for m in methods:
        add_estimates_row(t, m.method, m.figures.get("auroc"), m.figures.get("ci"))
    return t
