"""Shared helpers: machine description, result files, tables, statistics, composing nnctl configs.

Every benchmark runs its contenders interleaved in one process run and reports ratios of medians over repeats, so
that load from other processes on a shared CPU hits all contenders alike. Absolute times are printed for context
only; goals are judged on ratios (except the startup goal, which is an absolute budget by definition).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
CONFIG_DIR = ROOT / "configs"
PYTHON = sys.executable


def nnctl_command() -> list[str]:
    """The installed `nnctl` console script next to this interpreter, else `python -m nnctl`."""
    script = Path(PYTHON).with_name("nnctl")
    return [str(script)] if script.is_file() else [PYTHON, "-m", "nnctl"]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "nproc": cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def command_line() -> str:
    """How this benchmark was started, as a copy-pasteable command."""
    module = sys.modules["__main__"].__spec__
    head = f"python -m {module.name}" if module is not None else f"python {sys.argv[0]}"
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])


def write_result(name: str, result: dict[str, Any]) -> Path:
    """bench/results/<name>.json with the machine, the command and a timestamp added."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "command": command_line(), "machine": machine_info(),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (first column left, the rest right)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "-" if v is None else str(v)


def verdict(met: bool | None) -> str:
    return {True: "MET", False: "MISSED", None: "SKIPPED"}[met]


def compose(overrides: Sequence[str], config_name: str = "train"):
    """The config `nnctl <config_name> <overrides>` would run, composed with Hydra's compose API.

    `paths.run_dir` is `${hydra:runtime.output_dir}` in a real run; callers must override it, because no Hydra
    runtime exists here to resolve it.
    """
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def run_timed(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path = ROOT,
              timeout: float | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command to completion with output captured; (wall seconds, completed process)."""
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - start, proc


def run_in_terminal(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path = ROOT,
                    timeout: float | None = None, columns: int = 120) -> tuple[float, int, str, float]:
    """Run a command attached to a pseudo-terminal, as a user at a terminal would (progress bars on).

    Returns (wall seconds, exit code, the last 20k characters of the output, CPU seconds (user + system) of the
    process and the children it waited for). The output is drained as it comes, so a chatty progress bar never
    blocks on a full pipe.
    """
    import pty
    import select

    env = dict(os.environ if env is None else env, COLUMNS=str(columns), LINES="40")
    env.setdefault("TERM", "xterm-256color")
    master, slave = pty.openpty()
    try:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    except (ImportError, OSError):
        pass
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    tail = bytearray()
    deadline = None if timeout is None else start + timeout
    try:
        while True:
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.perf_counter()))
            ready, _, _ = select.select([master], [], [], wait)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    break
                tail += chunk
                del tail[:-20_000]
            elif deadline is not None and time.perf_counter() >= deadline:
                proc.kill()
                raise subprocess.TimeoutExpired(list(cmd), timeout)
        _, status, usage = os.wait4(proc.pid, 0)
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return time.perf_counter() - start, code, tail.decode(errors="replace"), cpu


def interleaved(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each contender once per repeat, alternating the order (ABBA...) so drift in machine load cancels."""
    names = list(contenders)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(contenders[n]())
    return out


def base_parser(doc: str | None):
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats/epochs: checks the script, noisy numbers")
    return parser
