"""Forward cost of an encoder, from its architecture: what its config's card records.

Counted as the matrix products a forward runs (linear layers, attention scores and their
weighted sums, the patch embedding), 2 FLOPs per multiply-add; normalisations and
activations are left out (a few percent). ``tests/test_encoder_families.py`` checks the
formula against torch's own FLOP counter on the tiny stand-ins of each family.
"""
from __future__ import annotations


def transformer_gflops(tokens: int, width: int, layers: int, mlp: int, extra_macs: float = 0.0) -> float:
    """GFLOPs of ``layers`` pre-norm transformer blocks over ``tokens`` tokens of ``width``
    (q, k, v and out projections, attention, an MLP of hidden size ``mlp``)."""
    per_layer = tokens * (4 * width * width + 2 * width * mlp) + 2 * tokens * tokens * width
    return 2 * (layers * per_layer + extra_macs) / 1e9


def vit_gflops(image: int, patch: int, width: int, layers: int, mlp: int, prefix: int = 1,
               head_macs: float = 0.0) -> float:
    """A ViT at ``image`` pixels square: the patch embedding, the blocks, and ``head_macs`` more
    (a pooling head or a projection)."""
    patches = (image // patch) ** 2
    embed = patches * 3 * patch * patch * width
    return transformer_gflops(patches + prefix, width, layers, mlp, embed + head_macs)


def map_head_macs(tokens: int, width: int, mlp: int) -> float:
    """SigLIP's attention-pooling head: one probe query over every token, then an MLP."""
    return 2 * tokens * width * width + 2 * width * width + tokens * width * 2 + 2 * width * mlp


def bert_gflops(tokens: int, width: int = 768, layers: int = 12, mlp: int = 3072, head_macs: float = 0.0) -> float:
    """A BERT-style text encoder over ``tokens`` tokens (embeddings are look-ups: free)."""
    return transformer_gflops(tokens, width, layers, mlp, head_macs)
