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
