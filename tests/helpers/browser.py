"""A page opened in a real browser: headless Chromium driven over the DevTools protocol.

The system's Chromium (Debian's ``chromium`` package: `make test` installs it when missing)
is started with ``--remote-debugging-port=0`` and a throw-away profile; one page target is
driven over its websocket (``websocket-client``). :func:`check_page` loads a file and
records what a person would notice: console errors and uncaught exceptions, every network
request the page made, images that did not decode, and a screenshot.

    python -m tests.helpers.browser demo-out/report.html --screenshot docs/report.png --height 1800
"""
from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")
INSTALL_HINT = "apt-get update && apt-get install -y chromium   (as root; `make test` does this when it is missing)"


class BrowserMissing(RuntimeError):
    pass


def find_chromium() -> str | None:
    """$PIPE_CHROMIUM, else the first Chromium on PATH."""
    given = os.environ.get("PIPE_CHROMIUM")
    if given:
        return given if shutil.which(given) else None
    return next((p for p in map(shutil.which, NAMES) if p), None)


class Chromium:
    """One headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 900, timeout: float = 60):
        self.binary = binary or find_chromium()
        if not self.binary:
            raise BrowserMissing(f"no Chromium found (looked for {', '.join(NAMES)}); install it: {INSTALL_HINT}")
        self.width, self.height, self.timeout = width, height, timeout
        self.profile = Path(tempfile.mkdtemp(prefix="pipe-chromium-"))
        self.log = open(self.profile / "chromium.log", "w+b")
        args = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                "--mute-audio", "--hide-scrollbars", "--remote-allow-origins=*", "--remote-debugging-port=0",
                f"--window-size={width},{height}", f"--user-data-dir={self.profile / 'profile'}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.ws = None
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        import websocket  # lazy: a test dependency (the dev extra)

        port_file = self.profile / "profile" / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"Chromium did not start ({self.binary}, exit {self.proc.poll()}):\n"
                                   + self.log.read().decode(errors="replace")[-2000:])
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        req = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            target = json.loads(r.read())
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=self.timeout,
                                              suppress_origin=True, enable_multithread=False)

    def send(self, method: str, **params) -> dict:
        """Call a DevTools method and return its result; events that arrive meanwhile are kept."""
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(method)

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + self.timeout
        seen = len(self.events)
        while True:
            for e in self.events[seen:]:
                if e["method"] == event:
                    return e
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise TimeoutError(event)
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)

    def open(self, url: str, javascript: bool = True) -> None:
        self.events.clear()
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setScriptExecutionDisabled", value=not javascript)
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def outer_html(self) -> str:
        root = self.send("DOM.getDocument", depth=-1)["root"]
        return self.send("DOM.getOuterHTML", nodeId=root["nodeId"])["outerHTML"]

    def screenshot(self, height: int | None = None) -> bytes:
        """A PNG of the page from the top: ``height`` CSS pixels of it, or all of it."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        h = int(min(size["height"], height or size["height"]))
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": self.width, "height": h, "scale": 1})
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class PageCheck:
    url: str
    console_errors: list[str] = field(default_factory=list)   # console.error, uncaught exceptions, browser errors
    requests: list[str] = field(default_factory=list)         # every URL fetched but the page and data: URIs
    images: list[dict] = field(default_factory=list)          # {src, complete, width, height} of each <img>
    screenshot: bytes = b""
    html: str = ""                                            # the DOM as the browser built it

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not (i["complete"] and i["width"] > 0)]


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                                  for a in p.get("args", [])))
        elif e["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"{p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
    return out


def _requests(events: list[dict], page_url: str) -> list[str]:
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    return [u for u in urls if u != page_url and not u.startswith("data:")]


IMAGES_JS = ("Array.from(document.images).map(i => ({src: i.currentSrc.slice(0, 60), complete: i.complete, "
             "width: i.naturalWidth, height: i.naturalHeight}))")


def check_page(path: Path, javascript: bool = True, width: int = 1280, settle: float = 0.5,
               shot_height: int | None = None) -> PageCheck:
    """Open ``path`` from disk and record what went wrong, with a screenshot of the page."""
    url = Path(path).resolve().as_uri()
    with Chromium(width=width) as b:
        b.open(url, javascript=javascript)
        time.sleep(settle)  # late console messages and requests
        b.send("Runtime.evaluate", expression="1")  # drains the events that arrived meanwhile
        check = PageCheck(url)
        if javascript:
            check.images = b.evaluate(IMAGES_JS)
        check.html = b.outer_html()
        check.screenshot = b.screenshot(shot_height)
        check.console_errors = _errors(b.events)
        check.requests = _requests(b.events, url)
    return check


def blank(png: bytes) -> bool:
    """A screenshot with (almost) nothing on it: one flat colour."""
    from PIL import Image, ImageStat

    im = Image.open(io.BytesIO(png)).convert("L")
    return ImageStat.Stat(im).stddev[0] < 3 or len(im.getcolors(1 << 16) or range(1 << 16)) < 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("--screenshot", type=Path, help="write a PNG of the page here")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=None, help="CSS pixels from the top (default: the whole page)")
    ap.add_argument("--colours", type=int, default=0, help="quantise the PNG to this many colours (smaller file)")
    a = ap.parse_args()
    c = check_page(a.page, width=a.width, shot_height=a.height)
    print(json.dumps({"console_errors": c.console_errors, "requests": c.requests, "images": len(c.images),
                      "broken_images": c.broken_images, "blank": blank(c.screenshot)}, indent=1))
    if a.screenshot:
        png = c.screenshot
        if a.colours:
            from PIL import Image

            im = Image.open(io.BytesIO(png)).convert("RGB").quantize(a.colours, method=Image.Quantize.FASTOCTREE)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
            png = buf.getvalue()
        a.screenshot.parent.mkdir(parents=True, exist_ok=True)
        a.screenshot.write_bytes(png)
        print(f"wrote {a.screenshot} ({len(png) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
