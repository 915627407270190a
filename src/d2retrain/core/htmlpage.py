"""A small standalone HTML page, as the report embeds the workflow's tables and notes."""

import html
import logging

logger = logging.getLogger(__name__)

__all__ = ["html_page"]

_STYLE = """<style>
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
th { background: #f0f0f0; }
</style>"""


def html_page(title: str, body: str) -> str:
    """A small standalone HTML page (the report embeds it): ``body`` is HTML, ``title`` text."""
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}"
    return f"<!DOCTYPE html><html><head>{head}</head><body>{body}</body></html>\n"
