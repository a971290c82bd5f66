"""User mistakes as one line: every error a user can cause becomes "nnctl <command>: error: <key or file>: <what is
wrong>; <fix>" (exit 2, printed by nnctl.commands.run); anything not recognised is a programming error and keeps its
traceback. Unknown keys and options get a "did you mean" from the config tree."""
from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from nnctl.commands import CONFIG_DIR, EVAL_PATCHABLE, GROUPS
from nnctl.errors import UserError, one_line


def user_message(exc: BaseException, command: str | None = None) -> str | None:
    """One line for a mistake the user can fix, or None for a programming error (which keeps its traceback).

    `command` (train/eval) and the command line are taken from the enclosing `run()` call when not given.
    """
    context = _run_context()
    message = _user_message(exc, command or context[0], context[1])
    return None if message is None else one_line(message)


def _run_context() -> tuple[str | None, list[str] | None]:
    """(command, override args) of the `run()` call on the stack; (None, None) when called from elsewhere."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "run" and frame.f_globals.get("__name__") == "nnctl.commands":
            args = frame.f_locals.get("args")
            return frame.f_locals.get("command"), list(args) if isinstance(args, (list, tuple)) else None
        frame = frame.f_back
    return None, None


def _user_message(exc: BaseException | None, command: str | None, args: list[str] | None) -> str | None:
    from hydra.errors import (ConfigCompositionException, HydraException, InstantiationException,
                              MissingConfigException, OverrideParseException)
    from omegaconf.errors import OmegaConfBaseException

    seen = set()
    while exc is not None and id(exc) not in seen:  # user errors raised inside constructors come wrapped
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return str(exc)
        if isinstance(exc, BrokenPipeError):  # the output's reader went away (`| head`): the CLI stops quietly
            return None
        if isinstance(exc, OverrideParseException):
            return _override_message(exc)
        if isinstance(exc, (MissingConfigException, ConfigCompositionException)):
            return _hydra_message(str(exc), exc, command, args)
        if isinstance(exc, OmegaConfBaseException):
            return _omegaconf_message(exc, command, args)
        if isinstance(exc, OSError) and _frames(exc, lambda path, func: f"{os.sep}hydra{os.sep}" in path):
            return _output_dir_message(exc)  # Hydra creating the run dir / its .hydra files / the log file
        if isinstance(exc, ValueError) and _frames(exc, lambda path, func: path.endswith("defaults_list.py")
                                                   and func == "__init__"):
            return f"bad override: {_first_line(str(exc))}; write group=option or key=value"
        if isinstance(exc, InstantiationException) and isinstance(exc.__cause__, TypeError):
            return f"{_first_line(str(exc.__cause__))}; check the keys of the config group that builds it"
        if isinstance(exc, InstantiationException) or (isinstance(exc, HydraException) and exc.__cause__):
            exc = exc.__cause__
            continue
        return None
    return None


def _frames(exc: BaseException, match: Callable[[str, str], bool]) -> bool:
    """Whether any frame of the exception's traceback matches (file path, function name)."""
    tb = exc.__traceback__
    while tb is not None:
        if match(tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name):
            return True
        tb = tb.tb_next
    return False


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _output_dir_message(exc: OSError) -> str:
    where = f"{exc.filename}" if exc.filename else "the run dir"
    return (f"paths.output_dir: cannot create {where} ({exc.strerror or type(exc).__name__}); set "
            "paths.output_dir (or paths.root_dir / NNCTL_ROOT) to a writable directory")


def _override_message(exc: Any) -> str:
    override = getattr(exc, "override", "") or ""
    details = [line.strip() for line in str(getattr(exc, "message", exc)).splitlines()
               if line.strip() and not line.strip().startswith(("See https://", "Error parsing override"))]
    detail = "; ".join(details) or "cannot parse it"
    detail = detail.replace("missing EQUAL at '<EOF>'", "no '=' in it")
    return (f"bad override '{override}': {detail}; write key=value or group=option, lists as key=[1,2], and quote "
            "values with spaces or brackets, e.g. 'key=\"a b\"'")


def _hydra_message(text: str, exc: BaseException, command: str | None = None,
                   args: list[str] | None = None) -> str:
    m = re.search(r"Could not (?:find|load) '([^']*/[^'/]*)'", text)  # load: an option in a list, logger=[a,b]
    if m:
        group, option = m.group(1).rsplit("/", 1)
        options = _options(group)
        if not options:
            return f"{group}: no such config group; groups: {', '.join(_groups())}"
        choose = f"choose one of {', '.join(options)}"
        if not option:
            return f"{group}=: no option given; {choose}"
        return f"{group}={option}: unknown option{_did_you_mean(option, options)}; {choose}"
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        return _unknown_key_message(m.group(1), command)
    m = re.search(r"Could not append to config\. An item is already at '([^']+)'", text)
    if m:
        return f"{m.group(1)}: already in the config; set it without the + prefix: {m.group(1)}=..."
    m = re.search(r"Could not delete from config\. '([^']+)' does not exist", text)
    if m:
        return _unknown_key_message(m.group(1), command, action="delete")
    m = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if m:
        return (f"'{m.group(1)}': a comma makes this a sweep; add -m to sweep over the values, write key=[a,b] for "
                "a list, or quote it as key='a,b' for a string")
    cause = exc.__cause__
    if isinstance(cause, BaseException) and cause is not exc:
        inner = _user_message(cause, command, args)
        if inner:
            return inner
    return _first_line(text)


def _omegaconf_message(exc: Any, command: str | None = None, args: list[str] | None = None) -> str | None:
    """OmegaConf errors: user errors when they come from the config or the command line; None (a bug) when code
    asks for a key nobody mentioned."""
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, GrammarParseError, InterpolationResolutionError,
                                  MissingMandatoryValue)

    key = getattr(exc, "full_key", None) or ""
    text = _first_line(str(exc))
    if isinstance(exc, MissingMandatoryValue):
        return f"{key}: a value is required; pass {key}=..."
    if isinstance(exc, (InterpolationResolutionError, GrammarParseError)):
        return f"{key}: {text}; check the ${{...}} interpolation in its value" if key else text
    mention = _mentioned(key, args) if key else None
    if args is not None and mention is None:
        return None  # code asked the config for something the user never touched: a programming error
    if mention is not None and mention.startswith("~"):
        return f"{key}: nnctl needs this key; drop '{mention}'"
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)) and key:
        return _unknown_key_message(key, command)
    return f"{key}: {text}" if key else text


def _mentioned(key: str, args: list[str] | None) -> str | None:
    """The command-line override that touches `key` (the key itself, a parent or a child), if any."""
    for arg in args or []:
        name = arg.split("=", 1)[0].lstrip("+~")
        if name and (name == key or key.startswith(name + ".") or name.startswith(key + ".")):
            return arg
    return None


def _unknown_key_message(key: str, command: str | None, action: str = "override") -> str:
    root = key.split(".", 1)[0]
    if command == "eval" and root in GROUPS and root not in EVAL_PATCHABLE:
        return (f"{key}: nnctl eval rebuilds the {root} from the config stored in the checkpoint and cannot change "
                f"it; only {', '.join(p + '.*' for p in EVAL_PATCHABLE)} can be overridden")
    if "." not in key and root in GROUPS and command == "eval":
        return (f"{key}: nnctl eval uses the {key} config stored in the checkpoint; change single keys instead, "
                f"e.g. {key}.batch_size=... or {key}.root=..." if key == "data" else
                f"{key}: nnctl eval uses the {key} config stored in the checkpoint; change single keys instead, "
                f"e.g. {key}.device=cpu")
    if "." not in key and root in GROUPS:
        return (f"{key}: the config has no {key}; choose one with {key}=<option>, one of "
                f"{', '.join(_options(key))}")
    index = _key_index(command)
    if command == "eval" and key in index:
        return (f"{key}: not in the config stored with this checkpoint (written before the key existed, or by "
                "another option of its group); drop the override")
    if key in index:  # defined by another option of the same group, not by the selected one
        owners = [o for o in index[key] if "=" in o]
        if owners:
            return (f"{key}: not a key of the selected {owners[0].split('=')[0]} option; only "
                    f"{', '.join(owners)} has it: choose that option or drop the {action}")
    other = {"train": "eval", "eval": "train"}.get(command or "")
    if other and "." not in key and key in _key_index(other):
        return f"{key}: not a key of nnctl {command} (it is one of nnctl {other}); drop it"
    near = _did_you_mean(key, list(index))
    if near:
        return f"{key}: unknown key{near}"
    parent = key.rpartition(".")[0]
    siblings = {k.rpartition(".")[2] for k in index if k.rpartition(".")[0] == parent}
    if not parent:  # config groups are top-level keys too
        siblings |= {g for g in (*GROUPS, "paths") if command != "eval" or g in (*EVAL_PATCHABLE, "paths")}
    siblings = sorted(siblings)
    where = f"{parent} has" if parent else "top-level keys are"
    listing = f"; {where}: {', '.join(siblings)}" if siblings else ""
    hint = f" (to add a new key use +{key}=...)" if action == "override" else ""
    return f"{key}: unknown key{listing}{hint}"


def _did_you_mean(word: str, options: list[str]) -> str:
    near = difflib.get_close_matches(word, [o for o in options if o != word], n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _groups() -> list[str]:
    return sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*")
                  if p.is_dir() and any(p.glob("*.yaml")))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")) if (CONFIG_DIR / group).is_dir() else []


def known_keys(command: str | None = None) -> list[str]:
    """Dotted keys defined by any option of any config group, and by `command`'s root config (for suggestions)."""
    return sorted(_key_index(command))


def _key_index(command: str | None = None) -> dict[str, list[str]]:
    """Dotted key -> where it is defined ('model=mlp', or 'train.yaml' for the root config of a command)."""
    paths = []
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        rel = path.relative_to(CONFIG_DIR).parent.parts
        if rel and rel[0] in ("hydra", "experiment", "debug"):
            continue
        if not rel and command is not None and path.stem != command:
            continue  # train.yaml's keys are not keys of eval, and the other way round
        try:
            paths.append((path, path.stat().st_mtime_ns))
        except OSError:
            continue
    return {k: list(v) for k, v in _index_files(tuple(paths)).items()}


@functools.lru_cache(maxsize=8)
def _index_files(paths: tuple[tuple[Path, int], ...]) -> dict[str, tuple[str, ...]]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    index: dict[str, list[str]] = {}
    for path, _ in paths:
        rel = path.relative_to(CONFIG_DIR).parent.parts
        try:
            tree = yaml.load(path.read_text(), Loader=loader) or {}
        except (OSError, yaml.YAMLError):
            continue
        owner = f"{'/'.join(rel)}={path.stem}" if rel else path.name
        for key in _dotted(tree, ".".join(rel)):
            index.setdefault(key, []).append(owner)
    return {k: tuple(v) for k, v in index.items()}


def _dotted(tree: Any, prefix: str) -> list[str]:
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k in ("defaults",) or str(k).startswith("_"):
                continue
            name = f"{prefix}.{k}" if prefix else str(k)
            out.append(name)
            out.extend(_dotted(v, name))
    return out
