"""Sequence, attention and tabular families end to end: every model option trains from the CLI (loss falls),
`nnctl eval` reproduces its test metrics from the checkpoint alone, and lstm / seq2seq runs resume bitwise after
kill -9. Plus the pieces a run cannot show: padding invariance, beam search, decode_text, preprocessing, R^2."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import fixtures as fx
from nnctl import checkpoint as ck
from nnctl.cli import main
from nnctl.errors import UserError

FAST = ["trainer.progress=false", "trainer.device=cpu", "trainer.log_every_n_steps=5"]
REGRESSION = ["trainer/checkpoint=loss"]
SEQ = ["data=sequence_tasks", "data.num_samples=600", "data.min_len=3", "data.max_len=8"]


def write_texts(root: Path) -> Path:
    """A CSV of texts whose class is which vowel dominates them (learnable by character statistics)."""
    import random

    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(400):
        label = ["a", "o"][i % 2]
        text = "".join(rng.choice(label * 4 + "bcdfg ") for _ in range(rng.randint(5, 30)))
        rows.append(f'"{text}",{label}-text')
    path = root / "texts.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_table(root: Path) -> Path:
    """A CSV with a numeric, a categorical and a partly missing column; y = 3 x1 + 5 [colour = red] + noise."""
    import random

    rng = random.Random(1)
    rows = ["x1,colour,x2,y"]
    for i in range(300):
        x1, colour = rng.uniform(-2, 2), rng.choice(["red", "green", "blue"])
        x2 = "" if i % 7 == 0 else f"{rng.gauss(0, 1):.4f}"
        rows.append(f"{x1:.4f},{colour},{x2},{3 * x1 + 5 * (colour == 'red') + rng.gauss(0, 0.1):.4f}")
    path = root / "table.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


# every model option, on the data it reads; each a few seconds on a CPU
RUNS = {
    "lstm": [*SEQ, "model=lstm", "model.hidden_size=32", "data.task=sum_last_k", "trainer.max_epochs=3",
             *REGRESSION],
    "gru": ["data=text_classification", "data.path={texts}", "model=gru", "model.hidden_size=32",
            "model.pool=attention", "model.bidirectional=true", "trainer.max_epochs=3"],
    "rnn": [*SEQ, "model=rnn", "model.hidden_size=32", "model.pool=mean", "data.task=majority",
            "trainer.max_epochs=3"],
    "transformer": [*SEQ, "model=transformer", "model.dim=32", "model.pool=cls", "model.positions=learned",
                    "data.task=majority", "trainer.max_epochs=3"],
    "vit": ["data=digits", "data.batch_size=32", "model=vit", "model.patch_size=4", "model.dim=32", "model.depth=2",
            "optimizer.lr=0.005", "trainer.max_epochs=4"],
    "seq2seq": [*SEQ, "model=seq2seq", "model.dim=32", "data.task=reverse", "data.max_len=5", "data.batch_size=16",
                "optimizer.lr=0.005", "trainer.max_epochs=3"],
    "seq2seq_lstm": [*SEQ, "model=seq2seq_lstm", "model.hidden_size=64", "data.task=copy", "data.max_len=5",
                     "data.batch_size=16", "optimizer.lr=0.005", "trainer.max_epochs=3"],
    "mlp_wine": ["data=tabular", "data.name=wine", "model=mlp", "model.hidden_sizes=[32]", "trainer.max_epochs=5"],
    "mlp_csv": ["data=tabular", "data.name=null", "data.path={table}", "data.target=y", "model=mlp",
                "model.hidden_sizes=[32]", "trainer.max_epochs=5", *REGRESSION],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq_inputs")
    return {"texts": write_texts(root), "table": write_table(root)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> dict[str, Path]:
    """One finished run per entry of RUNS (trained once for the module)."""
    out = {}
    for name, args in RUNS.items():
        run = tmp_path_factory.mktemp(name) / "run"
        argv = [a.format(**inputs) for a in args]
        assert main(["train", *argv, *FAST, f"hydra.run.dir={run}"]) == 0, name
        out[name] = run
    return out


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def train_losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


@pytest.mark.parametrize("name", list(RUNS))
def test_model_trains_and_eval_reproduces_test_metrics(name: str, runs: dict[str, Path], cli, tmp_path: Path) -> None:
    run = runs[name]
    losses = train_losses(run)
    assert len(losses) >= 3 and losses[-1] < 0.8 * losses[0], losses
    trained = metrics_of(run)["test"]
    assert all(math.isfinite(v) for v in trained.values())
    assert cli("eval", f"ckpt={run}") == 0
    (eval_run,) = fx.run_dirs(tmp_path, "eval")
    evaluated = metrics_of(eval_run)["test"]
    assert evaluated.keys() == trained.keys()
    for k in trained:
        assert evaluated[k] == pytest.approx(trained[k], rel=1e-5, abs=1e-6), k


def test_what_each_family_learns(runs: dict[str, Path]) -> None:
    assert metrics_of(runs["lstm"])["test"]["r2"] > 0.5  # chance: 0
    assert metrics_of(runs["gru"])["test"]["acc"] > 0.9  # chance: 0.5
    assert metrics_of(runs["transformer"])["test"]["acc"] > 0.75
    assert metrics_of(runs["mlp_wine"])["test"]["acc"] > 0.85  # 3 classes
    assert metrics_of(runs["mlp_csv"])["test"]["r2"] > 0.8
    assert metrics_of(runs["seq2seq"])["test"]["token_acc"] > 0.3  # chance: ~0.1 (10 digits and <eos>)
    test = metrics_of(runs["mlp_csv"])["test"]
    assert set(test) == {"loss", "mse", "mae", "r2"} and test["mae"] <= math.sqrt(test["mse"]) + 1e-9


def test_checkpoint_holds_the_tokenizer(runs: dict[str, Path]) -> None:
    state = ck.load_checkpoint(runs["gru"] / "checkpoints" / ck.BEST)
    tok = state[ck.DATA]["tokenizer"]
    assert tok["kind"] == "char" and set(tok["symbols"]) == set("abcdfgo ") and tok["specials"][0] == "<pad>"
    assert state[ck.DATA]["classes"] == ["a-text", "o-text"]


# -- exact resume after kill -9 ---------------------------------------------------------------------------------
RESUMABLE = {
    "lstm": ["data=sequence_tasks", "data.task=sum_last_k", "data.num_samples=2000", "data.max_len=12",
             "model=lstm", "model.hidden_size=16", "data.batch_size=32", *REGRESSION],
    "seq2seq": ["data=sequence_tasks", "data.task=reverse", "data.num_samples=2000", "data.max_len=6",
                "model=seq2seq", "model.dim=16", "model.depth=1", "data.batch_size=32"],
}
RESUME = ["trainer.deterministic=true", "trainer.progress=false", "trainer.device=cpu", "trainer.max_epochs=3",
          "trainer.early_stopping.enabled=false", "trainer.log_every_n_steps=5", "scheduler=step"]


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_kill9_mid_epoch_then_resume_is_bitwise_identical(name: str, tmp_path: Path) -> None:
    from test_resume import _assert_bitwise_equal, _wait_for, _weights

    args = [*RESUMABLE[name], *RESUME]
    straight, run = tmp_path / "straight", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nnctl", "train", *args, f"hydra.run.dir={run}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert main(["train", *args, f"hydra.run.dir={straight}"]) == 0  # the reference, meanwhile
    _wait_for(run / "checkpoints" / ck.LAST, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = ck.load_checkpoint(run / "checkpoints" / ck.LAST)
    assert state[ck.EPOCH] < 3, "the run finished before it was killed"
    assert main(["train", f"resume={run}"]) == 0
    _assert_bitwise_equal(_weights(run), _weights(straight))
    assert metrics_of(run)["test"] == metrics_of(straight)["test"]


# -- models: padding, pooling, decoding ---------------------------------------------------------------------------
def _padded_pair(vocab: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same 3 sequences alone (batch of 1 each, no padding) and padded into one batch with a mask."""
    torch.manual_seed(0)
    seqs = [torch.randint(1, vocab, (n,)) for n in (5, 2, 4)]
    batch = torch.zeros(3, 5, dtype=torch.int64)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    mask = batch != 0
    return seqs, batch, mask


@pytest.mark.parametrize("build", [
    *[f"recurrent:{cell}:{pool}" for cell in ("rnn", "lstm", "gru") for pool in ("last", "mean", "attention")],
    "recurrent:lstm:bi", "transformer:mean", "transformer:cls"])
def test_padding_never_changes_a_sequence_output(build: str) -> None:
    from nnctl.models.recurrent import Recurrent
    from nnctl.models.transformer import TransformerEncoder

    kind, *opts = build.split(":")
    torch.manual_seed(0)
    if kind == "recurrent":
        cell, pool = opts
        bi = pool == "bi"
        model = Recurrent(cell, hidden_size=8, num_layers=2, bidirectional=bi, pool="mean" if bi else pool,
                          embed_dim=8, vocab_size=7, num_classes=3)
    else:
        model = TransformerEncoder(max_len=8, dim=16, depth=2, heads=2, pool=opts[0], vocab_size=7, num_classes=3)
    model.eval()
    seqs, batch, mask = _padded_pair()
    with torch.no_grad():
        together = model(batch, mask)
        for i, s in enumerate(seqs):
            alone = model(s[None], torch.ones(1, len(s), dtype=torch.bool))
            torch.testing.assert_close(together[i: i + 1], alone, rtol=1e-5, atol=1e-5)


def _seq2seq_models() -> list:
    from nnctl.models.seq2seq import LSTMSeq2Seq, TransformerSeq2Seq

    torch.manual_seed(0)
    return [TransformerSeq2Seq(vocab_size=9, max_len=12, pad_id=0, bos_id=1, eos_id=2, dim=16, depth=1, heads=2),
            LSTMSeq2Seq(vocab_size=9, pad_id=0, bos_id=1, eos_id=2, embed_dim=8, hidden_size=16)]


def _log_prob(model, src: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each decoded sequence (up to and including <eos>)."""
    tgt = torch.cat([torch.ones(len(out), 1, dtype=torch.int64), out], 1)
    logp = model(src, mask, tgt[:, :-1]).log_softmax(-1).gather(2, tgt[:, 1:, None])[..., 0]  # [B, T]
    ended = (tgt[:, 1:-1] == 2).cumsum(1) > 0  # positions after an <eos>
    return logp.masked_fill(torch.cat([torch.zeros(len(out), 1, dtype=torch.bool), ended], 1), 0).sum(1)


@pytest.mark.parametrize("index", [0, 1], ids=["transformer", "lstm"])
def test_beam_search_finds_sequences_at_least_as_likely_as_greedy(index: int) -> None:
    model = _seq2seq_models()[index].eval()
    _, src, mask = _padded_pair(9)
    with torch.no_grad():
        greedy, beam1 = model.greedy_decode(src, mask, 6), model.beam_decode(src, mask, 1, 6)
        assert torch.equal(greedy, beam1)  # a beam of one is greedy search
        beam = model.beam_decode(src, mask, 4, 6)
        assert (_log_prob(model, src, mask, beam) >= _log_prob(model, src, mask, greedy) - 1e-5).all()
        # each row: tokens, then <eos>, then only <pad>
        for row in beam.tolist():
            if 2 in row:
                assert set(row[row.index(2) + 1:]) <= {0}


def test_decode_text_uses_the_checkpoint_vocabulary(runs: dict[str, Path]) -> None:
    from hydra.utils import instantiate

    from nnctl.seq2seq_decode import decode_text
    from nnctl.spec import complete

    state = ck.load_checkpoint(runs["seq2seq"] / "checkpoints" / ck.BEST)
    cfg = OmegaConf.create(state[ck.CONFIG])
    spec = {"vocab_size": 13, "max_len": 7, "pad_id": 0, "bos_id": 1, "eos_id": 2}
    model = complete(instantiate(cfg.model), spec, "model")
    model.load_state_dict(state[ck.MODEL])
    data_state = state[ck.DATA]
    out = decode_text(model, data_state, "3141", beam=1, max_len=7)
    assert set(out) <= set("0123456789") and len(out) <= 7
    # the same as decoding the ids directly
    ids = torch.tensor([[3 + int(c) for c in "3141"]])
    direct = model.eval().greedy_decode(ids, torch.ones_like(ids, dtype=torch.bool), 7)[0].tolist()
    upto = direct[: direct.index(2)] if 2 in direct else direct
    assert out == "".join(str(i - 3) for i in upto if i >= 3)
    assert set(decode_text(model, data_state, "3141", beam=3, max_len=7)) <= set("0123456789")
    with pytest.raises(UserError, match=r"input: character 'x' at position 2 is not in the model's vocabulary"):
        decode_text(model, data_state, "31x4", beam=1, max_len=7)


# -- data ---------------------------------------------------------------------------------------------------------
def _build(cls: str, **kw: object):
    from hydra.utils import get_object

    base = dict(batch_size=16, eval_batch_size=64, val_fraction=0.1, test_fraction=0.2, split_seed=0)
    return get_object(cls)(**{**base, **kw}).setup(torch.device("cpu"))


def test_tabular_preprocessing_is_fit_on_the_training_rows(inputs: dict[str, Path]) -> None:
    data = _build("nnctl.data.tabular.Tabular", name=None, path=str(inputs["table"]), target="y")
    assert data.spec["target"] == "regression" and data.feature_names == [
        "x1", "colour=blue", "colour=green", "colour=red", "x2"]
    x = data.splits["train"]["x"]
    assert x[:, 0].mean().abs() < 1e-5 and (x[:, 0].std(unbiased=False) - 1).abs() < 1e-4  # standardized on train
    assert torch.equal(x[:, 1:4].sum(1), torch.ones(len(x)))  # one-hot
    assert torch.isfinite(x).all()  # missing x2 -> the training median
    y = data.splits["train"]["y"]
    assert y.mean().abs() < 1e-5 and abs(data.spec["target_std"][0] - 3.2) < 1.0
    batch = next(data.train_batches(0, 0))
    assert batch[0].shape == (16, 5) and batch[1].shape == (16, 1)
    wine = _build("nnctl.data.tabular.Tabular", name="wine", path=None, target=None)
    assert wine.spec["target"] == "class" and wine.spec["num_classes"] == 3 and wine.spec["num_features"] == 13
    diabetes = _build("nnctl.data.tabular.Tabular", name="diabetes", path=None, target=None)
    assert diabetes.spec["target"] == "regression"


def test_text_folders_and_byte_tokenizer(tmp_path: Path) -> None:
    for label, texts in (("pos", ["good", "great fun", "süper"]), ("neg", ["bad", "awful", "dull", "meh"])):
        (tmp_path / label).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / label / f"{i}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "neg" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: fine for bytes
    data = _build("nnctl.data.text_classification.TextClassification", path=str(tmp_path), tokenizer="byte",
                  max_len=6, val_fraction=0.2, test_fraction=0.2)
    assert data.spec["classes"] == ["neg", "pos"] and data.spec["vocab_size"] == 258
    tokens, mask, labels = next(data.eval_batches("test"))
    assert tokens.shape[1] <= 6 and torch.equal(mask, tokens != 0) and mask[:, 0].all()
    assert data.tokenizer.decode(data.tokenizer.encode("süper")) == "süper"


def test_sequence_tasks_make_what_they_say() -> None:
    common = dict(num_samples=50, min_len=3, max_len=6)
    rev = _build("nnctl.data.sequence_tasks.SequenceTasks", task="reverse", **common)
    src, src_mask, tgt = next(rev.eval_batches("test"))
    tok = rev.tokenizer
    for s, t in zip(src.tolist(), tgt.tolist()):
        assert t[0] == 1 and tok.decode(t) == tok.decode(s)[::-1]
    srt = _build("nnctl.data.sequence_tasks.SequenceTasks", task="sort", **common)
    s, _, t = next(srt.eval_batches("test"))
    assert all(srt.tokenizer.decode(b) == "".join(sorted(srt.tokenizer.decode(a))) for a, b in zip(s.tolist(),
                                                                                                     t.tolist()))
    par = _build("nnctl.data.sequence_tasks.SequenceTasks", task="parity", **common)
    tokens, mask, labels = next(par.eval_batches("val"))
    assert torch.equal(((tokens == par.tokenizer.ids["1"]) & mask).sum(1) % 2, labels)
    reg = _build("nnctl.data.sequence_tasks.SequenceTasks", task="sum_last_k", k=2, **common)
    x, mask, y = next(reg.eval_batches("test"))
    last = mask.sum(1)
    raw = torch.stack([x[i, last[i] - 2: last[i], 0].sum() for i in range(len(x))])
    mean, std = reg.spec["target_mean"][0], reg.spec["target_std"][0]
    torch.testing.assert_close(y[:, 0] * std + mean, raw, rtol=1e-5, atol=1e-5)
    # the same seed makes the same data; batches are fixed by (seed, epoch, index)
    again = _build("nnctl.data.sequence_tasks.SequenceTasks", task="sum_last_k", k=2, **common)
    assert all(torch.equal(a, b) for a, b in zip(next(reg.train_batches(1, 5, start=1)),
                                                  next(again.train_batches(1, 5, start=1))))


# -- objectives ---------------------------------------------------------------------------------------------------
def test_regression_metrics_match_their_definitions() -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    from nnctl.metrics import Averages
    from nnctl.objectives.regression import Regression

    torch.manual_seed(0)
    mean, std = 150.0, 70.0
    y = torch.randn(100, 1)  # standardized targets
    pred = y + 0.3 * torch.randn(100, 1)
    objective, metrics = Regression([mean], [std]), Averages()
    for i in range(0, 100, 32):  # uneven batches
        objective.eval_update(lambda *_, p=pred[i:i + 32]: p, (torch.zeros(1), y[i:i + 32]), metrics, None)
    got = objective.summarize(metrics.means())
    true, hat = (y * std + mean).numpy(), (pred * std + mean).numpy()
    assert got["mse"] == pytest.approx(mean_squared_error(true, hat), rel=1e-4)
    assert got["mae"] == pytest.approx(mean_absolute_error(true, hat), rel=1e-4)
    assert got["r2"] == pytest.approx(r2_score(true, hat), rel=1e-4)
    assert got["loss"] == pytest.approx(float(((pred - y) ** 2).mean()), rel=1e-4)


@pytest.mark.parametrize(("objective", "data", "cls"), [
    ("regression", ["data=tabular", "data.name=diabetes"], "Regression"),
    ("seq2seq", ["data=sequence_tasks", "data.task=copy"], "Seq2Seq"),
    ("auto", ["data=sequence_tasks", "data.task=copy"], "Seq2Seq"),
    ("auto", ["data=sequence_tasks", "data.task=sum_last_k"], "Regression"),
    ("auto", ["data=text_classification", "data.path={texts}"], "Classification"),
])
def test_objective_options_build_for_their_data(objective: str, data: list[str], cls: str, tmp_path: Path,
                                                 inputs: dict[str, Path]) -> None:
    from test_configs import compose_train

    from nnctl.engine import Engine

    model = {"Regression": "model=mlp", "Seq2Seq": "model=seq2seq", "Classification": "model=gru"}[cls]
    if "sum_last_k" in data[-1]:
        model = "model=lstm"
    cfg = compose_train(f"objective={objective}", model, *(a.format(**inputs) for a in data), "trainer.device=cpu")
    engine = Engine(cfg, tmp_path / "run")
    assert type(engine.objective).__name__ == cls
    loss, sums = engine.objective.training_step(engine.model, next(engine.data.train_batches(0, 0)))
    assert torch.isfinite(loss) and sums


def test_generate_decodes_a_seq2seq_checkpoint(runs: dict[str, Path], cli, capsys: pytest.CaptureFixture) -> None:
    from nnctl.seq2seq_decode import decode_text

    capsys.readouterr()
    assert cli("generate", f"ckpt={runs['seq2seq']}", "input=3141", "max_new_tokens=7") == 0
    greedy = capsys.readouterr().out.strip().splitlines()[-1]
    assert set(greedy) <= set("0123456789") and len(greedy) <= 7
    assert cli("generate", f"ckpt={runs['seq2seq']}", "input=3141", "max_new_tokens=7", "beam=3") == 0
    beam = capsys.readouterr().out.strip().splitlines()[-1]
    assert set(beam) <= set("0123456789")
    # the same text as decode_text on the best checkpoint's weights
    state = ck.load_checkpoint(runs["seq2seq"] / "checkpoints" / ck.BEST)
    from hydra.utils import instantiate

    from nnctl.spec import complete

    model = complete(instantiate(OmegaConf.create(state[ck.CONFIG]).model), state[ck.DATA]["spec"], "model")
    model.load_state_dict(state[ck.MODEL])
    assert greedy == decode_text(model, state[ck.DATA], "3141", beam=1, max_len=7)
    assert cli("generate", f"ckpt={runs['seq2seq']}") == 2  # no input: one line naming the key
    assert "input: a sequence-to-sequence model decodes an input" in capsys.readouterr().err
