"""The run report's HTML page: written next to the JSON by every compressing command, rebuilt by
``llmc report``, tables without matplotlib, and drawn by a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import calib_ids, tiny_model
from test_cli import calib_flags, run

import llmc
from llmc.report import HTML_FILE, render_html

RECIPE = {"steps": [{"method": "awq", "args": {"bits": 4, "group_size": 32}},
                    {"method": "wanda", "args": {"sparsity": 0.5, "owl": True}},
                    {"method": "gptq", "args": {"bits": 4, "group_size": 32}},
                    {"method": "distill", "args": {"mode": "block", "steps": 4}}]}
# the sections with a plot for RECIPE: error and sparsity heat maps, AWQ, OWL, the held-out
# and train distillation curves, time per block, memory
PLOTS = 8


@pytest.fixture(scope="module")
def report() -> dict:
    _, rep = llmc.compress(tiny_model("llama"), RECIPE, calibration=calib_ids(16, 32),
                           progress=False)
    return rep.to_dict()


def plots(page: str) -> int:
    return len(re.findall(r'<img class="plot"[^>]*src="data:image/png;base64,', page))


def test_every_section_is_drawn(report):
    pytest.importorskip("matplotlib")
    page = render_html(report)
    assert plots(page) == PLOTS
    for title in ("Relative output error per Linear", "Sparsity per Linear", "AWQ scales",
                  "OWL (step 1", "Block-wise distillation", "Time per block",
                  "Memory over the run", "Recipe"):
        assert title in page, title
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # each heat-map cell is in the page's table too
    name = report["layers"][-1]["name"]
    assert name in page


def test_tables_without_matplotlib(report):
    page = render_html(report, plots=False)
    assert plots(page) == 0 and "matplotlib is not installed" in page
    assert page.count("<table>") >= 8
    assert f"{report['transforms'][0]['pairs'][0]['alpha']:.4g}" in page


def test_cli_writes_and_rebuilds_the_page(model_dir, text_file, tmp_path):
    out = tmp_path / "w4"
    run("quantize", model_dir, "--method", "awq+gptq", "--group-size", 32,
        *calib_flags(text_file), "-o", out)
    page = (out / HTML_FILE).read_text()
    assert (out / HTML_FILE).stat().st_size < 2 * 2**20
    assert "llmc report: awq + gptq" in page
    if _has_matplotlib():
        assert plots(page) >= 4  # error heat map, AWQ, time, memory
    (out / HTML_FILE).unlink()
    run("report", out)
    assert (out / HTML_FILE).read_text().count("<section>") == page.count("<section>")
    res = run("report", tmp_path, ok=False)
    assert res.exit_code != 0 and "no llmc_report.json" in res.output


def test_a_broken_page_never_loses_the_run(model_dir, text_file, tmp_path, monkeypatch):
    import llmc.api

    def broken(*a, **k):
        raise RuntimeError("no plots today")

    monkeypatch.setattr(llmc.api, "write_html", broken)
    out = tmp_path / "o"
    run("quantize", model_dir, "--method", "rtn", "--group-size", 32, *calib_flags(text_file),
        "-o", out)
    assert (out / "llmc_report.json").is_file() and not (out / HTML_FILE).exists()


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
# Injected by the test only (the page itself has no scripts): records script errors and, once
# the page has loaded, how many of its images decoded to a picture.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(e.message || "resource failed"), true);
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const drawn = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  document.body.setAttribute("data-images", imgs.length);
  document.body.setAttribute("data-drawn", drawn.length);
  document.body.setAttribute("data-errors", window.__errors.join("|"));
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
def test_the_page_renders_in_a_headless_browser(report, tmp_path):
    pytest.importorskip("matplotlib")
    page = render_html(report)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<body>", "<body>" + PROBE, 1))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-images") == str(PLOTS), attrs
    assert attrs.get("data-drawn") == str(PLOTS), attrs
    assert attrs.get("data-errors") == "", attrs
    shot = tmp_path / "report.png"
    (tmp_path / HTML_FILE).write_text(page)
    subprocess.run([*flags, "--window-size=1200,5000", f"--screenshot={shot}",
                    (tmp_path / HTML_FILE).as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
