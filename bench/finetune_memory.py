"""Fine-tuning memory and speed: QLoRA vs LoRA vs full fine-tuning of one Hugging Face GPT-2, built offline.

The model is a GPT-2 (`GPT2Config`: width 512, 8 layers, 8 heads, 256 positions, a 4096-token vocabulary; 28.0M
parameters, 25.2M of them in the blocks' Linear layers) with random weights, saved with `save_pretrained` into a
temporary folder: nothing is downloaded, and neither memory nor time depends on the values. Each method is built
the way `nnctl train model=hf_causal_lm adapter=...` builds it: `nnctl.models.hf.hf_causal_lm` (for qlora with the
adapter's settings as transformers' BitsAndBytesConfig: NF4, double quantization, fp32 compute), the adapter from
`configs/adapter/<name>.yaml` (r=8 on every Linear of the blocks; `none` trains everything), AdamW over
`nnctl.optimization.param_groups`, and training steps (forward, next-token loss, backward, AdamW step) on a batch
of 4 x 64 random tokens.

1. Bytes per parameter of the frozen base under QLoRA: (a) the 4-bit layers, i.e. packed weights plus their
   quantization statistics (absmax, nested absmax, code) per weight they stand for; the QLoRA goal is <= 0.6 here;
   (b) the whole frozen base, including what QLoRA keeps in full precision as transformers does: the embeddings
   (tied to the output layer), LayerNorms and biases.
2. Peak training memory, as tensor bytes (what torch.cuda.max_memory_allocated reports on a GPU): the tensors alive
   when a training step starts (weights with the 4-bit statistics, buffers, optimizer state; shared storages
   counted once), plus the highest running sum of the allocations and frees torch's CPU allocator makes during the
   step (the profiler's memory events, `profile_memory=True`, in time order: activations, gradients, the
   optimizer's temporaries, the dequantized 4-bit weights). Taken on a step after the first, so the optimizer state
   exists. Side by side: the weights, gradients and optimizer state alone.
   The process's resident set is reported too, but not used for the comparison: each method in a fresh subprocess,
   the peak resident set size (VmHWM) over `--memory-steps` steps above the resident set before loading (peaks
   reset through /proc/self/clear_refs; glibc told to return freed blocks, MALLOC_MMAP_THRESHOLD_=65536). It
   counts file pages: transformers maps the safetensors file and uses fp32 weights in place, so frozen weights
   and the pages QLoRA read to quantize from stay mapped as clean page cache, which the kernel can drop.
3. Step time of LoRA vs full fine-tuning (QLoRA alongside): the three models, built in one process from the same
   weights, take training steps in turn (rotating order), `--steps` each after `--warmup`; medians and their ratios.
   bitsandbytes dequantizes every 4-bit weight in every forward and backward pass, so QLoRA trades time for memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before torch: the profiler's start/stop lines are noise here
import torch  # noqa: E402

from bench._common import (PYTHON, ROOT, base_parser, compose, cpu_count, median, table, verdict,  # noqa: E402
                           write_result)

NAME = "finetune_memory"
GOAL_BYTES = 0.6
METHODS = {"qlora": "adapter=qlora", "lora": "adapter=lora", "full": "adapter=none"}
GPT2 = {"n_embd": 512, "n_layer": 8, "n_head": 8, "n_positions": 256, "vocab_size": 4096, "bos_token_id": 0,
        "eos_token_id": 0}
BATCH, TOKENS = 4, 64
MIB = 2 ** 20


def make_model(folder: Path) -> Path:
    """A randomly initialized GPT-2 saved with save_pretrained (no tokenizer: the batches are token ids)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**GPT2)).save_pretrained(folder)
    return folder


def build(method: str, model_dir: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer `nnctl train model=hf_causal_lm <METHODS[method]>` trains."""
    from hydra.utils import instantiate

    from nnctl.adapters import load_quantization
    from nnctl.models.hf import hf_causal_lm
    from nnctl.optimization import param_groups

    adapter = instantiate(compose([METHODS[method]]).adapter)
    net = adapter(hf_causal_lm(str(model_dir), **load_quantization(adapter))).train()
    groups = param_groups(net, 0.01, False, 1e-4)
    return net, torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4, weight_decay=0.01)


def batch() -> torch.Tensor:
    return torch.randint(0, GPT2["vocab_size"], (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))


def step(net: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    net(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


# -- bytes ---------------------------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _quant_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    from nnctl.adapters import _quant_tensors

    state = getattr(p, "quant_state", None)
    return [] if state is None else _quant_tensors(state) + [t for t in (getattr(state, "offset", None),)
                                                              if isinstance(t, torch.Tensor)]


def quantized_bytes(net: torch.nn.Module) -> tuple[int, int]:
    """(bytes, weights) of the 4-bit layers: packed weights and quantization statistics, and the weights they hold."""
    stored = logical = 0
    for p in net.parameters():
        if getattr(p, "quant_state", None) is not None:
            stored += _nbytes(p) + sum(_nbytes(t) for t in _quant_tensors(p))
            logical += p.quant_state.shape.numel()
    return stored, logical


def tensor_bytes(net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Weights (4-bit layers with their statistics), gradients of the trainable weights, optimizer state."""
    from nnctl.adapters import base_bytes

    trainable = [p for p in net.parameters() if p.requires_grad]
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"weights": base_bytes(net) + sum(_nbytes(p) for p in trainable),
            "grads": sum(_nbytes(p) for p in trainable), "optimizer": sum(_nbytes(t) for t in state)}


def resident_bytes(net: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor alive between steps (weights, 4-bit statistics, buffers, optimizer state), each once
    (GPT-2's output layer shares the embedding)."""
    tensors = [*net.parameters(), *net.buffers(), *(t for p in net.parameters() for t in _quant_tensors(p)),
               *(t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
    # by address, not storage: transformers' fp32 tensors may be views into one mapping of the whole weights file
    return sum({t.data_ptr(): _nbytes(t) for t in tensors}.values())


def step_allocation_peak(net: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> int:
    """The highest running sum of the CPU allocator's allocations minus frees during one training step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(net, opt, ids)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


# -- resident set of one method in a fresh process ------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(method: str, model_dir: Path, steps: int) -> dict[str, Any]:
    """Run in a subprocess: the resident set before loading, after loading, and its peak over training."""
    import bitsandbytes  # noqa: F401  (everything imported before the baseline)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import nnctl.models.hf  # noqa: F401
    import nnctl.optimization  # noqa: F401

    compose([METHODS[method]])
    ids = batch()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS: imports are not the model's
    before, file_before = _status_kib("VmRSS"), _status_kib("RssFile")
    net, opt = build(method, model_dir)
    loaded, file_pages = _status_kib("VmRSS"), _status_kib("RssFile") - file_before
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(steps):
        step(net, opt, ids)
    return {"method": method, "rss_before_mib": before / 1024, "rss_loaded_mib": (loaded - before) / 1024,
            "rss_file_loaded_mib": file_pages / 1024, "rss_train_peak_mib": (_status_kib("VmHWM") - before) / 1024}


def measure_rss(method: str, model_dir: Path, steps: int, threads: int) -> dict[str, Any]:
    cmd = [PYTHON, "-m", "bench.finetune_memory", "--worker", method, "--model-dir", str(model_dir),
           "--memory-steps", str(steps), "--threads", str(threads)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the RSS
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- tensor memory and step time, in this process -------------------------------------------------------------------
def measure(model_dir: Path, warmup: int, steps: int) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """Per method: parameter counts, bytes and the peak of one step; and step times, the methods taking turns."""
    from nnctl.adapters import base_bytes, parameter_counts

    models = {m: build(m, model_dir) for m in METHODS}
    ids = batch()
    names = list(models)
    times: dict[str, list[float]] = {m: [] for m in names}
    memory: dict[str, dict[str, Any]] = {}
    for i in range(warmup + steps):
        for m in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
            if i == 1 and m not in memory:  # the second step: the optimizer state exists
                net, opt = models[m]
                resident = resident_bytes(net, opt)
                peak = resident + step_allocation_peak(net, opt, ids)
                trainable, total = parameter_counts(net)
                stored, logical = quantized_bytes(net)
                memory[m] = {"trainable": trainable, "total": total, "tensors": tensor_bytes(net, opt),
                             "resident": resident, "peak": peak, "quantized_bytes": stored,
                             "quantized_weights": logical, "frozen_bytes": base_bytes(net),
                             "frozen_weights": total - trainable}
                continue
            seconds = step(*models[m], ids)
            if i >= warmup:
                times[m].append(seconds)
    return memory, times


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method before timing (>= 2)")
    parser.add_argument("--memory-steps", type=int, default=3, help="training steps in each resident-set subprocess")
    parser.add_argument("--threads", type=int, default=cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args.memory_steps)))
        return None
    if args.quick:
        args.steps, args.memory_steps = 3, 2
    args.warmup = max(args.warmup, 2)  # step 1 of each method is the profiled one
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "gpt2")
        rss = {m: measure_rss(m, model_dir, args.memory_steps, args.threads) for m in METHODS}
        memory, times = measure(model_dir, args.warmup, args.steps)
    q, full = memory["qlora"], memory["full"]
    per_4bit = q["quantized_bytes"] / q["quantized_weights"]
    per_base = q["frozen_bytes"] / q["frozen_weights"]
    rows = []
    for m in METHODS:
        r, t = memory[m], memory[m]["tensors"]
        rows.append((f"{m} ({METHODS[m]})", f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.1f} %)",
                     t["weights"] / MIB, t["grads"] / MIB, t["optimizer"] / MIB, r["peak"] / MIB,
                     r["peak"] / full["peak"], rss[m]["rss_train_peak_mib"], median(times[m]) * 1000,
                     median(times[m]) / median(times["lora"])))
    text = table(["method", "trainable", "weights MiB", "grads MiB", "optimizer MiB", "peak tensor MiB",
                  "peak / full", "RSS peak MiB", "ms/step (median)", "step time / lora"], rows)
    head = (f"GPT-2 {GPT2['n_layer']}x{GPT2['n_embd']}, vocab {GPT2['vocab_size']}: {full['total']:,} parameters "
            f"(4-bit layers hold {q['quantized_weights']:,}); batch {BATCH} x {TOKENS} tokens, AdamW, "
            f"{args.threads} thread(s), {args.steps} timed steps each")
    notes = (f"QLoRA base: {per_4bit:.3f} bytes/parameter in the 4-bit layers ({q['quantized_bytes'] / MIB:.2f} MiB "
             f"for {q['quantized_weights']:,} weights); whole frozen base {per_base:.3f} bytes/parameter "
             f"({q['frozen_bytes'] / MIB:.2f} MiB: fp32 embeddings, LayerNorms and biases included)\n"
             f"RSS peak: above the resident set before loading ({rss['full']['rss_before_mib']:.0f} MiB: interpreter "
             f"and libraries); file pages mapped by loading (part of the RSS): "
             + ", ".join(f"{m} {r['rss_file_loaded_mib']:.0f} MiB" for m, r in rss.items()))
    full_vs_lora = median(times["full"]) / median(times["lora"])
    qlora_vs_full = q["peak"] / full["peak"]
    print(f"{head}\n\n{text}\n\n{notes}")
    met = per_4bit <= GOAL_BYTES
    goal = f"QLoRA base weights <= {GOAL_BYTES} bytes/parameter (the 4-bit layers)"
    print(f"goal: {goal}: {verdict(met)}")
    result = {"goal": goal, "met": met, "quick": args.quick, "threads": args.threads, "table": f"{text}\n\n{notes}",
              "model": GPT2, "memory": memory, "rss": rss, "step_seconds": times, "bytes_per_param_4bit": per_4bit,
              "bytes_per_param_base": per_base, "full_over_lora_step": full_vs_lora,
              "seconds": round(time.perf_counter() - started, 1),
              "headline": (f"QLoRA {per_4bit:.3f} B/param (4-bit layers), {per_base:.2f} whole base; peak tensor "
                           f"memory qlora/lora/full {q['peak'] / MIB:.0f}/{memory['lora']['peak'] / MIB:.0f}/"
                           f"{full['peak'] / MIB:.0f} MiB (qlora/full {qlora_vs_full:.2f}); step full/lora "
                           f"{full_vs_lora:.2f}x")}
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
