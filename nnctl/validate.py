"""Value checks on the composed config, as one table of rules.

Hydra/OmegaConf already reject unknown groups and keys; these rules catch values of the wrong type or outside
their range before any work starts, each naming the key and the accepted values. A rule whose key is absent from
the config (another option of the group is selected) is skipped, so one table serves every option.

To add a check, append a `Rule` to RULES: the dotted key, the accepted types (INT, NUM, BOOL, STR, LIST, DICT or a
tuple of your own), an optional predicate on the value, and what a valid value looks like (shown to the user as
"<key>: got <value>; expected <expect>").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from nnctl.distributed import BACKENDS, STRATEGIES
from nnctl.errors import UserError


@dataclass(frozen=True)
class Rule:
    key: str                            # dotted config key; skipped when absent from the config
    types: tuple[type, ...]             # accepted Python types (bool is never accepted as int/float)
    check: Callable[[Any], bool] | None  # extra predicate on the value (only called when the type matched)
    expect: str | Callable[[], str]     # what a valid value looks like, for the message
    nullable: bool = False


def _positive(v: Any) -> bool:
    return v > 0


def _fraction_open(v: Any) -> bool:
    return 0 < v < 1


def _fraction_limit(v: Any) -> bool:
    return (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)


def _ints(minimum: int, min_len: int = 0, max_len: int | None = None) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        items = list(v)
        return (min_len <= len(items) <= (max_len if max_len is not None else len(items))
                and all(_has_type(i, (int,)) and i >= minimum for i in items))
    return check


def _betas(v: Any) -> bool:
    items = list(v)
    return len(items) == 2 and all(_has_type(b, (int, float)) and 0 <= b < 1 for b in items)


def _device(v: str) -> bool:
    return re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None


def _metric(v: str) -> bool:
    return re.fullmatch(r"(train|val)/\w+", v) is not None


def _activation(v: str) -> bool:
    from nnctl.models import ACTIVATIONS

    return v in ACTIVATIONS


def _activations() -> str:
    from nnctl.models import ACTIVATIONS

    return "one of " + ", ".join(ACTIVATIONS)


def _tta(v: Any) -> bool:
    from nnctl.objectives import TTA_MODES

    return isinstance(v, bool) or v in TTA_MODES


def _tta_modes() -> str:
    from nnctl.objectives import TTA_MODES

    return f"one of {', '.join(TTA_MODES)} (true/false mean flip/none)"


def _tune_names(registry: str) -> list[str]:
    from nnctl import tune

    return list(getattr(tune, registry))


def _tune_choices(registry: str) -> str:
    return "one of " + ", ".join(_tune_names(registry))
def _wandb_mode(v: str) -> bool:
    from nnctl.loggers.wandb import MODES

    return v in MODES


def _wandb_modes() -> str:
    from nnctl.loggers.wandb import MODES

    return "one of " + ", ".join(MODES)
def _tokenizer(v: str) -> bool:
    from nnctl.data.text import TOKENIZERS

    return v in TOKENIZERS


def _tokenizers() -> str:
    from nnctl.data.text import TOKENIZERS

    return "one of " + ", ".join(TOKENIZERS)


INT, NUM, BOOL, STR = (int,), (int, float), (bool,), (str,)
LIST, DICT = (list, tuple, ListConfig), (dict, DictConfig)
MAPPING = "a mapping of keys (to pick an option of the group, write {group}=<option>)"

RULES: list[Rule] = [
    # -- optimizer ------------------------------------------------------------------------------------------------
    Rule("optimizer.lr", NUM, _positive, "a number > 0, e.g. optimizer.lr=0.001"),
    Rule("optimizer.weight_decay", NUM, lambda v: v >= 0, "a number >= 0, e.g. optimizer.weight_decay=0.01"),
    Rule("optimizer.momentum", NUM, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. optimizer.momentum=0.9"),
    Rule("optimizer.betas", LIST, _betas, "two numbers in [0, 1), e.g. optimizer.betas=[0.9,0.999]"),
    Rule("optimizer.alpha", NUM, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. optimizer.alpha=0.99"),
    Rule("optimizer.nesterov", BOOL, None, "true or false"),
    # -- scheduler ------------------------------------------------------------------------------------------------
    Rule("scheduler.min_lr_ratio", NUM, lambda v: 0 <= v <= 1, "a number in [0, 1], e.g. 0.0"),
    Rule("scheduler.warmup_fraction", NUM, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.05"),
    Rule("scheduler.first_cycle_epochs", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("scheduler.cycle_mult", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("scheduler.pct_start", NUM, _fraction_open, "a fraction strictly between 0 and 1, e.g. 0.25"),
    Rule("scheduler.div_factor", NUM, _positive, "a number > 0, e.g. 25"),
    Rule("scheduler.final_div_factor", NUM, _positive, "a number > 0, e.g. 1000"),
    Rule("scheduler.anneal", STR, lambda v: v in ("cos", "linear"), "cos or linear"),
    Rule("scheduler.step_epochs", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("scheduler.gamma", NUM, _positive, "a number > 0 (< 1 decays the lr), e.g. scheduler.gamma=0.5"),
    Rule("scheduler.factor", NUM, _fraction_open, "a fraction strictly between 0 and 1, e.g. 0.5"),
    Rule("scheduler.patience", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("scheduler.mode", STR, lambda v: v in ("min", "max", "auto"), "min or max"),
    Rule("scheduler.monitor", STR, lambda v: v == "auto" or _metric(v), "a metric name such as val/loss or val/acc"),
    # -- data -----------------------------------------------------------------------------------------------------
    Rule("data.root", STR + INT, None, "a directory path, e.g. data.root=/path/to/data"),
    Rule("data.download", BOOL, None, "true or false"),
    Rule("data.batch_size", INT, lambda v: v >= 1, "an integer >= 1, e.g. data.batch_size=64"),
    Rule("data.eval_batch_size", INT, lambda v: v >= 1, "an integer >= 1, e.g. data.eval_batch_size=512"),
    Rule("data.val_fraction", NUM, _fraction_open, "a fraction strictly between 0 and 1, e.g. 0.1"),
    Rule("data.test_fraction", NUM, _fraction_open, "a fraction strictly between 0 and 1, e.g. 0.2"),
    Rule("data.split_seed", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("data.num_workers", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("data.limit", INT, lambda v: v >= 1, "an integer >= 1 or null", nullable=True),
    Rule("data.overfit_batches", INT, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    Rule("data.image_size", INT, lambda v: v >= 4, "an integer >= 4, e.g. data.image_size=32"),
    Rule("data.channels", INT, lambda v: v >= 1, "an integer >= 1 (3 = RGB, 1 = grayscale)"),
    Rule("data.num_samples", INT, lambda v: v >= 2, "an integer >= 2"),
    Rule("data.num_classes", INT, lambda v: v >= 2, "an integer >= 2"),
    Rule("data.noise", NUM, lambda v: v >= 0, "a number >= 0"),
    Rule("data.in_memory", BOOL + STR, lambda v: v in (True, False, "auto"), "true, false or auto"),
    Rule("data.max_memory_mb", INT, lambda v: v >= 1, "an integer >= 1 (MiB)"),
    Rule("data.classes", LIST, lambda v: len(v) >= 2, "a list of >= 2 class names or indices, e.g. [0,1,2]",
         nullable=True),
    Rule("data.augment", DICT, None, "a mapping with crop_padding and hflip, e.g. data.augment.hflip=false"),
    Rule("data.augment.crop_padding", INT, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    Rule("data.augment.hflip", BOOL, None, "true or false"),
    Rule("data.path", STR, None, "a file or directory path, e.g. data.path=/path/to/file (null: the option's default)",
         nullable=True),
    Rule("data.sample_rate", INT, lambda v: v >= 1, "an integer >= 1 (Hz), e.g. data.sample_rate=16000"),
    Rule("data.clip_seconds", NUM, _positive, "a number > 0 (seconds), e.g. data.clip_seconds=1.0"),
    Rule("data.representation", STR, lambda v: v in ("waveform", "logmel"), "waveform or logmel"),
    Rule("data.frontend", DICT, None, "a mapping with n_fft, hop_length, n_mels, e.g. data.frontend.n_mels=64"),
    Rule("data.frontend.n_fft", INT, lambda v: v >= 2, "an integer >= 2, e.g. data.frontend.n_fft=512"),
    Rule("data.frontend.hop_length", INT, lambda v: v >= 1, "an integer >= 1, e.g. data.frontend.hop_length=256"),
    Rule("data.frontend.n_mels", INT, lambda v: v >= 1, "an integer >= 1, e.g. data.frontend.n_mels=64"),
    Rule("data.frontend.top_db", NUM, _positive, "a number > 0 (dB), e.g. data.frontend.top_db=80"),
    Rule("data.tokenizer", STR, _tokenizer, _tokenizers),
    Rule("data.block_size", INT, lambda v: v >= 1, "an integer >= 1, e.g. data.block_size=128"),
    Rule("data.batches_per_epoch", INT, lambda v: v >= 1, "an integer >= 1, e.g. data.batches_per_epoch=200"),
    Rule("data.name", STR, None, "the name of a bundled table, or null", nullable=True),
    Rule("data.target", STR, None, "a column name, e.g. data.target=price", nullable=True),
    Rule("data.text_column", STR, None, "a column name, e.g. data.text_column=text"),
    Rule("data.label_column", STR, None, "a column name, e.g. data.label_column=label"),
    Rule("data.task", STR, None, "a task name (see the data option's comments)"),
    Rule("data.max_len", INT, lambda v: v >= 1, "an integer >= 1, e.g. data.max_len=256"),
    Rule("data.min_len", INT, lambda v: v >= 1, "an integer >= 1, e.g. data.min_len=4"),
    Rule("data.k", INT, lambda v: v >= 1, "an integer >= 1, e.g. data.k=3"),
    Rule("data.max_classes", INT, lambda v: v >= 2, "an integer >= 2, e.g. data.max_classes=20"),
    # -- model ----------------------------------------------------------------------------------------------------
    Rule("model.hidden_sizes", LIST, _ints(1), "a list of integers >= 1, e.g. model.hidden_sizes=[256,128]"),
    Rule("model.channels", LIST, _ints(1, min_len=1), "a non-empty list of integers >= 1, e.g. [32,64,128]"),
    Rule("model.convs_per_block", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("model.blocks_per_stage", LIST, _ints(1, min_len=1), "a non-empty list of integers >= 1, e.g. [1,1,1,1]",
         nullable=True),
    Rule("model.depth", INT, lambda v: v >= 1, "an integer >= 1 (resnet: 18 or 34, or set model.blocks_per_stage)"),
    Rule("model.width", INT, lambda v: v >= 1, "an integer >= 1, e.g. model.width=64"),
    Rule("model.batch_norm", BOOL, None, "true or false"),
    Rule("model.residual", BOOL, None, "true or false"),
    Rule("model.dropout", NUM, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. model.dropout=0.1"),
    Rule("model.activation", STR, _activation, _activations),
    Rule("model.widths", LIST, _ints(1, min_len=1), "a non-empty list of integers >= 1, e.g. [32,64,128]"),
    Rule("model.whiten_width", INT, lambda v: v >= 2, "an integer >= 2 or null (all eigenvectors)", nullable=True),
    Rule("model.whiten_kernel", INT, lambda v: v >= 1, "an integer >= 1, e.g. 2"),
    Rule("model.logit_scale", NUM, _positive, "a number > 0, e.g. 0.111"),
    Rule("model.norm_bias_lr_mult", NUM, _positive, "a number > 0, e.g. 64 (1 = the optimizer's lr)"),
    Rule("model.n_layer", INT, lambda v: v >= 1, "an integer >= 1, e.g. model.n_layer=4"),
    Rule("model.n_head", INT, lambda v: v >= 1, "an integer >= 1, e.g. model.n_head=4"),
    Rule("model.n_embd", INT, lambda v: v >= 1, "an integer >= 1 (a multiple of model.n_head), e.g. 128"),
    Rule("model.bias", BOOL, None, "true or false"),
    Rule("model.cell", STR, lambda v: v in ("rnn", "lstm", "gru"), "rnn, lstm or gru"),
    Rule("model.hidden_size", INT, lambda v: v >= 1, "an integer >= 1, e.g. model.hidden_size=128"),
    Rule("model.num_layers", INT, lambda v: v >= 1, "an integer >= 1, e.g. model.num_layers=2"),
    Rule("model.bidirectional", BOOL, None, "true or false"),
    Rule("model.pool", STR, lambda v: v in ("last", "mean", "attention", "cls"),
         "last, mean or attention (recurrent models); mean or cls (transformer)"),
    Rule("model.embed_dim", INT, lambda v: v >= 1, "an integer >= 1, e.g. model.embed_dim=64"),
    Rule("model.dim", INT, lambda v: v >= 1, "an integer >= 1 divisible by model.heads, e.g. model.dim=64"),
    Rule("model.heads", INT, lambda v: v >= 1, "an integer >= 1 that divides model.dim, e.g. model.heads=4"),
    Rule("model.decoder_depth", INT, lambda v: v >= 1, "an integer >= 1 or null (= model.depth)", nullable=True),
    Rule("model.mlp_ratio", NUM, _positive, "a number > 0, e.g. model.mlp_ratio=2.0"),
    Rule("model.positions", STR, lambda v: v in ("sinusoidal", "learned"), "sinusoidal or learned"),
    Rule("model.patch_size", INT, lambda v: v >= 1, "an integer >= 1 dividing the image sides, e.g. 4"),
    Rule("objective.snr_gamma", NUM, _positive, "a positive number (5.0 is the usual choice) or null (off)",
         nullable=True),
    # -- trainer --------------------------------------------------------------------------------------------------
    Rule("trainer.max_epochs", INT, lambda v: v >= 1, "an integer >= 1, e.g. trainer.max_epochs=5"),
    Rule("trainer.max_steps", INT, lambda v: v >= 1, "an integer >= 1 or null", nullable=True),
    Rule("trainer.grad_accum_steps", INT, lambda v: v >= 1, "an integer >= 1, e.g. trainer.grad_accum_steps=2"),
    Rule("trainer.grad_clip_norm", NUM, _positive, "a number > 0 or null, e.g. trainer.grad_clip_norm=1.0",
         nullable=True),
    Rule("trainer.grad_checkpointing", BOOL, None, "true or false"),
    Rule("trainer.l1", NUM, lambda v: v >= 0, "a number >= 0 (0 = off), e.g. trainer.l1=1e-5"),
    Rule("trainer.label_smoothing", NUM, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.1"),
    Rule("trainer.decay_norm_bias", BOOL, None, "true or false"),
    Rule("trainer.seed", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("trainer.deterministic", BOOL, None, "true or false"),
    Rule("trainer.device", STR, _device, "auto, cpu, cuda, cuda:N or mps"),
    Rule("trainer.limit_train_batches", NUM, _fraction_limit, "an integer >= 1, a fraction in (0, 1], or null",
         nullable=True),
    Rule("trainer.limit_val_batches", NUM, _fraction_limit, "an integer >= 1, a fraction in (0, 1], or null",
         nullable=True),
    Rule("trainer.log_every_n_steps", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.max_bad_steps", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.progress", BOOL, None, "true or false"),
    Rule("trainer.channels_last", BOOL, None, "true or false"),
    Rule("trainer.compile", BOOL, None, "true or false"),
    Rule("trainer.extend_schedule", BOOL, None, "true or false, e.g. trainer.extend_schedule=true"),
    Rule("trainer.init_samples", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.ema", DICT, None, MAPPING.format(group="trainer/ema")),
    Rule("trainer.ema.enabled", BOOL, None, "true or false"),
    Rule("trainer.ema.decay", NUM, _fraction_open, "a number strictly between 0 and 1, e.g. trainer.ema.decay=0.999"),
    Rule("trainer.ema.every_n_steps", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.early_stopping", DICT, None, MAPPING.format(group="trainer/early_stopping")),
    Rule("trainer.early_stopping.enabled", BOOL, None, "true or false"),
    Rule("trainer.early_stopping.monitor", STR, _metric, "a metric name such as val/loss or val/acc"),
    Rule("trainer.early_stopping.patience", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("trainer.early_stopping.min_delta", NUM, lambda v: v >= 0, "a number >= 0"),
    Rule("trainer.early_stopping.mode", STR, lambda v: v in ("min", "max"), "min or max"),
    Rule("trainer.checkpoint", DICT, None, MAPPING.format(group="trainer/checkpoint")),
    Rule("trainer.checkpoint.enabled", BOOL, None, "true or false"),
    Rule("trainer.checkpoint.monitor", STR, lambda v: v in ("auto", "latest") or _metric(v),
         "auto, latest (the newest epoch) or a metric name such as val/acc or val/loss"),
    Rule("trainer.checkpoint.mode", STR, lambda v: v in ("min", "max", "auto"), "min, max or auto"),
    Rule("trainer.checkpoint.save_top_k", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("trainer.checkpoint.save_last", BOOL, None, "true or false"),
    Rule("trainer.checkpoint.every_n_epochs", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.checkpoint.sharded", BOOL, None, "true or false"),
    Rule("trainer.nproc_per_node", INT, lambda v: v >= 1, "an integer >= 1 (processes on this node)"),
    Rule("trainer.nnodes", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.rdzv_endpoint", STR, lambda v: re.fullmatch(r"[\w.\-\[\]:]+:\d+", v) is not None,
         "HOST:PORT of the first node, e.g. trainer.rdzv_endpoint=node001:29500, or null", nullable=True),
    Rule("trainer.strategy", STR, lambda v: v in STRATEGIES, lambda: "one of " + ", ".join(STRATEGIES)),
    Rule("trainer.sync_batchnorm", BOOL, None, "true or false"),
    Rule("trainer.dist_backend", STR, lambda v: v in BACKENDS, lambda: "one of " + ", ".join(BACKENDS)),
    Rule("trainer.dist_timeout", NUM, _positive, "a number of seconds > 0, e.g. 300"),
    # -- search (nnctl tune) ---------------------------------------------------------------------------------------
    Rule("search.metric", STR, _metric, "a metric name such as val/acc or val/loss"),
    Rule("search.direction", STR, lambda v: v in ("maximize", "minimize"), "maximize or minimize"),
    Rule("search.sampler", STR, lambda v: v in _tune_names("SAMPLERS"), lambda: _tune_choices("SAMPLERS")),
    Rule("search.pruner", STR, lambda v: v in _tune_names("PRUNERS"), lambda: _tune_choices("PRUNERS")),
    Rule("search.n_trials", INT, lambda v: v >= 1, "an integer >= 1, e.g. search.n_trials=20"),
    Rule("search.timeout", NUM, _positive, "a number of seconds > 0, or null", nullable=True),
    Rule("search.seed", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("search.startup_trials", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("search.warmup_epochs", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("search.params", DICT, None, "a mapping of config keys to ranges, e.g. {optimizer.lr: {type: float, "
                                      "low: 1e-4, high: 0.1, log: true}}"),
    Rule("search.enqueue", LIST, None, "a list of mappings, e.g. [{optimizer.lr: 0.003}]"),
    Rule("search.overrides", LIST, None, "a list of overrides, e.g. [experiment=fashion_mnist_fast]"),
    # -- lr-find --------------------------------------------------------------------------------------------------
    Rule("lr_find.start_lr", NUM, _positive, "a number > 0, e.g. lr_find.start_lr=1e-7"),
    Rule("lr_find.end_lr", NUM, _positive, "a number > 0, e.g. lr_find.end_lr=10"),
    Rule("lr_find.num_steps", INT, lambda v: v >= 10, "an integer >= 10, e.g. lr_find.num_steps=100"),
    # -- explain --------------------------------------------------------------------------------------------------
    Rule("num_images", INT, lambda v: v >= 1, "an integer >= 1, e.g. num_images=16"),
    Rule("layer", STR, None, "a module name such as blocks.1.0, or null for the last Conv2d", nullable=True),
    # -- logger ---------------------------------------------------------------------------------------------------
    Rule("logger", DICT, None, "trackers chosen as logger=<option> or logger=[tensorboard,mlflow]", nullable=True),
    Rule("logger.mlflow.tracking_uri", STR, lambda v: v.strip() != "",
         "a tracking URI: sqlite:///path/mlflow.db or http://host:port"),
    Rule("logger.mlflow.experiment_name", STR, lambda v: v.strip() != "", "a non-empty name, e.g. nnctl"),
    Rule("logger.mlflow.log_artifacts", BOOL, None, "true or false"),
    Rule("logger.mlflow.timeout_s", NUM, _positive, "a number of seconds > 0, e.g. 5"),
    Rule("logger.wandb.mode", STR, _wandb_mode, _wandb_modes),
    Rule("logger.wandb.project", STR, lambda v: v.strip() != "", "a non-empty project name, e.g. nnctl"),
    Rule("logger.wandb.tags", LIST, None, "a list of strings, e.g. logger.wandb.tags=[baseline]"),
    Rule("logger.wandb.log_artifacts", BOOL, None, "true or false"),
    # -- adapter / fine-tuning -----------------------------------------------------------------------------------
    Rule("adapter.r", INT, lambda v: v >= 1, "an integer >= 1, e.g. adapter.r=8"),
    Rule("adapter.alpha", NUM, _positive, "a number > 0, e.g. adapter.alpha=16"),
    Rule("adapter.dropout", NUM, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. adapter.dropout=0.05"),
    Rule("adapter.quant_type", STR, lambda v: v in ("nf4", "fp4"), "nf4 or fp4"),
    Rule("adapter.double_quant", BOOL, None, "true or false"),
    Rule("adapter.compute_dtype", STR, lambda v: v in ("float32", "fp32", "bfloat16", "bf16"), "float32 or bfloat16"),
    Rule("init_from", STR, None, "a checkpoint file or run dir", nullable=True),
    Rule("finetune.freeze", LIST, None, "a list of regexes, e.g. finetune.freeze=[features]"),
    Rule("finetune.lr_mult", DICT, None, "a mapping regex -> number, e.g. finetune.lr_mult={features:0.1}",
         nullable=True),
    Rule("finetune.unfreeze_schedule", LIST, None, "a list of {epoch: E, unfreeze: [regex, ...]}, e.g. "
         "finetune.unfreeze_schedule=[{epoch:0,unfreeze:[head]},{epoch:2,unfreeze:['.*']}]", nullable=True),
    # -- eval -----------------------------------------------------------------------------------------------------
    Rule("eval.tta", BOOL + STR, _tta, _tta_modes, nullable=True),
    Rule("eval.worst_k", INT, lambda v: v >= 0, "an integer >= 0 (0 = no worst_k.png)"),
    # -- generate (top-level keys of nnctl generate) --------------------------------------------------------------
    Rule("max_new_tokens", INT, lambda v: v >= 0, "an integer >= 0, e.g. max_new_tokens=200"),
    Rule("temperature", NUM, lambda v: v >= 0, "a number >= 0 (0 = greedy), e.g. temperature=0.8"),
    Rule("top_k", INT, lambda v: v >= 1, "an integer >= 1, or null for all tokens", nullable=True),
    Rule("top_p", NUM, lambda v: 0 < v <= 1, "a number in (0, 1] (1.0 = off), e.g. top_p=0.95"),
    Rule("num_samples", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("seed", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("kv_cache", BOOL, None, "true or false"),
    Rule("input", STR + NUM, None, "the text a sequence-to-sequence model decodes, e.g. input=\"31415\"", nullable=True),
    Rule("beam", INT, lambda v: v >= 1, "an integer >= 1 (1 = greedy), e.g. beam=4"),
    Rule("device", STR, _device, "auto, cpu, cuda, cuda:N or mps"),
]


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


_ABSENT = object()


def _lookup(cfg: DictConfig, key: str) -> Any:
    """The value at `key`, _ABSENT when a parent or the key itself is not in `cfg`; '???' raises UserError."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None, throw_on_missing=False) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent.keys():  # `in parent` is False for '???'
        return _ABSENT
    if OmegaConf.is_missing(parent, leaf):
        raise UserError(f"a value is required; pass {key}=...", key=key)
    return parent[leaf]  # interpolations resolve here; a broken one raises an OmegaConf error naming the key


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value)


def validate(cfg: DictConfig, rules: list[Rule] = RULES) -> None:
    """Raise UserError for the first value in `cfg` that breaks a rule."""
    for rule in rules:
        value = _lookup(cfg, rule.key)
        if value is _ABSENT or (value is None and rule.nullable):
            continue
        if not _has_type(value, rule.types) or (rule.check is not None and not rule.check(value)):
            expect = rule.expect() if callable(rule.expect) else rule.expect
            raise UserError(f"got {_show(value)}; expected {expect}", key=rule.key)
