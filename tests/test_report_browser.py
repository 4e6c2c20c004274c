"""The report in a real browser: headless Chromium opens a layer page from file:// (no network),
every strip image loads, every unit card is present, and the sort/filter script works.

Skipped only when Chromium is not installed outside CI; in CI (CI=true) a missing Chromium fails.
Install it with ``apt-get install -y chromium``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dissect.report import render_report

from test_report import LAYER, N_UNITS, shared_synthetic_run

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=10000")


def find_chromium() -> str:
    """Path of the Chromium binary; skip (or fail in CI) when there is none."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and Path("/usr/bin/chromium").exists():
        path = "/usr/bin/chromium"
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed (CI=true); install it with "
                        "`apt-get install -y chromium`")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


def run_chromium(chromium: str, profile: Path, *args: str) -> str:
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def report_index(toy_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = shared_synthetic_run(toy_dataset, tmp_path_factory)
    return render_report(run_dir, tmp_path_factory.mktemp("browser_report") / "report")


def body_attribute(dom: str, name: str) -> str:
    match = re.search(r"<body[^>]*\s" + name + r'="([^"]*)"', dom)
    assert match, f"no {name} on <body>"
    return match.group(1)


def test_layer_page_loads_every_image_and_card(report_index: Path, tmp_path: Path) -> None:
    chromium = find_chromium()
    page = report_index.parent / f"{LAYER}.html"
    dom = run_chromium(chromium, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert body_attribute(dom, "data-images-total") == str(N_UNITS)
    assert body_attribute(dom, "data-images-loaded") == str(N_UNITS)
    cards = re.findall(r'<section class="unit[^"]*" id="unit-(\d+)"', dom)
    assert sorted(int(c) for c in cards) == list(range(N_UNITS))
    assert f"{N_UNITS} of {N_UNITS} units" in dom          # the script ran
    screenshot = tmp_path / "layer.png"
    run_chromium(chromium, tmp_path / "profile", f"--screenshot={screenshot}",
                 "--window-size=1200,1600", page.as_uri())
    assert screenshot.stat().st_size > 10_000


def test_sort_and_filter_script(report_index: Path, tmp_path: Path) -> None:
    """Drive the page's controls from an appended script; compare with report.json."""
    chromium = find_chromium()
    data = json.loads((report_index.parent / "report.json").read_text())
    units = data["layers"][0]["units"]
    category = next(u["category"] for u in units if u["category"])
    page = (report_index.parent / f"{LAYER}.html").read_text()
    probe = """<script>
function visible() {
  var out = [], cards = document.querySelectorAll("#units section.unit");
  for (var i = 0; i < cards.length; i++) {
    if (!cards[i].classList.contains("hidden")) { out.push(cards[i].getAttribute("data-unit")); }
  }
  return out.join(",");
}
function set(id, value) {
  var el = document.getElementById(id);
  if (el.type === "checkbox") { el.checked = value; } else { el.value = value; }
  el.dispatchEvent(new Event("change"));
}
document.body.setAttribute("data-by-iou", visible());
set("sort", "unit"); document.body.setAttribute("data-by-unit", visible());
set("category", "CATEGORY"); document.body.setAttribute("data-category-only", visible());
set("category", ""); set("detectors", true);
document.body.setAttribute("data-detectors", visible());
</script>
</body>""".replace("CATEGORY", category)
    probe_page = report_index.parent / "probe.html"
    probe_page.write_text(page.replace("</body>", probe))
    dom = run_chromium(chromium, tmp_path / "profile", "--dump-dom", probe_page.as_uri())
    by_iou = sorted(units, key=lambda u: (-u["iou"], u["unit"]))
    assert body_attribute(dom, "data-by-iou") == ",".join(str(u["unit"]) for u in by_iou)
    assert body_attribute(dom, "data-by-unit") == ",".join(str(u["unit"]) for u in units)
    assert body_attribute(dom, "data-category-only") == ",".join(
        str(u["unit"]) for u in units if u["category"] == category)
    assert body_attribute(dom, "data-detectors") == ",".join(
        str(u["unit"]) for u in units if u["detector"])
