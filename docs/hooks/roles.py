"""MkDocs hook: the reference shows Sphinx roles of the docstrings as code.

offload's docstrings name other objects the way Sphinx does
(``:class:`offload.Future```), which Markdown renders as the role's text
followed by code. The reference shows the code alone.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):(<code>[^<]*</code>)")


def on_page_content(html: str, **kwargs: object) -> str:
    """The page's HTML with ``:role:<code>x</code>`` made ``<code>x</code>``."""
    return ROLE.sub(r"\1", html)
