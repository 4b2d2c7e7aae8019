"""A real S3-compatible server on localhost for the object-store tests: moto's, in a thread.
The fixtures ``s3_endpoint`` and ``bucket`` (tests/conftest.py) start it and make buckets."""
from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from typing import Iterator

ACCESS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server() -> Iterator[str]:
    """The endpoint of an S3 server (moto in server mode) that runs while the block does."""
    from moto import server  # lazy: moto[server] (the dev extra) serves only the bucket tests

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    running = server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    running.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        running.stop()


def make_bucket(endpoint: str, test_name: str) -> str:
    """A new bucket named after the test; returns its name."""
    import boto3  # lazy: moto's own dependency, only to make the bucket

    name = "t-" + "".join(c if c.isalnum() else "-" for c in test_name.lower())[:40].strip("-")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name
