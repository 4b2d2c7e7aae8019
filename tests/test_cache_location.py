"""Where a cache may live: a local folder or an S3 bucket, and nothing that only looks like one.

``--cache s3://bucket/c`` used to make a local folder named ``s3:`` in the working
directory and report success. ``s3://`` now means the bucket (tests/test_object_store.py);
every other URL scheme is refused before anything is written.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cache.paths import cache_root, url_scheme
from core.errors import InputError
from tests.helpers import make_table, pipe


@pytest.mark.parametrize("url", ["gs://bucket/c", "HTTPS://host/c", "file:///tmp/c", "az://c/d"])
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


def test_embed_and_cache_commands_refuse_another_scheme_and_write_nothing(tmp_path, monkeypatch):
    table = make_table(tmp_path / "data", 2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    runs = [pipe("embed", "--dataset", str(table), "--backbone", "tiny-vit", "--text-encoder", "tiny-bert",
                 "--cache", "gs://bucket/c", expect=2),
            pipe("cache", "verify", "--cache", "gs://bucket/c", expect=2),
            pipe("cache", "ls", "--cache", "gs://bucket/c", expect=2),
            pipe("cache", "gc", "--cache", "gs://bucket/c", expect=2)]
    runs.append(pipe("doctor", "--cache", "gs://bucket/c", expect=2))
    for r in runs:
        assert "gs:// URL is not supported" in r.output
    monkeypatch.setenv("PIPE_CACHE", "gs://bucket/c")
    r = pipe("cache", "verify", expect=2)
    assert "$PIPE_CACHE" in r.output
    assert os.listdir(work) == []  # no folder named 'gs:'


def test_an_unreachable_bucket_is_one_message_that_says_what_to_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "never-shown-7f3a", "AWS_REGION": "us-east-1",
                 "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_TIMEOUT": "1"}.items():
        monkeypatch.setenv(k, v)
    r = pipe("cache", "ls", "--cache", "s3://no-such-bucket/c", expect=2)
    assert "cannot reach the bucket" in r.output and "AWS_ENDPOINT_URL" in r.output
    assert "never-shown-7f3a" not in r.output
    assert "s:" not in os.listdir(tmp_path) and "s3:" not in os.listdir(tmp_path)
