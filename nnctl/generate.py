"""`nnctl generate`: decode from a trained checkpoint, streaming the text to stdout as it is produced.

The checkpoint alone is enough: the model is rebuilt from the config stored in it and the data state (the
tokenizer and the data's spec) that the data module saved there. Which decoding runs is looked up by what the
data's target is (`spec["target"]`) in DECODERS, so another model family plugs its own decoding in with one entry.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from nnctl.errors import UserError

Pick = Callable[[torch.Tensor], torch.Tensor]  # next-token logits [B, vocab] -> token ids [B]


def sampler(temperature: float, top_k: int | None, top_p: float, generator: torch.Generator) -> Pick:
    """Greedy at temperature 0; otherwise sample from softmax(logits / temperature) restricted to the top_k most
    likely tokens and to the smallest set whose probability reaches top_p (nucleus)."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # [B, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before a token already reaches top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]

    return pick


def default_prompt(tokenizer: Any) -> str:
    """Where generation starts when no prompt is given: a newline, or the vocabulary's first character."""
    vocab = getattr(tokenizer, "vocab", "\n")
    return "\n" if "\n" in vocab else vocab[0]


def sample_text(model: nn.Module, tokenizer: Any, prompt: str | None, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float, seed: int, kv_cache: bool = True,
                write: Callable[[str], Any] | None = None) -> str:
    """Continue `prompt` by `max_new_tokens` tokens; returns the new text, handing each piece to `write` as soon as
    it is decoded. Deterministic for a seed: draws come from a generator of their own (the global RNG, which a
    training run depends on, is untouched)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(default_prompt(tokenizer) if prompt is None else prompt)
    if not ids:
        raise UserError("the prompt is empty; pass some text, e.g. prompt='The ', or prompt=null to start from a "
                        "newline", key="prompt")
    generator = torch.Generator(device=device).manual_seed(seed)
    decode, pieces, was_training = tokenizer.decoder(), [], model.training
    model.eval()
    try:
        prompt_ids = torch.tensor([ids], device=device)  # [1, T]
        for token in model.stream(prompt_ids, max_new_tokens, sampler(temperature, top_k, top_p, generator),
                                  kv_cache):
            piece = decode([int(token[0])])
            pieces.append(piece)
            if write is not None and piece:
                write(piece)
    finally:
        model.train(was_training)
    return "".join(pieces)


def continue_text(model: nn.Module, data_state: dict[str, Any], cfg: DictConfig) -> list[str]:
    """Next-token models (model=gpt): print the prompt, then stream `num_samples` continuations to stdout."""
    from nnctl.data.text import tokenizer_from_state

    tokenizer = tokenizer_from_state(data_state["tokenizer"])
    prompt = None if cfg.prompt is None else str(cfg.prompt)
    shown = "" if prompt is None else prompt
    samples = []
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            _write(f"--- sample {i + 1} of {cfg.num_samples} ---\n")
        _write(shown)
        samples.append(shown + sample_text(model, tokenizer, prompt, cfg.max_new_tokens, cfg.temperature,
                                           cfg.top_k, cfg.top_p, cfg.seed + i, cfg.kv_cache, _write))
        _write("\n")
    return samples


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def translate(model: nn.Module, data_state: dict[str, Any], cfg: DictConfig) -> list[str]:
    """Encoder-decoder models (model=seq2seq): decode `input` greedily or with a beam search, print the output."""
    from nnctl.seq2seq_decode import decode_text

    if cfg.input is None:
        raise UserError("a sequence-to-sequence model decodes an input: pass input=\"...\"", key="input")
    text = decode_text(model, data_state, str(cfg.input), beam=cfg.beam, max_len=cfg.max_new_tokens)
    _write(text + "\n")
    return [text]


def respond(model: nn.Module, data_state: dict[str, Any], cfg: DictConfig) -> list[str]:
    """Fine-tuned Hugging Face causal LMs (model=hf_causal_lm): the prompt shown through the training template,
    the model's continuation printed."""
    from nnctl.models.hf import generate_hf, load_tokenizer

    tokenizer = load_tokenizer(data_state["tokenizer_path"])
    shown = data_state.get("template", "{prompt}").format(prompt="" if cfg.prompt is None else str(cfg.prompt))
    texts = []
    for i in range(cfg.num_samples):
        texts.append(generate_hf(model, tokenizer, shown, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                 cfg.seed + i))
        _write(texts[-1] + "\n")
    return texts


# spec["target"] of the checkpoint's data -> its decoding: fn(model, data_state, cfg) -> list of output texts
DECODERS: dict[str, Callable[[nn.Module, dict[str, Any], DictConfig], list[str]]] = {
    "next_token": continue_text,
    "seq2seq": translate,
    "causal_lm": respond,
}


def generate(cfg: DictConfig) -> dict[str, Any]:
    """The `nnctl generate` task: rebuild the model from the checkpoint, decode, return the texts."""
    from hydra.utils import instantiate

    from nnctl import checkpoint as ck
    from nnctl.run_state import load_weights
    from nnctl.runtime import pick_device
    from nnctl.spec import complete
    from nnctl.validate import validate

    validate(cfg)
    path = ck.resolve_checkpoint(cfg.ckpt, prefer=ck.BEST)
    state = ck.load_checkpoint(path)
    stored = OmegaConf.create(state[ck.CONFIG])
    data_state = state.get(ck.DATA) or {}
    target = data_state.get("spec", {}).get("target")
    if target not in DECODERS:
        trained = f"a {target!r} target" if target else f"data {stored.data._target_.rsplit('.', 1)[-1]}"
        raise UserError(f"{path} holds a {stored.model._target_.rsplit('.', 1)[-1]} model trained on {trained}, "
                        f"which nnctl generate cannot decode; it decodes checkpoints of: {', '.join(DECODERS)} "
                        "targets (e.g. nnctl train model=gpt data=text)", key="ckpt")
    try:
        device = pick_device(cfg.device)
    except UserError as exc:  # it names the training key; here the key is `device`
        raise UserError(str(exc).split(": ", 1)[1].replace("trainer.device", "device"), key="device") from None
    from nnctl.finetune import starting_point

    net, _ = starting_point(stored, complete(instantiate(stored.model), data_state["spec"], "model"))
    net = instantiate(stored.adapter)(net)  # adapter runs: the checkpoint holds what trained on top of the base
    load_weights(net, state[ck.MODEL])
    net.to(device).eval()
    return {"samples": DECODERS[target](net, data_state, cfg), "checkpoint": str(path)}
