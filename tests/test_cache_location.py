"""Where a cache may live: a local folder, and nothing that only looks like one.

``--cache s3://bucket/c`` used to make a local folder named ``s3:`` in the working
directory and report success; every URL scheme is now refused before anything is written.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import make_table, pipe

from cache.paths import cache_root, url_scheme
from core.errors import InputError


@pytest.mark.parametrize("url", ["s3://bucket/c", "gs://bucket/c", "HTTPS://host/c", "file:///tmp/c"])
def test_a_url_is_refused_given_as_an_option_a_path_or_the_environment(url, monkeypatch):
    with pytest.raises(InputError, match="--cache .*not supported.*nothing was written"):
        cache_root(url)
    with pytest.raises(InputError, match="not supported"):
        cache_root(Path(url))  # what typer hands over: Path() folds '//' into '/'
    monkeypatch.setenv("PIPE_CACHE", url)
    with pytest.raises(InputError, match=r"\$PIPE_CACHE"):
        cache_root(None)


@pytest.mark.parametrize("path", ["c", "./s3", "rel/dir:x", "/tmp/a:b/c", "~/cache"])
def test_local_paths_are_still_local_folders(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert url_scheme(path) is None
    assert cache_root(path) == Path(path).expanduser().resolve()


def test_embed_and_cache_commands_refuse_an_s3_cache_and_write_nothing(tmp_path, monkeypatch):
    table = make_table(tmp_path / "data", 2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    runs = [pipe("embed", "--dataset", str(table), "--backbone", "tiny-vit", "--text-encoder", "tiny-bert",
                 "--cache", "s3://bucket/c", expect=2),
            pipe("cache", "verify", "--cache", "s3://bucket/c", expect=2),
            pipe("cache", "ls", "--cache", "s3://bucket/c", expect=2),
            pipe("cache", "gc", "--cache", "s3://bucket/c", expect=2)]
    runs.append(pipe("doctor", "--cache", "s3://bucket/c", expect=2))
    for r in runs:
        assert "s3:// URL is not supported" in r.output
    monkeypatch.setenv("PIPE_CACHE", "s3://bucket/c")
    r = pipe("cache", "verify", expect=2)
    assert "$PIPE_CACHE" in r.output
    assert os.listdir(work) == []  # no folder named 's3:'
