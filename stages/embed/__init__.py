"""Stage one: `pipe embed`. See :mod:`stages.embed.stage`."""
from stages.embed.stage import EmbedConfig, EmbedResult, ModalityResult, embed_modality, run

__all__ = ["EmbedConfig", "EmbedResult", "ModalityResult", "embed_modality", "run"]
