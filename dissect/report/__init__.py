"""HTML reports of a run: ``render_report(run_dir)`` writes ``run_dir/report/index.html``, one page
per layer (dissection, ablation study, importance, formulas, significance, unit cards), one page per
explanation set, the image strips and ``report.json`` (the data model from ``build_report_data``).
``compare_runs(run_dirs, out_dir)`` writes a page comparing runs on the same dataset.

Templates are Jinja2 files shipped in ``dissect/report/templates`` (autoescaped, strict undefined);
pages need no network and open from ``file://``.
"""

from __future__ import annotations

from dissect.report.compare import compare_runs
from dissect.report.data import build_report_data
from dissect.report.render import render_report

__all__ = ["build_report_data", "compare_runs", "render_report"]
