"""Headless Chromium for the HTML report tests: render a report offline, screenshot it into the CI artifacts
folder, and measure what a reader would see (horizontal overflow, external requests, the rendered DOM).

Offline is checked, not assumed: Chromium runs with every http/https request sent to a local recording proxy
(`--proxy-server`, loopback not bypassed), so a report that fetches a font, a script, a stylesheet or an image
from anywhere is caught by the request the proxy saw. Chromium itself calls home even with the flags below
(update.googleapis.com, accounts.google.com, clients2.google.com in 156): the hosts it contacts for an empty page
are measured once per session and only requests to other hosts count against a report. Overflow is measured in the page itself: a copy of the
report with a small script appended writes `scrollWidth` and `clientWidth` of the document into the DOM that
`--dump-dom` prints (the report we ship contains no script; only the measured copy does).
"""
from __future__ import annotations

import http.server
import os
import re
import shutil
import socketserver
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
#: Screenshots land here (gitignored); CI keeps the folder as a build artifact. QUANTGATE_CI_ARTIFACTS moves it.
ARTIFACTS = Path(os.environ.get("QUANTGATE_CI_ARTIFACTS", ROOT / "ci-artifacts"))
SHOTS = ARTIFACTS / "screenshots"
WIDTH = 1280
#: the screenshots this session took (tests/conftest.py prints the folder at the end of the run)
TAKEN: list[Path] = []

_MEASURE = """<script>
(function () {
  var d = document.documentElement, b = document.body;
  var wide = [];
  document.querySelectorAll("body *").forEach(function (e) {
    var r = e.getBoundingClientRect();
    if (r.right > d.clientWidth + 1 && wide.length < 5) { wide.push(e.tagName + "." + e.className + ":" + Math.round(r.right)); }
  });
  var m = document.createElement("pre");
  m.id = "qg-measure";
  var ext = performance.getEntriesByType("resource").map(function (e) { return e.name; })
    .filter(function (u) { return !/^(data|file|blob):/.test(u); });
  m.textContent = "scrollWidth=" + Math.max(d.scrollWidth, b.scrollWidth) + " clientWidth=" + d.clientWidth +
                  " external=" + ext.join(" ") + " wide=" + wide.join("|");
  b.appendChild(m);
})();
</script>"""


def require_chromium() -> str:
    """The Chromium binary; a skip locally, a failure in CI (QUANTGATE_REQUIRE_ORACLE=1) when it is missing."""
    if CHROMIUM is None:
        msg = "chromium not installed (apt-get install -y chromium)"
        if os.environ.get("QUANTGATE_REQUIRE_ORACLE", "") not in ("", "0"):
            pytest.fail(msg)
        pytest.skip(msg)
    return CHROMIUM


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A proxy that answers every request with 502 and remembers it (CONNECT for https, GET/... for http)."""

    seen: list[str]

    def _record(self) -> None:
        self.server.seen.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_HEAD = do_CONNECT = do_PUT = do_OPTIONS = _record

    def log_message(self, *args: object) -> None:  # quiet
        pass


class _Proxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@dataclass
class Rendered:
    """What Chromium made of one report."""

    dom: str
    screenshot: Path
    scroll_width: int
    client_width: int
    wide: str
    requests: list[str] = field(default_factory=list)   # what the recording proxy saw (Chromium's own included)
    loaded: list[str] = field(default_factory=list)     # the page's Resource Timing entries that are not data:/file:

    @property
    def page_requests(self) -> list[str]:
        """Requests the page made: those to hosts Chromium does not contact on its own for an empty page."""
        own = _own_hosts()
        return [r for r in self.requests if _host(r) not in own] + self.loaded

    def assert_fits_and_offline(self) -> None:
        """No horizontal scrollbar at the window width, and no request left the machine."""
        assert self.scroll_width <= self.client_width, (
            f"horizontal overflow: scrollWidth {self.scroll_width} > clientWidth {self.client_width} "
            f"(elements past the right edge: {self.wide}); screenshot {self.screenshot}")
        assert not self.page_requests, f"the report requested external resources: {self.page_requests}"


def _host(request: str) -> str:
    """`CONNECT host:443` / `GET http://host/path` -> host."""
    target = request.split(" ", 1)[1]
    return re.sub(r"^[a-z]+://", "", target).split("/", 1)[0].rsplit(":", 1)[0]


_OWN: list[set[str]] = []


def _own_hosts() -> set[str]:
    """The hosts Chromium contacts by itself (an empty page, same flags), measured once."""
    if not _OWN:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            blank = Path(d) / "blank.html"
            blank.write_text("<!DOCTYPE html><html><body><p>blank</p></body></html>", encoding="utf-8")
            _OWN.append({_host(r) for r in _launch(blank, Path(d), shot=None)[1]})
    return _OWN[0]


def _launch(html: Path, tmp: Path, *, shot: Path | None, height: int = 2000) -> tuple[str, list[str]]:
    """Chromium on `html` through the recording proxy: (the DOM it dumped, the requests the proxy saw); with
    `shot`, a screenshot of it first."""
    exe = require_chromium()
    proxy = _Proxy(("127.0.0.1", 0), _Recorder)
    proxy.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio", "--no-pings",
             "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--disable-breakpad",
             f"--proxy-server=http://127.0.0.1:{proxy.server_address[1]}", "--proxy-bypass-list=<-loopback>",
             f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={WIDTH},{height}"]
    try:
        if shot is not None:
            subprocess.run([exe, *flags, f"--screenshot={shot}", html.resolve().as_uri()], capture_output=True,
                           timeout=120, check=False)
        r = subprocess.run([exe, *flags, "--dump-dom", html.resolve().as_uri()], capture_output=True, text=True,
                           timeout=120, check=False)
    finally:
        proxy.shutdown()
        proxy.server_close()
    return r.stdout or r.stderr[-2000:], list(proxy.seen)  # type: ignore[attr-defined]


def render(html: Path, name: str, tmp: Path, *, height: int = 2000) -> Rendered:
    """Open `html` in headless Chromium at WIDTH px: screenshot to SHOTS/<name>.png, DOM, overflow, requests."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / f"{name}.png"
    shot.unlink(missing_ok=True)
    measured = tmp / f"{name}.measure.html"
    text = html.read_text(encoding="utf-8")
    measured.write_text(text.replace("</body>", _MEASURE + "</body>") if "</body>" in text else text + _MEASURE,
                        encoding="utf-8")
    # the screenshot is of the report itself; the DOM (and the measurement) of its measured copy, which sits in
    # another folder: a report that links a file beside it would show that as a broken link, not a request
    dom_shot, seen_shot = _launch(html, tmp, shot=shot, height=height)
    dom, seen = _launch(measured, tmp, shot=None, height=height)
    m = re.search(r"scrollWidth=(\d+) clientWidth=(\d+) external=(.*?) wide=([^<]*)", dom)
    assert m, f"chromium rendered nothing for {html}: {dom[-2000:]}"
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no screenshot of {html}"
    print(f"screenshot: {shot}")
    TAKEN.append(shot)
    return Rendered(dom=dom, screenshot=shot, scroll_width=int(m.group(1)), client_width=int(m.group(2)),
                    wide=m.group(4), requests=seen_shot + seen, loaded=m.group(3).split())
