"""HTML reports of a run: ``render_report(run_dir)`` writes ``run_dir/report/index.html``, one page
per layer, the image strips and ``report.json`` (the data model from ``build_report_data``).

Templates are Jinja2 files shipped in ``dissect/report/templates`` (autoescaped, strict undefined);
pages need no network and open from ``file://``.
"""

from __future__ import annotations

from dissect.report.data import build_report_data
from dissect.report.render import render_report

__all__ = ["build_report_data", "render_report"]
