"""The `logger` group end to end: every tracker receives the same numbers from a tiny run, read back with each
tracker's own reader (TensorBoard's event files, metrics.csv, MLflow's client on the SQLite store, W&B's offline
run file); a sweep is one group; a resumed run continues the same tracker runs; bad tracker settings are one line.
"""
from __future__ import annotations

import csv
import json
import math
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

import fixtures as fx
from nnctl import checkpoint as ck
from nnctl.cli import main
from test_train_eval import scalars

TINY = ["data=synthetic", "data.num_samples=320", "model=mlp", "model.hidden_sizes=[16]", "trainer.max_epochs=2",
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "trainer.device=cpu",
        "trainer.progress=false", "trainer.log_every_n_steps=2"]
REAL_GETADDRINFO = socket.getaddrinfo  # conftest cuts name resolution; the unreachable-server test needs loopback
TRACKERS = ("tensorboard", "csv", "mlflow", "wandb")


# -- reading each tracker back -----------------------------------------------------------------------------------------
def csv_series(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r[key] != ""}


def mlflow_client(root: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root}/outputs/mlruns/mlflow.db")


def mlflow_runs(root: Path) -> list[Any]:
    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("nnctl")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def mlflow_series(root: Path, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow_client(root).get_metric_history(run_id, key)}


def wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte file header, then 32 KiB blocks of records
    with a 7-byte header each: crc32, length, type full/first/middle/last), each a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += block - pos % block
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full or last fragment
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_runs(run_dir: Path) -> list[dict[str, Any]]:
    """Per offline run dir under run_dir/wandb (oldest first): run id, group, name, tags, history rows, summary."""
    out = []
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        info: dict[str, Any] = {"history": {}, "summary": {}}
        for r in wandb_records(next(directory.glob("run-*.wandb"))):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                info.update(id=r.run.run_id, group=r.run.run_group, name=r.run.display_name, tags=list(r.run.tags),
                            project=r.run.project)
            elif kind == "history":
                row = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                info["history"][row["_step"]] = row
            elif kind == "summary":
                info["summary"].update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
        out.append(info)
    return out


def wandb_series(runs: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {step: row[key] for run in runs for step, row in run["history"].items() if key in row}


def tb_series(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def assert_same(a: dict[int, float], b: dict[int, float], what: str) -> None:
    assert a.keys() == b.keys() and a, f"{what}: steps {sorted(a)} vs {sorted(b)}"
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-6), f"{what} at step {step}: {a[step]} vs {b[step]}"


# -- every tracker, one run ------------------------------------------------------------------------------------------
def test_every_tracker_receives_the_same_scalars(tmp_path: Path) -> None:
    assert main(["train", *TINY, "logger=many", "logger.mlflow.log_artifacts=true", "optimizer.lr=0.003"]) == 0
    run = fx.run_dirs(tmp_path)[0]
    (mlrun,) = mlflow_runs(tmp_path)
    wb = wandb_runs(run)
    # loss logged every 2 steps (8 steps in 2 epochs), val/acc at each epoch's end, test at the end: same numbers
    for key, steps in (("train/loss_running", [2, 4, 6, 8]), ("val/acc", [4, 8]), ("test/acc", [8])):
        tb = tb_series(run, key)
        assert sorted(tb) == steps, (key, tb)
        assert_same(tb, csv_series(run, key), f"csv {key}")
        assert_same(tb, mlflow_series(tmp_path, mlrun.info.run_id, key), f"mlflow {key}")
        assert_same(tb, wandb_series(wb, key), f"wandb {key}")
    result = json.loads((run / "metrics.json").read_text())
    assert math.isclose(tb_series(run, "test/acc")[8], result["test"]["acc"], rel_tol=1e-6)
    assert tb_series(run, "train/loss_running")[8] < tb_series(run, "train/loss_running")[2]  # it trained
    # csv: one row per logged step, every column in every row, a header pandas reads as is
    rows = list(csv.DictReader(open(run / "metrics.csv", newline="")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]  # a step's log and its epoch's end share a row
    assert {"train/loss_running", "val/acc", "test/acc", "lr"} <= set(rows[0])
    # mlflow: run name = the run dir's name, params without build plumbing, overrides as a tag, artifacts
    assert mlrun.info.run_name == run.name and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["optimizer.lr"] == "0.003" and mlrun.data.params["model.hidden_sizes"] == "[16]"
    assert not [k for k in mlrun.data.params if "_target_" in k or "_partial_" in k or k.startswith(("paths.",
                                                                                                     "hydra."))]
    assert "optimizer.lr=0.003" in mlrun.data.tags["nnctl.overrides"]
    assert math.isclose(mlrun.data.metrics["final/val/acc"], result["val"]["acc"], rel_tol=1e-6)
    artifacts = {a.path for a in mlflow_client(tmp_path).list_artifacts(mlrun.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/best.pt"}
    assert (Path(mlrun.info.artifact_uri.removeprefix("file://")) / "train" / "samples.png").is_file()
    # wandb: one offline run named after the run dir, config without plumbing, final metrics in the summary
    (only,) = wb
    assert only["name"] == run.name and only["project"] == "nnctl" and "optimizer.lr=0.003" in only["tags"]
    assert math.isclose(only["summary"]["final/test/acc"], result["test"]["acc"], rel_tol=1e-6)


def test_tensorboard_hparams_name_meaningful_keys_and_add_no_scalar_cards(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert main(["train", *TINY, "optimizer.lr=0.002"]) == 0  # TensorBoard is the default tracker
    run = fx.run_dirs(tmp_path)[0]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("hparam")]  # no single-point hparam/* cards
    assert not [p for p in (run / "tensorboard").iterdir() if p.is_dir()]  # and no extra run dir beside it
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    hparams = start.session_start_info.hparams
    assert hparams["optimizer.lr"].number_value == pytest.approx(0.002) and "trainer.max_epochs" in hparams
    assert not [k for k in hparams if "_target_" in k or "_partial_" in k or k.startswith(("paths.", "hydra."))]
    metrics = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"val/acc", "test/acc", "test/loss"} <= metrics <= set(acc.Tags()["scalars"])  # values from real tags
    assert acc.Tags()["images"] == ["train/samples"]


# -- sweeps and resume -------------------------------------------------------------------------------------------------
def test_a_sweep_is_one_group_in_each_tracker(tmp_path: Path) -> None:
    assert main(["train", "-m", *TINY, "trainer.max_epochs=1", "logger=[mlflow,wandb]", "optimizer.lr=0.01,0.02"]) == 0
    sweep = next((tmp_path / "outputs" / "multirun" / "train").glob("*/*"))
    group = f"{sweep.parent.name}/{sweep.name}"
    runs = mlflow_runs(tmp_path)
    assert [r.data.tags.get("sweep") for r in runs] == [group, group]
    assert [r.info.run_name for r in runs] == [f"{sweep.name}/0", f"{sweep.name}/1"]
    assert [r.data.params["optimizer.lr"] for r in runs] == ["0.01", "0.02"]
    wb = [wandb_runs(sweep / str(job))[0] for job in (0, 1)]
    assert [w["group"] for w in wb] == [group, group] and wb[0]["id"] != wb[1]["id"]


def test_resume_continues_the_same_tracker_runs(tmp_path: Path) -> None:
    trackers = "logger=[tensorboard,csv,mlflow,wandb]"
    assert main(["train", *TINY, "trainer.max_epochs=1", trackers]) == 0
    run = fx.run_dirs(tmp_path)[0]
    saved = ck.load_checkpoint(run / "checkpoints" / ck.LAST)[ck.LOGGERS]
    assert set(saved) == {"mlflow", "wandb"}
    assert main(["train", f"resume={run}", "trainer.max_epochs=2", "trainer.extend_schedule=true"]) == 0
    (mlrun,) = mlflow_runs(tmp_path)  # the same MLflow run, not a second one
    assert mlrun.info.run_id == saved["mlflow"]["run_id"] and mlrun.info.status == "FINISHED"
    assert sorted(mlflow_series(tmp_path, mlrun.info.run_id, "val/acc")) == [4, 8]  # both epochs in one history
    first, second = wandb_runs(run)  # an offline run dir per process, one W&B run id: `wandb sync` joins them
    assert first["id"] == second["id"] == saved["wandb"]["run_id"]
    assert sorted(wandb_series([second], "val/acc")) == [8]
    assert sorted(csv_series(run, "val/acc")) == [4, 8]  # the same metrics.csv, appended
    assert_same(tb_series(run, "val/acc"), mlflow_series(tmp_path, mlrun.info.run_id, "val/acc"), "resumed val/acc")


# -- bad input ---------------------------------------------------------------------------------------------------------
def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", REAL_GETADDRINFO)  # 127.0.0.1 only: nothing leaves the machine
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    assert main(["train", *TINY, "logger=mlflow", f"logger.mlflow.tracking_uri=http://127.0.0.1:{port}"]) == 2
    assert time.monotonic() - started < 60
    line = _one_line_error(capsys)
    assert line.startswith(f"nnctl train: error: logger.mlflow.tracking_uri: cannot reach the MLflow tracking "
                           f"server at http://127.0.0.1:{port} (Connection refused)"), line
    assert not list((tmp_path / "outputs").rglob("*.pt"))  # stopped before training


def test_wandb_without_its_package_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    assert main(["train", *TINY, "logger=[csv,wandb]"]) == 2
    line = _one_line_error(capsys)
    assert line == ("nnctl train: error: logger: the wandb package is not installed; pip install wandb, or choose "
                    "other trackers (logger=tensorboard)"), line


@pytest.mark.parametrize("stop, code, status", [("interrupt", 143, "KILLED"), ("bug", None, "FAILED")])
def test_a_run_that_stops_early_closes_its_tracker_runs_with_that_status(stop: str, code: int | None, status: str,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from nnctl import run_state
    from nnctl.engine import Engine
    from nnctl.errors import Interrupted

    def stop_after_first_epoch(engine: Engine, metrics: dict) -> None:
        if stop == "interrupt":  # what SIGTERM between two steps ends in
            raise Interrupted(signal.SIGTERM, None, engine.run_dir)
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(run_state, "save_epoch", stop_after_first_epoch)
    if code is None:
        with pytest.raises(ZeroDivisionError):
            main(["train", *TINY, "logger=[csv,mlflow]"])
    else:
        assert main(["train", *TINY, "logger=[csv,mlflow]"]) == code
    (mlrun,) = mlflow_runs(tmp_path)
    assert mlrun.info.status == status
    assert sorted(mlflow_series(tmp_path, mlrun.info.run_id, "val/acc")) == [4]  # what was logged before is kept
    assert sorted(csv_series(fx.run_dirs(tmp_path)[0], "val/acc")) == [4]  # the pending csv row was written
