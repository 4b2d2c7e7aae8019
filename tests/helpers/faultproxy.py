"""A fault-injecting HTTP proxy between the commands and the S3 server the tests start (tests only).

The commands talk to ``http://127.0.0.1:<port>`` (``$AWS_ENDPOINT_URL``) as to any S3
endpoint; the proxy forwards each request to the real server (moto) unless the seeded
schedule picks it for a fault. The faults are what real services do:

========================  ===========================================================================
kind                      what the client sees
========================  ===========================================================================
``throttle``              ``503 SlowDown`` with ``Retry-After: 1``; the request never reached the server
``error500``              ``500 InternalError``; the request never reached the server
``reset_upload``          an upload (PUT/POST with a body) read, then the connection reset; nothing landed
``reset_read``            a GET answered with its headers and part of its body, then the connection reset
``stall``                 no answer until after the client's timeout, then the connection closed
``short_read``            a GET whose body stops short of its ``Content-Length`` (the connection closed)
``short_range``           a range GET answered ``206`` with fewer bytes than asked, headers consistent
``lost_commit``           a conditional PUT (``If-None-Match``/``If-Match``) that landed on the server,
                          whose answer is lost (the connection reset): the ambiguous-timeout case
========================  ===========================================================================

A :class:`Rule` says which requests a kind may hit (method, a pattern of the key, a
header) and which of them: ``limit`` of the first ``within`` matching requests, drawn by
its own ``random.Random`` seeded from the schedule's seed and the rule's kind (so every
kind is injected, and a run gets through in the end), or each matching request with
probability ``rate`` (``rate=1``: an outage, from the ``after``-th request on). ``injected`` counts the faults by kind, and
``requests`` every request the proxy saw.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

KINDS = ("throttle", "error500", "reset_upload", "reset_read", "stall", "short_read", "short_range", "lost_commit")
_BEFORE = {"throttle", "error500", "reset_upload", "stall"}  # faults that never reach the server
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass
class Rule:
    """Which requests ``kind`` may hit, how often, and at most how many times."""

    kind: str
    rate: float = 0.0
    limit: int = 4
    within: int | None = None        # faults on ``limit`` of the first ``within`` matching requests
    method: str | None = None        # e.g. "PUT"; None: any the kind applies to
    key: str = ""                    # a regular expression searched in the request's path
    header: str | None = None        # a header the request must carry (lower case)
    after: int = 0                   # the first ``after`` matching requests pass (an outage that starts later)
    rng: random.Random = field(default=None, repr=False)  # set by the schedule
    hits: int = 0
    seen: int = 0
    picks: set = field(default_factory=set)

    def fires(self) -> bool:
        """Called once per matching request."""
        self.seen += 1
        if self.hits >= self.limit or self.seen <= self.after:
            return False
        if self.within is not None:
            return self.seen - self.after in self.picks
        return self.rng.random() < self.rate

    def applies(self, method: str, path: str, headers: dict[str, str]) -> bool:
        if self.method and method != self.method:
            return False
        if self.key and not re.search(self.key, path):
            return False
        if self.header and self.header not in headers:
            return False
        return _KIND_APPLIES[self.kind](method, headers)


def _is_upload(method: str, headers: dict) -> bool:
    return method in ("PUT", "POST") and int(headers.get("content-length", "0") or 0) > 0


def _is_conditional_put(method: str, headers: dict) -> bool:
    return method == "PUT" and ("if-none-match" in headers or "if-match" in headers)


_KIND_APPLIES = {
    "throttle": lambda m, h: True, "error500": lambda m, h: True, "stall": lambda m, h: True,
    "reset_upload": _is_upload, "reset_read": lambda m, h: m == "GET", "short_read": lambda m, h: m == "GET",
    "short_range": lambda m, h: m == "GET" and "range" in h, "lost_commit": _is_conditional_put,
}


class Schedule:
    """The seeded faults: each request is offered to the rules in order; the first that fires wins."""

    def __init__(self, seed: int, rules: list[Rule]):
        self.seed, self.rules = seed, rules
        for r in rules:
            assert r.kind in KINDS, r.kind
            r.rng = random.Random(f"{seed}-{r.kind}-{r.key}-{r.method}")
            if r.within is not None:
                r.picks = set(r.rng.sample(range(1, r.within + 1), min(r.limit, r.within)))
        self._lock = threading.Lock()

    def pick(self, method: str, path: str, headers: dict[str, str]) -> str | None:
        with self._lock:
            for r in self.rules:
                if r.applies(method, path, headers) and r.fires():
                    r.hits += 1
                    return r.kind
        return None


class FaultProxy:
    """The proxy, in threads of this process: ``start()``, point ``$AWS_ENDPOINT_URL`` at ``url``,
    set a :class:`Schedule` with ``use()`` (None: pass everything), ``stop()``."""

    def __init__(self, upstream: str, stall_s: float = 4.0):
        self.upstream = urlsplit(upstream)
        self.stall_s = stall_s
        self.schedule: Schedule | None = None
        self.injected: Counter = Counter()
        self.requests: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                proxy._serve(self)

            def finish(self):  # the connection may be reset or closed by a fault already
                try:
                    super().finish()
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FaultProxy":
        threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def use(self, schedule: Schedule | None) -> None:
        """Faults from now on follow ``schedule``; the counts start again."""
        with self._lock:
            self.schedule = schedule
            self.injected, self.requests = Counter(), Counter()

    # -- one client connection: requests until it closes ---------------------------------------
    def _serve(self, h: socketserver.StreamRequestHandler) -> None:
        upstream = None
        try:
            while True:
                request = _read_request(h.rfile)
                if request is None:
                    return
                method, target, headers, body = request
                with self._lock:
                    self.requests[method] += 1
                    kind = self.schedule.pick(method, target, headers) if self.schedule else None
                    if kind:
                        self.injected[kind] += 1
                if kind in _BEFORE:
                    self._fault_before(h, kind)
                    return
                upstream = upstream or http.client.HTTPConnection(self.upstream.hostname, self.upstream.port,
                                                                  timeout=120)
                status, reason, out_headers, data = _forward(upstream, method, target, headers, body)
                if kind:
                    self._fault_after(h, kind, method, status, reason, out_headers, data)
                    return
                h.wfile.write(_response(status, reason, out_headers, data, method))
                h.wfile.flush()
        except (ConnectionError, OSError):
            return
        finally:
            if upstream is not None:
                upstream.close()

    def _fault_before(self, h, kind: str) -> None:
        if kind in ("throttle", "error500"):
            code, reason, text = ((503, "Slow Down", "SlowDown") if kind == "throttle" else
                                  (500, "Internal Server Error", "InternalError"))
            body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{text}</Code><Message>injected</Message>" \
                   f"</Error>".encode()
            extra = [("Retry-After", "1")] if kind == "throttle" else []
            h.wfile.write(_response(code, reason, [("Content-Type", "application/xml"), *extra], body, "GET",
                                    close=True))
            h.wfile.flush()
        elif kind == "stall":
            time.sleep(self.stall_s)
        _reset(h.connection) if kind == "reset_upload" else h.connection.close()

    def _fault_after(self, h, kind, method, status, reason, headers, data) -> None:
        if kind == "lost_commit":  # it landed upstream; the answer never comes
            _reset(h.connection)
            return
        raw = _response(status, reason, headers, data, method)
        cut = len(raw) - len(data) + len(data) // 2  # the headers and half the body
        if kind == "short_range" and status == 206 and len(data) > 1:
            short = data[:len(data) // 2]
            fixed = [(k, v) for k, v in headers if k.lower() != "content-range"]
            span = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", dict((k.lower(), v) for k, v in headers)["content-range"])
            start, total = int(span[1]), span[3]
            fixed.append(("Content-Range", f"bytes {start}-{start + len(short) - 1}/{total}"))
            h.wfile.write(_response(status, reason, fixed, short, method))
            h.wfile.flush()
            return
        h.wfile.write(raw[:cut] if data else raw)
        h.wfile.flush()
        _reset(h.connection) if kind == "reset_read" else h.connection.close()


def _read_request(rfile):
    line = rfile.readline(65537)
    if not line or not line.strip():
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    order: list[tuple[str, str]] = []
    while True:
        h = rfile.readline(65537).decode("latin-1")
        if h in ("\r\n", "\n", ""):
            break
        k, v = h.split(":", 1)
        headers[k.strip().lower()] = v.strip()
        order.append((k.strip(), v.strip()))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _read_chunked(rfile)
    else:
        body = rfile.read(int(headers.get("content-length", "0") or 0))
    headers["_order"] = order  # type: ignore[assignment]
    return method, target, headers, body


def _read_chunked(rfile) -> bytes:
    out = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()


def _forward(conn: http.client.HTTPConnection, method, target, headers, body):
    sent = [(k, v) for k, v in headers["_order"] if k.lower() not in _HOP and k.lower() != "content-length"]
    conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
    for k, v in sent:
        conn.putheader(k, v)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, resp.reason, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP], data


def _response(status, reason, headers, data, method, close: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() != "content-length"]
    if method != "HEAD" or not any(k.lower() == "content-length" for k, _ in headers):
        lines.append(f"Content-Length: {len(data)}")
    else:
        lines.append(f"Content-Length: {dict((k.lower(), v) for k, v in headers)['content-length']}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if method == "HEAD" else data)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks to the client."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


TALLY_ENV = "PIPE_FAULT_TALLY"


def tally(**counts: int) -> None:
    """Add ``counts`` (faults by kind, runs compared, objects compared, kills) to the JSON file
    ``$PIPE_FAULT_TALLY`` names, when it is set: what the reliability page's tally is made from."""
    path = os.environ.get(TALLY_ENV)
    if not path:
        return
    with _TALLY_LOCK:
        try:
            total = Counter(json.loads(Path(path).read_text()))
        except (OSError, ValueError):
            total = Counter()
        total.update({k: v for k, v in counts.items() if v})
        Path(path).write_text(json.dumps(dict(sorted(total.items())), indent=1))


_TALLY_LOCK = threading.Lock()

STALL_S = 3.0  # past the client's timeout below
QUICK = {"PIPE_S3_TIMEOUT_S": "2", "PIPE_S3_CONNECT_TIMEOUT_S": "2", "PIPE_S3_BACKOFF_S": "0.02",
         "PIPE_S3_BACKOFF_MAX_S": "0.3"}


def mixed(seed: int, within: int = 12) -> Schedule:
    """Every kind of fault, seeded: 2 of each on the first ``within`` requests it applies to (one
    stall: each costs a client timeout)."""
    return Schedule(seed, [Rule(k, limit=1 if k == "stall" else 2, within=within) for k in KINDS])


def compared(files: int) -> None:
    """One run compared with a clean run and found equal, on ``files`` objects or files."""
    tally(**{"runs compared": 1, "objects compared": files})
