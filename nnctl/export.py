"""`nnctl export ckpt=PATH out=DIR [merge=true]`: weights in safetensors plus what rebuilds the model without nnctl
internals or peft.

- Hugging Face models: a `save_pretrained` folder (with the tokenizer) that AutoModelForCausalLM loads; merged,
  the adapters are folded into the base weights, so plain transformers runs it.
- nnctl models: `model.safetensors` and `model.yaml` (the model's `_target_` and every constructor argument, data
  sizes included), so `instantiate(model.yaml)` + `load_state_dict` rebuilds it.
- merge=false on an adapter checkpoint: the PEFT folder (adapter_model.safetensors, adapter_config.json) for
  peft's `PeftModel.from_pretrained` on the base.
- format=checkpoint: one nnctl checkpoint file (`out` is the file) that `nnctl eval`, generate, sample and
  init_from read: the weights (a sharded checkpoint's gathered in this process), config and data state, without
  optimizer state.

A QLoRA model is merged into float weights holding the values its 4-bit base had in training, so the export
computes what the adapter model computed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from nnctl import adapters
from nnctl import checkpoint as ck
from nnctl.errors import UserError

log = logging.getLogger(__name__)
FORMATS = ("model", "checkpoint")  # format=: the model alone (safetensors / transformers / peft), or an nnctl .pt


def export(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from nnctl.engine import Engine
    from nnctl.validate import validate

    if cfg.out is None or str(cfg.out).strip() == "":
        raise UserError("no output folder given; pass out=DIR", key="out")
    if cfg.format not in FORMATS:
        raise UserError(f"got {cfg.format!r}; expected one of {', '.join(FORMATS)}", key="format")
    path = ck.resolve_checkpoint(cfg.ckpt, prefer=ck.BEST)
    if cfg.format == "checkpoint":
        return export_checkpoint(path, Path(str(cfg.out)).expanduser())
    state = ck.load_checkpoint(path)
    run_cfg = OmegaConf.create(state[ck.CONFIG])
    adapted = ck.BASE in state
    if cfg.merge and adapted and "dequantize" in run_cfg.adapter:
        run_cfg.adapter.dequantize = True  # float base with the 4-bit values: merging is then exact
    if not adapted:
        run_cfg.init_from = None  # the checkpoint holds every weight
    validate(run_cfg)
    engine = Engine(run_cfg, run_dir)
    engine.load_state_dict(state, full=False)
    net = engine.eval_net.eval()
    out = Path(str(cfg.out)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if adapters.is_adapted(net) and cfg.merge:
        net = net.merge_and_unload()
    if adapters.is_adapted(net):
        net.save_pretrained(out)  # adapter_model.safetensors + adapter_config.json
        kind = "peft adapter"
    elif hasattr(net, "save_pretrained"):  # a transformers model
        from nnctl.models.hf import load_tokenizer

        net.save_pretrained(out)
        load_tokenizer(run_cfg.model.path, key="model.path").save_pretrained(out)
        kind = "transformers model"
    else:
        save_plain(net, run_cfg, engine.spec, out)
        kind = "model.safetensors + model.yaml"
    log.info("exported %s (%s) to %s", path, kind, out)
    from nnctl.reporting import console

    console.print(f"nnctl export: {path} -> {out} ({kind})")
    return {"checkpoint": str(path), "out": str(out), "kind": kind}


def export_checkpoint(path: Path, out: Path) -> dict[str, Any]:
    """`path` as one self-contained checkpoint file at `out`, without optimizer state (so resume refuses it)."""
    from nnctl.reporting import console

    if out.is_dir():
        raise UserError(f"{out} is a folder; format=checkpoint writes one file, e.g. out={out / 'model.pt'}",
                        key="out")
    state = {k: v for k, v in ck.load_checkpoint(path).items() if k not in (ck.FORMAT, ck.OPTIMIZER)}
    ck.save_checkpoint(state, out)
    log.info("exported %s to %s (one checkpoint file)", path, out)
    console.print(f"nnctl export: {path} -> {out} (checkpoint file)")
    return {"checkpoint": str(path), "out": str(out), "kind": "checkpoint file"}


def save_plain(net: nn.Module, run_cfg: DictConfig, spec: dict[str, Any], out: Path) -> None:
    """safetensors weights and a model.yaml whose `_target_` and arguments rebuild `net` with hydra."""
    from hydra.utils import instantiate
    from safetensors.torch import save_file

    from nnctl.spec import accepted

    model_cfg = OmegaConf.to_container(run_cfg.model, resolve=True)
    names, _ = accepted(instantiate(run_cfg.model))
    model_cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()
                      if (names is None or k in names) and k not in model_cfg})
    model_cfg.pop("_partial_", None)
    OmegaConf.save(OmegaConf.create(model_cfg), out / "model.yaml")
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))


def load_plain(folder: str | Path) -> nn.Module:
    """Rebuild a model written by `save_plain` (no nnctl checkpoint, no peft)."""
    from hydra.utils import instantiate
    from safetensors.torch import load_file

    folder = Path(folder)
    net = instantiate(OmegaConf.load(folder / "model.yaml"))
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return net.eval()
