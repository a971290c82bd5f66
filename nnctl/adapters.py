"""Adapters decide which parameters train. Each is a callable model -> model built from `adapter/<name>.yaml`.

`full` trains everything. `lora`, `dora` and `qlora` go through peft: the base weights are frozen and low-rank
updates (DoRA: plus a learned magnitude per output) are injected into the targeted layers. `qlora` needs a base
whose Linear layers are bitsandbytes 4-bit layers (NF4/FP4). A Hugging Face model is loaded that way by
transformers (`load_quantization` hands the settings to the model loader, which passes a `BitsAndBytesConfig`) and
prepared with peft's `prepare_model_for_kbit_training`; nnctl's own models are quantized here and marked
`is_loaded_in_4bit`, so peft picks its 4-bit LoRA layer for both. peft and bitsandbytes are imported only by the
adapters that use them.

An adapted model saves only what trained (`model_state`): the adapter weights, the modules trained in full (the
head) and the buffers (BatchNorm statistics); the frozen base is rebuilt from the config (and `init_from`) and
checked against the fingerprint stored with the checkpoint (`base_reference`).
"""
from __future__ import annotations

import hashlib
import logging
import re
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from nnctl.errors import UserError

log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16}


def full(model: nn.Module) -> nn.Module:
    """Train every parameter of the model as built."""
    return model


def lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
         target_modules: str | Sequence[str] = "auto", modules_to_save: str | Sequence[str] | None = "auto",
         use_dora: bool = False) -> nn.Module:
    """peft LoRA (DoRA with `use_dora`) on the targeted Linear/Conv layers; the rest of the base is frozen."""
    return _inject(model, weights_fingerprint(model), r, alpha, dropout, target_modules, modules_to_save, use_dora)


def _inject(model: nn.Module, fingerprint: str, r: int, alpha: float, dropout: float,
            target_modules: str | Sequence[str], modules_to_save: str | Sequence[str] | None,
            use_dora: bool) -> nn.Module:
    import peft

    save = _modules_to_save(model, modules_to_save)
    targets = _targets(model, target_modules, save)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             modules_to_save=save or None, use_dora=use_dora)
    with _quiet():
        net = peft.get_peft_model(model, config)
    net.nnctl_base_fingerprint = fingerprint  # checked when the adapter weights are loaded again
    return net


def dora(model: nn.Module, **kwargs: Any) -> nn.Module:
    """LoRA with weight-decomposed magnitude (peft's use_dora)."""
    return lora(model, use_dora=True, **kwargs)


def qlora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
          target_modules: str | Sequence[str] = "auto", modules_to_save: str | Sequence[str] | None = "auto",
          use_dora: bool = False, quant_type: str = "nf4", double_quant: bool = True,
          compute_dtype: str = "float32", dequantize: bool = False) -> nn.Module:
    """LoRA on a 4-bit base (QLoRA). A model transformers loaded in 4-bit (through `load_quantization`'s settings)
    is prepared for k-bit training; any other has the body's Linear layers quantized to bitsandbytes 4-bit here.

    `dequantize` keeps the base as float layers holding the 4-bit weights' values (what `nnctl export merge=true`
    builds, so the adapters merge into exactly the weights they were trained on). The base fingerprint is taken
    of the 4-bit weights either way: transformers and `quantize_4bit` produce the same bytes."""
    dtype = _quantization_settings(quant_type, compute_dtype)
    save = _modules_to_save(model, modules_to_save)
    if getattr(model, "is_loaded_in_4bit", False):  # transformers quantized it while loading
        from peft import prepare_model_for_kbit_training

        fingerprint = weights_fingerprint(model)
        # freezes the base and upcasts fp16/bf16 norms to fp32; activation recomputation is left to
        # trainer.grad_checkpointing, as for every other model
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        replaced = quantize_4bit(model, _head_names(model, save), quant_type, double_quant, dtype)
        fingerprint = weights_fingerprint(model)
        if dequantize:
            dequantize_4bit(model, replaced)
        else:
            model.is_loaded_in_4bit = True  # how peft recognizes a 4-bit model (transformers sets it for its own)
    keep_standard_4bit_layout(model)
    return _inject(model, fingerprint, r, alpha, dropout, target_modules, modules_to_save, use_dora)


def keep_standard_4bit_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer in bitsandbytes' standard layout. On a CPU with AVX512-BF16, bitsandbytes repacks a
    Linear4bit's weights in place at its first no-grad forward in eval mode, into a CPU inference layout with
    bf16 quantization statistics: the base then changes under the adapters with the first evaluation (its bytes,
    its checkpoint keys and its outputs depend on the CPU and on whether an evaluation ran), and a layer narrower
    than one quantization block fails to repack at all. Training and evaluation run the same kernels this way."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):  # bitsandbytes >= 0.48's flag, set per layer
            module.support_avx512bf16_for_cpu = False


def load_quantization(adapter: Callable[..., nn.Module], init_from: str | None = None) -> dict[str, Any]:
    """{"quantization": 4-bit settings} for a model loader that quantizes while loading (model=hf_causal_lm passes
    them to transformers as a BitsAndBytesConfig): adapter=qlora's, except in its dequantized export form and when
    `init_from` weights still have to be loaded into the float model; else {}. A model whose constructor does not
    take `quantization` is quantized by `qlora` itself."""
    func, options = getattr(adapter, "func", adapter), getattr(adapter, "keywords", {})
    if func is not qlora or options.get("dequantize", False) or init_from is not None:
        return {}
    quant_type = options.get("quant_type", "nf4")
    return {"quantization": {"quant_type": quant_type, "double_quant": options.get("double_quant", True),
                             "compute_dtype": _quantization_settings(quant_type,
                                                                     options.get("compute_dtype", "float32"))}}


def _quantization_settings(quant_type: str, compute_dtype: str) -> torch.dtype:
    """Check qlora's 4-bit settings; the compute dtype as a torch dtype."""
    if quant_type not in QUANT_TYPES:
        raise UserError(f"got {quant_type!r}; expected one of {', '.join(QUANT_TYPES)}", key="adapter.quant_type")
    if compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"got {compute_dtype!r}; expected one of {', '.join(COMPUTE_DTYPES)}",
                        key="adapter.compute_dtype")
    return COMPUTE_DTYPES[compute_dtype]


# -- 4-bit base layers ------------------------------------------------------------------------------------------------
def _linear_like(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def quantize_4bit(model: nn.Module, skip: set[str], quant_type: str, double_quant: bool,
                  compute_dtype: torch.dtype) -> dict[str, nn.Module]:
    """Replace every Linear outside `skip` (the heads) by a bitsandbytes Linear4bit holding the same weights, as
    transformers' BitsAndBytesConfig loading does. Returns the float layers replaced, by name."""
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if _linear_like(m) and not _under(n, skip)]
    if not names:
        layers = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        raise UserError(f"qlora quantizes Linear layers and {type(model).__name__} has none outside its head "
                        f"(its layers: {', '.join(layers)}); use adapter=lora, which also adapts Conv layers",
                        key="adapter")
    replaced = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        old = model.get_submodule(name)
        weight = old.weight.data if isinstance(old, nn.Linear) else old.weight.data.t()  # Conv1D: [in, out]
        out_f, in_f = weight.shape
        new = bnb.nn.Linear4bit(in_f, out_f, bias=old.bias is not None, compute_dtype=compute_dtype,
                                compress_statistics=double_quant, quant_type=quant_type)
        new.weight = bnb.nn.Params4bit(weight.contiguous().float(), requires_grad=False,
                                       compress_statistics=double_quant, quant_type=quant_type)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.float(), requires_grad=False)
        new.to(weight.device)  # quantizes now (bnb does it on .to)
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        replaced[name] = old
    log.info("qlora: %d Linear layer(s) quantized to 4-bit %s", len(names), quant_type)
    return replaced


def dequantize_4bit(model: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Put the float layers `quantize_4bit` replaced back, holding the 4-bit weights' values."""
    import bitsandbytes as bnb

    for name, old in replaced.items():
        parent, _, leaf = name.rpartition(".")
        new = model.get_submodule(name)
        values = bnb.functional.dequantize_4bit(new.weight.data, new.weight.quant_state).float()  # [out, in]
        old.weight.data = values if isinstance(old, nn.Linear) else values.t().contiguous()
        setattr(model.get_submodule(parent) if parent else model, leaf, old)


# -- what trains --------------------------------------------------------------------------------------------------
def _under(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules_to_save(model: nn.Module, modules_to_save: str | Sequence[str] | None) -> list[str]:
    """'auto': the model's `head` (nnctl models; re-created when a checkpoint's head did not fit); none for
    Hugging Face LMs, whose output layer is tied to the input embeddings."""
    if modules_to_save == "auto":
        return ["head"] if isinstance(getattr(model, "head", None), nn.Module) else []
    if modules_to_save is None:
        return []
    names = [modules_to_save] if isinstance(modules_to_save, str) else [str(m) for m in modules_to_save]
    known = {n for n, _ in model.named_modules() if n}
    for n in names:
        if n not in known and not any(k.endswith("." + n) for k in known):
            raise UserError(f"no module named {n!r}; top-level modules: "
                            f"{', '.join(n for n, _ in model.named_children())}", key="adapter.modules_to_save")
    return names


def _head_names(model: nn.Module, save: list[str]) -> set[str]:
    """Modules that are never adapted or quantized: those trained in full and the LM output layer."""
    heads = set(save)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads |= {n for n, m in model.named_modules() if out is not None and m is out}
    return heads


def _targets(model: nn.Module, target_modules: str | Sequence[str], save: list[str]) -> list[str]:
    """Full names of the layers LoRA adapts: 'auto' (every Linear/Conv of the body), 'all-linear', a regex, or
    a list of names (a name also matches as the last components of a full name, as in peft)."""
    heads = _head_names(model, save)
    layers = {n: m for n, m in model.named_modules() if n and not _under(n, heads)}
    adaptable = {n for n, m in layers.items() if _linear_like(m) or isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                 or type(m).__name__ == "Linear4bit"}
    linear = {n for n in adaptable if _linear_like(layers[n]) or type(layers[n]).__name__ == "Linear4bit"}
    if target_modules == "auto":
        found = adaptable
    elif target_modules == "all-linear":
        found = linear
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise UserError(f"{target_modules!r} is not a valid regex ({exc})", key="adapter.target_modules") from None
        found = {n for n in adaptable if pattern.fullmatch(n)}
    else:
        wanted = [str(t) for t in target_modules]
        found = {n for n in adaptable if any(n == t or n.endswith("." + t) for t in wanted)}
    if not found:
        listing = ", ".join(sorted(adaptable)[:12]) + (" ..." if len(adaptable) > 12 else "")
        raise UserError(f"{target_modules!r} matches no adaptable layer of {type(model).__name__}; its Linear/Conv "
                        f"layers are: {listing or 'none'} (or use auto, all-linear or a regex)",
                        key="adapter.target_modules")
    return sorted(found)


def is_adapted(net: nn.Module) -> bool:
    """Whether `net` carries peft adapters (its checkpoint then holds only what trained)."""
    return hasattr(net, "peft_config")


def model_state(net: nn.Module, eval_net: nn.Module,
                read: Callable[[nn.Module], dict[str, torch.Tensor]] = nn.Module.state_dict) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stores: everything for a plainly trained model; for an adapted one, the
    parameters that train (adapter, saved modules) and the buffers (norm statistics move in training).
    `read` gets a module's whole state (several processes: gathered from its shards)."""
    state = read(eval_net)
    if not is_adapted(net):
        return state
    keep = {n for n, p in net.named_parameters() if p.requires_grad} | {n for n, _ in net.named_buffers()}
    return {k: v for k, v in state.items() if k in keep}


def load_model_state(net: nn.Module, state: dict[str, torch.Tensor],
                     load: Callable[[nn.Module, dict[str, torch.Tensor]], Any] | None = None) -> None:
    """Load `model_state`'s output (with `load`, e.g. into shards; default nn.Module.load_state_dict); an adapted
    model's frozen base stays as built. Mismatches raise RuntimeError as nn.Module.load_state_dict does."""
    if not is_adapted(net):
        (load or nn.Module.load_state_dict)(net, state)
        return
    missing, unexpected = net.load_state_dict(state, strict=False)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    lacking = sorted(trainable & set(missing))
    if unexpected or lacking:
        raise RuntimeError(f"Error(s) in loading state_dict:\n\tadapter keys unexpected: {unexpected[:3]}, "
                           f"missing: {lacking[:3]}")


def base_reference(net: nn.Module) -> dict[str, str]:
    """What identifies an adapted model's frozen base (empty for a plainly trained model)."""
    fingerprint = getattr(net, "nnctl_base_fingerprint", None)
    return {"weights_sha256": fingerprint} if fingerprint else {}


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's parameters (names, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- reporting ------------------------------------------------------------------------------------------------------
def base_bytes(net: nn.Module) -> int:
    """Bytes the frozen base weights occupy (4-bit weights: packed bytes plus their quantization statistics)."""
    total = 0
    for p in net.parameters():
        if p.requires_grad:
            continue
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in _quant_tensors(state))
    return total


def _quant_tensors(state: Any) -> list[torch.Tensor]:
    out = [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
    if getattr(state, "nested", False):
        out += _quant_tensors(state.state2)
    return out


def parameter_counts(net: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts its logical size (two values per stored byte)."""
    trainable = total = 0
    for p in net.parameters():
        n = p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def report(net: nn.Module) -> None:
    """Print and log trainable vs total parameters and the bytes of the frozen base."""
    from nnctl.reporting import console

    trainable, total = parameter_counts(net)
    frozen = base_bytes(net)
    line = f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f} %); "
    line += (f"frozen base weights: {frozen / 2**20:.2f} MiB ({frozen / (total - trainable):.2f} bytes/parameter)"
             if total > trainable else "no frozen weights")
    log.info(line)
    console.print(line)


class _quiet:
    """peft warns about fan_in_fan_out for GPT-2's Conv1D and sets it right itself: keep the run log clean."""

    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)
