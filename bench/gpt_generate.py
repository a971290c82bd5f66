"""GPT generation speed: tokens/s with the KV cache versus recomputing the whole context for every token.

The model is experiment=char_gpt's GPT (4 layers, 4 heads, width 128) with a 512-token context, so a 256-token
prompt plus the new tokens fit without the context sliding; weights are its random initialization (speed does not
depend on them). Both contenders run `GPT.stream` with `nnctl generate`'s sampler (temperature 0.8, top_k 50,
top_p 0.95) from the same seed, interleaved (alternating order) over repeats; each produces `--new-tokens` tokens
after the same 256-token prompt of the bundled corpus, and both must produce the same tokens.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from bench._common import base_parser, compose, cpu_count, interleaved, median, table, verdict, write_result

NAME = "gpt_generate"
GOAL_RATIO = 3.0
CONTEXT = 256


def build(block_size: int) -> tuple[Any, torch.Tensor]:
    from hydra.utils import instantiate

    from nnctl.data.text import CharTokenizer, bundled_corpus
    from nnctl.spec import complete

    cfg = compose(["experiment=char_gpt", "paths.run_dir=."])
    raw = bundled_corpus()
    tokenizer = CharTokenizer.build(raw, "corpus")
    spec = {"vocab_size": tokenizer.vocab_size, "block_size": block_size}
    torch.manual_seed(0)
    model = complete(instantiate(cfg.model), spec, "model").eval()
    prompt = torch.tensor([tokenizer.encode(raw.decode("utf-8")[:CONTEXT])])  # [1, 256]
    return model, prompt


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from nnctl.generate import sampler

    parser = base_parser(__doc__)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=cpu_count(), help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens = 2, 16
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, prompt = build(2 * CONTEXT)
    outputs: dict[bool, torch.Tensor] = {}

    def contender(kv_cache: bool):
        def run() -> float:
            pick = sampler(0.8, 50, 0.95, torch.Generator().manual_seed(0))
            start = time.perf_counter()
            tokens = torch.stack(list(model.stream(prompt, args.new_tokens, pick, kv_cache)), dim=1)
            seconds = time.perf_counter() - start
            outputs[kv_cache] = tokens
            return args.new_tokens / seconds
        return run

    rates = interleaved({"kv_cache": contender(True), "no_cache": contender(False)}, args.repeats)
    same = torch.equal(outputs[True], outputs[False])
    ratio = median(a / b for a, b in zip(rates["kv_cache"], rates["no_cache"]))
    text = table(["contender", "tokens/s (median)", "vs no cache"], [
        ("no cache: full forward over the context per token", median(rates["no_cache"]), 1.0),
        ("KV cache: one position per token", median(rates["kv_cache"]), ratio)])
    print(f"GPT 4x4x128, {CONTEXT}-token prompt, {args.new_tokens} new tokens, {args.threads} thread(s), "
          f"{args.repeats} repeats\n\n{text}\nsame tokens: {same}")
    met = ratio >= GOAL_RATIO and same
    goal = f"tokens/s with the KV cache >= {GOAL_RATIO}x without, at {CONTEXT} tokens of context, same tokens"
    print(f"goal: {goal}: {verdict(met)}")
    result = {"goal": goal, "met": met, "quick": args.quick, "threads": args.threads, "table": text,
              "ratio_median": ratio, "same_tokens": same, "rates": rates, "new_tokens": args.new_tokens,
              "seconds": round(time.perf_counter() - started, 1),
              "headline": f"KV cache / no cache {ratio:.1f}x tokens/s"}
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
