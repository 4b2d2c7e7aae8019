"""A trained Adaptor, ready for new images and reports: :func:`load_adaptor` and :class:`TrainedAdaptor`."""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.api.bank import ReportBank, build_bank
from pipeline.api.encode import (ImageInput, adaptor_image, adaptor_text, image_features, image_label, load_pixels,
                                 text_features)
from pipeline.api.source import Source, check_encoder, load_model, resolve_encoder, resolve_source
from core.console import err, escape, progress
from pipeline.devices import resolve_device
from pipeline.encoders import create_encoder
from pipeline.encoders.config import MODALITIES
from pipeline.encoders.stored import preprocess_of
from pipeline.models.label_types import LABEL_TYPES
from core.errors import InputError
from pipeline.models.adaptor import Adaptor, AdaptorMode
from pipeline.models.checkpoint import weights_hash
from pipeline.models.heads import load_head
from pipeline.prompts import finding_scores, load_prompts, prompt_layout, zero_shot_probability


class ImageInputError(InputError):
    """Images that could not be read; ``failures`` maps each one's position to the reason."""

    def __init__(self, failures: dict[int, str], total: int):
        self.failures = failures
        first = "; ".join(list(failures.values())[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        super().__init__(f"{len(failures)} of {total} images could not be read: {first}{more}")


@dataclass
class ZeroShot:
    """Zero-shot findings of n images: ``scores`` (mean similarity to the positive prompts minus
    the mean to the negative ones, what `pipe evaluate --task zero-shot` ranks by) and
    ``probabilities`` (the same, as a softmax at the Adaptor's logit scale), both ``[n, F]``."""

    findings: list[str]
    scores: np.ndarray
    probabilities: np.ndarray

    def frame(self, index: Sequence | None = None) -> pd.DataFrame:
        """The probabilities as a table: one row per image, one column per finding."""
        return pd.DataFrame(self.probabilities, columns=self.findings, index=index)


@dataclass
class HeadOutput:
    """A classification head's probabilities ``[n, L]`` for its ``labels``."""

    name: str
    labels: list[str]
    label_type: str
    probabilities: np.ndarray

    def frame(self, index: Sequence | None = None) -> pd.DataFrame:
        return pd.DataFrame(self.probabilities, columns=self.labels, index=index)


def load_adaptor(path: str | os.PathLike, device: str = "auto", *, image_encoder: str | None = None,
                 text_encoder: str | None = None) -> "TrainedAdaptor":
    """A trained Adaptor from a run folder (its best.safetensors, else last.safetensors), a
    checkpoint file, or a package written by `pipe export`.

    The encoders it was trained on are found offline as the CLI finds them (``image_encoder``
    and ``text_encoder`` name others: a local directory holding the same weights, say) and
    refused when their fingerprints differ from the ones it was trained on.
    """
    source = resolve_source(path)
    dev = resolve_device(device)
    overrides = {"image": image_encoder, "text": text_encoder}
    configs = {m: resolve_encoder(source.encoders[m], overrides[m]) for m in MODALITIES}
    for m in MODALITIES:
        check_encoder(source.encoders[m], configs[m], dev)
    return TrainedAdaptor(source, load_model(source, dev), dev, configs)


class TrainedAdaptor:
    """A trained Adaptor with its two frozen encoders: encode, compare, classify, retrieve.

    Embeddings are L2-normalised float32 rows, so ``a @ b.T`` is their cosine similarity.
    The encoders are built on first use. Long inputs show a progress bar on stderr
    (``progress=False`` hides it; ``PIPE_NO_PROGRESS=1`` hides every bar).
    """

    def __init__(self, source: Source, model: Adaptor, device: torch.device, encoders: dict):
        self.source, self.model, self.device, self.encoder_configs = source, model, device, encoders
        self._encoders: dict[str, torch.nn.Module] = {}

    def __repr__(self) -> str:
        return (f"TrainedAdaptor({self.mode.name} mode, {self.dim}-d, image encoder {self.encoder_configs['image'].name}, "
                f"text encoder {self.encoder_configs['text'].name}, from {self.source.kind} {self.source.path})")

    # -- what it is -----------------------------------------------------------------------
    @property
    def mode(self) -> AdaptorMode:
        return self.model.mode

    @property
    def dim(self) -> int:
        return self.model.cfg.d_model

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale), clamped as in training: the temperature of its similarities."""
        return float(self.model.scale().detach())

    @cached_property
    def weights_hash(self) -> str:
        """A hash of the Adaptor's tensors (equal for a run's checkpoint and its export)."""
        return weights_hash(self.model.state_dict())

    @property
    def training_cache(self) -> Path | None:
        """The cache it was trained from, when that folder is here (a run or a checkpoint records it,
        a package does not): where :meth:`report_bank` finds its dataset's reports when no cache is given."""
        meta = self.source.meta if self.source.kind != "package" else {}
        recorded = meta.get("cache_root") or (meta.get("config") or {}).get("cache")
        path = Path(recorded).expanduser() if recorded else None
        return path if path is not None and path.is_dir() else None

    @property
    def fingerprints(self) -> dict[str, str]:
        """The fingerprints of the cache stores it was trained on, per modality."""
        return {m: r.fingerprint for m, r in self.source.encoders.items()}

    def encoder(self, modality: str):
        """The frozen image or text encoder (built on first use)."""
        if modality not in self._encoders:
            self._encoders[modality] = create_encoder(self.encoder_configs[modality], self.device)
        return self._encoders[modality]

    # -- encoding -------------------------------------------------------------------------
    def encode_images(self, images: Sequence[ImageInput], *, batch_size: int = 32, progress: bool | None = None,
                      on_error: str = "raise") -> np.ndarray:
        """Image embeddings ``[n, d]`` of paths (PNG, JPEG, DICOM, ...), file bytes, numpy arrays
        (``[H, W]`` grey or ``[H, W, 3]``), PIL images or tensors, in batches.

        An image that cannot be read raises :class:`ImageInputError` naming every such image
        (``on_error="raise"``), or gets a row of NaN (``on_error="nan"``)."""
        if on_error not in ("raise", "nan"):
            raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
        emb, failures = self.image_embeddings(images, batch_size=batch_size, progress=progress)
        if failures and on_error == "raise":
            raise ImageInputError(failures, len(emb))
        for i, why in failures.items():
            err.print(f"[yellow]skipped:[/] {escape(why)}")
        return emb

    def image_embeddings(self, images: Sequence[ImageInput], *, batch_size: int = 32,
                         progress: bool | None = None) -> tuple[np.ndarray, dict[int, str]]:
        """Image embeddings ``[n, d]`` (NaN rows where an image failed) and ``{position: reason}``."""
        one = isinstance(images, (str, os.PathLike, bytes, Image.Image)) or \
            (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 2)
        images = [images] if one else list(images)  # one image, or a sequence (an [N, H, W] array: N images)
        labels = [image_label(x, i) for i, x in enumerate(images)]
        out = np.full((len(images), self.dim), np.nan, np.float32)
        failures: dict[int, str] = {}
        pre = preprocess_of(self.encoder_configs["image"])
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="decode") as pool, \
                self._bar("encode images", len(images), batch_size, progress) as advance:
            for s in range(0, len(images), batch_size):
                loaded = load_pixels(images[s:s + batch_size], labels[s:s + batch_size], pre, pool)
                ok = [i for i, x in enumerate(loaded) if not isinstance(x, Exception)]
                failures.update({s + i: str(x) for i, x in enumerate(loaded) if isinstance(x, Exception)})
                if ok:
                    feats = image_features(self.encoder("image"), torch.stack([loaded[i] for i in ok]), self.device)
                    out[[s + i for i in ok]] = adaptor_image(self.model, feats, *self._grid)
                advance(len(loaded))
        return out, failures

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 32, progress: bool | None = None) -> np.ndarray:
        """Report (or prompt) embeddings ``[n, d]``; texts are normalised like cached reports."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        cfg = self.encoder_configs["text"]
        with self._bar("encode reports", len(texts), batch_size, progress) as advance:
            for s in range(0, len(texts), batch_size):
                try:
                    feats = text_features(self.encoder("text"), cfg, texts[s:s + batch_size], self.device)
                except ValueError as e:
                    raise InputError(f"cannot encode the texts: {e} (position {s} onwards)") from None
                out[s:s + batch_size] = adaptor_text(self.model, feats)
                advance(len(texts[s:s + batch_size]))
        return out

    @property
    def _grid(self) -> tuple[tuple[int, int] | None, int]:
        return self.source.image_grid, self.source.n_prefix

    @contextlib.contextmanager
    def _bar(self, what: str, n: int, batch: int, show: bool | None):
        """A progress bar for inputs longer than one batch (or as ``show`` says)."""
        if not (show if show is not None else n > batch):
            yield lambda k: None
            return
        with progress() as bar:
            task = bar.add_task(what, total=n)
            yield lambda k: bar.advance(task, k)

    # -- using the embeddings -------------------------------------------------------------
    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarities ``[n, m]`` of two sets of embeddings (float64, as evaluation computes them)."""
        return np.asarray(a, np.float64) @ np.asarray(b, np.float64).T

    def zero_shot(self, image_embeddings: np.ndarray, prompts: str | None = None,
                  findings: Sequence[str] | None = None) -> ZeroShot:
        """Zero-shot findings from prompts: a name in configs/prompts/ or a YAML path (default: the
        package's own prompts, else ``chest_xray``), scored as `pipe evaluate --task zero-shot` does."""
        table = load_prompts(prompts or str(self.source.prompts or "chest_xray"))
        chosen = list(findings) if findings else list(table)
        unknown = [f for f in chosen if f not in table]
        if unknown:
            raise InputError(f"findings {unknown} have no prompts; the prompts name: {', '.join(table)}")
        texts, where = prompt_layout(table, chosen)
        scores = finding_scores(self.similarity(image_embeddings, self.encode_texts(texts, progress=False)), where)
        s = np.stack([scores[f] for f in chosen], 1)
        return ZeroShot(chosen, s, zero_shot_probability(s, self.logit_scale))

    def head_path(self, head: str | os.PathLike) -> Path:
        """A head file: a path, an evaluation run's folder (its heads/), or a head shipped in a package."""
        if str(head) in self.source.heads:
            return self.source.heads[str(head)]
        p = Path(head).expanduser()
        if p.is_dir():
            found = sorted((p / "heads").glob("adaptor-*.safetensors")) or sorted(p.glob("*.safetensors"))
            if len(found) != 1:
                have = ", ".join(f.name for f in found) or "none"
                raise InputError(f"{p} holds {len(found)} heads ({have}); name one file")
            return found[0]
        if not p.exists() and self.source.heads:
            raise InputError(f"head {head!r} is neither a file nor a head of this package ({', '.join(self.source.heads)})")
        return p

    def classify(self, image_embeddings: np.ndarray, head: str | os.PathLike) -> HeadOutput:
        """A classification head trained by `pipe evaluate --task classification` on this Adaptor's
        features, applied to image embeddings: probabilities per label."""
        path = self.head_path(head)
        module, meta = load_head(path)
        if meta.get("adaptor_weights") != self.weights_hash:
            raise InputError(f"head {path} was trained on the features of another Adaptor (weights "
                             f"{str(meta.get('adaptor_weights'))[:16]}, this one {self.weights_hash[:16]}); use the "
                             "heads of an evaluation of this Adaptor")
        with torch.no_grad():
            logits = module(torch.as_tensor(np.asarray(image_embeddings, np.float32)))
        p = LABEL_TYPES[meta["label_type"]].scores(logits)
        return HeadOutput(path.stem, list(meta["labels"]), meta["label_type"], p.numpy())

    def report_bank(self, reports, *, split: str | None = None, cache: str | os.PathLike | None = None,
                    batch_size: int = 32) -> ReportBank:
        """Reports to retrieve from: a list of texts, a table (CSV/Parquet with a ``report`` column;
        a text file, one report per line) or a dataset in the cache (as given to `pipe embed`, read
        from the cache without running the text encoder). ``split`` keeps one split of a dataset.
        Without ``cache``, a dataset is looked for in the default cache ($PIPE_CACHE, else
        ~/.cache/freeze-pipe), then in the cache the Adaptor was trained from."""
        return build_bank(self, reports, split=split, cache=cache, batch_size=batch_size)
