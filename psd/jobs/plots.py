"""Training-curve plots from metric records; matplotlib is imported only when plotting."""
from __future__ import annotations

from pathlib import Path


def _lines(records: list[dict], x: str, ys: list[str]) -> dict[tuple, tuple[list, list]]:
    """Group points by (series, y key), keeping only records that have both coordinates."""
    lines: dict[tuple, tuple[list, list]] = {}
    for rec in records:
        if x not in rec:
            continue
        for y in ys:
            if y in rec and rec[y] is not None:
                xs, vs = lines.setdefault((rec.get("series"), y), ([], []))
                xs.append(rec[x])
                vs.append(rec[y])
    return lines


def plot_curves(records: list[dict], x: str, ys: list[str], path, title: str = "",
                kind: str = "line", xscale: str = "linear", yscale: str = "linear") -> Path:
    """Write a PNG with one line per y key, and per ``series`` when records carry one.

    Records missing ``x`` or a y key are skipped for that line, so mixed records (a
    global evaluation next to per-worker ones) can be passed in as they were reported.
    ``kind="scatter"`` draws points instead of lines; ``xscale``/``yscale`` are
    matplotlib scales (``"log"``; ``"symlog"`` is linear within 1 of zero, so zeros show).
    """
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global figure state in a daemon

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    lines = _lines(records, x, ys)
    for (series, y), (xs, vs) in sorted(lines.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        pts = sorted(zip(xs, vs), key=lambda p: p[0])
        label = y if series is None else (str(series) if len(ys) == 1 else f"{series} {y}")
        if kind == "scatter":
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, alpha=0.5, label=label)
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
    if xscale != "linear":
        ax.set_xscale(xscale, **({"linthresh": 1.0} if xscale == "symlog" else {}))
    if yscale != "linear":
        ax.set_yscale(yscale, **({"linthresh": 1.0} if yscale == "symlog" else {}))
    ax.set_xlabel(x)
    ax.set_ylabel(ys[0] if len(ys) == 1 else "value")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
