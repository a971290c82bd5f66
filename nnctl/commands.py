"""The Hydra apps behind `nnctl train` and `nnctl eval`, and the translation of user mistakes into one line."""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from nnctl.errors import USER_ERROR_EXIT, UserError

CONFIG_DIR = Path(os.environ.get("NNCTL_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))
GROUPS = ("model", "data", "objective", "optimizer", "scheduler", "precision", "adapter", "trainer")
EVAL_PATCHABLE = ("data", "trainer", "eval")

log = logging.getLogger(__name__)
JOBS: list[dict[str, Any]] = []  # one entry per job of this process (multirun summary)
FAILED: list[BaseException] = []  # a single run's exception, raised again after Hydra has finished the job


# -- task functions -----------------------------------------------------------------------------------------------
def train_task(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from nnctl.engine import Engine
    from nnctl.reporting import print_config, print_model_summary
    from nnctl.validate import validate

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    state = None
    if cfg.resume is not None:
        from nnctl.resume import resume_config

        cfg, state, run_dir = resume_config(cfg, HydraConfig.get().overrides.task, CONFIG_DIR)
    validate(cfg)
    print_config(cfg)
    engine = Engine(cfg, run_dir)
    print_model_summary(engine.model)
    if state is not None:
        engine.load_state_dict(state, full=True)
    return engine.fit()


def eval_task(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from nnctl import checkpoint as ck
    from nnctl.engine import Engine
    from nnctl.reporting import print_metrics, write_json
    from nnctl.validate import validate

    if cfg.split not in ("test", "val"):
        raise UserError(f"got {cfg.split!r}; expected test or val", key="split")
    path = ck.resolve_checkpoint(cfg.ckpt, prefer=ck.BEST)
    state = ck.load_checkpoint(path)
    stored = OmegaConf.create(state[ck.CONFIG])
    patch = {k: OmegaConf.to_container(cfg[k]) for k in EVAL_PATCHABLE if cfg[k]}
    patch.get("eval", {}).pop("tta", None) if cfg.eval.tta is None else None
    run_cfg = merge_strict(stored, patch)
    validate(run_cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    engine = Engine(run_cfg, run_dir)
    engine.load_state_dict(state, full=False)
    metrics = engine.evaluate(cfg.split)
    result = {cfg.split: {k.split("/", 1)[1]: v for k, v in metrics.items()}, "checkpoint": str(path),
              "epoch": state[ck.EPOCH], "global_step": state[ck.STEP]}
    write_json(run_dir / "metrics.json", result)
    print_metrics(f"nnctl eval: {path}", {cfg.split: result[cfg.split]})
    return result


def merge_strict(base: DictConfig, patch: dict[str, Any]) -> DictConfig:
    """Merge `patch` onto `base`, refusing keys `base` does not have (with a did-you-mean)."""
    OmegaConf.set_struct(base, True)
    return OmegaConf.merge(base, patch)


TASKS: dict[str, Callable[[DictConfig], Any]] = {"train": train_task, "eval": eval_task}


def _job(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a task so one failing job of a sweep is recorded and reported instead of ending the sweep."""

    def job(cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        entry = {"num": hc.job.get("num"), "overrides": list(hc.overrides.task), "dir": hc.runtime.output_dir}
        JOBS.append(entry)
        if hc.mode == RunMode.MULTIRUN:  # jobs share one terminal: per-epoch lines instead of live bars
            if "progress" in cfg.get("trainer", {}):
                cfg.trainer.progress = False
        try:
            entry["result"] = task(cfg)
            entry["status"] = "ok"
            return entry["result"]
        except Exception as exc:
            if type(exc).__name__ == "Interrupted":  # a signal stops the whole sweep, not just this job
                raise
            if hc.mode != RunMode.MULTIRUN:
                # Hydra would print its own banner for a failed job; we report it once run() regains control.
                FAILED.append(exc)
                return None
            message = user_message(exc) or f"{type(exc).__name__}: {exc}"
            entry.update(status="failed", error=message)
            Path(hc.runtime.output_dir, "error.txt").write_text(message + "\n\n" + traceback.format_exc())
            logging.getLogger("nnctl").error("job %s failed: %s", entry["num"], message)
            return None

    job.__module__ = task.__module__
    job.__qualname__ = task.__qualname__
    return job


# -- running a Hydra app ------------------------------------------------------------------------------------------
def _prepare_eval_args(args: list[str]) -> list[str]:
    """`nnctl eval ckpt=X data.batch_size=N`: keys under data/trainer/eval are patches onto the stored config,
    which Hydra only accepts with the force-add prefix `++`."""
    out = []
    for a in args:
        if re.match(rf"^({'|'.join(EVAL_PATCHABLE)})\.[\w.]+=", a):
            a = "++" + a
        out.append(a)
    return out


def run(command: str, args: list[str]) -> int:
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    version.setbase("1.3")

    if command == "eval":
        args = _prepare_eval_args(args)
    sys.argv = ["nnctl", *args]
    parser = get_args_parser()
    parsed = parser.parse_args(args)
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us; we decide how to print them
    JOBS.clear()
    FAILED.clear()
    try:
        _run_hydra(args=parsed, args_parser=parser, task_function=_job(TASKS[command]),
                   config_path=str(CONFIG_DIR), config_name=command)
        if FAILED:
            raise FAILED[0]
    except KeyboardInterrupt:
        print("nnctl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ == "Interrupted":  # graceful SIGINT/SIGTERM stop: last.pt saved
            print(f"nnctl {command}: {exc}", file=sys.stderr)
            return 128 + exc.signum
        message = user_message(exc)
        if message is None or full_error:
            raise
        print(f"nnctl {command}: error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT
    finally:
        if not full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    return _report_jobs()


def _report_jobs() -> int:
    failed = [j for j in JOBS if j.get("status") == "failed"]
    if len(JOBS) > 1 or failed:
        from nnctl.reporting import console

        ok = len(JOBS) - len(failed)
        console.print(f"sweep: {ok} of {len(JOBS)} job(s) finished" + (f", {len(failed)} failed:" if failed else ""))
        for j in failed:
            console.print(f"  job {j['num']} ({' '.join(j['overrides'])}): {j['error']}  [{j['dir']}/error.txt]",
                          markup=False)
    return 1 if failed else 0


# -- user errors --------------------------------------------------------------------------------------------------
def user_message(exc: BaseException) -> str | None:
    """One line for a mistake the user can fix, or None for a programming error (which keeps its traceback)."""
    from hydra.errors import (ConfigCompositionException, HydraException, InstantiationException,
                              MissingConfigException, OverrideParseException)
    from omegaconf.errors import OmegaConfBaseException

    seen = set()
    while exc is not None and id(exc) not in seen:  # user errors raised inside constructors come wrapped
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return str(exc)
        if isinstance(exc, (MissingConfigException, ConfigCompositionException, OverrideParseException)):
            return _hydra_message(str(exc), exc)
        if isinstance(exc, OmegaConfBaseException):
            return _omegaconf_message(exc)
        if isinstance(exc, InstantiationException) and isinstance(exc.__cause__, TypeError):
            return f"{_first_line(str(exc.__cause__))}; check the keys of the config group that builds it"
        if isinstance(exc, InstantiationException) or (isinstance(exc, HydraException) and exc.__cause__):
            exc = exc.__cause__
            continue
        return None
    return None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _hydra_message(text: str, exc: BaseException) -> str:
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text) or re.search(
        r"In '[^']+': Could not find '([^/']+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        return f"{group}={option}: unknown option{_did_you_mean(option, options)}; " \
               f"choose one of {', '.join(options)}"
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        return f"{key}: unknown key{_did_you_mean(key, known_keys())}; prefix with + to add a new key"
    cause = exc.__cause__
    if isinstance(cause, BaseException) and cause is not exc:
        inner = user_message(cause)
        if inner:
            return inner
    return _first_line(text)


def _omegaconf_message(exc: Any) -> str:
    key = getattr(exc, "full_key", None) or ""
    text = _first_line(str(exc))
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    if isinstance(exc, MissingMandatoryValue):
        return f"{key}: a value is required; pass {key}=..."
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)) and key:
        return f"{key}: unknown key{_did_you_mean(key, known_keys())}"
    return f"{key}: {text}" if key else text


def _did_you_mean(word: str, options: list[str]) -> str:
    near = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def known_keys() -> list[str]:
    """Dotted keys defined by any option of any config group (for suggestions)."""
    import yaml

    keys: set[str] = set()
    for path in CONFIG_DIR.rglob("*.yaml"):
        rel = path.relative_to(CONFIG_DIR).parent.parts
        if rel and rel[0] in ("hydra", "experiment", "debug"):
            continue
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        keys.update(_dotted(tree, ".".join(rel)))
    return sorted(keys)


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
