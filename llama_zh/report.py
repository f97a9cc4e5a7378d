"""`python -m llama_zh.report <sweep dir>` (or `<run dir> ...`): one table and one plot comparing the
jobs of a multirun, from the files each job leaves behind (no W&B server needed).

A sweep's jobs each write `metrics.csv`, `.hydra/overrides.yaml` and `.hydra/config.yaml` into their own
directory and none knows the others, so nothing compares them at the end. This reads them all and
writes into the sweep directory:

- `report.md` and `report.csv`: one row per job with the overrides that differ between jobs, final and
  best val loss (and the step of the best), final train loss, median tokens/s, peak memory, steps
  logged, and whether the run finished (it wrote `checkpoints/final`);
- `report.png`: the train and val loss curves of every job, labelled by those overrides.

Each file is written under a temporary name and renamed, so a report is either the old one or the new.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llama_zh.atomic import write_with
from llama_zh.errors import LlamaZhError

METRICS_FILE = "metrics.csv"  # written by the CSV logger of llama_zh.tracking

# What a job's row shows, from its metrics.csv: (CSV column, Markdown title, Markdown format).
COLUMNS: list[tuple[str, str, str]] = [
    ("status", "status", "s"),
    ("steps", "steps", "d"),
    ("final_val_loss", "final val loss", ".4f"),
    ("best_val_loss", "best val loss", ".4f"),
    ("best_val_step", "best at step", "d"),
    ("final_train_loss", "final train loss", ".4f"),
    ("tokens_per_s", "tokens/s (median)", ".0f"),
    ("peak_memory_gib", "peak memory GiB", ".3f"),
    ("planned_memory_gib", "planned GiB", ".3f"),
]


class ReportError(LlamaZhError):
    pass


@dataclass
class Job:
    """One run directory: its overrides as typed on the command line, and its metrics.csv rows."""

    path: Path
    name: str
    overrides: dict[str, str]
    rows: list[dict[str, float]] = field(default_factory=list)
    has_metrics: bool = True

    @property
    def finished(self) -> bool:
        # The training stages write the final native checkpoint last, atomically.
        return (self.path / "checkpoints" / "final").is_dir()

    def series(self, column: str) -> list[tuple[int, float]]:
        """(step, value) of every row that logged `column`, in step order."""
        points = [(int(r["step"]), r[column]) for r in self.rows if column in r]
        return sorted(points, key=lambda p: p[0])


# ------------------------------------------------------------------------------------------- reading


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a metrics.csv as {column: value}, empty cells left out (each row holds what was
    logged at that step). Anything but numbers under a header with a `step` column is refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not UTF-8 text (byte {e.start})") from e
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if not header or not any(header):
            raise ReportError(f"{path}: empty; expected a header line naming step, train/loss, val/loss, ...")
        if "step" not in header:
            raise ReportError(f"{path}:1: no 'step' column in the header (columns: {', '.join(header)})")
        rows = [_parse_row(path, reader.line_num, header, cells) for cells in reader if cells]
    except csv.Error as e:
        raise ReportError(f"{path}:{reader.line_num}: not CSV ({e})") from e
    return rows


def _parse_row(path: Path, line: int, header: list[str], cells: list[str]) -> dict[str, float]:
    if len(cells) != len(header):
        raise ReportError(f"{path}:{line}: {len(cells)} fields, the header has {len(header)}")
    row: dict[str, float] = {}
    for name, cell in zip(header, cells, strict=False):
        if cell == "":
            continue
        try:
            row[name] = float(cell)
        except ValueError:
            raise ReportError(f"{path}:{line}: column {name!r}: {cell!r} is not a number") from None
    step = row.get("step")
    if step is None or not math.isfinite(step) or step < 0 or not step.is_integer():
        raise ReportError(f"{path}:{line}: step {cells[header.index('step')]!r} is not a step number")
    return row


def read_overrides(run: Path) -> dict[str, str]:
    """{key: value} of the job's command-line overrides (`+`/`++` prefixes dropped; `~key` deletes)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(items, list):
        raise ReportError(f"{path}: expected a list of key=value overrides, found {type(items).__name__}")
    overrides: dict[str, str] = {}
    for item in items:
        text = str(item)
        if text.startswith("~"):
            overrides[text[1:].split("=", 1)[0]] = "(deleted)"
            continue
        key, _, value = text.lstrip("+").partition("=")
        overrides[key] = value
    return overrides


def config_value(run: Path, key: str) -> str | None:
    """What a job that did not override `key` ran with: its resolved config's value, or the option of
    a config group (`model=tiny`), from the files Hydra wrote into `.hydra/`."""
    for name, prefix in (("config.yaml", ()), ("hydra.yaml", ("hydra", "runtime", "choices"))):
        path = run / ".hydra" / name
        if not path.is_file():
            continue
        try:
            node = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        for part in (*prefix, *([key] if prefix else key.split("."))):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, (dict, list)):
            return str(node)
    return None


def _is_run(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or (path / ".hydra").is_dir()


def _job_order(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def find_runs(dirs: list[Path]) -> list[Path]:
    """The run directories to compare: a sweep directory's jobs (its subdirectories that hold a
    metrics.csv or a `.hydra/`, in job-number order), or the run directories given."""
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d}: no such directory")
    if len(dirs) == 1 and not _is_run(dirs[0]):
        runs = sorted((p for p in dirs[0].iterdir() if p.is_dir() and _is_run(p)), key=_job_order)
        if not runs:
            raise ReportError(
                f"{dirs[0]}: no jobs (no subdirectory with a {METRICS_FILE} or a .hydra/); "
                "expected a sweep directory such as outputs/multirun/pretrain/<date_time>"
            )
        if not any((r / METRICS_FILE).is_file() for r in runs):
            raise ReportError(f"{runs[0] / METRICS_FILE}: missing, and so is every other job's: nothing to compare")
        return runs
    for d in dirs:
        if not (d / METRICS_FILE).is_file():
            raise ReportError(f"{d / METRICS_FILE}: missing; expected a run directory of llama_zh")
    return list(dirs)


def load_jobs(runs: list[Path]) -> list[Job]:
    """A sweep's job that has no metrics.csv yet (it failed before logging, or has not started) stays
    in the table as incomplete: the others are still worth comparing."""
    names = [r.name for r in runs]
    unique = len(set(names)) == len(names)
    jobs = []
    for run in runs:
        metrics = run / METRICS_FILE
        has_metrics = metrics.is_file()
        jobs.append(
            Job(
                run,
                run.name if unique else str(run),
                read_overrides(run),
                read_metrics(metrics) if has_metrics else [],
                has_metrics,
            )
        )
    return jobs


# ------------------------------------------------------------------------------------------ comparing


def differing_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value is not the same in every job (absent counts as a value), in the order
    they were first given."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def override_values(jobs: list[Job], keys: list[str]) -> list[dict[str, str]]:
    return [
        {k: job.overrides[k] if k in job.overrides else config_value(job.path, k) or "(default)" for k in keys}
        for job in jobs
    ]


def summarize(job: Job) -> dict:
    """The job's numbers: None where its metrics.csv logged nothing for them."""
    val = job.series("val/loss")
    finite_val = [p for p in val if math.isfinite(p[1])]
    best = min(finite_val, key=lambda p: p[1]) if finite_val else None  # ties: the earliest step
    train = job.series("train/loss")
    speed = [v for _, v in job.series("train/tokens_per_s") if math.isfinite(v)]
    measured = [v for _, v in job.series("memory/measured_gib")]
    planned = [v for _, v in job.series("memory/planned_gib")]
    status = "finished" if job.finished else "incomplete" if job.has_metrics else f"incomplete (no {METRICS_FILE})"
    return {
        "status": status,
        # Lightning logs each row at the 0-based index of the optimizer step it follows.
        "steps": max(int(r["step"]) for r in job.rows) + 1 if job.rows else 0,
        "final_val_loss": val[-1][1] if val else None,
        "best_val_loss": best[1] if best else None,
        "best_val_step": best[0] if best else None,
        "final_train_loss": train[-1][1] if train else None,
        "tokens_per_s": statistics.median(speed) if speed else None,
        "peak_memory_gib": max(measured) if measured else None,
        "planned_memory_gib": max(planned) if planned else None,
    }


@dataclass
class Report:
    jobs: list[Job]
    keys: list[str]  # the overrides that differ between jobs
    values: list[dict[str, str]]  # per job: key -> value
    summaries: list[dict]

    @classmethod
    def of(cls, jobs: list[Job]) -> Report:
        keys = differing_keys(jobs)
        return cls(jobs, keys, override_values(jobs, keys), [summarize(j) for j in jobs])

    def label(self, i: int) -> str:
        """A job's name in the plot's legend: its number and what sets it apart."""
        overrides = ", ".join(f"{k}={v}" for k, v in self.values[i].items())
        return f"{self.jobs[i].name}: {overrides}" if overrides else self.jobs[i].name

    def common(self) -> list[str]:
        """The overrides every job shares (printed once, above the table)."""
        return [
            f"{k}={v}"
            for k, v in self.jobs[0].overrides.items()
            if k not in self.keys and all(j.overrides.get(k) == v for j in self.jobs)
        ]

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["job", *self.keys, *(c for c, _, _ in COLUMNS), "path"])
        for job, values, summary in zip(self.jobs, self.values, self.summaries, strict=False):
            cells = ["" if summary[c] is None else summary[c] for c, _, _ in COLUMNS]
            writer.writerow([job.name, *(values[k] for k in self.keys), *cells, str(job.path)])
        return out.getvalue()

    def markdown(self, plot_note: str) -> str:
        header = ["job", *self.keys, *(title for _, title, _ in COLUMNS)]
        rows = [
            [job.name, *(values[k] for k in self.keys), *(_format(summary[c], fmt) for c, _, fmt in COLUMNS)]
            for job, values, summary in zip(self.jobs, self.values, self.summaries, strict=False)
        ]
        lines = [f"# Comparison of {len(self.jobs)} job{'s' if len(self.jobs) != 1 else ''}", ""]
        if self.common():
            lines += ["Every job: " + " ".join(f"`{o}`" for o in self.common()), ""]
        lines += [_markdown_table(header, rows), "", plot_note, ""]
        return "\n".join(lines)


def _format(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, fmt)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    cells = [[c.replace("|", "\\|") for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plotting


def plot_losses(report: Report):
    """A matplotlib Figure: train loss (left) and val loss (right) against the step, one colour per
    job on both. Built without pyplot, on the Agg canvas, so it needs no display and leaves the
    caller's matplotlib backend alone. Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_train, ax_val = fig.subplots(1, 2)
    for i, job in enumerate(report.jobs):
        colour = f"C{i % 10}"
        style = "-" if i < 10 else "--"  # the colour cycle has ten
        for ax, column, marker in ((ax_train, "train/loss", None), (ax_val, "val/loss", "o")):
            points = job.series(column)
            if points:
                ax.plot(
                    [s for s, _ in points],
                    [v for _, v in points],
                    style,
                    color=colour,
                    marker=marker,
                    markersize=3,
                    label=report.label(i),
                )
    for ax, column in ((ax_train, "train/loss"), (ax_val, "val/loss")):
        ax.set_title(column.replace("/", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no job logged {column}", transform=ax.transAxes, ha="center", color="grey")
    return fig


# -------------------------------------------------------------------------------------------- writing


def write_report(report: Report, out_dir: Path) -> tuple[list[Path], str | None]:
    """Writes report.csv, report.png (if matplotlib is installed) and report.md into `out_dir`; returns
    the files written and, when the plot could not be made, the one line that says why."""
    written = []
    csv_path, md_path, png_path = out_dir / "report.csv", out_dir / "report.md", out_dir / "report.png"
    write_with(csv_path, lambda p: p.write_text(report.csv_text(), encoding="utf-8"))
    written.append(csv_path)
    try:
        fig = plot_losses(report)
    except ImportError:
        missing = f"{png_path.name}: not written, the plot needs matplotlib (pip install matplotlib)"
        note = "No plot: it needs matplotlib (`pip install matplotlib`)."
    else:
        write_with(png_path, lambda p: fig.savefig(p, format="png", dpi=120))
        written.append(png_path)
        missing, note = None, f"![train and val loss of every job]({png_path.name})"
    write_with(md_path, lambda p: p.write_text(report.markdown(note), encoding="utf-8"))
    written.append(md_path)
    return written, missing


def default_output(dirs: list[Path], runs: list[Path]) -> Path:
    """The sweep directory; for run directories given one by one, their common parent (the run
    directory itself when there is one)."""
    if len(dirs) == 1:
        return dirs[0]
    return Path(os.path.commonpath([r.resolve() for r in runs]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_zh.report",
        description="Compare the jobs of a multirun: report.md, report.csv and report.png in the sweep directory.",
    )
    parser.add_argument(
        "dirs",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="a sweep directory (outputs/multirun/<stage>/<date_time>), or run directories",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="where to write the report (default: the sweep directory, or the run directories' common parent)",
    )
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.dirs)
        report = Report.of(load_jobs(runs))
        out_dir = args.output or default_output(args.dirs, runs)
        if not out_dir.is_dir():
            raise ReportError(f"{out_dir}: no such directory (--output)")
        written, missing = write_report(report, out_dir)
    except ReportError as e:
        print(f"llama_zh.report: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"llama_zh.report: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    for job in report.jobs:
        if not job.has_metrics:
            print(f"{job.path / METRICS_FILE}: missing; the job is listed as incomplete", file=sys.stderr)
    if missing:
        print(missing, file=sys.stderr)
    print(report.markdown("").rstrip())
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
