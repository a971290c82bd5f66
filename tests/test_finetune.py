"""Fine-tuning: LoRA / DoRA / QLoRA through peft on nnctl models and a tiny Hugging Face LM, init_from with a new
head, class subsets, adapter checkpoints (small, exact resume, base checks), export, generation."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import fixtures as fx
from nnctl import checkpoint as ck
from nnctl.cli import main
from nnctl.commands import CONFIG_DIR

DIGITS = ["data=digits", "data.batch_size=64", "trainer.device=cpu", "trainer.progress=false",
          "trainer.early_stopping.enabled=false", "scheduler=none"]
MLP = [*DIGITS, "model=mlp", "model.hidden_sizes=[64,32]"]


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _engine(overrides: list[str], run_dir: Path):  # noqa: ANN202 - an Engine
    from nnctl.engine import Engine

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.run_dir={run_dir}"])
    return Engine(cfg, run_dir)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP trained on digits 0-4 (three epochs): the base the adapters fine-tune on digits 5-9."""
    run = tmp_path_factory.mktemp("pre") / "run"
    assert main(["train", *MLP, "data.classes=[0,1,2,3,4]", "trainer.max_epochs=3", "optimizer.lr=0.01",
                 f"hydra.run.dir={run}"]) == 0
    assert _metrics(run)["test"]["acc"] > 0.9
    return run


@pytest.mark.parametrize("adapter", ["lora", "dora", "qlora"])
def test_adapter_trains_and_leaves_the_base_bit_identical(adapter: str, pretrained: Path, tmp_path: Path) -> None:
    engine = _engine([*MLP, f"adapter={adapter}", "data.classes=[5,6,7,8,9]", "trainer.max_epochs=2",
                      "optimizer.lr=0.01", f"init_from={pretrained}"], tmp_path / "run")
    frozen = {n: p.detach().clone() for n, p in engine.net.named_parameters() if not p.requires_grad}
    assert any("lora_A" in n for n, p in engine.net.named_parameters() if p.requires_grad)
    before = engine.evaluate("val")["val/loss"]
    result = engine.fit()
    after = {n: p for n, p in engine.net.named_parameters() if not p.requires_grad}
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert result["val"]["loss"] < 0.5 * before and result["test"]["acc"] > 0.6  # chance: 0.2
    state = ck.load_checkpoint(tmp_path / "run" / "checkpoints" / ck.BEST)
    assert not any("base_layer" in k and k.endswith("weight") for k in state[ck.MODEL])  # only what trained
    assert state[ck.BASE]["init_from"].endswith("best.pt") and len(state[ck.BASE]["weights_sha256"]) == 64
    # nnctl eval rebuilds the base from init_from and reproduces the run's test metrics
    assert main(["eval", f"ckpt={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'eval'}"]) == 0
    assert _metrics(tmp_path / "eval")["test"] == pytest.approx(result["test"], abs=1e-6)


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_export_merged_matches_the_adapter_model(adapter: str, pretrained: Path, tmp_path: Path) -> None:
    from nnctl.export import load_plain

    run = tmp_path / "run"
    assert main(["train", *MLP, f"adapter={adapter}", "data.classes=[5,6,7,8,9]", "trainer.max_epochs=1",
                 "optimizer.lr=0.01", f"init_from={pretrained}", f"hydra.run.dir={run}"]) == 0
    assert (run / "checkpoints" / "best_peft" / "adapter_model.safetensors").is_file()
    assert main(["export", f"ckpt={run}", f"out={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'ex'}"]) == 0
    merged = load_plain(tmp_path / "out")
    assert not any("lora" in k for k in merged.state_dict())
    engine = _engine([*MLP, f"adapter={adapter}", "data.classes=[5,6,7,8,9]", f"init_from={pretrained}"],
                     tmp_path / "e")
    engine.load_state_dict(ck.load_checkpoint(run / "checkpoints" / ck.BEST), full=False)
    x, _ = next(engine.data.eval_batches("test"))
    with torch.no_grad():
        assert torch.allclose(merged(x), engine.net.eval()(x), atol=1e-5)


def test_qlora_base_keeps_its_layout_through_evaluation_on_any_cpu(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """bitsandbytes repacks a Linear4bit in place at its first eval-mode forward when the CPU has AVX512-BF16 (and
    fails on layers narrower than a quantization block: the tiny LM's tests cover that). Made to believe this CPU
    has it, the base still keeps its layout, bytes and checkpoint keys through an evaluation, and evaluating twice
    gives the same loss."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # read when each Linear4bit is built
    engine = _engine([*MLP, "adapter=qlora"], tmp_path / "run")
    layers = [m for m in engine.net.modules() if isinstance(m, bnb_modules.Linear4bit)]
    assert len(layers) == 2
    base = {k: v.clone() for k, v in engine.net.state_dict().items() if "lora" not in k}
    first = engine.evaluate("val")["val/loss"]
    assert engine.evaluate("val")["val/loss"] == first
    after = {k: v for k, v in engine.net.state_dict().items() if "lora" not in k}
    assert after.keys() == base.keys() and all(torch.equal(base[k], after[k]) for k in base)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_init_from_recreates_a_head_that_does_not_fit(pretrained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", *MLP, "data.classes=[7,8,9]", "trainer.max_epochs=2", "optimizer.lr=0.01", f"init_from={pretrained}",
                 f"hydra.run.dir={run}"]) == 0
    assert "re-initialized: head.weight, head.bias" in (run / "train.log").read_text()  # a WARNING line
    assert _metrics(run)["test"]["acc"] > 0.7  # chance: 0.33
    state = ck.load_checkpoint(run / "checkpoints" / ck.BEST)
    base = ck.load_checkpoint(pretrained / "checkpoints" / ck.BEST)[ck.MODEL]
    assert ck.BASE not in state and state[ck.MODEL]["head.weight"].shape[0] == 3
    assert not torch.equal(state[ck.MODEL]["blocks.0.linear.weight"], base["blocks.0.linear.weight"])


def test_lr_mult_and_freeze_make_their_own_groups(tmp_path: Path) -> None:
    engine = _engine([*MLP, "optimizer.lr=0.01", "finetune.lr_mult={blocks\\.0:0.1}", "finetune.freeze=[blocks.1]"],
                     tmp_path / "run")
    engine.configure_optimization()
    lrs = sorted({g["lr"] for g in engine.optimizer.param_groups if g["params"]})
    assert lrs == pytest.approx([0.001, 0.01])
    held = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in held for p in engine.net.blocks[1].parameters())


@pytest.mark.parametrize("optimizer, lr", [("adamw8bit", 0.01), ("lion8bit", 0.01)])
def test_8bit_optimizers_train_with_8bit_state(optimizer: str, lr: float, tmp_path: Path) -> None:
    engine = _engine([*MLP, f"optimizer={optimizer}", f"optimizer.lr={lr}", "trainer.max_epochs=1",
                      "trainer.limit_train_batches=10"], tmp_path / "run")
    before = engine.evaluate("val")["val/loss"]
    assert engine.fit()["val"]["loss"] < 0.85 * before  # 2.30 -> 1.80 (adamw8bit), 1.60 (lion8bit) in 10 steps
    first = engine.optimizer.state[engine.net.blocks[0].linear.weight]  # 64 x 64: large enough for 8-bit state
    assert first["state1"].dtype == torch.uint8
    assert ck.load_checkpoint(tmp_path / "run" / "checkpoints" / ck.LAST)[ck.OPTIMIZER]["main"]["state"]


def test_8bit_optimizer_missing_from_bitsandbytes_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes.optim

    from nnctl.errors import UserError
    from nnctl.optim import lion8bit

    monkeypatch.delattr(bitsandbytes.optim, "Lion8bit")
    with pytest.raises(UserError, match=r"^optimizer: bitsandbytes \S+ has no Lion8bit \(optimizer=lion8bit\); "
                                        r"pip install -U 'bitsandbytes>=0.50', or use optimizer=adamw$"):
        lion8bit([{"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=1e-3)


def test_adapter_checkpoint_refuses_a_changed_or_missing_base(pretrained: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    import shutil

    base = tmp_path / "base.pt"
    shutil.copy(pretrained / "checkpoints" / ck.BEST, base)
    run = tmp_path / "run"
    assert main(["train", *MLP, "adapter=lora", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 f"init_from={base}", f"hydra.run.dir={run}"]) == 0
    state = ck.load_checkpoint(base)
    state[ck.MODEL]["blocks.0.linear.weight"] += 1
    ck.save_checkpoint(state, base)
    capsys.readouterr()
    assert main(["eval", f"ckpt={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "init_from: the adapter checkpoint's base" in err and "changed since training" in err
    base.unlink()
    assert main(["eval", f"ckpt={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "base.pt does not exist" in err and "needs the base checkpoint" in err


CNN = ["data=digits", "data.batch_size=32", "model=cnn", "model.channels=[8,16]", "scheduler=step",
       "trainer.deterministic=true", "trainer.progress=false", "trainer.max_epochs=3",
       "trainer.early_stopping.enabled=false", "trainer.log_every_n_steps=5", "trainer.device=cpu"]
LORA_CNN = [*CNN, "adapter=lora"]
# the head alone, then the second conv block too, then everything; the body at half the learning rate
UNFREEZE = ["optimizer=adamw", "finetune.lr_mult={features:0.5}",
            "finetune.unfreeze_schedule=[{epoch:0,unfreeze:[head]},{epoch:1,unfreeze:['features\\.[3-5]']},"
            "{epoch:2,unfreeze:['.*']}]"]


def _killed_and_resumed(args: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """Final weights of a run killed with SIGKILL after its first last.pt and resumed, and of the same run
    uninterrupted (trained meanwhile)."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nnctl", "train", *args, f"hydra.run.dir={run}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert main(["train", *args, f"hydra.run.dir={straight}"]) == 0  # meanwhile: the uninterrupted run
    last = run / "checkpoints" / ck.LAST
    import time

    while not last.exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if ck.load_checkpoint(last)[ck.EPOCH] >= 3:
        pytest.skip("the run finished before it could be killed")
    assert main(["train", f"resume={run}"]) == 0
    assert _metrics(run)["test"] == _metrics(straight)["test"]
    a, b = (ck.load_checkpoint(r / "checkpoints" / ck.LAST)[ck.MODEL] for r in (run, straight))
    return a, b


def test_adapter_run_resumes_exactly_after_kill9(tmp_path: Path) -> None:
    a, b = _killed_and_resumed(LORA_CNN, tmp_path)
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unfreeze_schedule_trains_each_part_from_its_epoch(tmp_path: Path) -> None:
    engine = _engine([*CNN, *UNFREEZE, "trainer.limit_train_batches=10"], tmp_path / "run")
    start = {n: p.detach().clone() for n, p in engine.net.named_parameters()}
    seen: list[tuple[set[str], dict[str, int]]] = []  # per epoch: tensors that moved, Adam steps per tensor

    def record(engine, metrics: dict) -> None:  # noqa: ANN001 - the Engine
        names = {p: n for n, p in engine.net.named_parameters()}
        seen.append(({n for n, p in engine.net.named_parameters() if not torch.equal(p, start[n])},
                     {names[p]: int(s["step"]) for p, s in engine.optimizer.state.items()}))

    engine.epoch_hooks.insert(0, record)
    engine.fit()
    head = {n for n in start if n.startswith("head.")}
    block2 = {n for n in start if n.startswith(("features.3.", "features.4."))}
    assert seen[0] == (head, dict.fromkeys(head, 10))  # the body: no gradient, no update, no decay, no state
    assert seen[1] == (head | block2, {**dict.fromkeys(head, 20), **dict.fromkeys(block2, 10)})  # fresh moments
    assert seen[2][0] == set(start) and seen[2][1]["features.0.0.weight"] == 10
    # every tensor had its group from the first step: lr_mult and the weight-decay split, scaled by the schedule

    def group(name: str) -> dict:
        p = engine.net.get_parameter(name)
        return next(g for g in engine.optimizer.param_groups if any(q is p for q in g["params"]))

    conv, norm, head_weight = group("features.0.0.weight"), group("features.0.1.weight"), group("head.3.weight")
    assert conv["lr"] == norm["lr"] == pytest.approx(head_weight["lr"] / 2)
    assert (conv["weight_decay"], norm["weight_decay"]) == (head_weight["weight_decay"], 0.0)
    assert conv["weight_decay"] > 0


def test_unfreezing_resumes_exactly_across_a_boundary_after_kill9(tmp_path: Path) -> None:
    a, b = _killed_and_resumed([*CNN, *UNFREEZE, "trainer.limit_train_batches=10"], tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- Hugging Face causal LMs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lm")
    return fx.make_hf_causal_lm(root / "model"), fx.write_instructions(root / "records.jsonl")


def _lm_args(tiny_lm: tuple[Path, Path], *extra: str) -> list[str]:
    model, records = tiny_lm
    return ["train", "experiment=instruct_qlora", f"model.path={model}", f"data.path={records}",
            "trainer.device=cpu", "trainer.progress=false", "optimizer.lr=0.02", "data.batch_size=4",
            "data.max_len=64", *extra]  # the tiny model's positions


def test_instruction_tuning_with_qlora_end_to_end(tiny_lm: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nnctl.models.hf import generate_hf

    run, out = tmp_path / "run", tmp_path / "out"
    assert main([*_lm_args(tiny_lm), f"hydra.run.dir={run}"]) == 0
    result = _metrics(run)
    assert result["val"]["loss"] < 2.5 and result["val"]["ppl"] < 12  # the base scores ~3.5 on the template
    base_size = (tiny_lm[0] / "model.safetensors").stat().st_size
    assert (run / "checkpoints" / ck.BEST).stat().st_size < base_size
    # generate with the adapter model as nnctl rebuilds it from the checkpoint
    state = ck.load_checkpoint(run / "checkpoints" / ck.BEST)
    from omegaconf import OmegaConf

    from nnctl.engine import Engine

    engine = Engine(OmegaConf.create(state[ck.CONFIG]), tmp_path / "e")
    engine.load_state_dict(state, full=False)
    prompt = engine.data.template.format(prompt="Name the colour of snow.")
    text = generate_hf(engine.net, engine.data.tokenizer, prompt, max_new_tokens=6, temperature=0.0)
    assert text.strip(), "the adapter model generated nothing"
    # nnctl generate rebuilds the same adapter model from the checkpoint alone and prints the same text
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["generate", f"ckpt={run}", "prompt=Name the colour of snow.", "temperature=0",
                     "max_new_tokens=6", "device=cpu", f"hydra.run.dir={tmp_path / 'gen'}"]) == 0
    assert printed.getvalue().endswith(text + "\n")
    # export merged, reload with plain transformers: same greedy tokens
    assert main(["export", f"ckpt={run}", f"out={out}", f"hydra.run.dir={tmp_path / 'ex'}"]) == 0
    plain, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert generate_hf(plain, tok, prompt, max_new_tokens=6, temperature=0.0) == text
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(plain.eval()(ids).logits, engine.net.eval()(input_ids=ids).logits, atol=1e-4)


def test_lora_on_a_hf_model_writes_a_peft_folder_plain_peft_loads(tiny_lm: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main([*_lm_args(tiny_lm, "adapter=lora", "data.mode=packed", "data.max_len=48", "trainer.max_epochs=1"),
                 f"hydra.run.dir={run}"]) == 0
    assert main(["export", f"ckpt={run}", f"out={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'ex'}"]) == 0
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm[0]),
                                           run / "checkpoints" / "best_peft").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("quant_type, double_quant, compute_dtype",
                         [("nf4", True, "float32"), ("fp4", False, "bfloat16")])
def test_qlora_loads_a_hf_model_through_bitsandbytes_config(tiny_lm: tuple[Path, Path], quant_type: str,
                                                            double_quant: bool, compute_dtype: str) -> None:
    import bitsandbytes as bnb
    from hydra.utils import instantiate
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from nnctl.adapters import load_quantization, parameter_counts
    from nnctl.models.hf import hf_causal_lm

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["adapter=qlora", f"adapter.quant_type={quant_type}",
                                          f"adapter.double_quant={double_quant}",
                                          f"adapter.compute_dtype={compute_dtype}"])
    adapter = instantiate(cfg.adapter)
    model = hf_causal_lm(str(tiny_lm[0]), **load_quantization(adapter))
    quantization = model.config.quantization_config  # transformers loaded it in 4-bit
    assert (quantization.load_in_4bit, quantization.bnb_4bit_quant_type, quantization.bnb_4bit_use_double_quant,
            quantization.bnb_4bit_compute_dtype) == (True, quant_type, double_quant, getattr(torch, compute_dtype))
    net = adapter(model)
    layers = [m for n, m in net.named_modules() if n.endswith("attn.c_attn")]
    assert len(layers) == 2 and all(isinstance(m, LoraLinear4bit) for m in layers)  # peft's 4-bit LoRA layer
    base = layers[0].base_layer
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_state.quant_type == quant_type
    assert base.weight.quant_state.nested == double_quant and base.compute_dtype == getattr(torch, compute_dtype)
    trainable, total = parameter_counts(net)
    assert all("lora_" in n for n, p in net.named_parameters() if p.requires_grad) and 0 < trainable < total / 4
    ids = torch.arange(1, 20).unsqueeze(0)
    net(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "lora_B" in n)


def test_generate_hf_samples_reproducibly(tiny_lm: tuple[Path, Path]) -> None:
    from nnctl.models.hf import generate_hf, hf_causal_lm, load_tokenizer

    model, tok = hf_causal_lm(str(tiny_lm[0])), load_tokenizer(str(tiny_lm[0]))
    a = generate_hf(model, tok, "Name the", max_new_tokens=5, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert a == generate_hf(model, tok, "Name the", max_new_tokens=5, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert len(tok(a)["input_ids"]) >= 1


def test_hub_id_offline_fails_at_once(capsys: pytest.CaptureFixture) -> None:
    import time

    started = time.perf_counter()
    assert main(["train", "model=hf_causal_lm", "model.path=someone/some-model", "trainer.device=cpu"]) == 2
    assert time.perf_counter() - started < 30
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.path: cannot load 'someone/some-model': no network" in err
