"""The HTML in a real browser: headless Chromium loads it, every section heading is in the DOM, no image is
broken (checked both by the browser, naturalWidth > 0 after load, and by decoding every data URI with PIL),
and a full-page screenshot is written and not blank. Skips only when Chromium is not installed (fails then
under CI=true: ``tests.conftest.skip_or_fail``)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from medtransfer.reports.render import render_report
from tests.conftest import skip_or_fail
from tests.reports.conftest import BuiltRun

HEADINGS = ("Model Facts", "Intended use and data", "Model and training", "Performance", "Subgroups",
            "Explainability", "Limitations", "Reporting checklist", "Reproducibility")
#: Runs after load: counts images the browser could not decode and writes the result into the DOM.
IMAGE_CHECK = """<script>window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;
  var noalt = imgs.filter(function (i) { return !(i.getAttribute('alt') || '').trim(); }).length;
  var d = document.createElement('div'); d.id = 'imgcheck';
  d.setAttribute('data-total', imgs.length); d.setAttribute('data-broken', broken); d.setAttribute('data-noalt', noalt);
  document.body.appendChild(d); });</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    skip_or_fail("headless browser check skipped: Chromium is not installed (apt-get install chromium)")


def _run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chrome-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_without_chromium_the_check_skips_locally_and_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule of ``tests.conftest.skip_or_fail``: a missing system package is a skip with the reason on a
    developer's machine, and a failure with the reason under CI=true, where .ci/run installs it."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(globals(), "Path", lambda path: SimpleNamespace(exists=lambda: False))
    for value in (None, "false", "0"):
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="Chromium is not installed"):
            _chromium()
    for value in ("true", "TRUE", "1"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match=r"Chromium is not installed .*CI=true"):
            _chromium()


class _Headings(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.levels: list[int] = []
        self.h2: list[str] = []
        self._in: int | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if re.fullmatch(r"h[1-6]", tag):
            self.levels.append(int(tag[1]))
            self._in = int(tag[1])
            if self._in == 2:
                self.h2.append("")

    def handle_endtag(self, tag: str) -> None:
        if re.fullmatch(r"h[1-6]", tag):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == 2:
            self.h2[-1] += data


@pytest.fixture(scope="module")
def rendered(report_run: BuiltRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("browser")
    return render_report(report_run.run_dir, out, formats=["html"])["html"]


def test_dom_has_every_section_and_no_broken_image(rendered: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"
    probe.write_text(rendered.read_text("utf-8").replace("</body>", IMAGE_CHECK + "</body>"), "utf-8")
    proc = _run_chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    dom = proc.stdout
    assert "<html" in dom, proc.stderr[-2000:]
    parser = _Headings()
    parser.feed(dom)
    titles = [" ".join(t.split()) for t in parser.h2]
    for heading in HEADINGS:
        assert heading in titles, f"{heading!r} not among the section headings {titles}"
    assert parser.levels[0] == 1 and all(b - a <= 1 for a, b in zip(parser.levels, parser.levels[1:], strict=False)), \
        f"heading levels skip: {parser.levels}"
    check = re.search(r'id="imgcheck"[^>]*', dom)
    assert check, "the image check did not run in the browser"
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', check.group(0)))
    assert int(attrs["total"]) >= 4 and attrs["broken"] == "0" and attrs["noalt"] == "0", attrs


def test_every_embedded_image_decodes_as_png(rendered: Path) -> None:
    html = rendered.read_text("utf-8")
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]+)"', html)
    assert len(uris) == html.count("<img"), "every <img> must be an embedded PNG with alt text"
    for data, _alt in uris:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "PNG" and min(img.size) > 16
        img.verify()


def test_screenshot_is_written_and_not_blank(rendered: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    proc = _run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", "--hide-scrollbars",
                         rendered.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    grey = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert grey.shape == (4000, 1280)
    assert grey.std() > 10 and (grey < 100).mean() > 0.005, "the screenshot looks blank"
    # the first screen shows the banner and the facts label, not an empty page
    assert grey[:1000].std() > 10
