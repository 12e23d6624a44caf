"""The documentation site builds with warnings as errors, its links resolve, its API page lists
the public functions, and every ```python block in docs/ runs as written."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").rglob("*.md"))
BLOCKS = [(p.relative_to(ROOT), i, b) for p in DOCS
          for i, b in enumerate(re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S))]
MKDOCS = shutil.which("mkdocs", path=str(Path(sys.executable).parent))


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.links.append(href)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if MKDOCS is None:
        pytest.fail("mkdocs is not installed: it is in the dev extra (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([MKDOCS, "build", "--strict", "-d", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_every_page_is_built_and_the_index_links_resolve(site):
    for page in DOCS:
        rel = page.relative_to(ROOT / "docs").with_suffix("")
        built = site / ("index.html" if rel.name == "index" else rel / "index.html")
        assert built.exists(), built
    parser = _Links()
    parser.feed((site / "index.html").read_text())
    local = [h.split("#")[0] for h in parser.links if not h.startswith(("http", "#", "mailto"))]
    assert len(local) > 10
    for href in local:
        target = (site / href).resolve()
        assert target.exists() or (target / "index.html").exists(), href


def test_the_api_page_lists_the_public_functions(site):
    html = (site / "api" / "index.html").read_text()
    for name in ("compress", "capture", "channel_groups", "shrink", "export", "verify_export", "count_macs"):
        assert 'id="surgery.' in html and re.search(rf'id="surgery\.[\w.]*\b{name}"', html), name


@pytest.mark.parametrize("path, index, block", BLOCKS, ids=[f"{p}[{i}]" for p, i, _ in BLOCKS])
def test_docs_python_block_runs(path, index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(block, f"{path}[python block {index}]", "exec"), {"__name__": f"docs_{index}"})
    finally:
        torch.set_num_threads(threads)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served(site):
    """The built site over http on localhost, as a reader's browser would get it."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _render(url: str, tmp_path: Path) -> str:
    """The DOM Chromium builds for url once its scripts have run."""
    proc = subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=5000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian: apt-get install chromium; .ci/run installs it)")
def test_the_site_renders_in_a_browser_and_its_links_resolve(served, tmp_path):
    import urllib.parse
    import urllib.request

    dom = _render(served, tmp_path)
    assert "<title>surgery</title>" in dom and "Getting started" in dom
    assert 'data-md-component="navigation"' in dom or "md-nav" in dom  # the theme's script-built page
    parser = _Links()
    parser.feed(dom)
    local = sorted({h.split("#")[0] for h in parser.links if h and not h.startswith(("http", "#", "mailto"))})
    assert len(local) > 10
    for href in local:
        with urllib.request.urlopen(urllib.parse.urljoin(served, href)) as r:
            assert r.status == 200, href
    api = _render(served + "api/", tmp_path)
    assert re.search(r'id="surgery\.[\w.]*\bcompress"', api) and "surgery.compress" in api.replace("<wbr>", "")
