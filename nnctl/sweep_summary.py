"""A ranked table of the jobs of a sweep (or the trials of a tune study), built from their run dirs on disk.

Every job dir holds `.hydra/overrides.yaml` (what the user set) and `.hydra/config.yaml`; a finished job adds
`metrics.json`, a failed one `error.txt`, a pruned trial `pruned.json`. Nothing else is needed, so
`nnctl summary DIR` rebuilds the table of a finished, failed or interrupted sweep at any later time.
"""
from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from nnctl.errors import UserError

PRUNED_FILE = "pruned.json"  # written by nnctl tune into the run dir of a pruned trial
STATUS_ORDER = {"ok": 0, "pruned": 1, "incomplete": 2, "failed": 3}  # ranking: finished jobs first
COLUMNS = ("rank", "job", "status", "monitor", "test", "seconds")  # plus one column per varied override


def job_dirs(root: Path) -> list[Path]:
    """The job dirs of a sweep dir (numbered subdirs with a .hydra/ record), in job order."""
    dirs = [p for p in root.iterdir() if p.is_dir() and (p / ".hydra" / "overrides.yaml").is_file()]
    return sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def read_job(job: Path, monitor: str) -> dict[str, Any]:
    """One row: status, overrides, the best value of `monitor` (e.g. val/acc), its test counterpart, wall time."""
    overrides = [str(o) for o in (_read_yaml(job / ".hydra" / "overrides.yaml") or [])]
    metrics, pruned = _read_json(job / "metrics.json"), _read_json(job / PRUNED_FILE)
    error = job / "error.txt"
    split, _, name = monitor.partition("/")
    value = test = None
    if metrics is not None:
        status = "ok"
        value = metrics.get(split, {}).get(name)  # the val row of metrics.json is the best epoch's
        test = metrics.get("test", {}).get(name)
        end = job / "metrics.json"
    elif pruned is not None:
        status, value, end = "pruned", pruned.get("best"), job / PRUNED_FILE
    elif error.is_file():
        status, end = "failed", error
    else:
        status, end = "incomplete", max((p for p in job.rglob("*") if p.is_file()), key=_mtime, default=job)
    # wall time from the files themselves: .hydra/config.yaml is written as the job starts
    seconds = max(0.0, _mtime(end) - _mtime(job / ".hydra" / "config.yaml"))
    row = {"job": job.name, "dir": str(job), "status": status, "monitor": value, "test": test,
           "seconds": round(seconds, 1), "overrides": overrides}
    if status == "failed":
        row["error"] = next((ln for ln in error.read_text().splitlines() if ln.strip()), "")
    return row


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _monitor_of(jobs: list[Path]) -> tuple[str, str]:
    """trainer.checkpoint.monitor and mode as the jobs resolved them (metrics.json) or were configured (the first
    job that says)."""
    for job in jobs:
        metrics = _read_json(job / "metrics.json") or {}
        if isinstance(metrics.get("monitor"), str) and metrics.get("mode") in ("min", "max"):
            return metrics["monitor"], metrics["mode"]
    for job in jobs:
        cfg = _read_yaml(job / ".hydra" / "config.yaml") or {}
        ck = (cfg.get("trainer") or {}).get("checkpoint") or {}
        if isinstance(ck.get("monitor"), str) and ck.get("mode") in ("min", "max"):
            return ck["monitor"], ck["mode"]
    return "val/acc", "max"


def summarize(root: Path, jobs: list[Path] | None = None) -> dict[str, Any]:
    """The ranked summary of the job dirs under `root`: finished jobs by the monitored metric, then pruned,
    incomplete and failed ones. Raises UserError when `root` holds no jobs."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass a sweep dir (outputs/multirun/train/<date>/<time>) or "
                        "a tune study dir", key="SWEEP_DIR")
    jobs = job_dirs(root) if jobs is None else jobs
    if not jobs:
        raise UserError(f"{root} holds no job dirs (numbered dirs with .hydra/overrides.yaml); pass the dir "
                        "that nnctl train -m printed, or a tune study dir", key="SWEEP_DIR")
    monitor, mode = _monitor_of(jobs)
    rows = [read_job(job, monitor) for job in jobs]
    parsed = [dict(_split_override(o) for o in row["overrides"]) for row in rows]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    varied = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    for row, p in zip(rows, parsed):
        row["params"] = {k: p.get(k) for k in varied}
    sign = -1.0 if mode == "max" else 1.0

    def rank_key(row: dict[str, Any]) -> tuple:
        value = row["monitor"]
        return STATUS_ORDER[row["status"]], (sign * value if value is not None else float("inf")), int(
            row["job"]) if row["job"].isdigit() else 0

    rows.sort(key=rank_key)
    for i, row in enumerate(rows, start=1):
        row["rank"] = i
    best = rows[0] if rows[0]["status"] == "ok" else None
    return {"dir": str(root), "monitor": monitor, "mode": mode, "varied": varied, "jobs": rows,
            "best": best and {"job": best["job"], "dir": best["dir"], "monitor": best["monitor"],
                              "command": best_command(best["overrides"])}}


def best_command(overrides: list[str]) -> str:
    """The `nnctl train` command line that reruns a job, ready to paste."""
    return " ".join(["nnctl", "train", *(shlex.quote(o) for o in overrides if not o.startswith("hydra."))])


def write_summary(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """summary.json (everything) and summary.csv (one row per job, one column per varied override)."""
    from nnctl.reporting import write_json

    out_dir = Path(out_dir)
    write_json(out_dir / "summary.json", summary)
    path = out_dir / "summary.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS[:3], *summary["varied"], summary["monitor"], _test_name(summary), "seconds",
                         "dir"])
        for row in summary["jobs"]:
            writer.writerow([row["rank"], row["job"], row["status"], *(row["params"][k] for k in summary["varied"]),
                             _cell(row["monitor"]), _cell(row["test"]), row["seconds"], row["dir"]])
    return out_dir / "summary.json", path


def _test_name(summary: dict[str, Any]) -> str:
    return "test/" + summary["monitor"].partition("/")[2]


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _param(text: str) -> str:
    """A sampled value as a person reads it (0.6576 rather than 0.6576163631721307); the CSV/JSON keep all digits."""
    try:
        number = float(text)
    except ValueError:
        return text
    return text if number.is_integer() or len(text) <= 8 else f"{number:.4g}"


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from nnctl.reporting import console

    counts = {s: sum(r["status"] == s for r in summary["jobs"]) for s in STATUS_ORDER}
    title = (f"{summary['dir']}: {len(summary['jobs'])} job(s), ranked by {summary['monitor']} ({summary['mode']}); "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    table = Table(title=title, title_justify="left")
    headers = ("#", "job", "status", *summary["varied"], f"{summary['monitor']} (best)", _test_name(summary),
               "time (s)")
    for name in headers:  # full-width headers: override names are what tells the jobs apart
        table.add_column(name, justify="left" if name == "status" else "right", no_wrap=True, min_width=len(name))
    width = sum(len(h) + 3 for h in headers) + 12 * len(headers)
    for row in summary["jobs"]:
        status = {"ok": "ok", "pruned": "[yellow]pruned[/]", "incomplete": "[yellow]incomplete[/]",
                  "failed": "[red]failed[/]"}[row["status"]]
        table.add_row(str(row["rank"]), row["job"], status, *(_param(str(row["params"][k])) for k in summary["varied"]),
                      _short(row["monitor"]), _short(row["test"]), f"{row['seconds']:.1f}")
    console.print(table, width=max(console.width, width), crop=False)
    for row in summary["jobs"]:
        if row["status"] == "failed":
            console.print(f"  job {row['job']} failed: {row.get('error', '')}  [{row['dir']}/error.txt]",
                          markup=False, soft_wrap=True)
    if summary["best"]:
        console.print(f"best: job {summary['best']['job']} ({summary['monitor']} = {summary['best']['monitor']:.4f});"
                      " rerun it with:")
        console.print(f"  {summary['best']['command']}", markup=False, soft_wrap=True)


def report(root: Path, jobs: list[Path] | None = None) -> dict[str, Any]:
    """Build, print and write the summary of the sweep (or study) in `root`."""
    summary = summarize(root, jobs)
    print_summary(summary)
    write_summary(summary, root)
    return summary


def main(args: list[str]) -> int:
    """`nnctl summary SWEEP_DIR`: the table again, from disk (also for an interrupted sweep)."""
    from nnctl.errors import USER_ERROR_EXIT

    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: nnctl summary SWEEP_DIR   (a dir printed by nnctl train -m, or a tune study dir)",
              file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else USER_ERROR_EXIT
    root = Path(args[0]).expanduser()
    try:
        trials = root / "trials"  # a tune study keeps its trials one level down
        report(root, job_dirs(trials) if trials.is_dir() else None)
    except UserError as exc:
        print(f"nnctl summary: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0
