"""The model card (README.md) of an exported Adaptor: YAML front matter, then what a reader needs.

The front matter carries what the Hugging Face hub reads (library, licence, tags, the hub
ids of the encoders as ``base_model``) and what this project reads (each encoder's name,
hub id, weights identity and fingerprint; the training data and split). The body gives
the usage, the encoders, the training data, the evaluation tables with their confidence
intervals (from the run's results files), intended use, limitations and how to publish.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.records import EvalRecord
from pipeline.tables import to_markdown

INTENDED_USE = """\
Research only. This Adaptor aligns two frozen encoders on the training data named above; it is
meant for studying vision-language pre-training on cached embeddings, for reproducing the
evaluations above and for comparing against other methods.

**Not for clinical use.** It is not a medical device, has not been validated prospectively or
on any population, and must not inform the diagnosis or treatment of any patient. Zero-shot
"probabilities" are similarities read as a two-way softmax, not calibrated risks.
"""

LIMITATIONS = """\
- It reads only the embeddings of the two encoders named above, computed with their exact
  preprocessing: loading it with other weights is refused (the fingerprints differ), and on
  a GPU the encoders run in bf16, a rounding away from CPU features.
- The figures above come from the training dataset's own test split; performance on other
  hospitals, scanners, projections (lateral, AP) or populations is unknown.
- Report-based training inherits the reports' errors (missed, hedged and negated findings);
  the zero-shot scores depend on the wording of the prompts (`prompts.yaml`).
"""


# The hub's task types for each of `pipe evaluate`'s tasks (the model-index block)
HUB_TASKS = {"classification": "image-classification", "zero-shot": "zero-shot-image-classification",
             "segmentation": "image-segmentation", "retrieval": "image-text-retrieval"}


def model_index(title: str, evaluations: list[tuple[Path, EvalRecord]]) -> list[dict]:
    """The hub's ``model-index``: the Adaptor's own rows of every evaluation table, one metric per cell
    (the cell's figure in percent, to the tenth the tables print)."""
    results = []
    for _, res in evaluations:
        metrics = [{"type": t.metric, "name": f"{t.metric} · {row.method.name} · {column}",
                    "value": round(100 * cell.value, 1)}
                   for t in res.tables for row in t.rows if row.method.type.ours
                   for column, cell in row.cells.items() if cell.value is not None]
        if metrics:
            results.append({"task": {"type": HUB_TASKS.get(res.task, res.task), "name": res.task},
                            "dataset": {"type": res.dataset_label, "name": res.dataset_label, "split": "test"},
                            "metrics": metrics})
    return [{"name": title, "results": results}] if results else []


def front_matter(config: dict, license: str, evaluations: list[tuple[Path, EvalRecord]] = ()) -> dict:
    enc = config["encoders"]
    base = [e["hub_id"] for e in enc.values() if e.get("hub_id")]
    training = config["training"]
    fm = {"library_name": "freeze-pipe", "license": license,
          "tags": ["freeze-pipe", "adaptor", "vision-language", "medical-imaging", "chest-x-ray", "research-only"]}
    if license == "other":
        fm["license_name"] = "research-only"
        fm["license_details"] = ("the Adaptor's weights are shared for research; the licences of the encoders and "
                                 "of the training data also apply")
    if base:
        fm["base_model"] = base
    fm["encoders"] = {m: {k: e.get(k) for k in ("name", "hub_id", "weights", "fingerprint")} for m, e in enc.items()}
    fm["training_data"] = {k: training.get(k) for k in ("dataset", "dataset_name", "train_split", "val_split", "items")
                           if training.get(k) is not None}
    fm["adaptor"] = {"mode": config["mode"], "embedding_dim": config["embedding_dim"],
                     "weights_hash": config["weights_hash"]}
    index = model_index(_title(config), list(evaluations))
    if index:
        fm["model-index"] = index
    return fm


def _title(config: dict) -> str:
    enc = config["encoders"]
    return f"Adaptor ({config['mode']}) · {enc['image']['name']} + {enc['text']['name']}"


def model_card(config: dict, evaluations: list[tuple[Path, EvalRecord]], license: str) -> str:
    fm = yaml.safe_dump(front_matter(config, license, evaluations), sort_keys=False, allow_unicode=True)
    enc = config["encoders"]
    title = _title(config)
    parts = [f"---\n{fm}---\n", f"# {title}\n",
             f"A *Freeze the backbones* Adaptor (Qin et al., ICASSP 2024) trained with "
             f"freeze-pipe on cached embeddings of two frozen encoders. It maps an image and a "
             f"report into one {config['embedding_dim']}-d space, where their cosine similarity scores the pair.\n",
             _usage(), _encoders(enc), _training(config), _results(evaluations), _heads(config),
             "## Intended use\n\n" + INTENDED_USE, "## Limitations\n\n" + LIMITATIONS, _licence(license),
             _publishing()]
    return "\n".join(p.rstrip() + "\n" for p in parts if p)


def _usage() -> str:
    return """## How to use

```python
from pipeline.api import load_adaptor        # pip install freeze-pipe

model = load_adaptor("path/to/this/folder")  # checks the encoders' fingerprints against those below
img = model.encode_images(["chest.png", "study.dcm"])
zs = model.zero_shot(img)                     # the findings in prompts.yaml
print(zs.frame())
```

or from the command line: `pipe predict chest.png --adaptor path/to/this/folder`.
"""


def _encoders(enc: dict) -> str:
    rows = ["| modality | encoder | hub id | weights | fingerprint |", "|---|---|---|---|---|"]
    for m, e in enc.items():
        untrained = " (UNTRAINED)" if not e.get("trained", True) else ""
        rows.append(f"| {m} | {e['name']}{untrained} | {e.get('hub_id') or '—'} | `{e['weights']}` | "
                    f"`{e['fingerprint']}` |")
    return ("## Encoders (frozen, not included)\n\nThe Adaptor reads these encoders' cached outputs; install the same "
            "weights (`pipe encoders` shows what is present). A fingerprint names the weights, the preprocessing "
            "and the stored dtypes together.\n\n" + "\n".join(rows) + "\n")


def _training(config: dict) -> str:
    t = config["training"]
    items = t.get("items")
    counts = f" ({', '.join(f'{k}: {v:,}' for k, v in items.items())} items)" if items else ""
    cfg = t.get("config") or {}
    val = f", validation loss {t['val_loss']:.4f}" if isinstance(t.get("val_loss"), (int, float)) else ""
    return (f"## Training data\n\n- dataset: `{t.get('dataset')}`{counts}\n"
            f"- trained on the `{t.get('train_split')}` split; checkpoint chosen on the `{t.get('val_split')}` "
            f"split (`{t.get('checkpoint')}`, epoch {t.get('epoch')}{val})\n"
            f"- {cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, seed {cfg.get('seed')}; the whole "
            "training config is in `config.json`\n")


def _results(evaluations: list[tuple[Path, EvalRecord]]) -> str:
    if not evaluations:
        return ("## Results\n\nNo evaluation of this checkpoint was found when it was exported (`pipe export "
                "--results RUN` names evaluation runs of `pipe evaluate`).\n")
    out = ["## Results\n", "On the test split of the dataset named in each table; cells are percentages, with "
           "bootstrap confidence intervals in brackets (classification: mean ± std over seeds). Rows other than "
           "the Adaptor's are the references each evaluation ran beside it.\n"]
    for path, res in evaluations:
        out.append(f"### {res.task} · {res.dataset_name} (`{path.name}`)\n")
        out += [to_markdown(t) for t in res.tables]
    return "\n".join(out)


def _heads(config: dict) -> str:
    if not config.get("heads"):
        return ""
    rows = ["| head | kind | labels | label fraction | training items |", "|---|---|---|---|---|"]
    for name, h in config["heads"].items():
        rows.append(f"| `{name}` | {h.get('kind')} | {', '.join(h.get('labels') or [])} | "
                    f"{100 * float(h.get('fraction') or 0):g}% | {h.get('n_train')} |")
    return ("## Classification heads\n\nTrained by `pipe evaluate --task classification` on this Adaptor's image "
            "embeddings; apply one with `model.classify(img, head=NAME)` or `pipe predict --head NAME`.\n\n"
            + "\n".join(rows) + "\n")


def _licence(license: str) -> str:
    what = ("`other` (research only): the Adaptor's weights are shared for research" if license == "other"
            else f"`{license}` for the Adaptor's weights")
    return (f"## Licence\n\n{what}. The frozen encoders keep their own licences, and the training data's terms "
            "(e.g. a data use agreement) may restrict how models trained on it are shared: check both before "
            "publishing.\n")


def _publishing() -> str:
    return """## Publishing

```bash
hf upload YOUR-ORG/adaptor-name path/to/this/folder .    # or: huggingface-cli upload ...
```
"""
