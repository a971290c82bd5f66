"""Hugging Face causal language models (`model=hf_causal_lm`): loading, tokenizer, and text generation.

transformers is imported only here, on use. `path` is a local `save_pretrained` folder or a hub id; without
network a hub id fails at once (only the local cache is asked, so there are no retries).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from nnctl.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _source(path: str, key: str) -> tuple[str, dict[str, Any]]:
    """(what to pass to from_pretrained, its options): a local model folder, or a hub id (offline-safe)."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is not a Hugging Face model folder (no config.json); point {key} at a folder "
                            "written by save_pretrained, or a hub id such as gpt2", key=key)
        return str(p), {"local_files_only": True}
    if p.exists() or str(path).startswith(("/", ".", "~")) or str(path).count("/") > 1:
        raise UserError(f"{path} is not a model folder; point {key} at a folder written by save_pretrained, or a "
                        "hub id such as gpt2", key=key)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _online():
        # the HF cache only, resolved here: from_pretrained would still ask the hub for optional files, with retries
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(str(path), local_files_only=True), {"local_files_only": True}
        except Exception:
            raise UserError(f"cannot load {path!r}: no network and not in the Hugging Face cache; download it "
                            "where there is network (or copy a save_pretrained folder here) and pass its folder",
                            key=key) from None
    return str(path), {}


def _online() -> bool:
    import socket

    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False


def _load(loader: Any, path: str, key: str, **kwargs: Any) -> Any:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would interleave with the run's own output
    source, options = _source(path, key)
    try:
        return loader.from_pretrained(source, **options, **kwargs)
    except (OSError, ValueError) as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:200]
        raise UserError(f"cannot load {path!r}: {first}; pass a local save_pretrained folder", key=key) from None


def hf_causal_lm(path: str, dtype: str = "float32", max_len: int | None = None,
                 quantization: dict[str, Any] | None = None) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained(path) in `dtype`.

    `max_len` (the data's tokens per row) must fit the model's positions. `quantization` (adapter=qlora's 4-bit
    settings: quant_type, double_quant, compute_dtype) has transformers load the Linear layers as bitsandbytes
    4-bit layers through a BitsAndBytesConfig, each weight quantized as it is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise UserError(f"got {dtype!r}; expected one of {', '.join(DTYPES)}", key="model.dtype")
    config = _load(AutoConfig, path, "model.path")
    _check_positions(config, max_len, path)
    options: dict[str, Any] = {"config": config, "dtype": DTYPES[dtype]}
    if quantization:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization["quant_type"],
            bnb_4bit_use_double_quant=quantization["double_quant"],
            bnb_4bit_compute_dtype=quantization["compute_dtype"])
    return _load(AutoModelForCausalLM, path, "model.path", **options)


def max_positions(config: Any) -> int | None:
    """How many positions the model embeds (GPT-2: n_positions; most others: max_position_embeddings)."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_positions(config: Any, max_len: int | None, path: str) -> None:
    """Rows longer than the model's positions would fail inside its position embedding with an index error."""
    limit = max_positions(config)
    if max_len is not None and limit is not None and max_len > limit:
        raise UserError(f"{max_len} tokens per row exceed the {limit} positions of {path} "
                        f"({type(config).__name__}); set data.max_len={limit} or lower", key="data.max_len")


def load_tokenizer(path: str, key: str = "data.tokenizer_path") -> Any:
    """AutoTokenizer.from_pretrained(path), with a pad token (the end-of-text token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer, path, key)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def generate_hf(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
    """The text `model` continues `prompt` with (the new tokens only). temperature 0 decodes greedily."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    torch.manual_seed(seed)
    sample = temperature > 0
    options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens,
                               "pad_token_id": tokenizer.pad_token_id}
    if sample:
        options.update(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)
    was_training = model.training
    model.eval()
    out = model.generate(**inputs, **options)  # [1, prompt + new]
    model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
