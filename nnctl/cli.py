"""`nnctl` entry point: dispatches to the Hydra apps. Imports nothing heavy, so `nnctl --help` is instant."""
from __future__ import annotations

import os
import sys

COMMANDS = {
    "train": "train a model: nnctl train [group=option ...] [key=value ...] [-m for sweeps]",
    "eval": "evaluate a checkpoint: nnctl eval ckpt=PATH [split=val] [key=value ...]",
    "tune": "search hyperparameters with Optuna: nnctl tune search=NAME [key=value ...] [study_dir=PATH]",
    "lr-find": "learning-rate range test: nnctl lr-find [group=option ...] [key=value ...]",
    "explain": "attribution maps: nnctl explain ckpt=PATH method=gradcam|integrated_gradients|saliency|occlusion",
    "summary": "ranked table of a sweep or tune study: nnctl summary SWEEP_DIR",
    "sample": "draw images from a generative checkpoint: nnctl sample ckpt=PATH [num_samples=64] [out=grid.png]",
    "export": "export a checkpoint's model: nnctl export ckpt=PATH out=DIR [merge=false] [format=checkpoint]",
    "submit": "run nnctl train as a SLURM job (submitit): nnctl submit --nodes 2 --gpus-per-node 4 -- [overrides]",
    "generate": "continue text from a language-model checkpoint: nnctl generate ckpt=PATH prompt='...'",
}
# commands that are not Hydra apps: module with main(args) -> int
PLAIN = {"summary": "nnctl.sweep_summary", "submit": "nnctl.submit"}

USAGE = """usage: nnctl <command> [overrides ...]

Config-driven deep-learning training (PyTorch + Hydra).

commands:
{commands}

Commands other than summary and submit are Hydra apps: `nnctl train --help` lists config groups and their options,
`nnctl train --cfg job` prints the composed config, `nnctl train -m key=a,b` sweeps.
Shell completion: eval "$(nnctl train --shell-completion install=bash)"
"""


def _usage() -> str:
    return USAGE.format(commands="\n".join(f"  {name:<9}{text}" for name, text in COMMANDS.items()))


def _completion_command() -> str | None:
    """For Hydra's shell completion (`nnctl -sc query=bash`): find the command in COMP_LINE and strip it."""
    words = os.environ.get("COMP_LINE", "").split()
    if len(words) >= 2 and words[1] in COMMANDS:
        line = os.environ["COMP_LINE"]
        cut = line.index(words[1]) + len(words[1])
        os.environ["COMP_LINE"] = line[: line.index(words[1])] + line[cut:].lstrip()
        point = int(os.environ.get("COMP_POINT", len(line)))
        os.environ["COMP_POINT"] = str(max(0, point - (len(line) - len(os.environ["COMP_LINE"]))))
        return words[1]
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # the reader went away (`nnctl --help | head`): stop quietly, as the shell's own tools do. stdout goes to
        # /dev/null first, or Python fails again flushing it at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # the shell's code for a process ended by SIGPIPE


def _main(args: list[str]) -> int:
    if args and args[0] in ("-sc", "--shell-completion") and any(a.startswith("query=") for a in args):
        command = _completion_command()
        if command is None:  # still typing the command name
            print(" ".join(COMMANDS))
            return 0
        args = [command, *args]
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from nnctl import __version__

        print(f"nnctl {__version__}")
        return 0
    if args[0] not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(args[0], COMMANDS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        print(f"nnctl: unknown command '{args[0]}'{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if args[0] in PLAIN:
        import importlib

        return importlib.import_module(PLAIN[args[0]]).main(args[1:])
    from nnctl.commands import run

    return run(args[0], args[1:])


if __name__ == "__main__":
    sys.exit(main())
