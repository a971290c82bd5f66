"""The bad-input contract: every mistake a user can make prints ONE line on stderr that names the config key or file
and the fix, exits with code 2, prints no traceback (unless HYDRA_FULL_ERROR=1), and leaves existing run dirs and
checkpoints byte-identical. Programming errors keep their traceback.

CASES is one table; to cover a new mistake, add a row:

    case("id", ["train", "key=value", ...], r"regex the single stderr line must match")

Arguments may use {run} (a finished tiny run dir), {lm} (a finished tiny language-model run dir), {files} (a dir of
crafted bad files, see `crafted`) and {tmp} (the test's own dir: conftest's `isolated` makes it the working dir and
NNCTL_ROOT, so runs land there). Rows that fail at composition or validation take a fraction of a second; rows that
need a checkpoint share the one session run.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nnctl import checkpoint as ck
from nnctl.cli import main

TINY = ["data=synthetic", "data.num_samples=256", "model=mlp", "model.hidden_sizes=[16]", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.device=cpu", "trainer.progress=false"]


def case(id: str, argv: list[str], pattern: str, code: int = 2) -> object:
    return pytest.param(argv, code, pattern, id=id)


CASES = [
    # -- unknown group options: the valid ones listed, a did-you-mean for near misses ------------------------------
    case("model-unknown", ["train", "model=foo"],
         r"model=foo: unknown option; choose one of (\w+, )*cnn, (\w+, )*mlp, resnet"),
    case("model-near-miss", ["train", "model=resnt"], r"model=resnt: unknown option \(did you mean 'resnet'\?\); "
                                                       r"choose one of .*resnet"),
    case("model-empty", ["train", "model="],
         r"model=: no option given; choose one of (\w+, )*cnn, (\w+, )*mlp, resnet"),
    case("data-unknown", ["train", "data=svhn"], r"data=svhn: unknown option; choose one of .*mnist.*synthetic"),
    case("optimizer-near-miss", ["train", "optimizer=adm"], r"optimizer=adm: unknown option \(did you mean "
                                                            r"'adam'\?\); choose one of adam, adamw, .*sgd"),
    case("scheduler-unknown", ["train", "scheduler=linear"], r"scheduler=linear: unknown option; choose one of "
                                                             r".*warmup_cosine"),
    case("precision-unknown", ["train", "precision=fp8"], r"precision=fp8: unknown option; choose one of "
                                                          r"bf16, fp16, fp32"),
    case("adapter-unknown", ["train", "adapter=lokr"], r"adapter=lokr: unknown option .*; choose one of .*none"),
    case("objective-unknown", ["train", "objective=regress"], r"objective=regress: unknown option \(did you mean "
                                                              r"'regression'\?\); choose one of .*classification"),
    case("trainer-unknown", ["train", "trainer=fast"], r"trainer=fast: unknown option; choose one of .*default"),
    case("nested-group-near-miss", ["train", "trainer/early_stopping=of"],
         r"trainer/early_stopping=of: unknown option \(did you mean 'off'\?\)"),
    case("experiment-unknown", ["train", "experiment=mnist_mlp"], r"experiment=mnist_mlp: unknown option; choose "
                                                                  r"one of .*cifar10_resnet"),
    case("group-value-instead-of-option", ["train", "trainer.early_stopping=off"],
         r"trainer\.early_stopping: got 'off'; expected a mapping .*trainer/early_stopping=<option>"),
    # -- unknown keys, with a did-you-mean --------------------------------------------------------------------------
    case("key-max-epoch", ["train", "trainer.max_epoch=3"], r"trainer\.max_epoch: unknown key \(did you mean "
                                                            r"'trainer\.max_epochs'\?\)"),
    case("key-learning-rate", ["train", "optimizer.learning_rate=0.1"],
         r"optimizer\.learning_rate: unknown key \(did you mean 'optimizer\.lr'\?\)"),
    case("key-batchsize", ["train", "data.batchsize=32"], r"data\.batchsize: unknown key \(did you mean "
                                                          r"'data\.batch_size'\?\)"),
    case("key-of-other-option", ["train", "model=resnet", "model.hidden_sizes=[8]"],
         r"model\.hidden_sizes: not a key of the selected model option; only model=mlp has it"),
    case("key-of-eval-in-train", ["train", "split=test"], r"split: not a key of nnctl train"),
    case("key-unknown-top-level", ["train", "foo=1"], r"foo: unknown key; top-level keys are: .*model.*"
                                                      r"\(to add a new key use \+foo=\.\.\.\)"),
    case("append-existing-key", ["train", "+model.dropout=0.3"], r"model\.dropout: already in the config; set it "
                                                                 r"without the \+ prefix"),
    case("delete-required-key", ["train", "~trainer.max_epochs"], r"trainer\.max_epochs: nnctl needs this key; "
                                                                  r"drop '~trainer\.max_epochs'"),
    # -- wrong types ---------------------------------------------------------------------------------------------------
    case("type-max-epochs", ["train", "trainer.max_epochs=abc"], r"trainer\.max_epochs: got 'abc'; expected an "
                                                                 r"integer >= 1, e\.g\. trainer\.max_epochs=5"),
    case("type-batch-size", ["train", "data.batch_size=1.5"], r"data\.batch_size: got 1\.5; expected an integer"),
    case("type-deterministic", ["train", "trainer.deterministic=maybe"],
         r"trainer\.deterministic: got 'maybe'; expected true or false"),
    case("type-lr", ["train", "optimizer.lr=fast"], r"optimizer\.lr: got 'fast'; expected a number > 0"),
    case("type-hidden-sizes", ["train", "model=mlp", "model.hidden_sizes=abc"],
         r"model\.hidden_sizes: got 'abc'; expected a list of integers >= 1"),
    case("type-betas", ["train", "optimizer.betas=0.9"], r"optimizer\.betas: got 0\.9; expected two numbers"),
    case("type-gamma", ["train", "scheduler=step", "scheduler.gamma=abc"], r"scheduler\.gamma: got 'abc'"),
    case("type-augment", ["train", "data.augment=3"], r"data\.augment: got 3; expected a mapping"),
    case("type-eval-tta", ["train", "eval.tta=maybe"], r"eval\.tta: got 'maybe'; expected one of none, flip"),
    case("missing-value", ["train", "optimizer.lr=???"], r"optimizer\.lr: a value is required; pass "
                                                         r"optimizer\.lr=\.\.\."),
    # -- out of range --------------------------------------------------------------------------------------------------
    case("lr-zero", ["train", "optimizer.lr=0"], r"optimizer\.lr: got 0; expected a number > 0, e\.g\. "
                                                 r"optimizer\.lr=0\.001"),
    case("lr-negative", ["train", "optimizer.lr=-1"], r"optimizer\.lr: got -1; expected a number > 0"),
    case("batch-size-zero", ["train", "data.batch_size=0"], r"data\.batch_size: got 0; expected an integer >= 1"),
    case("val-fraction-above-1", ["train", "data.val_fraction=1.5"],
         r"data\.val_fraction: got 1\.5; expected a fraction strictly between 0 and 1, e\.g\. 0\.1"),
    case("val-fraction-zero", ["train", "data.val_fraction=0"], r"data\.val_fraction: got 0; expected a fraction"),
    case("patience-negative", ["train", "trainer.early_stopping.patience=-1"],
         r"trainer\.early_stopping\.patience: got -1; expected an integer >= 0"),
    case("grad-accum-zero", ["train", "trainer.grad_accum_steps=0"],
         r"trainer\.grad_accum_steps: got 0; expected an integer >= 1"),
    case("label-smoothing-one", ["train", "trainer.label_smoothing=1.0"],
         r"trainer\.label_smoothing: got 1\.0; expected a number in \[0, 1\)"),
    case("dropout-one", ["train", "model.dropout=1.0"], r"model\.dropout: got 1\.0; expected a number in \[0, 1\)"),
    case("limit-train-batches-zero", ["train", "trainer.limit_train_batches=0"],
         r"trainer\.limit_train_batches: got 0; expected an integer >= 1, a fraction in \(0, 1\], or null"),
    case("hidden-size-zero", ["train", "model=mlp", "model.hidden_sizes=[0]"], r"model\.hidden_sizes: got \[0\]"),
    case("monitor-not-a-metric", ["train", "trainer.checkpoint.monitor=accuracy"],
         r"trainer\.checkpoint\.monitor: got 'accuracy'; expected auto, latest \(the newest epoch\) or a metric name "
         r"such as val/acc"),
    case("strategy-unknown", ["train", "trainer.strategy=zero"],
         r"trainer\.strategy: got 'zero'; expected one of ddp, fsdp"),
    case("nproc-zero", ["train", "trainer.nproc_per_node=0"], r"trainer\.nproc_per_node: got 0; expected an integer"),
    case("backend-unknown", ["train", "trainer.dist_backend=mpi"],
         r"trainer\.dist_backend: got 'mpi'; expected one of auto, gloo, nccl"),
    case("rdzv-endpoint-no-port", ["train", "trainer.rdzv_endpoint=node1"],
         r"trainer\.rdzv_endpoint: got 'node1'; expected HOST:PORT"),
    case("nnodes-without-endpoint", ["train", *TINY, "trainer.nnodes=2"],
         r"trainer\.rdzv_endpoint: a job over several nodes meets at one address"),
    case("fsdp-with-ema", ["train", *TINY, "trainer.nproc_per_node=2", "trainer.strategy=fsdp", "trainer/ema=on"],
         r"trainer\.strategy: an EMA copy of a model sharded by FSDP is not supported"),
    case("sharded-without-fsdp", ["train", *TINY, "trainer.checkpoint.sharded=true"],
         r"trainer\.checkpoint\.sharded: sharded checkpoints save the shards FSDP keeps on each process; set "
         r"trainer\.strategy=fsdp, or trainer\.checkpoint\.sharded=false"),
    case("sharded-with-ema", ["train", *TINY, "trainer.strategy=fsdp", "trainer.checkpoint.sharded=true",
                              "trainer/ema=on"],
         r"trainer\.strategy: an EMA copy of a model sharded by FSDP is not supported"),
    case("sharded-not-bool", ["train", "trainer.checkpoint.sharded=sometimes"],
         r"trainer\.checkpoint\.sharded: got 'sometimes'; expected true or false"),
    case("gan-with-fsdp", ["train", "data=digits", "model=gan", "trainer.device=cpu", "trainer.nproc_per_node=2",
                           "trainer.strategy=fsdp"],
         r"trainer\.strategy: GANObjective updates parts of the model in turn, calling them outside the model's "
         r"forward, where FSDP cannot gather their shards; use trainer\.strategy=ddp"),
    case("sync-batchnorm-on-cpu", ["train", *TINY, "trainer.nproc_per_node=2", "trainer.sync_batchnorm=true"],
         r"trainer\.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only; set trainer\.sync_batchnorm=false "
         r"on cpu"),
    case("diffusion-snr-gamma-negative", ["train", "data=digits", "model=diffusion", "objective=diffusion",
                                          "objective.snr_gamma=-1"],
         r"objective\.snr_gamma: got -1(\.0)?; expected a positive number \(5\.0 is the usual choice\) or null"),
    case("device-tpu", ["train", "trainer.device=tpu"], r"trainer\.device: got 'tpu'; expected auto, cpu, cuda, "
                                                        r"cuda:N or mps"),
    case("device-bad-index", ["train", "trainer.device=cuda:x"], r"trainer\.device: got 'cuda:x'"),
    pytest.param(["train", *TINY, "trainer.device=cuda"], 2,
                 r"trainer\.device: device 'cuda' is not available on this machine; use trainer\.device=auto or cpu",
                 id="device-cuda-absent",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    case("activation-unknown", ["train", "model.activation=swish"],
         r"model\.activation: got 'swish'; expected one of relu, gelu"),
    case("airbench-activation-unknown", ["train", "model=airbench", "model.activation=swish"],
         r"model\.activation: got 'swish'; expected one of relu, gelu"),
    case("airbench-widths-empty", ["train", "model=airbench", "model.widths=[]"],
         r"model\.widths: got \[\]; expected a non-empty list of integers >= 1"),
    case("airbench-whiten-width-1", ["train", "model=airbench", "model.whiten_width=1"],
         r"model\.whiten_width: got 1; expected an integer >= 2 or null"),
    case("airbench-norm-bias-lr-mult-0", ["train", "model=airbench", "model.norm_bias_lr_mult=0"],
         r"model\.norm_bias_lr_mult: got 0; expected a number > 0"),
    # -- experiment trackers -------------------------------------------------------------------------------------------
    case("logger-unknown", ["train", "logger=mlfow"], r"logger=mlfow: unknown option \(did you mean 'mlflow'\?\); "
                                                      r"choose one of csv, many, mlflow, none, tensorboard, wandb"),
    case("logger-unknown-in-list", ["train", "logger=[tensorboard,neptune]"],
         r"logger=neptune: unknown option; choose one of csv"),
    case("logger-mlflow-unreachable", ["train", *TINY, "logger=mlflow", "logger.mlflow.tracking_uri=http://127.0.0.1:1",
                                       "logger.mlflow.timeout_s=1"],
         r"logger\.mlflow\.tracking_uri: cannot reach the MLflow tracking server at http://127\.0\.0\.1:1 "),
    case("logger-wandb-mode", ["train", "logger=wandb", "logger.wandb.mode=cloud"],
         r"logger\.wandb\.mode: got 'cloud'; expected one of offline, online, disabled"),
    case("logger-key-of-other-option", ["train", "logger.mlflow.tracking_uri=http://x"],
         r"logger\.mlflow\.tracking_uri: not a key of the selected logger option; only logger=mlflow has it"),
    # -- override syntax -----------------------------------------------------------------------------------------------
    case("syntax-unclosed-list", ["train", "trainer.max_epochs=[1,"],
         r"bad override 'trainer\.max_epochs=\[1,': .*write key=value"),
    case("syntax-no-equals", ["train", "trainer.max_epochs"], r"bad override 'trainer\.max_epochs': no '=' in it"),
    case("syntax-comma-without-m", ["train", "optimizer.lr=1e-3,1e-2"],
         r"'optimizer\.lr=1e-3,1e-2': a comma makes this a sweep; add -m"),
    # -- eval ----------------------------------------------------------------------------------------------------------
    case("eval-no-ckpt", ["eval"], r"ckpt: a value is required; pass ckpt=\.\.\."),
    case("eval-ckpt-missing", ["eval", "ckpt=nonexistent.pt"], r"ckpt: nonexistent\.pt does not exist; pass a "
                                                               r"checkpoint file"),
    case("eval-dir-without-checkpoint", ["eval", "ckpt={files}/emptydir"],
         r"ckpt: .*emptydir holds no checkpoint \(looked for best\.pt and last\.pt"),
    case("eval-empty-file", ["eval", "ckpt={files}/empty.pt"], r"ckpt: .*empty\.pt is empty"),
    case("eval-truncated", ["eval", "ckpt={files}/truncated.pt"],
         r"ckpt: .*truncated\.pt is not a readable checkpoint \(truncated or corrupt"),
    case("eval-random-bytes", ["eval", "ckpt={files}/random.pt"], r"ckpt: .*random\.pt is not a readable checkpoint"),
    case("eval-text-file", ["eval", "ckpt={files}/notes.pt"], r"ckpt: .*notes\.pt is not a readable checkpoint"),
    case("eval-foreign-dict", ["eval", "ckpt={files}/foreign.pt"], r"ckpt: .*foreign\.pt is not an nnctl checkpoint"),
    case("eval-malicious-pickle", ["eval", "ckpt={files}/evil.pt"], r"ckpt: .*evil\.pt was refused for safety"),
    case("eval-sharded-without-its-shards", ["eval", "ckpt={files}/sharded_moved.pt"],
         r"ckpt: .*sharded_moved\.pt keeps its weights in .*shards/step\d+-\w+, which is missing or incomplete; "
         r"a sharded checkpoint is the \.pt file and its checkpoints/shards/ folder together"),
    case("eval-sharded-malicious-metadata", ["eval", "ckpt={files}/sharded_evil"],
         r"ckpt: .*\.metadata was refused: not checkpoint metadata written by nnctl \(not an allowed global in "
         r"checkpoint metadata: posix\.system\)"),
    case("resume-sharded-malicious-metadata", ["train", "resume={files}/sharded_evil"],
         r"resume: .*\.metadata was refused: not checkpoint metadata written by nnctl"),
    case("resume-sharded-pickled-entry", ["train", "resume={files}/sharded_bytes", "trainer.max_epochs=2",
                                          "trainer.extend_schedule=true"],
         r"resume: .*\.metadata was refused: not checkpoint metadata written by nnctl \('model/.*' is not a tensor\)"),
    case("export-format-unknown", ["export", "ckpt={run}", "out={tmp}/model", "format=onnx"],
         r"format: got 'onnx'; expected one of model, checkpoint"),
    case("export-checkpoint-to-a-folder", ["export", "ckpt={run}", "out={files}/emptydir", "format=checkpoint"],
         r"out: .*emptydir is a folder; format=checkpoint writes one file"),
    case("eval-weights-do-not-fit", ["eval", "ckpt={files}/mismatch.pt"],
         r"model: the checkpoint's weights do not fit the model built from this config \(size mismatch.*\); "
         r"drop the model\.\* or data\.\* overrides"),
    case("eval-split-train", ["eval", "ckpt={run}", "split=train"], r"split: got 'train'; expected test or val"),
    case("eval-unknown-key", ["eval", "ckpt={run}", "data.batchsize=3"],
         r"data\.batchsize: unknown key \(did you mean 'data\.batch_size'\?\)"),
    case("eval-bad-value", ["eval", "ckpt={run}", "data.eval_batch_size=0"],
         r"data\.eval_batch_size: got 0; expected an integer >= 1"),
    case("eval-model-change", ["eval", "ckpt={run}", "model.dropout=0.5"],
         r"model\.dropout: nnctl eval rebuilds the model from the config stored in the checkpoint"),
    case("eval-train-key", ["eval", "ckpt={run}", "resume=auto"], r"resume: not a key of nnctl eval"),
    case("eval-group-choice", ["eval", "ckpt={run}", "data=mnist"],
         r"data: nnctl eval uses the data config stored in the checkpoint; change single keys instead"),
    # -- resume --------------------------------------------------------------------------------------------------------
    case("resume-missing", ["train", "resume=nonexistent"], r"resume: nonexistent does not exist"),
    case("resume-other-model", ["train", "resume={run}", "model=mlp"],
         r"resume: 'model=mlp' gives a different model than the checkpoint was trained with "
         r"\(model\.hidden_sizes: \[16\] -> \[256, 128\]\); .*drop 'model=mlp'"),
    case("resume-other-optimizer", ["train", "resume={run}", "optimizer=sgd"],
         r"resume: 'optimizer=sgd' gives a different optimizer"),
    case("resume-auto-no-runs", ["train", *TINY, "resume=auto"], r"resume: no resumable run with this config under "
                                                                 r".*outputs/train \(0 run\(s\) checked\)"),
    case("resume-loose-file", ["train", "resume={files}/foreign.pt"], r"resume: .*foreign\.pt is not inside a "
                                                                      r"run's checkpoints/ dir"),
    case("resume-then-bad-value", ["train", "resume={run}", "trainer.max_epochs=0"],
         r"trainer\.max_epochs: got 0; expected an integer >= 1"),
    case("resume-finished-schedule", ["train", "resume={run}", "trainer.max_epochs=2"],
         r"resume: the run finished its WarmupCosine schedule \(epoch 1, step 2\): its learning rate is at the final "
         r"value.* nnctl train init_from=.*/checkpoints/last\.pt .*trainer\.extend_schedule=true"),
    case("resume-extend-not-bool", ["train", "resume={run}", "trainer.max_epochs=2", "trainer.extend_schedule=yes"],
         r"trainer\.extend_schedule: got 'yes'; expected true or false"),
    pytest.param(["train", "resume={run}", "trainer.max_epochs=2", "trainer.extend_schedule=true",
                  "trainer.device=cuda"], 2,
                 r"trainer\.device: device 'cuda' is not available", id="resume-then-device-absent",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    # -- data and output locations -------------------------------------------------------------------------------------
    case("mnist-offline-no-download", ["train", "data=mnist", "data.download=false"],
         r"data\.root: mnist not found \(looked in .*MNIST/raw\)"),
    case("mnist-download-fails", ["train", "data=mnist", "data.download=true", "data.root={files}/empty_root"],
         r"data\.root: mnist is not on disk \(looked in .*empty_root/MNIST/raw\) and the download failed"),
    case("image-folder-no-root", ["train", "data=image_folder"], r"data\.root: a value is required; pass "
                                                                 r"data\.root=\.\.\."),
    case("image-folder-no-classes", ["train", "data=image_folder", "data.root={files}/no_classes"],
         r"data\.root: .*no_classes has no class folders; expected .*/<class>/<image files>"),
    case("audio-folder-no-audio", ["train", "data=audio_folder", "data.root={files}/no_audio"],
         r"data\.root: no readable audio files \(\.wav, \.flac, \.ogg\) under .*no_audio/<class>/"),
    case("audio-folder-no-classes", ["train", "data=audio_folder", "data.root={files}/no_classes"],
         r"data\.root: .*no_classes has no class folders; expected .*/<class>/<audio files>"),
    case("spoken-digits-not-made", ["train", "data=spoken_digits", "data.root={files}/no_digits"],
         r"data\.root: .*no_digits does not exist; make it with: python bench/spoken_digits\.py .*no_digits$"),
    case("audio-representation-unknown", ["train", "data=audio_tones", "data.representation=mfcc"],
         r"data\.representation: got 'mfcc'; expected waveform or logmel"),
    case("audio-sample-rate-zero", ["train", "data=audio_tones", "data.sample_rate=0"],
         r"data\.sample_rate: got 0; expected an integer >= 1"),
    case("audio-too-many-tone-kinds", ["train", "data=audio_tones", "data.num_classes=9"],
         r"data\.num_classes: got 9; audio_tones has 2 to 8 kinds of sound"),
    case("audio-mels-above-bins", ["train", "data=audio_tones", "data.frontend.n_fft=16", "model=audio_cnn"],
         r"data\.frontend\.n_mels: got n_mels=32 mel bands from only 9 frequency bins"),
    case("audio-model-on-images", ["train", "data=digits", "model=audio_cnn"],
         r"model: the model needs frontend, num_samples, which the data does not provide"),
    case("image-folder-not-a-dir", ["train", "data=image_folder", "data.root={files}/nowhere"],
         r"data\.root: .*nowhere is not a directory"),
    # -- text, tables and sequence tasks -------------------------------------------------------------------------
    case("text-file-missing", ["train", "data=text_classification", "data.path={files}/nowhere.csv"],
         r"data\.path: .*nowhere\.csv does not exist"),
    case("text-file-empty", ["train", "data=text_classification", "data.path={files}/empty.csv"],
         r"data\.path: .*empty\.csv is empty"),
    case("text-one-class", ["train", "data=text_classification", "data.path={files}/one_class.csv"],
         r"data\.label_column: the label column holds one class \('spam'\); classification needs at least two"),
    case("text-classification-not-utf8", ["train", "data=text_classification", "data.path={files}/latin1.csv"],
         r"data\.path: .*latin1\.csv is not UTF-8 text \(byte offset 19: b'\\xe9'\); .*data\.tokenizer=byte"),
    case("text-column-missing", ["train", "data=text_classification", "data.path={files}/one_class.csv",
                                 "data.text_column=body"],
         r"data\.text_column: .*one_class\.csv has no column 'body'; its columns are: text, label"),
    case("tabular-target-missing", ["train", "data=tabular", "data.name=null", "data.path={files}/table.csv",
                                    "data.target=price"],
         r"data\.target: .*table\.csv has no column 'price'; its columns are: a, colour, y"),
    case("tabular-name-and-path", ["train", "data=tabular", "data.path={files}/table.csv"],
         r"data\.path: set exactly one of data\.name .* and data\.path"),
    case("tabular-unknown-table", ["train", "data=tabular", "data.name=iris"],
         r"data\.name: unknown bundled table 'iris'; choose one of wine, breast_cancer, diabetes"),
    case("sequence-task-unknown", ["train", "data=sequence_tasks", "data.task=sum"],
         r"data\.task: unknown task 'sum'; choose one of sum_last_k, parity"),
    case("recurrent-on-images", ["train", "model=lstm", "data=digits"],
         r"model: this model reads token or real-valued sequences"),
    case("recurrent-on-a-table", ["train", "model=gru", "data=tabular"],
         r"model: this model reads token or real-valued sequences and the data yields features input"),
    case("vit-on-a-table", ["train", "model=vit", "data=tabular"], r"model: ViT reads images \[C, H, W\]"),
    case("seq2seq-on-classification-data", ["train", "model=seq2seq", "data=sequence_tasks"],
         r"model: the model needs bos_id, eos_id, which the data does not provide"),
    case("vit-patch-does-not-divide", ["train", "model=vit", "model.patch_size=3"],
         r"model\.patch_size: 8x8 images do not split into 3x3 patches"),
    case("tokenizer-unknown", ["train", "data=text_classification", "data.path=x.csv", "data.tokenizer=word"],
         r"data\.tokenizer: got 'word'; expected one of char, byte"),
    case("output-dir-not-writable", ["train", "paths.output_dir={files}/afile/outputs"],
         r"paths\.output_dir: cannot create .*afile/outputs.*; set paths\.output_dir .* to a writable directory"),
    case("output-dir-not-writable-sweep", ["train", "-m", "paths.output_dir={files}/afile/outputs",
                                           "trainer.max_epochs=1,2"], r"paths\.output_dir: cannot create"),
    # -- tune, lr-find, explain, summary -------------------------------------------------------------------------------
    case("tune-unknown-key", ["tune", "~search.params", "+search.params={{optimizer.lrr: {{type: float, "
                                                        "low: 0.001, high: 0.1}}}}"],
         r"search\.params\.optimizer\.lrr: not a key of the trial config \(did you mean 'optimizer\.lr'\?\)"),
    case("tune-empty-range", ["tune", "search.params={{optimizer.lr: {{low: 0.1, high: 0.01}}}}"],
         r"search\.params\.optimizer\.lr: empty range: low=0\.1 is not below high=0\.01"),
    case("tune-log-range-at-zero", ["tune", "search.params={{optimizer.lr: {{low: 0.0}}}}"],
         r"search\.params\.optimizer\.lr: a log range needs low > 0"),
    case("tune-metric-not-produced", ["tune", "search.metric=val/f1"],
         r"search\.metric: 'val/f1' is not a metric this run produces; choose one of .*val/acc"),
    case("tune-unknown-pruner", ["tune", "search.pruner=hyperband"],
         r"search\.pruner: got 'hyperband'; expected one of median, successive_halving, none"),
    case("lr-find-too-few-steps", ["lr-find", "lr_find.num_steps=2"], r"lr_find\.num_steps: got 2; expected an "
                                                                      r"integer >= 10"),
    case("explain-unknown-method", ["explain", "ckpt={run}", "method=gradcams"],
         r"method: unknown method 'gradcams' \(did you mean 'gradcam'\?\); choose one of gradcam, "),
    case("explain-gradcam-without-conv", ["explain", "ckpt={run}", "method=gradcam"],
         r"method: gradcam needs a Conv2d layer and this MLP has none; use method=saliency"),
    case("explain-not-a-classifier", ["explain", "ckpt={files}/regression.pt", "method=saliency"],
         r"ckpt: .*regression\.pt is not an image classifier's checkpoint \(its objective is Objective"),
    case("eval-worst-k-negative", ["eval", "ckpt={run}", "eval.worst_k=-1"],
         r"eval\.worst_k: got -1; expected an integer >= 0"),
    case("summary-not-a-dir", ["summary", "{tmp}/nowhere"], r"SWEEP_DIR: .*nowhere is not a directory"),
    case("summary-no-jobs", ["summary", "{files}/emptydir"], r"SWEEP_DIR: .*emptydir holds no job dirs"),
    # -- fine-tuning ---------------------------------------------------------------------------------------------------
    case("lora-targets-nothing", ["train", *TINY, "adapter=lora", "adapter.target_modules=[nothing]"],
         r"adapter\.target_modules: \['nothing'\] matches no adaptable layer of MLP; its Linear/Conv layers are: "
         r"blocks\.0\.linear"),
    case("qlora-without-linear", ["train", "data=synthetic", "data.num_samples=256", "model=cnn", "model.channels=[8]",
                                  "adapter=qlora", "trainer.device=cpu"],
         r"adapter: qlora quantizes Linear layers and CNN has none outside its head .*use adapter=lora"),
    case("hf-path-not-a-model", ["train", "model=hf_causal_lm", "model.path={files}/emptydir", "trainer.device=cpu"],
         r"model\.path: .*emptydir is not a Hugging Face model folder \(no config\.json\)"),
    case("hf-max-len-beyond-positions", ["train", "model=hf_causal_lm", "model.path={files}/tiny_lm",
                                         "data=instructions", "data.path={files}/records.jsonl", "data.max_len=65",
                                         "trainer.device=cpu"],
         r"data\.max_len: 65 tokens per row exceed the 64 positions of .*tiny_lm \(GPT2Config\); set "
         r"data\.max_len=64 or lower"),
    case("init-from-missing", ["train", *TINY, "init_from={files}/nowhere.pt"],
         r"init_from: .*nowhere\.pt does not exist; pass the nnctl checkpoint"),
    case("data-classes-unknown", ["train", *TINY, "data.classes=[0,99]"], r"data\.classes: unknown class 99"),
    case("paged-optimizer-on-cpu", ["train", *TINY, "optimizer=paged_adamw8bit"],
         r"optimizer: paged optimizers need a CUDA device \(parameters are on cpu\); use optimizer=adamw8bit"),
    case("unfreeze-matches-nothing", ["train", *TINY, "finetune.unfreeze_schedule=[{{epoch: 0, unfreeze: [neck]}}]"],
         r"finetune\.unfreeze_schedule\[0\]\.unfreeze: 'neck' matches no parameter; module names start with: "
         r"blocks, head"),
    case("unfreeze-epochs-not-increasing", ["train", *TINY, "finetune.unfreeze_schedule=[{{epoch: 0, unfreeze: "
                                            "[head]}}, {{epoch: 2, unfreeze: [blocks]}}, {{epoch: 2, unfreeze: ['.*']}}]"],
         r"finetune\.unfreeze_schedule: epochs must increase from entry to entry: epoch 2 follows epoch 2"),
    case("unfreeze-first-epoch-not-0", ["train", *TINY, "finetune.unfreeze_schedule=[{{epoch: 1, unfreeze: [head]}}]"],
         r"finetune\.unfreeze_schedule: the first entry is at epoch 1, so nothing would train before it"),
    case("unfreeze-entry-shape", ["train", *TINY, "finetune.unfreeze_schedule=[{{after: 0, unfreeze: [head]}}]"],
         r"finetune\.unfreeze_schedule\[0\]: got \{'after': 0, 'unfreeze': \['head'\]\}; each entry is "
         r"\{epoch: E, unfreeze: \[regex, \.\.\.\]\}"),
    case("unfreeze-with-adapter", ["train", *TINY, "adapter=lora",
                                   "finetune.unfreeze_schedule=[{{epoch: 0, unfreeze: ['.*']}}]"],
         r"finetune\.unfreeze_schedule: progressive unfreezing trains base weights, which an adapter keeps frozen"),
    # -- language models ---------------------------------------------------------------------------------------------
    case("text-missing-file", ["train", "data=text", "model=gpt", "data.path={files}/nowhere.txt"],
         r"data\.path: .*nowhere\.txt does not exist; pass a text file, or data\.path=null for the bundled corpus"),
    case("text-empty-file", ["train", "data=text", "model=gpt", "data.path={files}/empty.txt"],
         r"data\.path: .*empty\.txt is empty"),
    case("text-not-utf8", ["train", "data=text", "model=gpt", "data.path={files}/latin1.txt"],
         r"data\.path: .*latin1\.txt is not UTF-8 text \(byte 0xe9 at byte offset 3\); .*data\.tokenizer=byte"),
    case("text-block-size-too-long", ["train", "data=text", "model=gpt", "data.block_size=30000"],
         r"data\.block_size: block_size 30000 needs 30001 tokens in each split, but the val split of the bundled "
         r"corpus .* has \d+"),
    case("text-tokenizer-unknown", ["train", "data=text", "data.tokenizer=word"],
         r"data\.tokenizer: got 'word'; expected one of char, byte"),
    case("gpt-on-images", ["train", "model=gpt"], r"model: the model needs block_size, vocab_size, which the data "
                                                  r"does not provide \(it yields images"),
    case("gpt-heads-do-not-divide-width", ["train", "data=text", "model=gpt", "model.n_embd=30", "model.n_head=4"],
         r"model\.n_embd: n_embd=30 must be a multiple of n_head=4"),
    case("generate-no-ckpt", ["generate"], r"ckpt: a value is required; pass ckpt=\.\.\."),
    case("generate-image-classifier", ["generate", "ckpt={run}"],
         r"ckpt: .*best\.pt holds a MLP model trained on a 'class' target, which nnctl generate cannot decode"),
    case("generate-unknown-character", ["generate", "ckpt={lm}", "prompt='Ab\u65e5'"],
         r"prompt: character '\u65e5' \(U\+65E5\) at position 2 of the prompt is not in the checkpoint's "
         r"vocabulary"),
    case("generate-temperature-negative", ["generate", "ckpt={lm}", "temperature=-1"],
         r"temperature: got -1; expected a number >= 0 \(0 = greedy\)"),
    case("unknown-command", ["trian"], r"^nnctl: unknown command 'trian' \(did you mean 'train'\?\)"),
    # -- engine contract and curriculum stages -----------------------------------------------------------------
    case("stages-unknown-key", ["train", *TINY, "stages=[{{name: a, epochs: 1, overrides: {{data.batchsize: 8}}}}]"],
         r"stages\[0\]\.overrides: data\.batchsize: not a key of the config \(did you mean 'data\.batch_size'\?\)"),
    case("stages-change-model", ["train", *TINY, "stages=[{{name: a, epochs: 1, overrides: {{model.hidden_sizes: [8]}}}}]"],
         r"stages\[0\]\.overrides: a stage cannot change model\.hidden_sizes"),
    case("stages-zero-epochs", ["train", *TINY, "stages=[{{name: a, epochs: 0}}]"],
         r"stages\[0\]\.epochs: got 0; expected an integer >= 1"),
    case("stages-duplicate-name", ["train", *TINY, "stages=[{{name: a, epochs: 1}}, {{name: a, epochs: 1}}]"],
         r"stages\[1\]\.name: got name 'a'; each stage needs its own name"),
    case("stages-not-a-list", ["train", *TINY, "stages=3"], r"stages: expected a non-empty list"),
    case("l1-negative", ["train", *TINY, "trainer.l1=-0.1"], r"trainer\.l1: got -0\.1; expected a number >= 0"),
    case("grad-checkpointing-no-blocks", ["train", "data=synthetic", "model=cnn", "trainer.grad_checkpointing=true"],
         r"trainer\.grad_checkpointing: CNN has no `blocks` to recompute"),
    # -- generative models: nnctl sample and quality scores ------------------------------------------------------------
    case("sample-classifier", ["sample", "ckpt={run}"], r"ckpt: .*does not generate images; pass a checkpoint of "
                                                        r"model=gan, vae or diffusion"),
    case("sample-class-label-range", ["sample", "ckpt={ddpm}", "class_label=10"],
         r"class_label: got 10; this model knows classes 0 to 9"),
    case("sample-class-label-unconditional", ["sample", "ckpt={gan}", "class_label=1"],
         r"class_label: this model was trained without class labels"),
    case("sample-steps-above-schedule", ["sample", "ckpt={ddpm}", "steps=101"],
         r"steps: got 101; this model was trained with a 100-step noise schedule"),
    case("sample-steps-on-a-gan", ["sample", "ckpt={gan}", "steps=10"], r"steps: a GAN has no steps setting"),
    case("sample-guidance-rescale-range", ["sample", "ckpt={ddpm}", "guidance=2.0", "guidance_rescale=1.5"],
         r"guidance_rescale: got 1\.5; expected a number from 0 \(off\) to 1"),
    case("sample-reconstruct-gan", ["sample", "ckpt={gan}", "mode=reconstruct"], r"mode: a GAN does not reconstruct"),
    case("eval-guidance-on-a-gan", ["eval", "ckpt={gan}", "eval.feature_ckpt={run}", "eval.guidance=2.0"],
         r"eval\.guidance: a .* has no guidance setting \(only diffusion models do\)"),
    case("eval-feature-ckpt-other-data", ["eval", "ckpt={gan}", "eval.feature_ckpt={run}"],
         r"eval\.feature_ckpt: .* was trained on other data \(in_shape \[3, 16, 16\] vs the generator's \[1, 8, 8\]\)"),
]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class _Evil:
    """Unpickling this runs a shell command: what a malicious 'checkpoint' does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _declare_bytes(metadata: Path, payload: object) -> None:
    """Rewrite a shard folder's DCP index (only DCP's own records) so that its first weight is a pickled object in
    another file: DCP's loader would unpickle that without weights_only."""
    import io

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    index = pickle.loads(metadata.read_bytes())  # the test's own file: trusted
    name = next(k for k in index.state_dict_metadata if k.startswith("model/"))
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    (metadata.parent / "payload.distcp").write_bytes(buffer.getvalue())
    index.state_dict_metadata[name] = BytesStorageMetadata()
    index.storage_data = {k: v for k, v in index.storage_data.items() if k.fqn != name}
    index.storage_data[MetadataIndex(name)] = _StorageInfo("payload.distcp", 0, len(buffer.getvalue()))
    metadata.write_bytes(pickle.dumps(index))


@pytest.fixture(scope="session")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny finished run ({run}) and bad inputs made from it ({files}); paths are absolute, so this session
    fixture does not depend on the working dir of whichever test asks for it first."""
    base = tmp_path_factory.mktemp("errors")
    run, files = base / "run", base / "files"
    files.mkdir()
    assert main(["train", *TINY, f"paths.root_dir={base}", f"hydra.run.dir={run}"]) == 0
    generative = ["data=digits", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                  "trainer.device=cpu", "trainer.progress=false", "trainer/checkpoint=loss", f"paths.root_dir={base}"]
    assert main(["train", *generative, "model=gan", "objective=gan", "model.arch=mlp", "model.hidden=16",
                 "objective.grid_samples=4", f"hydra.run.dir={base / 'gan'}"]) == 0
    assert main(["train", *generative, "model=diffusion", "objective=diffusion", "model.channels=[8,16]",
                 "model.conditional=true", "model.timesteps=100", "model.sample_steps=2", "objective.grid_samples=4",
                 f"hydra.run.dir={base / 'ddpm'}"]) == 0
    sharded = base / "sharded"  # one process writes the sharded format too (one shard)
    assert main(["train", *TINY, "trainer.strategy=fsdp", "trainer.checkpoint.sharded=true", f"paths.root_dir={base}",
                 f"hydra.run.dir={sharded}"]) == 0
    shutil.copy(sharded / "checkpoints" / ck.BEST, files / "sharded_moved.pt")  # without its shards folder
    shutil.copytree(sharded / "checkpoints", files / "sharded_evil" / "checkpoints")
    for metadata in (files / "sharded_evil").rglob(".metadata"):
        metadata.write_bytes(pickle.dumps(_Evil(files / "pwned")))
    shutil.copytree(sharded / "checkpoints", files / "sharded_bytes" / "checkpoints")
    for metadata in (files / "sharded_bytes").rglob(".metadata"):
        _declare_bytes(metadata, _Evil(files / "pwned"))
    best = run / "checkpoints" / ck.BEST
    data = best.read_bytes()
    (files / "truncated.pt").write_bytes(data[: len(data) // 2])
    (files / "empty.pt").write_bytes(b"")
    (files / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (files / "notes.pt").write_text("these are my notes, not a checkpoint\n")
    torch.save({"weights": torch.zeros(3)}, files / "foreign.pt")  # a plain torch file without nnctl's keys
    torch.save({"model": _Evil(files / "pwned")}, files / "evil.pt")
    state = ck.load_checkpoint(best)
    cfg = OmegaConf.create(state[ck.CONFIG])
    cfg.model.hidden_sizes = [32]  # the stored config now describes a model the stored weights do not fit
    ck.save_checkpoint({**state, ck.CONFIG: OmegaConf.to_yaml(cfg)}, files / "mismatch.pt")
    cfg = OmegaConf.create(state[ck.CONFIG])
    cfg.objective = {"_target_": "nnctl.objectives.Objective", "_partial_": True}  # not a classifier's objective
    ck.save_checkpoint({**state, ck.CONFIG: OmegaConf.to_yaml(cfg)}, files / "regression.pt")
    (files / "emptydir").mkdir()
    import fixtures as fx

    fx.make_hf_causal_lm(files / "tiny_lm")  # GPT-2 with 64 positions
    fx.write_instructions(files / "records.jsonl", copies=4)
    (files / "empty_root").mkdir()
    (files / "no_classes").mkdir()
    (files / "no_classes" / "readme.txt").write_text("images go in class folders\n")
    (files / "no_audio" / "speech").mkdir(parents=True)
    (files / "no_audio" / "speech" / "notes.txt").write_text("recordings go here\n")
    (files / "afile").write_text("a regular file where a directory is expected\n")
    (files / "empty.csv").write_bytes(b"")
    (files / "one_class.csv").write_text("text,label\nbuy now,spam\ncheap pills,spam\n")
    (files / "latin1.csv").write_bytes("text,label\nok,a\ncaf\xe9,b\n".encode("latin-1"))  # offset 19: 0xe9
    (files / "table.csv").write_text("a,colour,y\n1,red,2.0\n2,blue,3.5\n")
    (files / "empty.txt").write_bytes(b"")
    (files / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    lm = base / "lm"  # a tiny language model
    assert main(["train", "data=text", "model=gpt", "model.n_layer=1", "model.n_embd=16", "data.block_size=16",
                 "data.batches_per_epoch=2", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
                 "trainer.device=cpu", "trainer.progress=false", f"paths.root_dir={base}", f"hydra.run.dir={lm}"]) == 0
    return {"run": run, "lm": lm, "files": files, "gan": base / "gan", "ddpm": base / "ddpm",  # type: ignore[dict-item]
            "digests": _digests(base)}


@pytest.mark.parametrize("argv, code, pattern", CASES)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], code: int, pattern: str, crafted: dict,
                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    places = {"run": crafted["run"], "lm": crafted["lm"], "files": crafted["files"], "tmp": tmp_path,
              "gan": crafted["gan"], "ddpm": crafted["ddpm"]}
    args = [a.format(**places) for a in argv]
    assert main(args) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{err}"
    assert re.match(r"nnctl( [a-z-]+: error:|:) ", lines[0]), lines[0]  # "nnctl <command>: error: ..."
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    assert not (crafted["files"] / "pwned").exists(), "a malicious pickle ran code"
    # what existed before (the finished run, its checkpoints, the crafted files) is byte-identical
    assert _digests(crafted["run"].parent) == crafted["digests"]


def test_cases_cover_each_group_and_have_unique_ids() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 35
    for group in ("model", "data", "optimizer", "scheduler", "precision", "adapter", "objective", "trainer"):
        assert any(arg == f"{group}=" or arg.startswith(f"{group}=") and "." not in arg.split("=")[0]
                   for c in CASES for arg in c.values[0]), group


# -- HYDRA_FULL_ERROR and programming errors ---------------------------------------------------------------------------
def _nnctl() -> list[str]:
    exe = Path(sys.executable).parent / "nnctl"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "nnctl"]


def test_full_error_env_shows_the_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["NNCTL_ROOT"] = str(tmp_path)
    def start(extra_env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen([*_nnctl(), "train", "optimizer.lr=-1"], cwd=tmp_path, env={**env, **extra_env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    plain, full = start({}), start({"HYDRA_FULL_ERROR": "1"})  # both at once: each pays the torch import
    plain_err, full_err = plain.communicate(timeout=180)[1], full.communicate(timeout=180)[1]
    assert plain.returncode == 2, plain_err
    assert plain_err.strip() == ("nnctl train: error: optimizer.lr: got -1; expected a number > 0, e.g. "
                                 "optimizer.lr=0.001"), plain_err
    assert full.returncode != 0
    assert "Traceback" in full_err and "UserError" in full_err and "optimizer.lr" in full_err


def test_full_error_env_in_process_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    from nnctl.errors import UserError

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UserError, match="optimizer.lr"):
        main(["train", "optimizer.lr=-1"])
    assert os.environ.get("HYDRA_FULL_ERROR") == "1"  # left as the user set it


def test_programming_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from nnctl.engine import Engine

    def broken(self: Engine) -> None:
        return 1 / 0

    monkeypatch.setattr(Engine, "fit", broken)
    with pytest.raises(ZeroDivisionError):
        main(["train", *TINY])
    assert "HYDRA_FULL_ERROR" not in os.environ  # run() restores the environment after raising


def test_code_reading_an_unknown_config_key_is_a_bug_not_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo'd config key in nnctl's own code must not be reported as the user's unknown key (exit 2)."""
    from omegaconf.errors import ConfigAttributeError

    from nnctl.engine import Engine

    def typo(self: Engine) -> None:
        return self.cfg.trainer.max_epoch

    monkeypatch.setattr(Engine, "fit", typo)
    with pytest.raises(ConfigAttributeError):
        main(["train", *TINY])


def test_train_help_lists_groups_and_options(capsys: pytest.CaptureFixture) -> None:
    try:
        code = main(["train", "--help"])
    except SystemExit as exc:  # Hydra's help may exit by itself
        code = exc.code or 0
    out = capsys.readouterr().out
    assert code == 0
    for group, options in (("model", "cnn.*mlp.*resnet"), ("optimizer", "adam.*sgd"), ("data", "digits.*synthetic"),
                           ("scheduler", "cosine.*warmup_cosine"), ("trainer/early_stopping", "default, off")):
        assert re.search(rf"^{group}: .*{options}", out, re.MULTILINE), (group, out)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_help_into_a_closed_pipe_stops_quietly(args: list[str]) -> None:
    """`nnctl --help | head`: the reader is gone before the help is written; no traceback, no bogus run-dir error,
    the exit status a shell gives a process its pipe closed on (128 + SIGPIPE)."""
    proc = subprocess.Popen([sys.executable, "-m", "nnctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


def test_user_message_without_run_context() -> None:
    """user_message also works when called outside run() (e.g. by a sweep job or a test)."""
    from nnctl.commands import user_message
    from nnctl.errors import UserError

    assert user_message(UserError("got 0; expected 1", key="x")) == "x: got 0; expected 1"
    assert user_message(UserError("two\n   lines")) == "two lines"
    assert user_message(ZeroDivisionError("bug")) is None
