"""CLI start-up time: `nnctl --help` and `nnctl train --cfg job`, with `python -c "import torch"` as the floor.

Each command is run as a fresh subprocess (the installed `nnctl` console script, from the repository root, output
captured), `--repeats` times, the three commands alternating so machine load hits them alike. Reported: median
wall seconds of each, and each as a multiple of the `import torch` floor. `nnctl --help` imports nothing heavy, so
it should cost a small fraction of the floor; `nnctl train --cfg job` composes the config through Hydra and
returns before any torch work. Goal: `nnctl --help` <= 1.0 s (an absolute budget: a user waits for it).
"""
from __future__ import annotations

import time
from typing import Any

from bench._common import PYTHON, base_parser, interleaved, median, nnctl_command, run_timed, table, verdict, \
    write_result

NAME = "startup"
GOAL_S = 1.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--repeats", type=int, help="runs per command (default 5, --quick 3)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    started = time.perf_counter()
    nnctl = nnctl_command()
    commands = {
        "nnctl --help": [*nnctl, "--help"],
        "nnctl train --cfg job": [*nnctl, "train", "--cfg", "job"],
        'python -c "import torch"': [PYTHON, "-c", "import torch"],
    }

    def timer(cmd: list[str]):
        def run() -> float:
            seconds, proc = run_timed(cmd)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            return seconds
        return run

    for cmd in commands.values():  # warm the file cache (first-run .pyc compilation is not start-up time)
        timer(cmd)()
    times = interleaved({name: timer(cmd) for name, cmd in commands.items()}, repeats)
    med = {k: median(v) for k, v in times.items()}
    floor = med['python -c "import torch"']
    rows = [(k, med[k], min(v), max(v), med[k] / floor) for k, v in times.items()]
    text = table(["command", "median s", "min s", "max s", "x import torch"], rows)
    print(text)
    met = med["nnctl --help"] <= GOAL_S
    goal = f"nnctl --help <= {GOAL_S:.1f} s (median of {repeats})"
    print(f"goal: {goal}: {verdict(met)}")
    result = {"goal": goal, "met": met, "quick": args.quick, "repeats": repeats, "table": text, "median_s": med, "all_s": times,
              "ratio_to_import_torch": {k: v / floor for k, v in med.items()},
              "seconds": round(time.perf_counter() - started, 1),
              "headline": f"--help {med['nnctl --help']:.2f}s, train --cfg job {med['nnctl train --cfg job']:.2f}s, "
                          f"import torch {floor:.2f}s"}
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
