"""MkDocs hook: the docstrings cross-reference in Sphinx style (:func:`x`), which Markdown renders as
the literal role followed by code; show just the code."""
from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(?=<code>)")


def on_page_content(html: str, **_) -> str:
    return _ROLE.sub("", html)
