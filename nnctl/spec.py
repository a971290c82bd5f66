"""What a data module tells the rest of a run about itself, and how partial components are completed from it.

A data module exposes `spec`: a dict such as {"in_shape": (1, 28, 28), "num_classes": 10, "classes": [...],
"input": "image"} or {"vocab_size": 65, "block_size": 128, "input": "tokens", "target": "next_token"}. A model or
objective partial (`_partial_: true`) is completed with the spec entries its constructor accepts, so a family
declares what it needs by naming it in its signature, and the engine never learns about families.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import torch

from nnctl.errors import UserError

# What each kind of input means, for messages: which data options provide what a model asks for.
INPUT_KINDS = {
    "image": "images [C, H, W] (data=digits, mnist, fashion_mnist, cifar10, cifar100, image_folder, synthetic)",
    "tokens": "token sequences (data=text, text_classification, sequence_tasks)",
    "sequence": "real-valued sequences (data=sequence_tasks data.task=sum_last_k)",
    "features": "feature vectors (data=tabular)",
    "audio": "waveforms [samples] (data=audio_folder, audio_tones)",
}


def accepted(build: Callable[..., Any]) -> tuple[set[str] | None, set[str]]:
    """(names a callable accepts, names it requires) — for a functools.partial, those still open. The accepted
    names are None when it takes **kwargs (it is given everything)."""
    func = build.func if isinstance(build, functools.partial) else build
    bound = set(build.keywords) if isinstance(build, functools.partial) else set()
    params = inspect.signature(func).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in params if p.kind in named} - bound
    required = {p.name for p in params if p.kind in named and p.default is inspect.Parameter.empty} - bound
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return (None if takes_all else names), required


def complete(build: Callable[..., Any], spec: Mapping[str, Any], group: str, **runtime: Any) -> Any:
    """Call the partial `build` with the spec entries (and `runtime` values) its constructor names.

    A required argument that the data does not provide means the model/objective and the data do not go together:
    a user error naming both, not a TypeError from deep inside a constructor.
    """
    names, required = accepted(build)
    offered = {**spec, **runtime}
    given = {k: v for k, v in offered.items() if (names is None or k in names) and not _bound(build, k)}
    missing = sorted(required - set(given))
    if missing:
        kind = spec.get("input", "?")
        raise UserError(f"the {group} needs {', '.join(missing)}, which the data does not provide (it yields "
                        f"{INPUT_KINDS.get(kind, kind)}); choose a data option that fits this {group}, or a "
                        f"{group} for this data", key=group)
    return build(**given)


def _bound(build: Callable[..., Any], name: str) -> bool:
    """Whether the config already set `name` (a config value wins over what the data offers)."""
    return isinstance(build, functools.partial) and name in build.keywords


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a batch (tensor, tuple/list or dict of them) to `device`; tensors already there are passed through."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):  # (tensors already there are passed without a call: this runs every step)
        return type(batch)([b if isinstance(b, torch.Tensor) and b.device == device else to_device(b, device)
                            for b in batch])
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
