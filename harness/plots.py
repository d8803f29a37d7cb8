"""The report's figures, drawn with matplotlib (Agg) from a `summary.Summary`; PNG and SVG each.

- pareto_memory: metric vs peak memory, the decision plot;
- metric_vs_params: metric vs trainable parameters (log scale);
- metric_vs_throughput: metric vs training samples/s;
- memory_breakdown: stacked bars of what the modelled memory is made of;
- sweeps (when the suite sweeps): each swept entry's mean dev score against each swept value, per task, the
  selected point ringed.
Each figure has one panel per task, after a panel for the across-task average
when there is one. Points are coloured (and shaped) by family; the Pareto
frontier (harness.pareto) is drawn and its points are ringed and labelled in bold.
Methods with no result in a panel are named under it, with their status.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from harness import pareto  # noqa: E402
from harness.formatting import byte_unit  # noqa: E402
from harness.summary import AVERAGE, BREAKDOWN, Summary, higher_is_better  # noqa: E402

# Okabe-Ito colours (readable with colour-blindness), and a shape each for grey-scale prints.
FAMILY_STYLE = {
    "baseline": ("#6b6b6b", "o"),
    "PETL": ("#0072B2", "s"),
    "METL": ("#D55E00", "^"),
    "unknown": ("#CC79A7", "D"),
}
BREAKDOWN_COLOURS = ["#cfd4dc", "#56B4E9", "#9b7fd1", "#E69F00", "#009E73"]
PLOTS = {  # name -> (x column, x label, lower x is better, log x)
    "pareto_memory": ("peak_bytes", "peak memory", True, False),
    "metric_vs_params": ("trainable_params", "trainable parameters", True, True),
    "metric_vs_throughput": ("train_samples_per_s", "training throughput (samples/s)", False, False),
}
TITLES = {
    "pareto_memory": "Score vs peak memory",
    "metric_vs_params": "Score vs trainable parameters",
    "metric_vs_throughput": "Score vs training throughput",
    "memory_breakdown": "Memory breakdown (modelled)",
    "sweeps": "Dev score across each sweep",
}
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "svg.hashsalt": "harness-report",
    "svg.fonttype": "none",
}


def plain(text) -> str:
    """Text from the records, shown as written: a "$" would otherwise start matplotlib's mathtext."""
    return str(text).replace("$", r"\$")


def panels(summary: Summary) -> list[tuple[str, pd.DataFrame]]:
    """(scope, one row per method) for the average (if any) and each task."""
    out = []
    if len(summary.overall):
        out.append((AVERAGE, summary.overall.assign(task=AVERAGE, metric_name="average score", higher_is_better=True)))
    for task, group in summary.per_task.groupby("task", sort=False):
        out.append((task, group))
    return out


def _grid(n: int, ax_w: float = 4.3, ax_h: float = 3.0, left: float = 0.8, gap_w: float = 0.9):
    """Up to three panels a row, laid out in inches (fixed margins: quicker and steadier than tight_layout)."""
    cols = min(3, n)
    rows = -(-n // cols)
    right, bottom, top, gap_h = 0.3, 1.0, 0.85, 1.3  # bottom and gap_h: x label and the "no point" note
    width, height = left + cols * ax_w + (cols - 1) * gap_w + right, bottom + rows * ax_h + (rows - 1) * gap_h + top
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap_w / ax_w,
        hspace=gap_h / ax_h,
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _missing_note(ax, frame: pd.DataFrame, shown, what: str = "no point") -> None:
    """Name, under the panel, each method with no point in it and why."""
    absent = frame[~shown]
    if len(absent):
        text = f"{what}: " + "; ".join(f"{plain(m)} ({s})" for m, s in zip(absent["method"], absent["status"]))
        ax.annotate(
            text,
            (0, 0),
            xycoords="axes fraction",
            xytext=(0, -38),
            textcoords="offset points",
            fontsize=7,
            color="#a33",
            va="top",
            wrap=True,
        )


def _label(ax, text, x, y, offset, ha, bold):
    # A faint white box keeps a label readable where it crosses the frontier line or the grid;
    # a label set further off gets a thin leader line to its point.
    far = abs(offset[0]) > 14 or abs(offset[1]) > 20
    return ax.annotate(
        text,
        (x, y),
        xytext=offset,
        textcoords="offset points",
        ha=ha,
        va="center",
        fontsize=8,
        color="#222",
        fontweight="bold" if bold else "normal",
        zorder=5,
        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.75},
        arrowprops={"arrowstyle": "-", "color": "#888", "linewidth": 0.6, "shrinkA": 1, "shrinkB": 4} if far else None,
    )


# Spots to try, nearest first: (offset in points, horizontal alignment).
LABEL_SPOTS = [
    ((7, 7), "left"),
    ((7, -7), "left"),
    ((-7, 7), "right"),
    ((-7, -7), "right"),
    ((0, 12), "center"),
    ((0, -12), "center"),
    ((28, 18), "left"),
    ((28, -18), "left"),
    ((-28, 18), "right"),
    ((-28, -18), "right"),
    ((0, 28), "center"),
    ((0, -28), "center"),
    ((40, 0), "left"),
    ((-40, 0), "right"),
]


def _place_labels(ax, xs, ys, labels, bold) -> None:
    """Label each point at the first nearby spot that covers no other label and no point."""
    renderer = ax.figure.canvas.get_renderer()
    centres = ax.transData.transform(np.column_stack([xs, ys])) if len(xs) else []
    radius = 5 * ax.figure.dpi / 72  # about a marker, in pixels
    taken = [
        matplotlib.transforms.Bbox.from_extents(cx - radius, cy - radius, cx + radius, cy + radius)
        for cx, cy in centres
    ]
    order = sorted(range(len(labels)), key=lambda i: not bold[i])  # frontier labels get the best spots
    axes_box = ax.get_window_extent(renderer)
    for i in order:
        chosen = None
        for offset, ha in LABEL_SPOTS:
            note = _label(ax, labels[i], xs[i], ys[i], offset, ha, bold[i])
            box = note.get_window_extent(renderer).expanded(1.04, 1.1)
            inside = axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
            if inside and not any(box.overlaps(other) for other in taken):
                chosen = box
                break
            note.remove()
        if chosen is None:  # crowded: take the first spot anyway, a label overlapping beats a missing one
            offset, ha = LABEL_SPOTS[0]
            chosen = _label(ax, labels[i], xs[i], ys[i], offset, ha, bold[i]).get_window_extent(renderer)
        taken.append(chosen)


def scatter_panel(ax, scope: str, frame: pd.DataFrame, x_column: str, x_label: str, lower_x_better: bool, log_x: bool):
    """Draw one panel; returns (x, y, labels, on frontier) of its points, labelled once the layout is final."""
    x = pd.to_numeric(frame[x_column], errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(frame["metric_mean"], errors="coerce").to_numpy(dtype=float)
    err = pd.to_numeric(frame["metric_std"], errors="coerce").fillna(0).to_numpy(dtype=float)
    shown = ~(np.isnan(x) | np.isnan(y))
    scale, unit = (1, "")
    if x_column == "peak_bytes":
        scale, unit = byte_unit(x[shown])
        sources = sorted({s for v in frame.loc[shown, "peak_source"].dropna() for s in v.split("/")})
        x_label = f"{x_label} ({unit}; {', '.join(sources) or 'no figure'})"
    x = x / scale
    maximise = higher_is_better(frame)
    # Frontier with the metric maximised and the cost minimised (throughput is a cost when negated).
    signed_y, signed_x = (y if maximise else -y), (x if lower_x_better else -x)
    on_front = np.array(pareto.frontier_mask(list(signed_y), list(signed_x)))
    for family, (colour, marker) in FAMILY_STYLE.items():
        pick = shown & (frame["family"].to_numpy() == family)
        if not pick.any():
            continue
        ax.errorbar(x[pick], y[pick], yerr=err[pick], fmt="none", ecolor=colour, alpha=0.5, elinewidth=1, capsize=2)
        ax.scatter(
            x[pick & ~on_front],
            y[pick & ~on_front],
            s=38,
            color=colour,
            marker=marker,
            alpha=0.55,
            edgecolors="white",
            linewidths=0.6,
            zorder=3,
        )
        ax.scatter(
            x[pick & on_front],
            y[pick & on_front],
            s=70,
            color=colour,
            marker=marker,
            edgecolors="black",
            linewidths=1.2,
            zorder=4,
        )
    steps = pareto.frontier_steps(list(signed_y), list(signed_x))
    if steps:
        fx = [c if lower_x_better else -c for c, _ in steps]
        fy = [m if maximise else -m for _, m in steps]
        ax.step(fx, fy, where="post", color="#222", linewidth=1.1, linestyle="--", alpha=0.8, zorder=2)
    if shown.any():
        ax.margins(x=0.18, y=0.22)
    if log_x:
        ax.set_xscale("log")
    elif shown.any():
        ax.set_xlim(left=0)  # memory and throughput from zero, so that lengths compare as ratios
    metric = frame["metric_name"].dropna().iloc[0] if frame["metric_name"].notna().any() else "metric"
    ax.set_title("average over tasks (GLUE-style)" if scope == AVERAGE else plain(scope))
    ax.set_xlabel(x_label + ("  (lower is better)" if lower_x_better else "  (higher is better)"))
    ax.set_ylabel(metric.replace("_", " ") + ("" if maximise else "  (lower is better)"))
    _missing_note(ax, frame, shown)
    labels = [plain(m) for m in frame["method"]]
    return x[shown], y[shown], [labels[i] for i in np.flatnonzero(shown)], on_front[shown]


def _family_legend(fig, families) -> None:
    handles = [
        plt.Line2D([], [], linestyle="none", marker=FAMILY_STYLE[f][1], color=FAMILY_STYLE[f][0], markersize=7, label=f)
        for f in FAMILY_STYLE
        if f in families
    ]
    handles += [
        plt.Line2D(
            [],
            [],
            linestyle="none",
            marker="o",
            markerfacecolor="white",
            markeredgecolor="black",
            markeredgewidth=1.2,
            markersize=8,
            label="on the Pareto frontier",
        ),
        plt.Line2D([], [], color="#222", linestyle="--", linewidth=1.1, label="frontier"),
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, 1.0))


def breakdown_panel(ax, task: str, frame: pd.DataFrame) -> None:
    has_figures = frame[[label for label, _ in BREAKDOWN]].notna().any(axis=1).to_numpy()
    _missing_note(ax, frame, has_figures, "no figures")
    frame = frame[has_figures]
    if not len(frame):
        ax.text(0.5, 0.5, "no memory figures", transform=ax.transAxes, ha="center", color="#888")
        ax.set_title(plain(task))
        return
    parts = frame[[label for label, _ in BREAKDOWN]].fillna(0).to_numpy(dtype=float)
    scale, unit = byte_unit(parts.sum(axis=1))
    parts = parts / scale
    rows = np.arange(len(frame))[::-1]  # first method on top
    left = np.zeros(len(frame))
    for (label, _), colour, values in zip(BREAKDOWN, BREAKDOWN_COLOURS, parts.T):
        ax.barh(rows, values, left=left, color=colour, height=0.62, label=label, edgecolor="white", linewidth=0.5)
        left += values
    measured = frame["peak_source"].fillna("").str.contains("CUDA|NVML").to_numpy()
    if measured.any():
        ax.scatter(
            frame["peak_bytes"].to_numpy(dtype=float)[measured] / scale,
            rows[measured],
            marker="D",
            color="black",
            s=22,
            zorder=4,
            label="device-measured peak",
        )
    for row, total in zip(rows, left):
        ax.annotate(
            f"{total:,.0f}",
            (total, row),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            color="#444",
        )
    ax.set_yticks(rows, [plain(m) for m in frame["method"]])
    ax.set_xlabel(f"{unit} per training step")
    ax.set_title(plain(task))
    ax.grid(axis="y", visible=False)
    ax.margins(x=0.12)


def draw(summary: Summary, out_dir: Path) -> dict[str, str]:
    """Write every figure as PNG and SVG into out_dir; {name: title}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scopes = panels(summary)
    families = set(summary.per_task["family"])
    written = {}
    with plt.rc_context(STYLE):
        for name, (x_column, x_label, lower_better, log_x) in PLOTS.items():
            fig, axes = _grid(len(scopes))
            points = [
                scatter_panel(ax, scope, frame.reset_index(drop=True), x_column, x_label, lower_better, log_x)
                for ax, (scope, frame) in zip(axes, scopes)
            ]
            _family_legend(fig, families)
            for ax, panel_points in zip(
                axes, points
            ):  # once limits are final, so overlaps are judged where they end up
                _place_labels(ax, *panel_points)
            _save(fig, out_dir / name)
            written[name] = TITLES[name]
        tasks = [(s, f) for s, f in scopes if s != AVERAGE]
        longest = max(len(str(m)) for _, f in tasks for m in f["method"])
        margin = 0.3 + 0.075 * longest  # room for the method names on the y axis
        fig, axes = _grid(
            len(tasks), ax_w=4.0, ax_h=0.2 + 0.36 * max(len(f) for _, f in tasks), left=margin, gap_w=margin + 0.3
        )
        for ax, (task, frame) in zip(axes, tasks):
            breakdown_panel(ax, task, frame.reset_index(drop=True))
        legend = {}
        for ax in axes:  # a panel may lack a part (no device-measured peak, no figures at all)
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        if legend:
            fig.legend(
                legend.values(),
                legend.keys(),
                loc="upper center",
                ncol=len(legend),
                frameon=False,
                bbox_to_anchor=(0.5, 1.0),
            )
        _save(fig, out_dir / "memory_breakdown")
        written["memory_breakdown"] = TITLES["memory_breakdown"]
    if draw_sweeps(summary.sweeps, out_dir):
        written["sweeps"] = TITLES["sweeps"]
    return written


def sweep_panel(ax, task: str, entry: str, key: str, points: pd.DataFrame) -> None:
    """Mean dev score (+- std over seeds) against one swept key's values; points that agree on the other swept
    keys are joined, so a grid over two keys draws one line per value of the other."""
    values = [p[key] for p in points["point"]]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    order = sorted(set(values)) if numeric else list(dict.fromkeys(map(str, values)))
    position = {v: (v if numeric else i) for i, v in enumerate(order)}

    def x(point: dict):
        return position[point[key] if numeric else str(point[key])]

    others = [tuple((k, str(v)) for k, v in p.items() if k != key) for p in points["point"]]
    for rest in dict.fromkeys(others):
        line = points[[o == rest for o in others]]
        xs = [x(p) for p in line["point"]]
        order_in_line = np.argsort(xs)
        label = ", ".join(f"{k}={v}" for k, v in rest) or None
        ax.errorbar(
            np.array(xs)[order_in_line],
            line["dev_mean"].to_numpy()[order_in_line],
            yerr=line["dev_std"].fillna(0).to_numpy()[order_in_line],
            marker="o",
            ms=4,
            capsize=2,
            label=plain(label) if label else None,
        )
    chosen = points[points["selected"]]
    for p, y in zip(chosen["point"], chosen["dev_mean"]):
        ax.scatter([x(p)], [y], s=120, facecolors="none", edgecolors="black")
    if numeric and min(order) > 0 and max(order) / min(order) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(order)), [plain(v) for v in order])
    ax.set_xlabel(plain(key))
    ax.set_ylabel(plain(f"dev {points['metric_name'].iloc[0]}"))
    ax.set_title(plain(f"{task}: {entry}"))
    if len(dict.fromkeys(others)) > 1:
        ax.legend(fontsize=7, frameon=False)


def draw_sweeps(sweeps: pd.DataFrame, out_dir: Path) -> bool:
    """The sweeps figure, one panel per task, swept entry and key; False (nothing written) when nothing was swept."""
    panels_ = [
        (task, entry, key, points.reset_index(drop=True))
        for (task, entry), points in sweeps.groupby(["task", "entry"], sort=False)
        for key in points["point"].iloc[0]
    ]
    if not panels_:
        return False
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(panels_))
        for ax, panel in zip(axes, panels_):
            sweep_panel(ax, *panel)
        _save(fig, out_dir / "sweeps")
    return True


def _save(fig, stem: Path) -> None:
    fig.savefig(stem.with_suffix(".png"), dpi=130, metadata={"Software": None})
    fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None, "Creator": None})
    plt.close(fig)
