"""The comparison figure of a sweep, one row per comparison group: quality against throughput, quality
against peak memory (left out when no trial measured memory: the CPU), and learning curves.

Quality is each config's mean at the group's common step with ± 1 std over seeds as error bars (on both
axes); every point carries a short label (the legend spells it out); the Pareto frontier is a step line;
the baseline is a black star; the workload's trivial floors are dashed lines with their names. Only the
object-oriented API (Figure + Agg canvas): the sweep makes the report on a worker thread, and pyplot's
global state is not thread-safe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import Bbox, blended_transform_factory

from orchestrator import compare as cmp

FONT = 9.5
DPI = 150
BASELINE_COLOR = "black"
FLOOR_COLORS = ("tab:red", "tab:purple", "tab:brown")
FRONTIER_COLOR = "0.45"
# label positions tried around a point, nearest first (to the sides first: error bars are mostly vertical):
# (dx, dy) in points, alignment;
OFFSETS = [(11, 0, "left", "center"), (-11, 0, "right", "center"), (7, 6, "left", "bottom"), (-7, 6, "right", "bottom"),
           (7, -6, "left", "top"), (-7, -6, "right", "top"), (0, 11, "center", "bottom"), (0, -11, "center", "top")]
# then further out, tied to the point by a line
OFFSETS += [(round(r * np.cos(a)), round(r * np.sin(a)), "left" if np.cos(a) > 0.1 else "right" if np.cos(a) < -0.1
             else "center", "bottom" if np.sin(a) > 0.1 else "top" if np.sin(a) < -0.1 else "center")
            for r in (24, 40) for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)]


@dataclass
class Point:
    """A plotted config: where, its error bars (data units), its label."""
    ax: Any
    x: float
    y: float
    xerr: float
    yerr: float
    text: str
    color: str


def short_labels(configs: list[str]) -> tuple[dict[str, str], str]:
    """Point and legend labels: a config's method and only the knobs that tell it from the method's other
    configs, long knob names cut to their initials (window_routed_q=8 -> wrq=8); and the key that spells out
    what was cut ("wrq = window_routed_q; colt5: router_iters=10"), for the legend's title."""
    tokens = {c: c.split() for c in configs}
    by_method: dict[str, list[list[str]]] = {}
    for t in tokens.values():
        by_method.setdefault(t[0] if t else "", []).append(t)
    abbreviations: dict[str, str] = {}

    def knob(tok: str) -> str:
        key, eq, value = tok.partition("=")
        short = key.rsplit(".", 1)[-1]
        if len(short) > 6:
            short = "".join(p[0] for p in short.split("_") if p)
            abbreviations[short] = key
        return short + eq + value

    labels, constant = {}, {}
    for c, t in tokens.items():
        same = by_method[t[0] if t else ""]
        varying = [tok for tok in t[1:] if not all(tok in other for other in same)]
        labels[c] = " ".join(t[:1] + [knob(tok) for tok in varying])
        if t[1:] and len(varying) < len(t) - 1:
            constant[t[0]] = " ".join(tok for tok in t[1:] if tok not in varying)
    if len(set(labels.values())) < len(labels) or len(set(abbreviations.values())) < len(abbreviations):
        return {c: c for c in configs}, ""  # the cut labels would be ambiguous: full ones
    key = [f"{s} = {k}" for s, k in sorted(abbreviations.items())] + [f"{m}: {v}" for m, v in constant.items()]
    return labels, "; ".join(key)


def _colors(comparison: cmp.Comparison) -> dict[str, str]:
    import matplotlib

    configs = list(dict.fromkeys(r.config for g in comparison.groups for r in g.rows if not r.is_baseline))
    cmap = matplotlib.colormaps["tab10" if len(configs) <= 10 else "tab20"]
    colors = {c: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, c in enumerate(configs)}
    base = {r.config: BASELINE_COLOR for g in comparison.groups for r in g.rows if r.is_baseline}
    return {**colors, **base}


def _floors(ax, comparison: cmp.Comparison, only_near: tuple[float, float] | None = None) -> str | None:
    """Dashed lines named just outside the right edge (where no data can hide them); the primary floor's
    margin as a faint band (a value inside it has not cleared the floor). only_near=(lo, hi): a floor far
    outside the data's range would squash the points into a line, so it is named in the returned note
    instead ("(off the axis: bigram 3.581 above)")."""
    trans = blended_transform_factory(ax.transAxes, ax.transData)
    far = []
    for i, f in enumerate(comparison.floors):
        color = FLOOR_COLORS[i % len(FLOOR_COLORS)]
        if only_near and not (only_near[0] <= f.value <= only_near[1]):
            far.append(f"{f.name} {f.value:.4g} {'above' if f.value > only_near[1] else 'below'}")
            continue
        ax.axhline(f.value, color=color, ls="--", lw=1.1, zorder=1)
        if i == 0 and f.margin:
            edge = f.value - f.margin if comparison.mode == "min" else f.value + f.margin
            ax.axhspan(min(edge, f.value), max(edge, f.value), color=color, alpha=0.08, lw=0, zorder=0)
        ax.text(1.01, f.value, f.name, transform=trans, fontsize=FONT - 1, ha="left", va="center", color=color,
                clip_on=False)
    if not far:
        return None
    return f"(off the axis: {', '.join(far)})"


def _frontier(ax, points: list[tuple[float, float]], higher_x_better: bool) -> list[tuple[float, float]]:
    """Rings on the frontier's configs and the staircase bounding what they dominate (compare.pareto_front):
    between two configs sorted by x, the line holds the quality of the one that dominates that stretch.
    Returns the staircase's corners (labels keep off it)."""
    if not points:
        return []
    xs, ys = zip(*sorted(points))
    ax.plot(xs, ys, "o", ms=17, mfc="none", mec=FRONTIER_COLOR, mew=1.2, zorder=2)
    corners = [(xs[0], ys[0])]
    for i in range(1, len(xs)):
        turn = (xs[i - 1], ys[i]) if higher_x_better else (xs[i], ys[i - 1])
        corners += [turn, (xs[i], ys[i])]
    if len(corners) > 1:
        ax.plot(*zip(*corners), color=FRONTIER_COLOR, lw=1.3, zorder=1)
    return corners


def _tradeoff(ax, group: cmp.GroupResult, comparison: cmp.Comparison, attr: str, colors,
              labels) -> tuple[list[Point], str | None]:
    """Quality (y) against tokens/s or peak MiB (x): the points to label, and a note on floors off the axis."""
    rows = [r for r in group.rows if r.quality.n and getattr(r, attr).n]
    points = []
    for r in rows:
        x, base, color = getattr(r, attr), r.is_baseline, colors[r.config]
        ax.errorbar(x.mean, r.quality.mean, xerr=x.std or 0, yerr=r.quality.std or 0, fmt="*" if base else "o",
                    ms=15 if base else 8, color=color, ecolor=color, elinewidth=1.1, capsize=3,
                    mec="white" if not base else BASELINE_COLOR, mew=0.8, zorder=4 if base else 3)
        points.append(Point(ax, x.mean, r.quality.mean, x.std or 0, r.quality.std or 0, labels[r.config], color))
    speed = attr == "tokens_per_s"
    corners = _frontier(ax, [(getattr(r, attr).mean, r.quality.mean) for r in rows
                             if (r.pareto_speed if speed else r.pareto_memory)], higher_x_better=speed)
    points += [Point(ax, x, y, 0, 0, "", "") for x, y in corners]  # no label: keeps labels off the line
    note = None
    if rows:
        qs = [r.quality.mean for r in rows]
        span = max(max(qs) - min(qs), 0.05 * max(abs(q) for q in qs), 1e-9)
        note = _floors(ax, comparison, only_near=(min(qs) - span, max(qs) + span))
        xs = [getattr(r, attr).mean for r in rows]
        if min(xs) > 0 and max(xs) / min(xs) > 8:
            ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no finished trial", transform=ax.transAxes, ha="center", fontsize=FONT)
    ax.margins(x=0.2, y=0.15)
    return points, note


def _mean_curve(trials: list[cmp.Trial]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step over the trials that reached it: (steps, mean, std); std is NaN where one trial is left."""
    steps = sorted({s for t in trials for s, _ in t.curve})
    by_step = [[v for t in trials for s, v in t.curve if s == step] for step in steps]
    mean = np.array([np.mean(v) for v in by_step])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else np.nan for v in by_step])
    return np.array(steps), mean, std


def _curves(ax, group: cmp.GroupResult, comparison: cmp.Comparison, colors) -> None:
    for r in group.rows:
        color, base = colors[r.config], r.is_baseline
        counted = [t for t in r.trials if t.counted]
        if counted:
            steps, mean, std = _mean_curve(counted)
            ax.plot(steps, mean, color=color, lw=2.2 if base else 1.5, zorder=3 if base else 2)
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.18, lw=0)
        for t in r.trials:  # left out of the statistics: drawn thin, dotted, ending in a cross
            if not t.counted and t.curve:
                s, v = zip(*t.curve)
                ax.plot(s, v, color=color, lw=1, ls=":", alpha=0.8)
                ax.plot(s[-1], v[-1], "x", color=color, ms=7)
    if group.common_step is not None:
        ax.axvline(group.common_step, color="0.3", ls=":", lw=1.2, zorder=1)
        ax.autoscale_view()
        lo, hi = ax.get_xlim()
        right_half = group.common_step > (lo + hi) / 2  # the name on the side with room
        ax.text(group.common_step, 0.99, f" common step {group.common_step} ", fontsize=FONT - 1, color="0.3",
                transform=blended_transform_factory(ax.transData, ax.transAxes),
                ha="right" if right_half else "left", va="top")
    _floors(ax, comparison)


def _boxes(p: Point, dpi: float) -> list[Bbox]:
    """Display-space boxes a label must not cover: the marker, and each error bar with its caps."""
    px, py = p.ax.transData.transform((p.x, p.y))
    r, cap = 8.5 * dpi / 72, 3.5 * dpi / 72  # r: the frontier's ring
    out = [Bbox.from_extents(px - r, py - r, px + r, py + r)]
    if p.yerr:
        (_, y0), (_, y1) = p.ax.transData.transform([(p.x, p.y - p.yerr), (p.x, p.y + p.yerr)])
        out.append(Bbox.from_extents(px - cap, min(y0, y1), px + cap, max(y0, y1)))
    if p.xerr:
        (x0, _), (x1, _) = p.ax.transData.transform([(p.x - p.xerr, p.y), (p.x + p.xerr, p.y)])
        out.append(Bbox.from_extents(min(x0, x1), py - cap, max(x0, x1), py + cap))
    return out


def _overlap(box: Bbox, others: list[Bbox]) -> float:
    return sum(max(0.0, min(box.x1, o.x1) - max(box.x0, o.x0)) * max(0.0, min(box.y1, o.y1) - max(box.y0, o.y0))
               for o in others)


def _place_labels(fig: Figure, points: list[Point]) -> None:
    """Each label at the first offset around its point that covers no marker, error bar or label already
    placed in its axes and stays inside them; where none is free, the one covering least, tied to its point
    by a thin line when it sits away from it. Greedy in display space once the layout is final, crowded
    points first."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken: dict = {}
    for p in points:
        taken.setdefault(p.ax, []).extend(_boxes(p, fig.dpi))
    for a, b in zip(points, points[1:]):  # the frontier's segments, between consecutive unlabelled corners
        if a.ax is b.ax and not a.text and not b.text:
            (x0, y0), (x1, y1) = a.ax.transData.transform([(a.x, a.y), (b.x, b.y)])
            taken[a.ax].append(Bbox.from_extents(min(x0, x1) - 2, min(y0, y1) - 2, max(x0, x1) + 2, max(y0, y1) + 2))
    points = [p for p in points if p.text]
    centre = {id(p): p.ax.transData.transform((p.x, p.y)) for p in points}
    crowd = {id(p): sum(np.hypot(*(centre[id(p)] - centre[id(q)])) < 80 * fig.dpi / 72
                        for q in points if q.ax is p.ax) for p in points}
    for p in sorted(points, key=lambda p: -crowd[id(p)]):
        inside = p.ax.get_window_extent(renderer)
        best = None
        for dx, dy, ha, va in OFFSETS:
            far = abs(dx) + abs(dy) > 20
            ann = p.ax.annotate(p.text, (p.x, p.y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                                fontsize=FONT - 0.5, color=p.color, zorder=5,
                                arrowprops=dict(arrowstyle="-", color=p.color, lw=0.6, shrinkB=5) if far else None)
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer)
            outside = box.width * box.height - _overlap(box, [inside])
            cost = _overlap(box, taken[p.ax]) + 4 * outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        taken[p.ax].append(best[2])


def _legend(fig: Figure, comparison: cmp.Comparison, colors, labels: dict[str, str], key: str) -> None:
    """Below the panels, outside them: configs (by their short labels; the key, as the title, spells out
    the cuts), the frontier, the std band, the floors."""
    import textwrap

    handles = []
    for config in dict.fromkeys(r.config for g in comparison.groups for r in g.rows):
        base = colors[config] == BASELINE_COLOR
        handles.append(Line2D([], [], color=colors[config], marker="*" if base else "o", ms=12 if base else 7,
                              lw=1.5, label=labels[config] + (" (baseline)" if base else "")))
    handles += [Line2D([], [], color=FRONTIER_COLOR, lw=1.3, marker="o", ms=11, mfc="none", label="Pareto frontier"),
                Patch(color="0.5", alpha=0.3, label="± 1 std over seeds")]
    for i, f in enumerate(comparison.floors):
        band = f" (band: margin {f.margin:g})" if i == 0 and f.margin else ""
        handles.append(Line2D([], [], color=FLOOR_COLORS[i % len(FLOOR_COLORS)], ls="--",
                              label=f"{f.name} floor {f.value:.4g} {f.unit}".rstrip() + band))
    if any(not t.counted and t.curve for g in comparison.groups for r in g.rows for t in r.trials):
        handles.append(Line2D([], [], color="0.3", ls=":", marker="x", label="diverged / excluded trial"))
    longest = max(len(h.get_label()) for h in handles)
    ncol = max(1, min(len(handles), 4 if longest <= 32 else 3 if longest <= 45 else 2))
    title = "\n".join(textwrap.wrap(key, 150)) if key else None
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=FONT, frameon=False,
               title=title, title_fontsize=FONT - 0.5)


def _axis_text(axes, group: cmp.GroupResult, comparison: cmp.Comparison, notes: list[str | None],
               shared_device: bool, many_groups: bool) -> None:
    """Labels and titles of one group's row of axes (throughput, [memory,] curves); notes: what each
    trade-off panel says about floors off its axis, under its title."""
    better = "lower" if comparison.mode == "min" else "higher"
    quality = f"{comparison.metric} @ step {group.common_step} ({better} is better)"
    suffix = f" — group {group.name}" if many_groups else ""
    xlabels = ["tokens/s (steady-state median)" + (" † shared device" if shared_device else ""), "peak memory (MiB)"]
    for ax, xlabel, title, note in zip(axes[:-1], xlabels, ("quality vs throughput", "quality vs memory"), notes):
        ax.set_xlabel(xlabel, fontsize=FONT)
        ax.set_ylabel(quality, fontsize=FONT)
        ax.set_title(title + suffix + (f"\n{note}" if note else ""), fontsize=FONT + 1)
    axes[-1].set_xlabel("step", fontsize=FONT)
    axes[-1].set_ylabel(comparison.metric, fontsize=FONT)
    axes[-1].set_title("learning curves (mean ± std over seeds)" + suffix, fontsize=FONT + 1)


def draw(comparison: cmp.Comparison, path: Path, shared_device: bool = False,
         device: str | None = None) -> Path | None:
    """Write the figure to `path`; None when no group has any trial."""
    groups = [g for g in comparison.groups if g.rows]
    if not groups:
        return None
    memory = comparison.memory_measured
    labels, key = short_labels(list(dict.fromkeys(r.config for g in groups for r in g.rows)))
    colors = _colors(comparison)
    legend_rows = -(-(len(labels) + 4) // 3) + (len(key) // 150 + 1 if key else 0)
    fig = Figure(figsize=(13 if memory else 10, 4.2 * len(groups) + 0.3 * legend_rows + 0.4), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 3 if memory else 2, squeeze=False)
    points = []
    for row, g in zip(axes, groups):
        notes = []
        for ax, attr in zip(row[:-1], ("tokens_per_s", "peak_mib")):
            placed, note = _tradeoff(ax, g, comparison, attr, colors, labels)
            points += placed
            notes.append(note)
        _curves(row[-1], g, comparison, colors)
        _axis_text(row, g, comparison, notes, shared_device, len(groups) > 1)
        for ax in row:
            ax.tick_params(labelsize=FONT - 0.5)
            ax.grid(alpha=0.25, lw=0.6)
    _legend(fig, comparison, colors, labels, key)
    floor, warnings = comparison.primary_floor, []
    for g in groups:  # the figure may travel without the table: it says so itself
        base = g.baseline
        if floor and base and base.quality.n and not cmp.clears(base.quality.mean, floor, comparison.mode):
            where = f" (group {g.name})" if len(groups) > 1 else ""
            warnings.append(f"untrained models{where}: the baseline has not cleared the {floor.name} floor")
    untrained = bool(warnings)
    if not memory:
        warnings.append("peak memory n/a on the CPU (no per-trial peak allocation)" if device != "cuda"
                        else "peak memory n/a (not logged)")
    if warnings:
        fig.suptitle("; ".join(warnings), fontsize=FONT, color=FLOOR_COLORS[0] if untrained else "0.35")
    _place_labels(fig, points)
    fig.savefig(path, dpi=DPI)
    return path
