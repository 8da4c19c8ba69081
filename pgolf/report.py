"""`pgolf report RUN_DIR... --out report/`: a markdown table of the final metrics and PNG curves.

Plots (several runs overlaid): train loss and val_bpb, each against step and against training
wallclock; the val_bpb plots draw the entropy floor of a synthetic corpus (no model can score below
it). Runs that have not finished are plotted and listed without final scores, with their status:
failed or interrupted at step N (from their metrics), or unfinished (still running, or killed).
"""
from __future__ import annotations

from pathlib import Path

from pgolf.artifact import SIZE_LIMIT
from pgolf.options import command_parser
from pgolf.runs import Run, load_runs, new_folder

PLOTS = {  # file -> (event, metric, x axis, y label)
    "train_loss_vs_step.png": ("train", "train_loss", "step", "train loss (nats)"),
    "train_loss_vs_time.png": ("train", "train_loss", "time", "train loss (nats)"),
    "val_bpb_vs_step.png": ("val", "val_bpb", "step", "val_bpb (pre-quantization)"),
    "val_bpb_vs_time.png": ("val", "val_bpb", "time", "val_bpb (pre-quantization)"),
}
COLUMNS = ["run", "seed", "steps", "train s", "val_loss", "val_bpb", "pre-quant bpb", "round-trip bpb",
           "sliding bpb", "entropy floor", "bytes total", "headroom", "status"]


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _cell(text: str, limit: int = 90) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def table_row(run: Run) -> list[str]:
    f, floor = run.final, _fmt(run.entropy_floor, ".5f")
    if f is None:  # steps: where it stopped, or the last step it logged
        logged = run.series("train", "train_loss")[0]
        reached = (run.early_end or {}).get("step", logged[-1] if logged else None)
        return [run.run_id, str(run.seed), _fmt(reached, "d")] + ["—"] * 6 + [floor, "—", "—", _cell(run.status)]
    return [run.run_id, str(run.seed), str(f["step_stop"]), _fmt(f["train_time_ms"] / 1000, ".1f"),
            _fmt(f["val_loss"], ".5f"), _fmt(f["val_bpb"], ".5f"), _fmt(f.get("pre_quant_val_bpb"), ".5f"),
            _fmt(f.get("roundtrip_val_bpb"), ".5f"), _fmt(f.get("sliding_val_bpb"), ".5f"), floor,
            _fmt(f["bytes_total"], ","), _fmt(SIZE_LIMIT - f["bytes_total"], ","), run.status]


def markdown_table(runs: list[Run]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in runs]
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], event: str, metric: str, x_axis: str, ylabel: str, path: Path) -> int:
    """Draw one metric for every run; returns how many runs had points. Uses the Agg canvas directly,
    so no display and no global pyplot state are involved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for run in runs:
        steps, times, values = run.series(event, metric)
        if not values:
            continue
        xs = steps if x_axis == "step" else [t / 1000 for t in times]
        end = run.early_end
        label = run.label + (f" [{end['event']} at step {end.get('step', '?')}]" if end else "")
        line, = ax.plot(xs, values, marker="o" if len(values) < 20 else None, markersize=3, label=label)
        if end:  # where it stopped
            ax.plot(xs[-1:], values[-1:], marker="x", markersize=10, color=line.get_color())
        if event == "val" and run.final:  # the headline score after export, at the last step
            x = run.final["step_stop"] if x_axis == "step" else run.final["train_time_ms"] / 1000
            ax.plot([x], [run.final["val_bpb"]], marker="*", markersize=11, color=line.get_color())
        drawn += 1
    if metric == "val_bpb":
        for floor in sorted({r.entropy_floor for r in runs if r.entropy_floor is not None}):
            ax.axhline(floor, linestyle="--", color="gray", label=f"entropy floor {floor:.4f} (synthetic corpus)")
    ax.set_xlabel("step" if x_axis == "step" else "training wallclock (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{metric} vs {'step' if x_axis == 'step' else 'wallclock'}")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no '{event}' events with {metric}", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, format="png")
    return drawn


def write_report(runs: list[Run], out: str | Path) -> Path:
    """Write report.md and the PNGs into a new folder `out` (built aside, renamed into place)."""
    with new_folder(out) as tmp:
        notes = []
        for name, (event, metric, x_axis, ylabel) in PLOTS.items():
            if not plot(runs, event, metric, x_axis, ylabel, tmp / name):
                notes.append(f"- {name}: no run has `{event}` events with {metric}")
        md = ["# Run report", "", markdown_table(runs)]
        md += ["Scores in nats (val_loss) and bits per byte; val_bpb is the headline score (sliding window if run, "
               f"else the artifact round trip); headroom is against {SIZE_LIMIT:,} bytes; the entropy floor is the "
               "val_bpb no model can beat on a synthetic corpus (dashed in the val_bpb plots). In the val_bpb plots "
               "the dots are the pre-quantization validations and the star is the final headline score; a cross "
               "marks where a failed or interrupted run stopped.", ""]
        md += [f"![{name}]({name})" for name in PLOTS] + [""] + notes
        md += ["", "Runs:"] + [f"- `{r.path}`" for r in runs]
        (tmp / "report.md").write_text("\n".join(md) + "\n")
    return Path(out)


def report_command(argv: list[str]) -> int:
    parser = command_parser("pgolf report", __doc__)
    parser.add_argument("runs", nargs="+", help="run folders (runs/<run_id>/)")
    parser.add_argument("--out", default="report", help="new folder for report.md and the plots")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs, require_final=False)
    out = write_report(runs, args.out)
    print(markdown_table(runs), end="")
    print(f"wrote {out}/report.md and {len(PLOTS)} plots: {', '.join(PLOTS)}")
    return 0
