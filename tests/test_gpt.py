"""Language models end to end: data=text + model=gpt train from the CLI, `nnctl eval` reproduces the test metrics
from the checkpoint alone, kill -9 + resume is bitwise identical, and `nnctl generate` is deterministic, with the
KV cache picking exactly the tokens the full recomputation picks, also past the context length."""
from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

import fixtures as fx
from test_resume import _wait_for
from nnctl import checkpoint as ck
from nnctl.cli import main
from nnctl.data.text import TextData, bundled_corpus
from nnctl.generate import sample_text, sampler
from nnctl.models.gpt import GPT

# A 2-layer GPT of width 32 on the bundled corpus: a few hundred ms per epoch of 20 batches.
TINY = ["model=gpt", "data=text", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "data.block_size=32",
        "data.batch_size=16", "data.batches_per_epoch=20", "data.eval_batch_size=256", "trainer.progress=false",
        "trainer.device=cpu", "objective.sample_tokens=40", "objective=language_model",
        "trainer.checkpoint.monitor=val/loss", "trainer.checkpoint.mode=min"]


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_gpt_trains_and_eval_reproduces_the_test_metrics(cli: Callable[..., int], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert cli("train", *TINY, "trainer.max_epochs=3", "optimizer.lr=1e-2") == 0
    (run,) = fx.run_dirs(tmp_path, "train")
    losses = _scalars(run, "val/loss")
    vocab = ck.load_checkpoint(run / "checkpoints" / ck.LAST)[ck.DATA]["spec"]["vocab_size"]
    # a uniform guess scores ln(vocab) ~ 4.6 nats; 60 steps learn the character frequencies and some pairs
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[2] < math.log(vocab) - 1.2, losses
    m = metrics_of(run)
    assert m["test"]["bpc"] == pytest.approx(m["test"]["loss"] / 0.6931471805599453)
    assert m["test"]["ppl"] == pytest.approx(2.718281828459045 ** m["test"]["loss"])
    assert 0 < m["test"]["acc"] < 1
    assert _texts(run, "sample")  # a text sample per validation
    state = ck.load_checkpoint(run / "checkpoints" / ck.BEST)
    assert state[ck.DATA]["tokenizer"]["kind"] == "char" and state[ck.DATA]["spec"]["target"] == "next_token"
    capsys.readouterr()
    assert cli("eval", f"ckpt={run}") == 0
    (evaluated,) = fx.run_dirs(tmp_path, "eval")
    for k, v in m["test"].items():
        assert metrics_of(evaluated)["test"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), k


def test_kill9_mid_run_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    args = [*TINY, "trainer.deterministic=true", "trainer.max_epochs=2", "data.batches_per_epoch=30",
            "model.dropout=0.1"]
    straight = tmp_path / "straight"
    assert main(["train", *args, f"hydra.run.dir={straight}"]) == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nnctl", "train", *args, f"hydra.run.dir={run}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / ck.LAST
    _wait_for(last, proc)  # epoch 1 is saved; epoch 2 is under way
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert ck.load_checkpoint(last)[ck.EPOCH] == 1
    assert main(["train", f"resume={run}"]) == 0
    a, b = ck.load_checkpoint(last)[ck.MODEL], ck.load_checkpoint(straight / "checkpoints" / ck.LAST)[ck.MODEL]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_of(run)["test"] == metrics_of(straight)["test"]


def test_generate_is_deterministic_and_the_kv_cache_changes_nothing(cli: Callable[..., int], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    assert cli("train", *TINY, "trainer.max_epochs=1") == 0
    (run,) = fx.run_dirs(tmp_path, "train")
    outputs = []
    # 80 new tokens after a 10-character prompt: past the 32-token context, so the context slides twice
    for extra in ([], [], ["kv_cache=false"]):
        capsys.readouterr()
        assert cli("generate", f"ckpt={run}", "prompt='The value'", "max_new_tokens=80", "seed=3", *extra) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("The value") and len(outputs[0]) > 60
    assert outputs[0] == outputs[1] == outputs[2]
    capsys.readouterr()
    assert cli("generate", f"ckpt={run}", "prompt='The value'", "max_new_tokens=80", "seed=4") == 0
    assert capsys.readouterr().out != outputs[0]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_kv_cache_picks_the_same_tokens_past_the_context(temperature: float) -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32).eval()
    with torch.no_grad():  # a peaked distribution, as after training, so greedy/sampled paths are not all ties
        model.tok.weight.mul_(20)
    prompt = torch.randint(0, 50, (2, 5))
    runs = []
    for kv_cache in (True, False):
        pick = sampler(temperature, None, 1.0, torch.Generator().manual_seed(0))
        runs.append(torch.stack(list(model.stream(prompt, 60, pick, kv_cache)), dim=1))  # [2, 60]
    assert runs[0].shape == (2, 60)
    assert torch.equal(runs[0], runs[1])


def test_kv_cache_logits_match_a_full_forward() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=30, block_size=24, n_layer=2, n_head=4, n_embd=32).eval()
    idx = torch.randint(0, 30, (3, 20))
    from nnctl.models.gpt import KVCache

    cache = KVCache(2, 3, 4, 24, 8, model.tok.weight)
    with torch.no_grad():
        full = model(idx)
        # prefill 7 positions, then 3 at once (queries against cached past), then one at a time
        parts = [model(idx[:, :7], cache), model(idx[:, 7:10], cache)]
        parts += [model(idx[:, t:t + 1], cache) for t in range(10, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    from nnctl.models import checkpoint_blocks

    torch.manual_seed(0)
    plain = GPT(vocab_size=40, block_size=16, n_layer=3, n_head=2, n_embd=32).train()
    recomputed = copy.deepcopy(plain)
    checkpoint_blocks(recomputed)
    x, y = torch.randint(0, 40, (4, 16)), torch.randint(0, 40, (4, 16))
    losses = []
    for net in (plain, recomputed):
        loss = torch.nn.functional.cross_entropy(net(x).view(-1, 40), y.view(-1))
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7, msg=name)


def test_tied_embedding_is_one_parameter_decayed_once() -> None:
    from nnctl.optimization import param_groups

    model = GPT(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32)
    assert model.head.weight is model.tok.weight
    decayed, plain = param_groups(model, 0.1, False)
    ids = [id(p) for g in (decayed, plain) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert any(p is model.tok.weight for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])


def test_text_windows_are_resumable_and_evaluation_scores_every_token_once(tmp_path: Path) -> None:
    path = tmp_path / "poem.txt"
    path.write_text("Tyger Tyger, burning bright,\nIn the forests of the night;\n" * 40)
    data = TextData(str(path), "char", block_size=16, batch_size=4, eval_batch_size=3, batches_per_epoch=6,
                    val_fraction=0.1, test_fraction=0.1).setup(torch.device("cpu"))
    whole = list(data.train_batches(epoch=1, seed=5))
    assert len(whole) == 6 and whole[0][0].shape == (4, 16)
    assert torch.equal(whole[0][1][:, :-1], whole[0][0][:, 1:])  # targets are the inputs shifted by one
    for i, (x, y, n) in enumerate(data.train_batches(epoch=1, seed=5, start=3), start=3):
        assert torch.equal(x, whole[i][0]) and torch.equal(y, whole[i][1])
    assert not torch.equal(whole[0][0], next(data.train_batches(epoch=2, seed=5))[0])
    for split in ("val", "test"):
        batches = list(data.eval_batches(split))
        assert len(batches) == data.num_batches(split)
        assert sum(n for _, _, n in batches) == len(data.splits[split]) - 1
        assert sum(int((y >= 0).sum()) for _, y, _ in batches) == len(data.splits[split]) - 1
    assert data.state_dict()["tokenizer"]["vocab"] == "".join(sorted(set(path.read_text())))


def test_byte_tokenizer_reads_any_file_and_streams_whole_characters(tmp_path: Path) -> None:
    path = tmp_path / "mixed.bin"
    path.write_bytes(("café crème " * 60).encode("latin-1") + "naïve ".encode("utf-8") * 60)
    data = TextData(str(path), "byte", block_size=8, batch_size=2, eval_batch_size=4, batches_per_epoch=2,
                    val_fraction=0.1, test_fraction=0.1).setup(torch.device("cpu"))
    assert data.spec["vocab_size"] == 256 and data.spec["token_unit"] == "byte"
    decode = data.tokenizer.decoder()
    assert decode(list("ï".encode("utf-8"))[:1]) == "" and decode(list("ï".encode("utf-8"))[1:]) == "ï"


def test_default_corpus_is_real_english_shipped_with_python() -> None:
    text = bundled_corpus().decode("utf-8")
    assert len(text) > 300_000
    assert text.count(" the ") > 2000 and "statement" in text


def test_sample_text_leaves_the_global_rng_alone() -> None:
    from nnctl.data.text import CharTokenizer

    tok = CharTokenizer("\n abcdefgh")
    model = GPT(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=16)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = sample_text(model, tok, "abc", 20, 1.0, None, 1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert a == sample_text(model, tok, "abc", 20, 1.0, None, 1.0, seed=7) and len(a) == 20


def _scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def _texts(run: Path, tag: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [t for t in acc.Tags()["tensors"] if t.startswith(tag)]
