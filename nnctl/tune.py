"""`nnctl tune search=NAME`: an Optuna study driven by ask/tell, with the engine as the objective.

Each trial is an ordinary training run (checkpoints, TensorBoard, metrics.json) under `<study dir>/trials/<n>/`,
composed like `nnctl train` from the fixed overrides plus the sampled values. The engine reports the search metric
after every epoch; the pruner may stop a trial there (TrialPruned), which frees its slot for the next one. The
study lives in a journal file in the study dir, so an interrupted study continues where it stopped, and several
processes started on the same study dir share it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from nnctl.errors import TrialPruned, UserError
from nnctl.sweep_summary import PRUNED_FILE

log = logging.getLogger(__name__)
JOURNAL = "study.journal"   # Optuna's journal (the study itself), in the study dir
PRUNING_FILE = "pruning.json"  # pruned trials and the time pruning saved, in the study dir
LOCK = ".study.lock"        # serializes "count trials, then ask" across processes
STUDY = "nnctl"
TUNE_ONLY = ("search", "study_dir", "hydra.")  # command-line keys that configure the search, not the trials
DIRECTIONS = {"maximize": "max", "minimize": "min"}


# -- the search space -----------------------------------------------------------------------------------------------
def _suggest_float(trial: Any, name: str, p: dict[str, Any]) -> float:
    return trial.suggest_float(name, p["low"], p["high"], log=bool(p.get("log", False)), step=p.get("step"))


def _suggest_int(trial: Any, name: str, p: dict[str, Any]) -> int:
    return trial.suggest_int(name, p["low"], p["high"], log=bool(p.get("log", False)), step=p.get("step") or 1)


def _suggest_categorical(trial: Any, name: str, p: dict[str, Any]) -> Any:
    return trial.suggest_categorical(name, list(p["choices"]))


SUGGEST: dict[str, Callable[[Any, str, dict[str, Any]], Any]] = {
    "float": _suggest_float, "int": _suggest_int, "categorical": _suggest_categorical}


def _grid_values(name: str, p: dict[str, Any]) -> list[Any]:
    if p["type"] == "categorical":
        return list(p["choices"])
    step = p.get("step") or (1 if p["type"] == "int" else None)
    if step is None:
        raise UserError("a grid search needs a step for a float range (or type: categorical with choices)",
                        key=f"search.params.{name}")
    count = int(math.floor((p["high"] - p["low"]) / step + 1e-9)) + 1
    return [p["low"] + i * step for i in range(count)]


def _tpe(seed: int, space: dict[str, Any]) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def _random(seed: int, space: dict[str, Any]) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _grid(seed: int, space: dict[str, Any]) -> Any:
    import optuna

    return optuna.samplers.GridSampler({n: _grid_values(n, p) for n, p in space.items()}, seed=seed)


SAMPLERS: dict[str, Callable[[int, dict[str, Any]], Any]] = {"tpe": _tpe, "random": _random, "grid": _grid}


def _median(search: DictConfig) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=search.warmup_epochs)


def _halving(search: DictConfig) -> Any:
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, search.warmup_epochs))


def _no_pruning(search: DictConfig) -> Any:
    import optuna

    return optuna.pruners.NopPruner()


PRUNERS: dict[str, Callable[[DictConfig], Any]] = {"median": _median, "successive_halving": _halving,
                                                   "none": _no_pruning}


def _space(search: DictConfig) -> dict[str, dict[str, Any]]:
    space = OmegaConf.to_container(search.params, resolve=True) if search.params is not None else {}
    if not isinstance(space, dict) or not space:
        raise UserError("the search space is empty; add entries such as optimizer.lr: {type: float, low: 1e-4, "
                        "high: 1e-1, log: true}", key="search.params")
    return space


def check_space(space: dict[str, dict[str, Any]], base: DictConfig, sampler: str) -> None:
    """Every parameter names a key of the trial config (or a config group) and has a non-empty range."""
    from nnctl.commands import GROUPS
    from nnctl.user_messages import _did_you_mean, _options
    from nnctl.loggers.base import flatten

    keys = [k for k, _ in flatten(OmegaConf.to_container(base, resolve=False))]
    for name, p in space.items():
        key = f"search.params.{name}"
        if not isinstance(p, dict) or p.get("type") not in SUGGEST:
            raise UserError(f"got {p!r}; expected a mapping with type: one of {', '.join(SUGGEST)}", key=key)
        group = name.replace("/", ".") in GROUPS or "/" in name
        if group:
            options = _options(name)
            bad = [c for c in p.get("choices") or [] if c not in options]
            if p["type"] != "categorical" or bad:
                raise UserError(f"a config group takes type: categorical with choices among {', '.join(options)}"
                                + (f" (not {', '.join(map(str, bad))})" if bad else ""), key=key)
        elif OmegaConf.select(base, name, default=_ABSENT) is _ABSENT:
            raise UserError(f"not a key of the trial config{_did_you_mean(name, keys)}; parameters are config keys "
                            "such as optimizer.lr (or a group such as optimizer with categorical choices)", key=key)
        if p["type"] == "categorical":
            choices = p.get("choices")
            if not isinstance(choices, list) or not choices or not all(
                    c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                raise UserError("choices must be a non-empty list of numbers, strings or booleans", key=key)
            continue
        low, high = p.get("low"), p.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise UserError(f"low and high must be numbers (got low={low!r}, high={high!r})", key=key)
        if low >= high:
            raise UserError(f"empty range: low={low} is not below high={high}", key=key)
        if p.get("log") and low <= 0:
            raise UserError(f"a log range needs low > 0 (got low={low}); raise low or set log: false", key=key)
        if sampler == "grid":
            _grid_values(name, p)


_ABSENT = object()


def produced_metrics(cfg: DictConfig) -> set[str]:
    """The metric names a run of `cfg` logs each epoch, from one training and one validation batch of the real
    model and data (no training, nothing written)."""
    import torch

    from nnctl.engine import Engine
    from nnctl.metrics import Averages

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        engine = Engine(cfg, Path(tmp))
        batch = next(iter(engine.data.train_batches(0, engine.t.seed, 0, 1)))
        _, stats = engine.objective.training_step(engine.model, batch)
        sums = Averages()
        engine.model.eval()
        engine.objective.eval_update(engine.model, next(iter(engine.data.eval_batches("val", 1))), sums,
                                     cfg.eval.tta)
    return {"train/loss", *(f"train/{k}" for k in stats), *(f"val/{k}" for k in sums.means())}


# -- trials ---------------------------------------------------------------------------------------------------------
def trial_overrides(fixed: list[str], params: dict[str, Any]) -> list[str]:
    """The `nnctl train` overrides of one trial: the fixed part, then the sampled values."""
    return [*fixed, *(f"{name}={_format(value)}" for name, value in params.items())]


def _format(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def compose_trial(overrides: list[str], run_dir: Path) -> DictConfig:
    """The trial's config, composed from configs/train.yaml exactly as `nnctl train <overrides>` would."""
    from hydra import compose

    cfg = compose("train", overrides=[*overrides, f"paths.run_dir={run_dir}"])
    cfg.trainer.progress = False  # trials share one terminal: per-epoch lines instead of live bars
    return cfg


class Reporter:
    """Epoch hook: report the search metric to the trial, keep its best value, prune when Optuna says so."""

    def __init__(self, trial: Any, metric: str, mode: str) -> None:
        self.trial, self.metric, self.sign = trial, metric, (1.0 if mode == "max" else -1.0)
        self.history: dict[int, float] = {}
        self.epoch_seconds: list[float] = []  # wall time of each epoch, validation included: what pruning skips
        self._mark = time.perf_counter()

    def start(self) -> None:
        """Time epochs from here (just before `fit`), not from composing the trial."""
        self._mark = time.perf_counter()

    def record(self, trial: Any, max_epochs: int) -> None:
        """Leave what the pruning report needs on the trial, before it is told."""
        if self.epoch_seconds:
            trial.set_user_attr("epoch_seconds", sum(self.epoch_seconds) / len(self.epoch_seconds))
        trial.set_user_attr("max_epochs", int(max_epochs))

    @property
    def best(self) -> float | None:
        return max(self.history.values(), key=lambda v: self.sign * v) if self.history else None

    def __call__(self, engine: Any, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        self.epoch_seconds.append(now - self._mark)
        self._mark = now
        value = float(metrics[self.metric])
        self.history[engine.epoch] = value
        self.trial.report(value, step=engine.epoch)
        if engine.epoch < engine.t.max_epochs and self.trial.should_prune():
            raise TrialPruned(engine.epoch, value)


def run_trial(trial: Any, search: DictConfig, fixed: list[str], space: dict[str, dict[str, Any]],
              trials_dir: Path) -> None:
    """Sample, train, tell. A user error in one trial fails that trial only; an interrupt ends the study."""
    import optuna
    import yaml

    from nnctl.commands import user_message
    from nnctl.engine import Engine
    from nnctl.reporting import write_json
    from nnctl.validate import validate

    params = {name: SUGGEST[p["type"]](trial, name, p) for name, p in space.items()}
    run_dir = trials_dir / str(trial.number)
    overrides = trial_overrides(fixed, params)
    record = run_dir / ".hydra"  # the same record a sweep job has, so the sweep summary reads trials too
    record.mkdir(parents=True, exist_ok=True)
    (record / "overrides.yaml").write_text(yaml.safe_dump(overrides, default_flow_style=False))
    reporter = Reporter(trial, search.metric, DIRECTIONS[search.direction])
    try:
        cfg = compose_trial(overrides, run_dir)
        (record / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        validate(cfg)
        engine = Engine(cfg, run_dir)
        engine.epoch_hooks.append(reporter)
        log.info("trial %d: %s", trial.number, " ".join(overrides))
        reporter.start()
        engine.fit()
    except TrialPruned as exc:
        write_json(run_dir / PRUNED_FILE, {"epoch": exc.epoch, "best": reporter.best, "history": reporter.history})
        reporter.record(trial, engine.t.max_epochs)
        trial.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log.info("trial %d %s", trial.number, exc)
    except KeyboardInterrupt:  # Interrupted (last.pt saved), or a signal that came before training started
        trial.set_user_attr("interrupted", True)
        trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        trial.study.enqueue_trial(params)  # the continued study runs this point again
        raise
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise
        (run_dir / "error.txt").write_text(message + "\n")
        trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.error("trial %d failed: %s", trial.number, message)
        return
    else:
        reporter.record(trial, engine.t.max_epochs)
        trial.study.tell(trial, reporter.best)
    if engine.signals.received is not None:  # came after the trial's last look (it was pruned, or finished)
        raise KeyboardInterrupt  # the trial is recorded as it ended; the study stops here, as asked


# -- the study ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_stale(study: Any) -> None:
    """Trials left RUNNING by a process of this host that no longer exists (kill -9) fail and run again."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("host") == socket.gethostname() and not _alive(int(t.user_attrs.get("pid", -1))):
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params)
            log.warning("trial %d was left running by a stopped process; it runs again", t.number)


def _counted(t: Any) -> bool:
    """Finished trials count towards n_trials; one stopped by an interrupt does not (it is retried)."""
    import optuna

    states = optuna.trial.TrialState
    return t.state in (states.COMPLETE, states.PRUNED, states.RUNNING) or (
        t.state == states.FAIL and not t.user_attrs.get("interrupted"))


def open_study(study_dir: Path, search: DictConfig, space: dict[str, dict[str, Any]]) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # nnctl reports trials itself
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(study_dir / JOURNAL)))
    study = optuna.create_study(study_name=STUDY, storage=storage, direction=search.direction,
                                pruner=PRUNERS[search.pruner](search), load_if_exists=True)
    if study.direction.name.lower() != search.direction:
        raise UserError(f"this study dir holds a study that is {study.direction.name.lower()}d; keep "
                        f"search.direction={study.direction.name.lower()} or start a new study_dir",
                        key="search.direction")
    return study


def optimize(study: Any, search: DictConfig, fixed: list[str], space: dict[str, dict[str, Any]],
             study_dir: Path) -> int:
    """Run trials until the study has n_trials (counting every process's) or this process's timeout passes."""
    n_trials = search.n_trials
    if search.sampler == "grid":
        n_trials = min(n_trials, math.prod(len(_grid_values(n, p)) for n, p in space.items()))
    started, ran = time.monotonic(), 0
    trials_dir = study_dir / "trials"
    while search.timeout is None or time.monotonic() - started < search.timeout:
        with _locked(study_dir / LOCK):
            trials = study.get_trials(deepcopy=False)
            if not trials:
                for params in OmegaConf.to_container(search.enqueue, resolve=True) or []:
                    study.enqueue_trial(params)
            _fail_stale(study)
            if sum(_counted(t) for t in study.get_trials(deepcopy=False)) >= n_trials:
                break
            # seeded per trial number: reproducible in one process, different points in parallel ones
            study.sampler = SAMPLERS[search.sampler](search.seed + len(trials), space)
            trial = study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
        run_trial(trial, search, fixed, space, trials_dir)
        ran += 1
    return ran


def fixed_overrides(search: DictConfig, task_overrides: list[str], base: DictConfig,
                    metric: str, mode: str) -> list[str]:
    """search.overrides, then the command line's (minus the search's own keys), then the monitor when it differs."""
    cli = [o for o in task_overrides if not o.lstrip("+~").startswith(TUNE_ONLY)]
    out = [*(OmegaConf.to_container(search.overrides, resolve=True) or []), *cli]
    if base.trainer.checkpoint.monitor != metric or base.trainer.checkpoint.mode != mode:
        out += [f"trainer.checkpoint.monitor={metric}", f"trainer.checkpoint.mode={mode}"]
    return out


def tune(cfg: DictConfig, study_dir: Path, task_overrides: list[str]) -> dict[str, Any]:
    """Check everything, run the study's trials, then summary, best preset and plots."""
    from nnctl.sweep_summary import job_dirs, report
    from nnctl.validate import validate

    search = cfg.search
    validate(cfg)  # the search.* rules, and every trainer/model/data value, before any trial runs
    space = _space(search)
    mode = DIRECTIONS[search.direction]
    base_overrides = [o for o in task_overrides if not o.lstrip("+~").startswith(TUNE_ONLY)]
    base = compose_trial([*(OmegaConf.to_container(search.overrides, resolve=True) or []), *base_overrides],
                         study_dir / "trials" / "check")
    validate(base)
    check_space(space, base, search.sampler)
    produced = produced_metrics(base)
    if search.metric not in produced:
        raise UserError(f"{search.metric!r} is not a metric this run produces; choose one of "
                        f"{', '.join(sorted(produced))}", key="search.metric")
    fixed = fixed_overrides(search, base_overrides, base, search.metric, mode)
    study = open_study(study_dir, search, space)
    ran = optimize(study, search, fixed, space, study_dir)
    log.info("this process ran %d trial(s)", ran)
    trials = job_dirs(study_dir / "trials")
    summary = report(study_dir, trials) if trials else None
    from nnctl.reporting import console

    pruning = pruning_report(study)
    if pruning["pruned"]:
        from nnctl.reporting import write_json

        write_json(study_dir / PRUNING_FILE, pruning)
        console.print(f"pruned {pruning['pruned']} of {pruning['finished']} trials after {pruning['pruned_epochs_mean']:.1f} "
                      f"epochs on average; time saved against running them to the end: "
                      f"~{pruning['seconds_saved'] / 60:.1f} min, {pruning['seconds_saved_fraction']:.0%} of the "
                      f"{(pruning['seconds_total'] + pruning['seconds_saved']) / 60:.1f} min the trials would have "
                      f"taken without pruning", markup=False)
    best = _best_trial(study)
    if best is not None:
        bases = [o.partition("=")[2] for o in fixed if o.lstrip("+").startswith("experiment=")]
        preset = write_preset(study_dir, best.params, search.metric, best.value, best.number,
                              bases[-1] if bases else None)
        fixed_cli = " ".join(_quote(o) for o in fixed if not o.lstrip("+").startswith("experiment="))
        console.print(f"best trial {best.number}: {search.metric} = {best.value:.4f}; preset {preset}; use it with:",
                      markup=False)
        console.print(f"  nnctl train --config-dir {study_dir} experiment=best {fixed_cli}".rstrip(), markup=False,
                      soft_wrap=True)
        console.print(f"  (or copy it to configs/experiment/<name>.yaml and pass experiment=<name>)", markup=False)
        write_plots(study, study_dir, search.metric)
    return {"study_dir": str(study_dir), "ran": ran, "summary": summary, "pruning": pruning,
            "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params}}


def pruning_report(study: Any) -> dict[str, Any]:
    """What pruning saved: each pruned trial skipped the epochs between where it stopped and `max_epochs`, each at
    the study's mean epoch time (complete trials' epochs; the pruned trials' own when none completed). Epochs, not
    whole trials, are compared so that start-up time, which pruning does not save, does not blur a short study."""
    import optuna

    states = optuna.trial.TrialState
    done = [t for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))
            if t.datetime_start is not None and t.datetime_complete is not None]
    seconds = {t.number: (t.datetime_complete - t.datetime_start).total_seconds() for t in done}
    ran = {t.number: max(t.intermediate_values, default=0) for t in done}  # epochs each trial finished
    per_epoch = {t.number: t.user_attrs.get("epoch_seconds", seconds[t.number] / max(ran[t.number], 1))
                 for t in done}  # studies written before epochs were timed: the trial's wall time per epoch
    pruned = [t for t in done if t.state == states.PRUNED]
    basis = [per_epoch[t.number] for t in done if t.state == states.COMPLETE] or [per_epoch[t.number] for t in pruned]
    epoch_s = sum(basis) / len(basis) if basis else 0.0
    saved = sum(max(0, t.user_attrs.get("max_epochs", ran[t.number]) - ran[t.number]) * epoch_s for t in pruned)
    total = sum(seconds.values())
    epochs = [ran[t.number] for t in pruned]
    return {"finished": len(done), "pruned": len(pruned),
            "pruned_epochs_mean": sum(epochs) / len(epochs) if epochs else 0.0,
            "epoch_seconds_mean": epoch_s, "seconds_total": total, "seconds_saved": saved,
            "seconds_saved_fraction": saved / (total + saved) if total + saved else 0.0}


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _best_trial(study: Any) -> Any:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if done else None


def write_preset(study_dir: Path, params: dict[str, Any], metric: str, value: float, number: int,
                 base: str | None = None) -> Path:
    """experiment/best.yaml in the study dir: the best trial's sampled values as an experiment preset, on top of
    the `base` experiment the trials started from (one experiment= on a command line: a second would replace it)."""
    from nnctl.commands import GROUPS

    groups = {n: v for n, v in params.items() if n.replace("/", ".") in GROUPS or "/" in n}
    tree = OmegaConf.create({})
    for name, v in params.items():
        if name not in groups:
            OmegaConf.update(tree, name, v, force_add=True)  # optimizer.lr -> optimizer: {lr: ...}
    lines = ["# @package _global_", f"# Best trial {number} of the study in {study_dir}: {metric} = {value:.6g}."]
    if groups or base:
        lines += ["defaults:", *([f"  - {base}"] if base else []),
                  *(f"  - override /{g}: {v}" for g, v in groups.items()), "  - _self_"]
    body = OmegaConf.to_yaml(tree) if params.keys() - groups.keys() else ""
    path = study_dir / "experiment" / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + body)
    return path


def write_plots(study: Any, study_dir: Path, metric: str) -> list[Path]:
    """Optuna's optimization history, parameter importances and parallel coordinates as PNGs."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    written = []
    for name, plot in (("optimization_history", ov.plot_optimization_history),
                       ("param_importances", ov.plot_param_importances),
                       ("parallel_coordinate", ov.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" warnings of optuna's matplotlib backend
                ax = plot(study, target_name=metric)
        except (ValueError, RuntimeError) as exc:  # e.g. importances need two finished trials
            log.warning("skipped the %s plot: %s", name, exc)
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(9, 5.5)
        fig.tight_layout()
        path = study_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
