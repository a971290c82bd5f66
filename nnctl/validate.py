"""Value checks on the composed config, as one table of rules.

Hydra/OmegaConf already reject unknown groups and keys; these rules catch values of the wrong type or outside
their range before any work starts, each naming the key and the accepted values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from nnctl.errors import UserError


@dataclass(frozen=True)
class Rule:
    key: str                            # dotted config key; skipped when absent from the config
    types: tuple[type, ...]             # accepted Python types (bool is never accepted as int/float)
    check: Callable[[Any], bool] | None  # extra predicate on the value
    expect: str                         # what a valid value looks like, for the message
    nullable: bool = False


def _positive(v: Any) -> bool:
    return v > 0


def _fraction_open(v: Any) -> bool:
    return 0 < v < 1


def _fraction_limit(v: Any) -> bool:
    return (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)


INT, NUM, BOOL, STR = (int,), (int, float), (bool,), (str,)

RULES: list[Rule] = [
    Rule("optimizer.lr", NUM, _positive, "a number > 0, e.g. optimizer.lr=0.001"),
    Rule("optimizer.weight_decay", NUM, lambda v: v >= 0, "a number >= 0"),
    Rule("optimizer.momentum", NUM, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    Rule("data.batch_size", INT, lambda v: v >= 1, "an integer >= 1, e.g. data.batch_size=64"),
    Rule("data.eval_batch_size", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("data.val_fraction", NUM, _fraction_open, "a fraction strictly between 0 and 1, e.g. 0.1"),
    Rule("data.test_fraction", NUM, _fraction_open, "a fraction strictly between 0 and 1, e.g. 0.2"),
    Rule("data.num_workers", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("data.limit", INT, lambda v: v >= 1, "an integer >= 1 or null", nullable=True),
    Rule("data.image_size", INT, lambda v: v >= 4, "an integer >= 4"),
    Rule("data.augment.crop_padding", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("data.augment.hflip", BOOL, None, "true or false"),
    Rule("trainer.max_epochs", INT, lambda v: v >= 1, "an integer >= 1, e.g. trainer.max_epochs=5"),
    Rule("trainer.max_steps", INT, lambda v: v >= 1, "an integer >= 1 or null", nullable=True),
    Rule("trainer.grad_accum_steps", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.grad_clip_norm", NUM, _positive, "a number > 0 or null", nullable=True),
    Rule("trainer.label_smoothing", NUM, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    Rule("trainer.seed", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("trainer.deterministic", BOOL, None, "true or false"),
    Rule("trainer.device", STR, lambda v: v.split(":")[0] in ("auto", "cpu", "cuda", "mps"),
         "auto, cpu, cuda, cuda:N or mps"),
    Rule("trainer.limit_train_batches", NUM, _fraction_limit, "an integer >= 1, a fraction in (0, 1], or null",
         nullable=True),
    Rule("trainer.limit_val_batches", NUM, _fraction_limit, "an integer >= 1, a fraction in (0, 1], or null",
         nullable=True),
    Rule("trainer.log_every_n_steps", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.max_bad_steps", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("trainer.early_stopping.patience", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("trainer.early_stopping.min_delta", NUM, lambda v: v >= 0, "a number >= 0"),
    Rule("trainer.early_stopping.mode", STR, lambda v: v in ("min", "max"), "min or max"),
    Rule("trainer.checkpoint.mode", STR, lambda v: v in ("min", "max"), "min or max"),
    Rule("trainer.checkpoint.save_top_k", INT, lambda v: v >= 0, "an integer >= 0"),
    Rule("trainer.checkpoint.every_n_epochs", INT, lambda v: v >= 1, "an integer >= 1"),
    Rule("model.dropout", NUM, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    Rule("model.activation", STR, None, "an activation name"),
]


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def validate(cfg: DictConfig, rules: list[Rule] = RULES) -> None:
    """Raise UserError for the first value in `cfg` that breaks a rule."""
    for rule in rules:
        value = OmegaConf.select(cfg, rule.key, default="__absent__", throw_on_missing=False)
        if isinstance(value, str) and value == "__absent__":
            continue
        if value is None and rule.nullable:
            continue
        if not _has_type(value, rule.types) or (rule.check is not None and not rule.check(value)):
            raise UserError(f"got {value!r}; expected {rule.expect}", key=rule.key)
