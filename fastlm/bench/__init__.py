"""`fastlm bench`: every op's cases on one device, one process; a table, a JSON file, a plot.

Results go to <out>/<machine>.json (one file per machine, one section per op, merged across
runs) and <out>/<machine>-<op>.png; `redraw(json_path)` draws the PNGs again from a results file.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time
from pathlib import Path

import torch

from fastlm.bench import harness
from fastlm.info import machine_name, summary

OPS = ("norm", "embedding", "activation", "rotary", "attention", "quant_matmul", "model", "hf")


def _module(op: str):
    if op in OPS:
        return importlib.import_module(f"fastlm.bench.{op}")
    raise ValueError(f"bench: unknown op {op!r}; choose from {', '.join(OPS)}")


def run(ops: list[str], device: str, quick: bool, out: str, plot: bool = True, reuse_memory: bool = True) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA device")
    print(f"machine: {machine_name(dev)}")
    reuse = reuse_memory and dev.type == "cpu" and harness.reuse_freed_host_memory()
    if dev.type == "cpu":
        print("host allocator: " + ("freed memory is reused (glibc mmap disabled), for every competitor alike"
                                    if reuse else "glibc's default (large outputs page-fault on every call)"))
    bw = harness.copy_bandwidth(dev)
    print(f"measured copy bandwidth: {bw:.1f} GB/s (read + write)")
    rates: dict[str, float] = {}

    def ceiling(case: harness.Case) -> float:
        """Copy bandwidth for memory-bound cases; the dense matmul rate in the case's dtype otherwise."""
        if case.metric == "GB/s":
            return bw
        key = str(case.dtype).removeprefix("torch.")
        if key not in rates:
            rates[key] = harness.matmul_rate(dev, case.dtype)
            print(f"measured matmul rate ({key}): {rates[key]:.3f} TFLOP/s")
        return rates[key]

    # Runs under glibc's default allocator go to a file of their own, beside the main results.
    name = machine_name(dev) + ("" if reuse or dev.type != "cpu" else "-default-alloc")
    results: dict[str, dict] = {}
    for op in ops:
        results[op] = _run_op(op, dev, quick, out, name, reuse, bw, rates, ceiling)
    print(f"wrote {Path(out) / (name + '.json')}")
    if plot:
        for op, res in results.items():
            png = draw(op, res["rows"], Path(out) / f"{name}-{op}.png")
            if png:
                print(f"wrote {png}")
    return results


def _run_op(op, dev, quick, out, name, reuse, bw, rates, ceiling) -> dict:
    """One op's cases, the results file rewritten after each, so that a run stopped by a time
    limit keeps every case that finished (marked "complete": false until the last)."""
    module = _module(op)
    rows: list = []

    def section(complete: bool) -> dict:
        return {"ceiling": {"copy_GBps": bw, "matmul_TFLOPs": dict(rates)}, "host_memory_reused": reuse,
                "rows": [dataclasses.asdict(r) for r in rows], "complete": complete}

    for case in module.cases(dev, quick):
        print(f"running {case.name} ({case.dtype}) ...", flush=True)
        rows += harness.run_case(case, dev, ceiling(case), reps=7 if quick else 15)
        save({op: section(False)}, dev, quick, out, name)
    print(harness.format_table(rows))
    res = section(True)
    # Measurements that are not timings (e.g. attention's peak memory against length).
    if hasattr(module, "extra"):
        save({op: {**res, "complete": False}}, dev, quick, out, name)
        res["extra"] = module.extra(dev, quick)
    save({op: res}, dev, quick, out, name)
    return res


def save(results: dict, dev: torch.device, quick: bool, out: str, name: str) -> Path:
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["machine"] = summary(dev)
    ops = doc.setdefault("ops", {})
    for op, res in results.items():
        ops[op] = {**res, "quick": quick, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# Plot geometry, in inches and points: a bar and the gap between cases tall enough for 8 pt labels.
_BAR_IN, _CASE_GAP_IN, _TITLE_IN, _XAXIS_IN, _PLOT_W_IN = 0.15, 0.12, 0.32, 0.34, 3.4
_FONT_PT, _CHAR_IN = 8, 0.07  # a character of an 8 pt label is at most about 0.07 in wide
_PASS_TITLE = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward + backward"}


def _speedup_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks inside [lo, hi]; only powers of ten when those would be more than seven."""
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks = [m * 10.0**e for e in range(e0, e1 + 1) for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
    return ticks if len(ticks) <= 7 else [t for t in ticks if math.log10(t).is_integer()]


def _columns(heights: list[float]) -> list[list[int]]:
    """Groups (by index) per column of panels for an op with one pass: one column, or for a tall
    stack the groups in order over two, split where the taller column is least tall."""
    n = len(heights)
    if sum(heights) <= 12 or n < 2:
        return [list(range(n))]
    cut = min(range(1, n), key=lambda k: max(sum(heights[:k]), sum(heights[k:])))
    return [list(range(cut)), list(range(cut, n))]


def _label(case: str, group: str) -> str:
    """A case's label in its group's panel: what varies inside the group ("M=1 (4.0x)")."""
    rest = case[len(group):].strip() if case.startswith(group + " ") else ""
    return rest or case


@dataclasses.dataclass
class _Panel:
    group: str
    pass_: str
    cases: list[str]  # those with a speedup in this pass
    impls: list[str]  # the competitors with a speedup here

    def height(self) -> float:  # inches, with the title above and the tick labels below
        return _TITLE_IN + len(self.cases) * (len(self.impls) * _BAR_IN + _CASE_GAP_IN) + _XAXIS_IN


def _draw_panel(ax, panel: _Panel, speedup: dict, colour: dict) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    p, impls = panel.pass_, panel.impls
    vals = [speedup[c, i, p] for c in panel.cases for i in impls if (c, i, p) in speedup]
    lo, hi = min(min(vals) / 2.2, 1 / 1.5), max(max(vals) * 2.2, 1.5)  # room for the values' text
    bar = 1.0 / (len(impls) + _CASE_GAP_IN / _BAR_IN)  # in case rows, so that a bar is _BAR_IN tall
    for k, impl in enumerate(impls):
        for n, c in enumerate(panel.cases):
            v, y = speedup.get((c, impl, p)), n + (k - (len(impls) - 1) / 2) * bar
            if v is None:
                continue
            ax.barh(y, v - 1.0, bar * 0.9, left=1.0, color=colour[impl])  # from 1x, either way
            ax.text(v * 1.05 if v >= 1 else v / 1.05, y, f"{v:.2f}x" if v < 10 else f"{v:.1f}x",
                    va="center", ha="left" if v >= 1 else "right", fontsize=6.5)
    ax.axvline(1.0, color="0.25", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks = _speedup_ticks(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}x" for t in ticks], fontsize=_FONT_PT)
    ax.set_ylim(len(panel.cases) - 0.5, -0.5)  # first case at the top
    ax.set_yticks(range(len(panel.cases)))
    ax.set_yticklabels([_label(c, panel.group) for c in panel.cases], fontsize=_FONT_PT)
    ax.set_title(f"{panel.group}: {_PASS_TITLE.get(p, p)}", loc="left", fontsize=9)
    ax.grid(axis="x", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)


def figure(op: str, rows: list[dict]):
    """The figure `draw` saves, or None when no row has a speedup over torch.

    One panel per group of cases (Case.group, e.g. "layer_norm" or "int8") and pass: a horizontal
    bar per competitor, its speedup over torch eager (the competitor named "torch"; for
    quant_matmul the dense matmul), drawn from the dashed line at 1x on a log axis so that 2x
    faster and 2x slower are bars of one length either side of it, with the value at the bar's end.
    Groups are rows of panels and passes columns; the legend is above the panels, never over a bar.
    Panels are placed in inches, so that every label gets the room it needs however many there are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    speedup = {(r["case"], r["impl"], r["pass_"]): r["vs_eager"] for r in rows if r.get("vs_eager")}
    if not speedup:
        return None
    present = {r["pass_"] for r in rows}
    passes = [p for p in harness.PASSES if p in present] + sorted(present - set(harness.PASSES))
    groups: dict[str, list[str]] = {}
    for r in rows:
        cases = groups.setdefault(r.get("group") or harness.case_group(r["case"]), [])
        if r["case"] not in cases:
            cases.append(r["case"])
    competitors = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != "torch"))
    colour = {impl: plt.get_cmap("tab10")(k % 10) for k, impl in enumerate(competitors)}
    panels: dict[tuple[str, str], _Panel] = {}
    for g, cases in groups.items():
        for p in passes:
            shown = [c for c in cases if any((c, i, p) in speedup for i in competitors)]
            if shown:
                impls = [i for i in competitors if any((c, i, p) in speedup for c in shown)]
                panels[g, p] = _Panel(g, p, shown, impls)

    # A row of panels per group, as tall as its tallest; a column per pass (or two for one pass).
    row_h = {g: max(panels[g, p].height() if (g, p) in panels else 0.0 for p in passes) for g in groups}
    names = list(groups)
    if len(passes) == 1:
        cols = [[(names[k], passes[0]) for k in ks] for ks in _columns([row_h[g] for g in names])]
    else:
        cols = [[(g, p) for g in names] for p in passes]
    label_w = [max((len(_label(c, g)) for g, p in col if (g, p) in panels for c in panels[g, p].cases), default=1)
               * _CHAR_IN + 0.15 for col in cols]
    legend_rows = math.ceil((len(competitors) + 1) / 5)
    top = 0.4 + 0.25 * legend_rows  # the figure's title and the legend
    height = top + max(sum(row_h[g] for g, _ in col) for col in cols) + 0.1
    width = sum(label_w) + len(cols) * (_PLOT_W_IN + 0.3) + 0.1
    fig = plt.figure(figsize=(width, height))
    fig.suptitle(f"{op}: speedup over torch (time of torch / time of each; right of 1x is faster)",
                 x=0.5, y=1 - 0.12 / height, va="top", fontsize=10)
    x = 0.05
    for col, lw in zip(cols, label_w):
        y = height - top  # the top of the next row of panels
        for g, p in col:
            if (g, p) in panels:
                h = panels[g, p].height() - _TITLE_IN - _XAXIS_IN
                ax = fig.add_axes([(x + lw) / width, (y - _TITLE_IN - h) / height, _PLOT_W_IN / width, h / height])
                _draw_panel(ax, panels[g, p], speedup, colour)
            y -= row_h[g]
        x += lw + _PLOT_W_IN + 0.3
    handles = [Patch(color=colour[i], label=i) for i in competitors]
    handles.append(Line2D([], [], color="0.25", linestyle="--", label="torch = 1x"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.38 / height),
               ncol=min(len(handles), 5), frameon=False, fontsize=_FONT_PT)
    return fig


def draw(op: str, rows: list[dict], path: Path) -> Path | None:
    """Saves `figure(op, rows)` as a PNG at path; None when matplotlib is missing or nothing has a
    speedup to show."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig = figure(op, rows)
    if fig is None:
        print(f"{op}: no row has a speedup over torch: no plot")
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def redraw(results: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draws every op's plot again from a results file, without running anything:

        fastlm bench --redraw benchmarks/results/cpu-amd-epyc-2t.json

    The PNGs go beside the file (or to out) as <machine>-<op>.png, as `run` names them."""
    path = Path(results)
    doc = json.loads(path.read_text())
    folder = Path(out) if out is not None else path.parent
    written = []
    for op, res in doc.get("ops", {}).items():
        png = draw(op, res["rows"], folder / f"{path.stem}-{op}.png")
        if png:
            written.append(png)
    return written
