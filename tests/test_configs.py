"""The real config tree: every option of every group composes, validates and builds working components."""
from __future__ import annotations

import copy
import functools
import inspect
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

import fixtures as fx
from nnctl.engine import Engine, Tracker, param_groups
from nnctl.spec import complete
from nnctl.errors import UserError
from nnctl.metrics import Averages, StepSums
from nnctl.validate import validate

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SPECIAL = {"hydra", "search"}  # Hydra's own settings; search spaces belong to nnctl tune (tests/test_insight.py)


def groups() -> dict[str, list[str]]:
    """Every config group (nested ones as 'trainer/early_stopping') and its options, read from disk."""
    out: dict[str, list[str]] = {}
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        group = path.parent.relative_to(CONFIG_DIR).as_posix()
        if group != "." and group.split("/")[0] not in SPECIAL:
            out.setdefault(group, []).append(path.stem)
    return out


GROUPS = groups()
ALL_OPTIONS = [(g, o) for g, options in GROUPS.items() for o in options]
# Options of other families, built and trained end to end in their own tests (tests/test_generative.py,
# tests/test_finetune.py, ...) rather than by the image-classifier checks below; audio data, models and the
# spoken_digits presets in tests/test_audio.py.
OTHER_FAMILIES = {"data": {"instructions", "text", "audio_folder", "audio_tones", "spoken_digits"},
                  "model": {"gan", "vae", "diffusion", "hf_causal_lm", "gpt", "audio_cnn", "audio_resnet"},
                  "objective": {"gan", "vae", "diffusion", "causal_lm", "language_model"},
                  "experiment": {"instruct_qlora", "char_gpt", "spoken_digits_cnn", "spoken_digits_ddpm"}}


def image_options(group: str) -> list[str]:
    return [o for o in GROUPS[group] if o not in OTHER_FAMILIES.get(group, set())]


def test_every_expected_group_is_present() -> None:
    expected = {"model", "data", "optimizer", "scheduler", "precision", "adapter", "objective", "debug", "experiment",
                "trainer", "trainer/early_stopping", "trainer/checkpoint", "paths", "logger"}
    assert expected <= set(GROUPS)
    assert set(GROUPS["scheduler"]) >= {"none", "cosine", "warmup_cosine", "cosine_warm_restarts", "onecycle",
                                        "step", "exponential", "plateau"}


@functools.lru_cache(maxsize=None)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[*overrides, "paths.run_dir=unused"])


def compose_train(*overrides: str) -> DictConfig:
    """Compose configs/train.yaml as `nnctl train` would (run_dir is Hydra's at run time; fixed here), and check
    what every composed config must satisfy: it resolves, has no missing values and passes nnctl's validation.

    Composing costs ~0.3 s, so identical compositions are cached; callers get their own copy."""
    cfg = copy.deepcopy(_compose(tuple(overrides)))  # interpolations (NNCTL_ROOT too) resolve on access
    resolved = copy.deepcopy(cfg)
    OmegaConf.resolve(resolved)  # every interpolation resolves (e.g. plateau's monitor from trainer.checkpoint)
    assert OmegaConf.missing_keys(resolved) == set()
    validate(resolved)
    return cfg


def data_overrides(option: str, data_root: Path, image_root: Path) -> list[str]:
    """Point every data option at the fixtures: datasets under data_root, image trees in image_root."""
    out = [f"paths.data_dir={data_root}"]
    if option == "image_folder":
        out += [f"data.root={image_root}", "data.batch_size=8"]
    if option == "synthetic":
        out += ["data.num_samples=256"]
    return out


# -- options without a dedicated test below: compose, and their _target_ imports --------------------------------------
DEDICATED = {"data", "model", "optimizer", "scheduler", "precision", "adapter", "objective", "debug", "experiment",
             "trainer/early_stopping", "trainer/checkpoint", "logger"}
OTHER_OPTIONS = [(g, o) for g, o in ALL_OPTIONS if g not in DEDICATED]


@pytest.mark.parametrize("group,option", OTHER_OPTIONS, ids=[f"{g}={o}" for g, o in OTHER_OPTIONS])
def test_other_options_compose_and_targets_import(group: str, option: str) -> None:
    cfg = compose_train(f"{group}={option}")
    node = OmegaConf.select(cfg, group.replace("/", "."))
    assert node is not None
    if "_target_" in node:
        assert callable(get_object(node._target_))


def test_paths_follow_nnctl_root(tmp_path: Path) -> None:
    cfg = compose_train()
    assert cfg.paths.data_dir == f"{tmp_path}/data" and cfg.paths.output_dir == f"{tmp_path}/outputs"


def _target(group: str, option: str) -> str:
    """The option's _target_, or that of the option of its group it builds on (its defaults list names it)."""
    node = yaml.safe_load((CONFIG_DIR / group / f"{option}.yaml").read_text())
    if "_target_" in node:
        return str(node["_target_"])
    base = next(d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_")
    return _target(group, base)


# Image data and models are tested together below; other data options with a model that reads them (further
# families: tests/test_sequences.py).
IMAGE_DATA = [o for o in GROUPS["data"] if _target("data", o).startswith("nnctl.data.vision.")]
IMAGE_MODELS = [o for o in GROUPS["model"] if o not in OTHER_FAMILIES["model"]
                and "in_shape" in inspect.signature(get_object(_target("model", o))).parameters]
OTHER_DATA = {"text_classification": ["model=gru", "data.path={texts}"], "tabular": ["model=mlp"],
              "sequence_tasks": ["model=lstm"], "text": ["model=gpt", "model.n_layer=1", "data.block_size=8"],
              "audio_tones": ["model=audio_cnn"]}


# -- data x default model: load the fixtures and run one batch through a model ------------------------------------
# instructions and audio folders need a model folder / audio files: tests/test_finetune.py and tests/test_audio.py
@pytest.mark.parametrize("option", sorted(set(GROUPS["data"]) - set(IMAGE_DATA)
                                          - {"instructions", "audio_folder", "spoken_digits"}))
def test_every_other_data_option_trains_a_step(option: str, tmp_path: Path) -> None:
    assert option in OTHER_DATA, f"data={option} has no model paired with it in OTHER_DATA"
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\n" + "".join(f"{'ab' * (i % 5 + 1)},{i % 2}\n" for i in range(60)))
    cfg = compose_train(f"data={option}", *(a.format(texts=texts) for a in OTHER_DATA[option]),
                        "data.batch_size=8", "trainer.device=cpu")
    engine = Engine(cfg, tmp_path / "run")
    loss, _ = engine.objective.training_step(engine.model, next(engine.data.train_batches(0, 0)))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in engine.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("option", IMAGE_DATA)
def test_every_data_option_builds_and_feeds_a_model(option: str, data_root: fx.DataRoot,
                                                    image_folder: fx.Images) -> None:
    cfg = compose_train(f"data={option}", "model=cnn", "model.channels=[8]",
                        *data_overrides(option, data_root.path, image_folder[0]))
    data = instantiate(cfg.data).setup(torch.device("cpu"))
    expected = {"mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
                "cifar100": ((3, 32, 32), 100), "digits": ((1, 8, 8), 10), "synthetic": ((3, 16, 16), 10),
                "image_folder": ((3, 32, 32), 3)}
    assert (data.in_shape, data.num_classes) == expected[option]
    model = instantiate(cfg.model)(in_shape=data.in_shape, num_classes=data.num_classes)
    x, y = next(data.train_batches(epoch=0, seed=0))
    assert x.shape == (cfg.data.batch_size, *data.in_shape) and x.dtype == torch.float32  # full batches only
    assert model(x).shape == (len(y), data.num_classes)


# -- models ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", IMAGE_MODELS)
def test_every_model_option_builds_from_data_shapes_and_backpropagates(option: str) -> None:
    cfg = compose_train(f"model={option}")
    torch.manual_seed(0)
    for in_shape, k in (((3, 16, 16), 10), ((1, 8, 8), 4)):  # RGB blobs and tiny grayscale digits
        model = instantiate(cfg.model)(in_shape=in_shape, num_classes=k)
        x, y = torch.randn(4, *in_shape), torch.arange(4) % k
        logits = model(x)
        assert logits.shape == (4, k) and torch.isfinite(logits).all()
        torch.nn.functional.cross_entropy(logits, y).backward()
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        assert trainable
        for name, p in trainable:  # every trainable parameter is reached by the gradient
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert sum(float(p.grad.abs().sum()) for _, p in trainable) > 0
        model.eval()  # eval mode (running BN stats) gives a deterministic, batch-independent output
        with torch.no_grad():
            torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-5)


# -- optimizers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", GROUPS["optimizer"])
def test_every_optimizer_option_builds_on_model_params_and_steps(option: str) -> None:
    cfg = compose_train(f"optimizer={option}", "model=mlp", "model.hidden_sizes=[16]")
    model = instantiate(cfg.model)(in_shape=(1, 8, 8), num_classes=10)
    build = instantiate(cfg.optimizer)
    groups_ = param_groups(model, build.keywords.get("weight_decay", 0.0), cfg.trainer.decay_norm_bias)
    try:
        opt = build(params=groups_)
    except UserError as exc:  # a CUDA-only optimizer must refuse CPU parameters with one actionable line
        if torch.cuda.is_available() or "CUDA" not in str(exc):
            raise
        assert str(exc).startswith("optimizer") and "trainer.device" in str(exc)
        return
    # the class named by the target (torch.optim.AdamW), or by nnctl's guarded builder (nnctl.optim.lion8bit)
    assert type(opt).__name__.lower() == cfg.optimizer._target_.rsplit(".", 1)[1].replace("_", "").lower()
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr
    assert opt.param_groups[0]["weight_decay"] == cfg.optimizer.weight_decay
    assert opt.param_groups[1]["weight_decay"] == 0.0  # norm scales and biases are not decayed
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 1, 8, 8)).logsumexp(dim=1).mean().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# -- schedulers -----------------------------------------------------------------------------------------------------
EPOCHS, STEPS_PER_EPOCH = 6, 10


def engine_for(tmp_path: Path, *overrides: str) -> Engine:
    """A real Engine on a small synthetic set: 6 epochs x 10 steps, built exactly as `nnctl train` builds it."""
    cfg = compose_train("data=synthetic", "data.num_samples=200", "data.batch_size=8", "model=mlp",
                        "model.hidden_sizes=[16]", "optimizer=sgd", "optimizer.lr=0.1", f"trainer.max_epochs={EPOCHS}",
                        f"trainer.limit_train_batches={STEPS_PER_EPOCH}", "trainer.device=cpu", *overrides)
    engine = Engine(cfg, tmp_path / "run")
    engine.configure_optimization()
    assert engine.total_steps() == EPOCHS * STEPS_PER_EPOCH
    return engine


def drive(engine: Engine, start: int, stop: int, metric: Callable[[int], float] = lambda e: 0.5) -> list[float]:
    """Drive the schedule over global steps [start, stop) as the engine's loop does; the lr seen by each step."""
    lrs = []
    for step in range(start, stop):
        lrs.append(engine.optimizer.param_groups[0]["lr"])
        engine.optimizer.step()  # no gradients: parameters do not move, the schedule does
        engine.schedule.after_step()
        if (step + 1) % STEPS_PER_EPOCH == 0:  # end of an epoch: validation metrics reach the schedule
            epoch = step // STEPS_PER_EPOCH
            engine.schedule.after_epoch({"val/acc": metric(epoch), "val/loss": 1.0 - metric(epoch)})
    return lrs


def lr_trace(engine: Engine, metric: Callable[[int], float] = lambda e: 0.5) -> list[list[float]]:
    """lr seen by each optimizer step of the whole run, per epoch."""
    flat = drive(engine, 0, EPOCHS * STEPS_PER_EPOCH, metric)
    return [flat[i:i + STEPS_PER_EPOCH] for i in range(0, len(flat), STEPS_PER_EPOCH)]


def non_increasing(xs: list[float]) -> bool:
    return all(b <= a + 1e-12 for a, b in zip(xs, xs[1:]))


def check_none(t: list[list[float]], peak: float, cfg: DictConfig) -> None:
    assert all(lr == peak for e in t for lr in e)


def check_cosine(t: list[list[float]], peak: float, cfg: DictConfig) -> None:
    flat = sum(t, [])
    assert flat[0] == pytest.approx(peak) and non_increasing(flat)
    assert flat[30] == pytest.approx(peak * 0.5, rel=1e-6)  # halfway down the cosine
    assert flat[-1] < 0.01 * peak


def check_warmup_cosine(t: list[list[float]], peak: float, cfg: DictConfig) -> None:
    flat = sum(t, [])
    warmup = max(1, int(len(flat) * cfg.scheduler.warmup_fraction))
    assert warmup >= 2, "the test needs a warmup of a few steps"
    rising, falling = flat[:warmup], flat[warmup - 1:]
    assert all(b > a for a, b in zip(rising, rising[1:])) and rising[0] < 0.5 * peak  # rises from ~0 ...
    assert max(flat) == pytest.approx(peak) and non_increasing(falling)  # ... to the peak, then falls
    assert flat[-1] < 0.02 * peak


def check_cosine_warm_restarts(t: list[list[float]], peak: float, cfg: DictConfig) -> None:
    first = cfg.scheduler.first_cycle_epochs * STEPS_PER_EPOCH
    flat = sum(t, [])
    assert flat[0] == pytest.approx(peak) and non_increasing(flat[:first]) and flat[first - 1] < 0.1 * peak
    assert flat[first] == pytest.approx(peak)  # restart
    second = first * cfg.scheduler.cycle_mult
    assert non_increasing(flat[first:first + second]) and flat[first + second] == pytest.approx(peak)


def check_onecycle(t: list[list[float]], peak: float, cfg: DictConfig) -> None:
    flat = sum(t, [])
    top = flat.index(max(flat))
    div, final = cfg.scheduler.div_factor, cfg.scheduler.final_div_factor
    assert flat[0] == pytest.approx(peak / div) and max(flat) == pytest.approx(peak, rel=1e-3)
    assert abs(top - cfg.scheduler.pct_start * len(flat)) <= 1
    assert non_increasing(flat[top:]) and flat[-1] < 2 * peak / div / final + 1e-4 * peak


def check_step(t: list[list[float]], peak: float, cfg: DictConfig) -> None:
    gamma, every = cfg.scheduler.gamma, cfg.scheduler.step_epochs
    for epoch, lrs in enumerate(t):
        assert lrs == pytest.approx([peak * gamma ** (epoch // every)] * STEPS_PER_EPOCH)  # constant within an epoch


def check_exponential(t: list[list[float]], peak: float, cfg: DictConfig) -> None:
    for epoch, lrs in enumerate(t):
        assert lrs == pytest.approx([peak * cfg.scheduler.gamma ** epoch] * STEPS_PER_EPOCH)


def check_plateau(t: list[list[float]], peak: float, cfg: DictConfig) -> None:
    # a flat metric: the first epoch sets the best, `patience` more are tolerated, the next one cuts the lr
    cut = 1 + cfg.scheduler.patience + 1
    per_epoch = [lrs[0] for lrs in t]
    assert all(len(set(lrs)) == 1 for lrs in t)
    assert per_epoch == pytest.approx([peak] * cut + [peak * cfg.scheduler.factor] * (EPOCHS - cut))


CHECKS: dict[str, Callable[[list[list[float]], float, DictConfig], None]] = {
    "none": check_none, "cosine": check_cosine, "warmup_cosine": check_warmup_cosine,
    "cosine_warm_restarts": check_cosine_warm_restarts, "onecycle": check_onecycle, "step": check_step,
    "exponential": check_exponential, "plateau": check_plateau,
}


@pytest.mark.parametrize("option", GROUPS["scheduler"])
def test_every_scheduler_moves_the_lr_as_it_should(option: str, tmp_path: Path) -> None:
    assert option in CHECKS, f"scheduler={option} has no behaviour check in this test"
    engine = engine_for(tmp_path, f"scheduler={option}")
    CHECKS[option](lr_trace(engine), 0.1, engine.cfg)


def test_plateau_keeps_the_lr_while_the_monitor_improves(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, "scheduler=plateau")
    assert engine.cfg.scheduler.monitor == "val/acc" and engine.cfg.scheduler.mode == "max"  # from checkpoint
    trace = lr_trace(engine, metric=lambda e: 0.1 * (e + 1))
    assert all(lr == 0.1 for lrs in trace for lr in lrs)


@pytest.mark.parametrize("option", GROUPS["scheduler"])
def test_scheduler_state_round_trips_mid_run(option: str, tmp_path: Path) -> None:
    # what resume relies on: a fresh schedule loaded from a mid-run state continues the same lr sequence
    total, cut = EPOCHS * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH + 3
    full = drive(engine_for(tmp_path, f"scheduler={option}"), 0, total)
    first = engine_for(tmp_path, f"scheduler={option}")
    assert drive(first, 0, cut) == full[:cut]
    resumed = engine_for(tmp_path, f"scheduler={option}")
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.schedule.load_state_dict(first.schedule.state_dict())
    assert drive(resumed, cut, total) == pytest.approx(full[cut:], rel=1e-12)


# -- precision, adapter, objective -----------------------------------------------------------------------------------
@pytest.mark.parametrize("option", GROUPS["precision"])
def test_every_precision_option_autocasts_on_cpu(option: str) -> None:
    cfg = compose_train(f"precision={option}")
    precision = instantiate(cfg.precision)
    cpu = torch.device("cpu")
    precision.check(cpu)  # all three are usable on CPU
    expected = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[option]
    assert precision.dtype is expected
    layer = torch.nn.Linear(8, 4)
    with precision.autocast(cpu):
        out = layer(torch.randn(2, 8))
    assert out.dtype == expected
    scaler = precision.grad_scaler(cpu)
    assert scaler.is_enabled() == (option == "fp16")  # loss scaling only for fp16


def test_each_under_autocasts_the_forwards_only() -> None:
    """The engine takes an objective's updates through each_under: each forward runs under autocast, the
    backward and the update that follow it do not."""
    from nnctl.precision import each_under

    seen = []

    def updates():  # as an objective's training_steps: the forward runs when the next update is asked for
        for name in ("discriminator", "generator"):
            seen.append((name, torch.is_autocast_enabled("cpu")))
            yield name

    for name in each_under(torch.autocast("cpu", dtype=torch.bfloat16), updates()):
        seen.append((f"after {name}", torch.is_autocast_enabled("cpu")))
    assert seen == [("discriminator", True), ("after discriminator", False), ("generator", True),
                    ("after generator", False)]


def test_adapter_options_return_a_trainable_model() -> None:
    for option in GROUPS["adapter"]:
        cfg = compose_train(f"adapter={option}", "model=mlp", "model.hidden_sizes=[8]")
        net = instantiate(cfg.model)(in_shape=(1, 4, 4), num_classes=3)
        model = instantiate(cfg.adapter)(net)
        assert isinstance(model, torch.nn.Module)
        assert any(p.requires_grad for p in model.parameters())
        assert model(torch.randn(2, 1, 4, 4)).shape == (2, 3)


@pytest.mark.parametrize("option", [o for o in GROUPS["objective"] if o in ("auto", "classification")])
def test_every_objective_gives_a_loss_and_metrics(option: str) -> None:
    cfg = compose_train(f"objective={option}", "trainer.label_smoothing=0.1")
    spec = {"input": "image", "target": "class", "in_shape": (1, 8, 8), "num_classes": 10, "classes": list("0123456789")}
    objective = complete(instantiate(cfg.objective), spec, "objective")  # as the engine completes it
    assert objective.label_smoothing == 0.1  # interpolated from trainer.label_smoothing
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    batch = (torch.randn(16, 1, 8, 8), torch.arange(16) % 10)
    loss, stats = objective.training_step(model, batch)
    loss = loss.detach()
    with torch.no_grad():
        correct = int((model(batch[0]).argmax(1) == batch[1]).sum())  # what the training statistic must count
    assert loss.ndim == 0 and math.isfinite(float(loss))
    for train_sums in (Averages(), StepSums()):  # the engine's running sums, and plain averages, take it alike
        train_sums.add(16, stats, {"loss": loss})
        train_sums.add(16, stats, {"loss": loss})
        means = (train_sums if isinstance(train_sums, Averages) else train_sums.totals()).means()
        assert means == pytest.approx({"acc": correct / 16, "loss": float(loss)})
    metrics = Averages()
    objective.eval_update(model, batch, metrics, tta=False)
    values = metrics.means()
    assert set(values) == {"loss", "acc", "acc_top5"} and values["acc"] <= values["acc_top5"] <= 1.0
    # the averages are exact per-sample means over the batch
    logits = model(batch[0]).detach()
    assert values["acc"] == pytest.approx(float((logits.argmax(1) == batch[1]).float().mean()))
    assert values["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, batch[1])), rel=1e-5)


# -- debug, experiment, trainer sub-groups ----------------------------------------------------------------------------
def test_debug_fast_and_overfit_settings(data_root: fx.DataRoot) -> None:
    fast = compose_train("debug=fast")
    assert fast.trainer.max_epochs == 1 and fast.trainer.limit_train_batches == 2
    assert not fast.trainer.checkpoint.enabled and not fast.trainer.early_stopping.enabled
    overfit = compose_train("debug=overfit", "data=mnist", f"paths.data_dir={data_root.path}", "data.batch_size=16")
    assert overfit.data.overfit_batches == 1 and overfit.data.augment.crop_padding == 0
    data = instantiate(overfit.data).setup(torch.device("cpu"))
    assert data.num_batches("train") == 1 and torch.equal(data.splits["val"][0], data.splits["train"][0])
    for cfg in (fast, overfit):
        validate(cfg)


def flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """{'a': {'b': 1}} -> [('a.b', 1)]"""
    out: list[tuple[str, object]] = []
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out += flatten(v, key) if isinstance(v, dict) else [(key, v)]
    return out


@pytest.mark.parametrize("option", image_options("experiment"))
def test_every_experiment_builds_all_components(option: str, data_root: fx.DataRoot, tmp_path: Path) -> None:
    # the fixtures hold 180 training images: a smaller batch keeps an epoch non-empty
    cfg = compose_train(f"experiment={option}", f"paths.data_dir={data_root.path}", "trainer.device=cpu",
                        "data.batch_size=32")
    raw = yaml.safe_load((CONFIG_DIR / "experiment" / f"{option}.yaml").read_text())
    for item in raw.get("defaults", []):  # the experiment's group choices took effect
        if not isinstance(item, dict):
            continue  # e.g. another experiment it builds on
        (key, choice), = item.items()
        group = key.replace("override /", "")
        chosen, alone = OmegaConf.select(cfg, group.replace("/", ".")), compose_train(f"{group}={choice}")
        if "_target_" in chosen:
            assert chosen._target_ == OmegaConf.select(alone, group.replace("/", "."))._target_
    for dotted, value in flatten({k: v for k, v in raw.items() if k != "defaults"}):
        if dotted != "data.batch_size":  # ... and its own values override the groups' (batch size: see above)
            got = OmegaConf.select(cfg, dotted)
            assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value, dotted
    validate(cfg)
    engine = Engine(cfg, tmp_path / "run")
    engine.configure_optimization()
    epochs = engine.stage.epochs if engine.stage else cfg.trainer.max_epochs  # a staged preset: its first stage
    assert engine.total_steps() == epochs * engine.batches_per_epoch("train")
    batch = next(engine.data.train_batches(0, cfg.trainer.seed))
    # what a batch means is the objective's business: each of its updates gives a finite loss
    assert all(loss.ndim == 0 and torch.isfinite(loss) for _, loss, _ in engine.objective.training_steps(engine.model,
                                                                                                            batch))


def test_language_model_options_train_a_step(tmp_path: Path) -> None:
    """experiment=char_gpt picks data=text, model=gpt and objective=language_model: they compose, validate, build
    from the data's spec and take a training step; evaluation scores every validation token once."""
    cfg = compose_train("experiment=char_gpt", "trainer.device=cpu", "data.batch_size=4", "data.block_size=16",
                        "data.eval_batch_size=512", "model.n_layer=1", "model.n_embd=16")
    assert {k: OmegaConf.select(cfg, k)._target_.rsplit(".", 1)[-1] for k in ("data", "model", "objective")} == \
        {"data": "TextData", "model": "GPT", "objective": "LanguageModel"}
    engine = Engine(cfg, tmp_path / "run")
    engine.configure_optimization()
    assert engine.total_steps() == cfg.trainer.max_epochs * cfg.data.batches_per_epoch
    batch = next(engine.data.train_batches(0, cfg.trainer.seed))
    loss, _ = engine.objective.training_step(engine.model, batch)
    assert batch[0].shape == (4, 16) and abs(float(loss.detach()) - math.log(engine.spec["vocab_size"])) < 0.5
    val = engine.evaluate("val")
    assert val["val/ppl"] == pytest.approx(math.exp(val["val/loss"])) and "val/bpc" in val


@pytest.mark.parametrize("option", GROUPS["trainer/early_stopping"] + ["@checkpoint"])
def test_trainer_monitors_build_trackers(option: str) -> None:
    if option == "@checkpoint":
        cfg = compose_train("trainer/checkpoint=default")
        node = cfg.trainer.checkpoint
        tracker = Tracker(node.monitor, node.mode)
    else:
        cfg = compose_train(f"trainer/early_stopping={option}")
        node = cfg.trainer.early_stopping
        tracker = Tracker(node.monitor, node.mode, node.min_delta)
    better, worse = (0.9, 0.5) if node.mode == "max" else (0.5, 0.9)
    assert tracker.update({node.monitor: worse}) and tracker.update({node.monitor: better})
    assert not tracker.update({node.monitor: worse}) and tracker.bad_checks == 1


@pytest.mark.parametrize("option", GROUPS["logger"])
def test_every_logger_option_names_tracker_adapters(option: str) -> None:
    from nnctl.loggers import Logger

    node = compose_train(f"logger={option}").logger
    assert option in ("none", "many") or list(node) == [option]
    assert set(node) == ({"tensorboard", "csv", "mlflow", "wandb"} if option == "many" else set(node))
    for name, tracker in node.items():
        assert tracker._partial_ is True, name  # the run and its saved state come from the engine
        assert issubclass(get_object(tracker._target_), Logger), name


# -- the files themselves ---------------------------------------------------------------------------------------------
YAML_FILES = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", YAML_FILES, ids=[str(p.relative_to(CONFIG_DIR)) for p in YAML_FILES])
def test_config_file_is_short_and_starts_with_a_comment(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert 4 <= len(lines) <= 40, f"{path.relative_to(CONFIG_DIR)} has {len(lines)} lines (expected 4-40)"
    body = [line for line in lines if line.strip() != "# @package _global_"]
    assert body[0].startswith("# ") and len(body[0]) > 4, "each file starts with a comment saying what it is"


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_data_key_is_commented(path: Path) -> None:
    # data options are the ones users edit most; each key says what it does (the header documents _target_)
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "_target_", "-")):
            assert "#" in line or line.rstrip().endswith(":"), f"{path.name}: {line!r} has no comment"


def test_airbench_norm_biases_keep_their_lr_multiple_through_the_schedule(tmp_path: Path) -> None:
    """model.norm_bias_lr_mult (airbench's bias scaler): the batch-norm biases train in an optimizer group of their
    own whose lr is that multiple of the weights' lr at every step of the one-cycle schedule, and they move."""
    cfg = compose_train("experiment=fashion_mnist_fast", "data=synthetic", "data.num_samples=256",
                        "data.batch_size=32", "model.widths=[8,8,8]", "model.norm_bias_lr_mult=64",
                        "trainer.max_epochs=1", "trainer.device=cpu", "trainer.progress=false",
                        "trainer.checkpoint.enabled=false", "trainer.init_samples=64", "eval.tta=none")
    engine = Engine(cfg, tmp_path / "run")
    biases = {n: p for n, p in engine.net.named_parameters() if ".norm" in n and n.endswith(".bias")}
    before = {n: p.detach().clone() for n, p in biases.items()}
    engine.configure_optimization()
    groups = engine.optimizer.param_groups
    ids = {id(p) for p in biases.values()}
    fast = [g for g in groups if {id(p) for p in g["params"]} == ids]
    rest = [g for g in groups if not ids & {id(p) for p in g["params"]}]
    assert len(fast) == 1 and rest and sum(len(g["params"]) for g in groups) == len(
        [p for p in engine.net.parameters() if p.requires_grad])
    lrs = []
    after_step = engine.optim.after_step

    def watched() -> None:  # the lr the update just used, in both groups
        lrs.append((fast[0]["lr"], rest[0]["lr"]))
        after_step()

    engine.optim.after_step = watched
    engine.fit()
    assert len(lrs) == engine.total_steps() >= 5
    assert len({round(b, 12) for _, b in lrs}) > 2  # the schedule does move the lr
    assert all(a == pytest.approx(64 * b, rel=1e-9) for a, b in lrs)
    assert all(not torch.equal(before[n], p.detach()) for n, p in biases.items())
