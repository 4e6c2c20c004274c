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
from test_report import LAYER, N_UNITS, shared_synthetic_run

from dissect.report import render_report

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


#: Injected first into <head>: records script errors, console errors and every resource URL
#: that is not file://, and writes them on <body> once the page has loaded.
WATCH = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message || e.type)); }, true);
  var original = console.error;
  console.error = function () { errors.push(Array.prototype.join.call(arguments, " ")); original.apply(console, arguments); };
  window.addEventListener("load", function () {
    setTimeout(function () {
      var remote = performance.getEntriesByType("resource").map(function (r) { return r.name; })
        .filter(function (u) { return u.indexOf("file:") !== 0; });
      document.body.setAttribute("data-errors", errors.join(" | "));
      document.body.setAttribute("data-remote", remote.join(" "));
    }, 0);
  });
})();
</script>"""


def watched_dom(chromium: str, page: Path, profile: Path, extra: str = "") -> tuple[str, str]:
    """DOM and stderr of ``page`` opened with :data:`WATCH` (and ``extra`` before </body>)."""
    text = page.read_text()
    probe = page.with_name("watched_" + page.name)
    probe.write_text(text.replace("<head>", "<head>" + WATCH, 1).replace("</body>",
                                                                          extra + "</body>"))
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "--enable-logging=stderr", "--v=0", "--dump-dom", probe.as_uri()],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def test_every_page_offline_without_errors(report_index: Path, tmp_path: Path) -> None:
    """Index, layer and explanation pages: every image loads, no script or console error, no
    request leaves file://."""
    chromium = find_chromium()
    pages = sorted(p for p in report_index.parent.glob("*.html") if not p.name.startswith(
        ("watched_", "probe")))
    assert {p.name for p in pages} >= {"index.html", f"{LAYER}.html", "explain_demo.html"}
    for page in pages:
        dom, stderr = watched_dom(chromium, page, tmp_path / "profile")
        assert body_attribute(dom, "data-errors") == "", page.name
        assert body_attribute(dom, "data-remote") == "", page.name
        assert body_attribute(dom, "data-images-loaded") == body_attribute(
            dom, "data-images-total"), page.name
        assert "Uncaught" not in stderr, (page.name, stderr[-2000:])
    dom, _ = watched_dom(chromium, report_index.parent / "explain_demo.html", tmp_path / "p2")
    assert body_attribute(dom, "data-images-total") == "4"


def test_lightbox_and_sort_by_importance(report_index: Path, tmp_path: Path) -> None:
    """Click the third image of a unit's strip: the lightbox shows that image's tile; sorting
    by importance orders the cards by damage (units without one last), then IoU, then unit."""
    chromium = find_chromium()
    data = json.loads((report_index.parent / "report.json").read_text())
    units = data["layers"][0]["units"]
    target = max(units, key=lambda u: u["iou"])
    probe = """<script>
window.addEventListener("load", function () {
  var img = document.querySelector("#unit-UNIT img.strip");
  var box = document.getElementById("units");
  var tile = parseInt(box.getAttribute("data-tile"), 10), gap = parseInt(box.getAttribute("data-gap"), 10);
  var rect = img.getBoundingClientRect();
  var x = rect.left + (2 * (tile + gap) + tile / 2) * rect.width / img.naturalWidth;
  img.dispatchEvent(new MouseEvent("click", {bubbles: true, clientX: x, clientY: rect.top + 5}));
  var light = document.getElementById("lightbox");
  document.body.setAttribute("data-light-hidden", String(light.classList.contains("hidden")));
  document.body.setAttribute("data-light-unit", light.getAttribute("data-unit"));
  document.body.setAttribute("data-light-slot", light.getAttribute("data-slot"));
  document.body.setAttribute("data-light-image", light.getAttribute("data-image"));
  document.body.setAttribute("data-light-position", document.getElementById("lightbox-tile").style.backgroundPosition);
  light.dispatchEvent(new MouseEvent("click", {bubbles: true}));
  document.body.setAttribute("data-light-closed", String(light.classList.contains("hidden")));
  var sort = document.getElementById("sort");
  sort.value = "damage"; sort.dispatchEvent(new Event("change"));
  var out = [], cards = document.querySelectorAll("#units section.unit");
  for (var i = 0; i < cards.length; i++) { out.push(cards[i].getAttribute("data-unit")); }
  document.body.setAttribute("data-by-damage", out.join(","));
});
</script>""".replace("UNIT", str(target["unit"]))
    dom, _ = watched_dom(chromium, report_index.parent / f"{LAYER}.html", tmp_path / "profile",
                         probe)
    assert body_attribute(dom, "data-errors") == ""
    assert body_attribute(dom, "data-light-hidden") == "false"
    assert body_attribute(dom, "data-light-unit") == str(target["unit"])
    assert body_attribute(dom, "data-light-slot") == "2"
    assert body_attribute(dom, "data-light-image") == target["top_images"][2]["image"]
    assert body_attribute(dom, "data-light-position").startswith("-")
    assert body_attribute(dom, "data-light-closed") == "true"
    by_damage = sorted(units, key=lambda u: (u["damage"] is None, -(u["damage"] or 0.0),
                                             -u["iou"], u["unit"]))
    assert body_attribute(dom, "data-by-damage") == ",".join(str(u["unit"]) for u in by_damage)
