"""The Hydra apps behind `nnctl train`, `eval`, `generate`, `export`, `tune`, `lr-find`, `explain` and `sample`, and
the run() that starts them and prints user mistakes as one line (the wording: nnctl.user_messages)."""
from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from nnctl.errors import USER_ERROR_EXIT, Interrupted, UserError, WorkersFailed


def _default_config_dir() -> Path:
    """The configs shipped inside an installed wheel (nnctl/configs), else the source tree's top-level configs/."""
    package = Path(__file__).resolve().parent
    return package / "configs" if (package / "configs" / "train.yaml").is_file() else package.parent / "configs"


# NNCTL_CONFIG_DIR replaces the built-in configs; Hydra's --config-dir adds a dir of your own to the search path.
CONFIG_DIR = Path(os.environ.get("NNCTL_CONFIG_DIR") or _default_config_dir())
GROUPS = ("model", "data", "objective", "optimizer", "scheduler", "precision", "adapter", "trainer", "logger")
EVAL_PATCHABLE = ("data", "trainer", "eval")
# eval.* keys of eval/explain itself, not of the run
EVAL_ONLY = ("worst_k", "feature_ckpt", "quality_samples", "sampler", "steps", "guidance", "guidance_rescale")

log = logging.getLogger(__name__)
JOBS: list[dict[str, Any]] = []  # one entry per job of this process (multirun summary)
FAILED: list[BaseException] = []  # a single run's exception, raised again after Hydra has finished the job


# -- task functions -----------------------------------------------------------------------------------------------
def train_task(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from nnctl import checkpoint as ck
    from nnctl import launch
    from nnctl.reporting import console, print_config
    from nnctl.validate import validate

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    state, plan = None, "new"
    if cfg.resume is not None:
        from nnctl.resume import continuation, resume_config

        cfg, state, run_dir = resume_config(cfg, HydraConfig.get().overrides.task, CONFIG_DIR)
    validate(cfg)
    if state is not None:
        plan = continuation(cfg, state)
    if plan == "done":  # no training and no re-evaluation: the run dir stays as it is
        longer = ("its stages are done" if cfg.get("stages") else
                  "to train longer, pass a larger trainer.max_epochs (or trainer.max_steps)")
        console.print(f"nothing left to train: {run_dir} has trained {state[ck.EPOCH]} epoch(s), {state[ck.STEP]} "
                      f"steps, as many as this run asks for; {longer}", markup=False, soft_wrap=True)
        return {"epochs": state[ck.EPOCH], "global_step": state[ck.STEP], "checkpoint": cfg.resume}
    launch.publish_run_dir(run_dir)  # launched by torchrun/srun: the other ranks train in this run dir
    print_config(cfg)
    if launch.spawns(cfg):  # trainer.nproc_per_node / nnodes > 1: start the workers
        return launch.launch(cfg, run_dir)
    return train(cfg, run_dir, state, plan)


def train(cfg: DictConfig, run_dir: Path, state: dict[str, Any] | None, plan: str | None = None) -> dict[str, Any]:
    """Train (or continue from `state`, as `plan` from nnctl.resume.continuation says) in this process, one of the
    job's ranks or the only one."""
    from nnctl import checkpoint as ck
    from nnctl.engine import Engine
    from nnctl.adapters import report
    from nnctl.reporting import print_model_summary
    from nnctl.resume import continuation

    engine = Engine(cfg, run_dir, progress=(state[ck.EPOCH], state[ck.BATCH_IN_EPOCH]) if state else (0, 0))
    try:
        print_model_summary(engine.net)
        report(engine.net)  # trainable vs total parameters, bytes of a frozen base
        if state is not None:
            engine.load_state_dict(state, full=True)
            if (plan or continuation(cfg, state)) == "replan":
                steps = engine.replan_schedule()
                log.warning("trainer.extend_schedule: the %d steps left (to trainer.max_epochs=%d) get a fresh %s "
                            "schedule, starting over from its beginning; the optimizer state carries on", steps,
                            cfg.trainer.max_epochs, cfg.scheduler._target_.rpartition(".")[2])
        return engine.fit()
    finally:
        engine.dist.teardown()


def load_for_eval(cfg: DictConfig, classifier: bool = False) -> tuple[Any, dict[str, Any], Path, Path]:
    """(engine with the checkpoint's weights, checkpoint state, checkpoint path, run dir) for `cfg.ckpt`, built from
    the stored config with the command line's data/trainer/eval patches. With `classifier`, refuse checkpoints of
    other objectives before building anything."""
    from hydra.core.hydra_config import HydraConfig

    from nnctl import checkpoint as ck
    from nnctl.confusion import is_classifier
    from nnctl.engine import Engine
    from nnctl.validate import validate

    validate(cfg)  # this command's own settings (eval.worst_k, ...)
    if cfg.split not in ("test", "val"):
        raise UserError(f"got {cfg.split!r}; expected test or val", key="split")
    path = ck.resolve_checkpoint(cfg.ckpt, prefer=ck.BEST)
    state = ck.load_checkpoint(path)
    stored = OmegaConf.create(state[ck.CONFIG])
    patch = {k: OmegaConf.to_container(cfg[k]) for k in EVAL_PATCHABLE if k in cfg and cfg[k]}
    patch.get("eval", {}).pop("tta", None) if cfg.eval.tta is None else None
    for key in EVAL_ONLY:  # settings of this command, not of the stored run
        patch.get("eval", {}).pop(key, None)
    run_cfg = merge_strict(stored, patch)
    if ck.BASE not in state and "init_from" in run_cfg:
        run_cfg.init_from = None  # the checkpoint holds every weight: the starting checkpoint is not needed
    validate(run_cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    engine = Engine(run_cfg, run_dir, progress=(state[ck.EPOCH], state[ck.BATCH_IN_EPOCH]))
    if classifier and not is_classifier(engine):
        raise UserError(f"{path} is not an image classifier's checkpoint (its objective is "
                        f"{type(engine.objective).__name__} on {engine.spec.get('input')} input); pass the checkpoint "
                        "of an image classification run", key="ckpt")
    engine.load_state_dict(state, full=False)
    return engine, state, path, run_dir


def eval_task(cfg: DictConfig) -> dict[str, Any]:
    from nnctl import checkpoint as ck
    from nnctl.reporting import print_metrics, write_json

    engine, state, path, run_dir = load_for_eval(cfg)
    metrics = engine.evaluate(cfg.split)
    if cfg.eval.get("feature_ckpt"):
        from nnctl.sample import quality

        metrics.update({f"{cfg.split}/{k}": v for k, v in quality(engine, cfg.eval).items()})
    result = {cfg.split: {k.split("/", 1)[1]: v for k, v in metrics.items()}, "checkpoint": str(path),
              "epoch": state[ck.EPOCH], "global_step": state[ck.STEP]}
    print_metrics(f"nnctl eval: {path}", {cfg.split: result[cfg.split]})
    from nnctl.confusion import analyze, is_classifier, print_per_class

    if is_classifier(engine):  # confusion matrix, per-class table, most confidently wrong images
        result.update(analyze(engine, cfg.split, engine.cfg.eval.tta, cfg.eval.worst_k, run_dir))
        print_per_class(result["per_class"], f"{cfg.split}: per class")
        shown = "confusion_matrix.png" + (", worst_k.png" if "worst" in result else "")
        from nnctl.reporting import console

        console.print(f"wrote {shown} and metrics.json to {run_dir}", markup=False)
    write_json(run_dir / "metrics.json", result)
    return result


def merge_strict(base: DictConfig, patch: dict[str, Any]) -> DictConfig:
    """Merge `patch` onto `base`, refusing keys `base` does not have (with a did-you-mean)."""
    OmegaConf.set_struct(base, True)
    return OmegaConf.merge(base, patch)


def generate_task(cfg: DictConfig) -> dict[str, Any]:
    from nnctl.generate import generate

    return generate(cfg)


def export_task(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from nnctl.export import export

    return export(cfg, Path(HydraConfig.get().runtime.output_dir))


def tune_task(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from nnctl.tune import tune

    hc = HydraConfig.get()
    return tune(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))


def lr_find_task(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from nnctl.lr_find import lr_find

    hc = HydraConfig.get()
    return lr_find(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))


def explain_task(cfg: DictConfig) -> dict[str, Any]:
    from nnctl.explain import explain

    return explain(cfg)


def sample_task(cfg: DictConfig) -> dict[str, Any]:
    from nnctl.sample import sample

    return sample(cfg)


TASKS: dict[str, Callable[[DictConfig], Any]] = {"train": train_task, "eval": eval_task, "tune": tune_task,
                                                 "lr-find": lr_find_task, "explain": explain_task,
                                                 "sample": sample_task, "export": export_task,
                                                 "generate": generate_task}
PATCHING = ("eval", "explain")  # commands that rebuild a run from its checkpoint and patch data/trainer/eval


def _job(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a task so one failing job of a sweep is recorded and reported instead of ending the sweep."""

    def job(cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        # resolve=False: an override such as x=${foo} must be reported by the task, not crash here
        overrides = OmegaConf.to_container(hc.overrides.task, resolve=False)
        entry = {"num": hc.job.get("num"), "overrides": overrides, "dir": hc.runtime.output_dir,
                 "sweep_dir": hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None}
        JOBS.append(entry)
        if hc.mode == RunMode.MULTIRUN:  # jobs share one terminal: per-epoch lines instead of live bars
            if "progress" in cfg.get("trainer", {}):
                cfg.trainer.progress = False
        try:
            entry["result"] = task(cfg)
            entry["status"] = "ok"
            return entry["result"]
        except Exception as exc:
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

    if command in PATCHING:
        args = _prepare_eval_args(args)
    if command == "train":
        from nnctl.launch import external_args

        try:
            args = external_args(args)  # started by torchrun/srun: ranks > 0 run in rank 0's run dir
        except UserError as exc:
            print(f"nnctl {command}: error: {exc}", file=sys.stderr)
            return USER_ERROR_EXIT
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
    except WorkersFailed as exc:  # a worker of a multi-process job printed its error (or traceback) above
        print(f"nnctl {command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:  # graceful SIGINT/SIGTERM stop: last.pt saved
        print(f"nnctl {command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("nnctl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_message(exc)
        if message is None or full_error:
            raise
        print(f"nnctl {command}: error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT
    finally:
        if not full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        if command == "train":
            from nnctl.launch import publish_run_dir

            publish_run_dir(None)  # a job that failed before its run started: the other ranks stop too
    return _report_jobs(command)


def _report_jobs(command: str) -> int:
    """After a sweep: the ranked summary (printed, and summary.csv/json in the sweep dir) and the failed jobs."""
    failed = [j for j in JOBS if j.get("status") == "failed"]
    if len(JOBS) > 1 or failed:
        from nnctl.reporting import console

        ok = len(JOBS) - len(failed)
        sweep_dir = JOBS[0].get("sweep_dir")
        if command == "train" and sweep_dir:
            from nnctl.sweep_summary import report

            report(Path(sweep_dir), [Path(j["dir"]) for j in JOBS])  # lists the failed jobs with the others
            console.print(f"sweep: {ok} of {len(JOBS)} job(s) finished" + (f", {len(failed)} failed" if failed else "")
                          + f"; summary.csv and summary.json in {sweep_dir}", markup=False)
            return 1 if failed else 0
        console.print(f"sweep: {ok} of {len(JOBS)} job(s) finished" + (f", {len(failed)} failed:" if failed else ""))
        for j in failed:
            console.print(f"  job {j['num']} ({' '.join(j['overrides'])}): {j['error']}  [{j['dir']}/error.txt]",
                          markup=False)
    return 1 if failed else 0


def user_message(exc: BaseException, command: str | None = None) -> str | None:
    """One line for a mistake the user can fix, or None for a programming error (nnctl.user_messages)."""
    from nnctl.user_messages import user_message as message  # imports this module's config constants

    return message(exc, command)

