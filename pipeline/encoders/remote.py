"""Encoders that run code from their hub repository: refused unless the user opts in.

``cxr-bert`` (microsoft/BiomedVLP-CXR-BERT-general) ships its model class as Python files
in its hub repository, which transformers imports and runs (``trust_remote_code``). This
project does not pin that repository to a reviewed commit (no revision hash could be
verified offline here), so whatever revision sits in the Hugging Face cache would run.
Such an encoder is therefore built only after an explicit opt-in: ``--trust-remote-code``
(``pipe embed``, ``pipe evaluate``) or ``PIPE_TRUST_REMOTE_CODE=1`` (what the flag sets,
so Dask workers and library callers see it too). ``pipe encoders`` marks these encoders.
"""
from __future__ import annotations

import os

from core.errors import InputError

ENV = "PIPE_TRUST_REMOTE_CODE"
FLAG = "--trust-remote-code"


class RemoteCodeRefused(InputError):
    """An encoder that would run repository code, without the user's opt-in."""


def runs_remote_code(config) -> bool:
    return bool(config.setting("trust_remote_code"))


def allow_remote_code() -> None:
    """The user opted in (``--trust-remote-code``): for this process and the workers it starts."""
    os.environ[ENV] = "1"


def remote_code_allowed() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def require_consent(config) -> None:
    """Stop before an encoder that runs repository code is built, unless the user opted in."""
    if runs_remote_code(config) and not remote_code_allowed():
        raise RemoteCodeRefused(
            f"encoder {config.name!r} runs Python code from its hub repository {config.hub_id} (transformers' "
            f"trust_remote_code), at whatever revision is in your Hugging Face cache: this project does not pin it to "
            f"a reviewed commit. It runs only if you opt in: read the repository's .py files, then pass {FLAG} "
            f"(pipe embed, pipe evaluate) or set {ENV}=1.")
