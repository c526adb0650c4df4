"""The run report a person looks at: ``llmc_report.html``, one self-contained file (plots as
inline PNG images, no scripts, no external resources) built from ``llmc_report.json``.

Sections: the run (time, engine, calibration), relative output error per Linear by block (a
heat map), achieved sparsity per Linear, AWQ's chosen exponents, OWL's per-block ratios, time
per block, memory over the run, the distillation curves (train and held-out), MoE experts, and
the recipe. Plots need matplotlib (the ``report`` extra); without it every section is a table.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

JSON_FILE = "llmc_report.json"  # what a compression did, written by llmc.api
HTML_FILE = "llmc_report.html"
_BLOCK = re.compile(r"^.*?\.(\d+)\.(.+)$")  # the first index in a Linear's name is its block
_EXPERT = re.compile(r"experts\.\d+\.")
MAX_COLUMNS = 48  # heat-map columns before MoE experts are merged into one column per kind
MiB = 2**20


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return _esc(x)


def _table(head: list[str], rows: list[list[Any]], limit: int = 400) -> str:
    body = "".join("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in r) + "</tr>"
                   for r in rows[:limit])
    more = f"<p>{len(rows) - limit} more rows in the JSON report.</p>" if len(rows) > limit else ""
    return ("<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>" + body
            + "</table>" + more)


class _Plots:
    """Figures drawn with matplotlib's object API (no pyplot, no global state) into inline
    PNGs; ``None`` for every plot when matplotlib is missing."""

    def __init__(self, enabled: bool = True) -> None:
        self.ok = False
        if enabled:
            try:
                from matplotlib.backends.backend_agg import FigureCanvasAgg
                from matplotlib.figure import Figure
            except ImportError:
                return
            self._figure, self._canvas, self.ok = Figure, FigureCanvasAgg, True

    def draw(self, fn: Callable[[Any, Any], None], size: tuple[float, float] = (8, 3.2),
             alt: str = "") -> str | None:
        if not self.ok:
            return None
        fig = self._figure(figsize=size, dpi=90, layout="constrained")
        self._canvas(fig)
        fn(fig, fig.add_subplot())
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        data = base64.b64encode(buf.getvalue()).decode()
        return f'<img class="plot" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _by_block(layers: list[dict], key: str) -> tuple[list[int], list[str], dict]:
    """(blocks, column names, {(block, column): value}) of the last value of ``key`` each
    Linear got; MoE experts merged (mean) when there are too many columns."""
    cells: dict[tuple[int, str], float] = {}
    for r in layers:
        m = _BLOCK.match(r["name"])
        if m and r.get(key) is not None:
            cells[(int(m.group(1)), m.group(2))] = float(r[key])
    columns = sorted({c for _, c in cells}, key=lambda c: (_EXPERT.sub("", c), c))
    if len(columns) > MAX_COLUMNS:
        merged: dict[tuple[int, str], list[float]] = {}
        for (b, c), v in cells.items():
            merged.setdefault((b, _EXPERT.sub("experts.*.", c)), []).append(v)
        cells = {k: sum(v) / len(v) for k, v in merged.items()}
        columns = sorted({c for _, c in cells})
    blocks = sorted({b for b, _ in cells})
    return blocks, columns, cells


def _heatmap(plots: _Plots, layers: list[dict], key: str, label: str, log: bool) -> str:
    blocks, columns, cells = _by_block(layers, key)
    if not cells:
        return ""

    def fn(fig: Any, ax: Any) -> None:
        grid = [[cells.get((b, c), math.nan) for c in columns] for b in blocks]
        if log:
            from matplotlib.colors import LogNorm

            positive = [v for row in grid for v in row if v > 0]
            norm = LogNorm(min(positive), max(positive)) if positive else None
        else:
            norm = None
        im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks],
                      fontsize=7 if len(blocks) <= 40 else 5)
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax, label=label)

    img = plots.draw(fn, size=(max(6.0, 2.5 + 0.35 * len(columns)),
                               max(3.0, 1.5 + 0.16 * len(blocks))), alt=label)
    rows = [[b] + [cells.get((b, c)) for c in columns] for b in blocks]
    return (img or "") + _details(_table(["block"] + columns, rows), label)


def _details(inner: str, what: str) -> str:
    return f"<details><summary>{_esc(what)}: the numbers</summary>{inner}</details>"


def _line_plot(plots: _Plots, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
               log: bool = False, kind: str = "line") -> str | None:
    def fn(fig: Any, ax: Any) -> None:
        from matplotlib.ticker import MaxNLocator

        for name, (x, y) in series.items():
            if kind == "bar":
                ax.bar(x, y, label=name)
            else:
                ax.plot(x, y, marker="." if len(x) < 60 else None, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            ax.set_yscale("log")
        if 1 < len(series) <= 12:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    return plots.draw(fn, alt=ylabel)


def _awq(plots: _Plots, transforms: list[dict]) -> str:
    rows, series = [], {}
    for t in transforms:
        for p in t.get("pairs", []) if t.get("method") == "awq" else []:
            name = ", ".join(p["linears"])
            rows.append([t["block"], p["prev"], name, p.get("alpha"), p.get("loss"),
                         p.get("loss_rtn")])
            x, y = series.setdefault(name, ([], []))
            x.append(t["block"])
            y.append(p.get("alpha"))
    if not rows:
        return ""
    img = _line_plot(plots, series, "block", "AWQ exponent (alpha)")
    return _section("AWQ scales", (img or "") + _details(_table(
        ["block", "scaled after", "Linears", "alpha", "loss", "loss at RTN"], rows),
        "AWQ exponents"))


def _owl(plots: _Plots, plan_steps: list[dict]) -> str:
    out = ""
    for p in plan_steps:
        owl = p.get("owl")
        if not owl:
            continue
        blocks = list(range(len(owl["block_sparsity"])))
        img = _line_plot(plots, {"sparsity": (blocks, owl["block_sparsity"]),
                                 "outlier ratio x 10": (blocks, [10 * r for r in
                                                                 owl["outlier_ratio"]])},
                         "block", "per-block ratio")
        rows = [[b, owl["outlier_ratio"][b], owl["block_sparsity"][b]] for b in blocks]
        out += _section(f"OWL (step {p['step']}, {p['method']}: lambda {owl.get('lambda')}, "
                        f"M {owl.get('m')})", (img or "") + _details(_table(
                            ["block", "outlier ratio", "sparsity"], rows), "OWL ratios"))
    return out


def _distill(plots: _Plots, report: dict) -> str:
    out = ""
    block = [t for t in report.get("transforms", []) if t.get("method") == "distill"]
    if block:
        held, train = {}, {}
        for t in block:
            h = [e for e in t["history"] if e.get("heldout") is not None]
            start = t.get("heldout_start") or 1.0
            held[f"block {t['block']}"] = ([e["step"] for e in h],
                                           [e["heldout"] / start for e in h])
            tr = [e for e in t["history"] if e.get("loss") is not None]
            train[f"block {t['block']}"] = ([e["step"] for e in tr],
                                            [e["loss"] / start for e in tr])
        imgs = [_line_plot(plots, s, "step", f"{what} loss / held-out loss at step 0")
                for what, s in (("held-out", held), ("train", train))]
        rows = [[t["block"], t.get("heldout_start"), t.get("heldout_best"), t.get("best_step"),
                 t.get("seconds")] for t in block]
        out += _section("Block-wise distillation", "".join(i or "" for i in imgs) + _details(
            _table(["block", "held-out start", "held-out best", "best step", "seconds"], rows),
            "distillation"))
    for d in report.get("distill", []):
        hist = d.get("history", [])
        series = {k: ([e["step"] for e in hist if e.get(k) is not None],
                      [e[k] for e in hist if e.get(k) is not None]) for k in ("loss", "heldout_kl")}
        series = {("train" if k == "loss" else "held-out KL"): v for k, v in series.items() if v[0]}
        img = _line_plot(plots, series, "step", "loss")
        rows = [[k, v] for k, v in d.items() if not isinstance(v, (list, dict))]
        out += _section(f"Distillation (step {d.get('step')})", (img or "") +
                        _table(["", ""], rows))
    return out


def _blocks(plots: _Plots, blocks: list[dict]) -> str:
    if not blocks:
        return ""
    b = [r["block"] for r in blocks]
    compute = [r["seconds"] - r.get("load_seconds", 0) - r.get("pack_seconds", 0) for r in blocks]

    def fn(fig: Any, ax: Any) -> None:
        from matplotlib.ticker import MaxNLocator

        load = [r.get("load_seconds", 0) for r in blocks]
        pack = [r.get("pack_seconds", 0) for r in blocks]
        ax.bar(b, load, label="load")
        ax.bar(b, compute, bottom=load, label="compress")
        ax.bar(b, pack, bottom=[x + y for x, y in zip(load, compute, strict=True)],
               label="write")
        ax.set_xlabel("block")
        ax.set_ylabel("seconds")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)

    out = _section("Time per block", (plots.draw(fn, alt="seconds per block") or "") + _details(
        _table(["block", "seconds", "load", "write"],
               [[r["block"], r["seconds"], r.get("load_seconds"), r.get("pack_seconds")]
                for r in blocks]), "time per block"))
    if any("rss_bytes" in r for r in blocks):
        series = {"RSS after the block": (b, [r.get("rss_bytes", 0) / MiB for r in blocks]),
                  "peak RSS so far": (b, [r.get("peak_rss_bytes", 0) / MiB for r in blocks])}
        if any("peak_device_bytes" in r for r in blocks):
            series["peak device memory"] = (b, [r.get("peak_device_bytes", 0) / MiB
                                                for r in blocks])
        img = _line_plot(plots, series, "block", "MiB")
        rows = [[r["block"]] + [None if r.get(k) is None else r[k] / MiB
                                for k in ("rss_bytes", "peak_rss_bytes", "peak_device_bytes")]
                for r in blocks]
        out += _section("Memory over the run", (img or "") + _details(_table(
            ["block", "RSS (MiB)", "peak RSS (MiB)", "peak device (MiB)"], rows), "memory"))
    return out


def _experts(report: dict) -> str:
    rows = [[e.get("block"), e.get("expert"), e.get("tokens"), e.get("rows"),
             e.get("fallback")] for e in report.get("experts", [])]
    return _section("MoE experts", _table(["block", "expert", "tokens", "rows", "fallback"],
                                          rows)) if rows else ""


def _section(title: str, inner: str) -> str:
    return f"<section><h2>{_esc(title)}</h2>{inner}</section>"


def _summary(report: dict) -> str:
    eng, cal = report.get("engine", {}), report.get("calibration", {})
    rows = [["compress seconds", report.get("seconds")],
            ["capture seconds", report.get("capture_seconds")],
            ["blocks", len(report.get("blocks", []))],
            ["Linears compressed", len({r["name"] for r in report.get("layers", [])})]]
    rows += [[f"engine: {k}", v] for k, v in eng.items() if not isinstance(v, (dict, list))]
    rows += [[f"calibration: {k}", v] for k, v in cal.items() if not isinstance(v, dict)]
    plan = report.get("plan") or {}
    if plan.get("peak_ram"):
        rows.append(["plan: peak RAM (MiB)", plan["peak_ram"] / MiB])
    return _section("The run", _table(["", ""], rows))


def render_html(report: dict[str, Any], *, title: str = "llmc report", plots: bool = True) -> str:
    """The HTML page of a report dict (``CompressionReport.to_dict()`` or the JSON file's
    contents)."""
    import yaml

    p = _Plots(plots)
    layers = report.get("layers", [])
    parts = [_summary(report)]
    if not p.ok:
        parts.append("<p class=note>matplotlib is not installed (pip install "
                     "'llmc-compress[report]'): tables only.</p>")
    if any(r.get("error") is not None for r in layers):
        parts.append(_section("Relative output error per Linear",
                              "<p>||W X - W' X|| / ||W X|| on the calibration inputs, the last "
                              "step that touched the Linear.</p>"
                              + _heatmap(p, layers, "error", "relative output error", log=True)))
    if any(r.get("sparsity") is not None for r in layers):
        parts.append(_section("Sparsity per Linear",
                              _heatmap(p, layers, "sparsity", "achieved sparsity", log=False)))
    parts += [_awq(p, report.get("transforms", [])), _owl(p, report.get("plans", [])),
              _distill(p, report), _blocks(p, report.get("blocks", [])), _experts(report)]
    parts.append(_section("Per Linear", _details(_table(
        ["Linear", "step", "method", "error", "sparsity", "seconds"],
        [[r["name"], r.get("step"), r.get("method"), r.get("error"), r.get("sparsity"),
          r.get("seconds")] for r in layers], limit=5000), "every Linear")))
    recipe = yaml.safe_dump(report.get("recipe", {}), sort_keys=False)
    parts.append(_section("Recipe", f"<pre>{_esc(recipe)}</pre>"))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:12px;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "th{background:#f3f3f3}img.plot{max-width:100%;display:block;margin:.5em 0}"
             "pre{background:#f6f6f6;padding:1em;font-size:12px;overflow:auto}"
             "section{margin-bottom:2em}.note{color:#a40}")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_esc(title)}"
            f"</title><style>{style}</style></head><body><h1>{_esc(title)}</h1>"
            + "".join(x for x in parts if x) + "</body></html>\n")


def write_html(report: dict[str, Any], directory: str | Path, *, title: str | None = None,
               plots: bool = True) -> Path:
    """Write ``llmc_report.html`` into ``directory``; its path."""
    directory = Path(directory)
    path = directory / HTML_FILE
    tmp = path.with_name(path.name + ".tmp")
    methods = " + ".join(s.get("method", "?") for s in report.get("recipe", {}).get("steps", []))
    tmp.write_text(render_html(report, title=title or f"llmc report: {methods or 'no steps'}",
                               plots=plots))
    tmp.replace(path)
    return path


def rebuild(directory: str | Path, *, plots: bool = True) -> Path:
    """``llmc report OUT``: the HTML page again from ``OUT/llmc_report.json``."""
    directory = Path(directory)
    source = directory / JSON_FILE
    if not source.is_file():
        raise ValueError(f"{directory} has no llmc_report.json: pass the output directory of a "
                         "compressing command")
    return write_html(json.loads(source.read_text()), directory, plots=plots)
