"""The Lightning side of bench/vs_lightning.py: nnctl's default run (digits + CNN) written the way a PyTorch
Lightning user would write it. Run by vs_lightning as a subprocess; runnable alone:

    python -m bench.lightning_digits --epochs 10 --out /tmp/lightning-run

Same as `nnctl train` with its defaults: scikit-learn digits with nnctl's train/val/test split and normalization,
nnctl's CNN (imported, so the model is identical), batch 64, random crop with padding 1 (no flip), AdamW(lr 3e-3,
weight decay 0.05 on weights only), per-step linear-warmup (5%) + cosine schedule, validation every epoch, the
best checkpoint by val acc plus last.ckpt, TensorBoard logging, the progress bar, and a test pass on the best
checkpoint at the end. The augmentation is done the Lightning/torchvision way: transforms applied per sample in
the Dataset, batched by a DataLoader. The only addition is a callback recording epoch-end times (for the steady-
state per-epoch comparison); it costs a perf_counter() call per epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from nnctl.models.cnn import CNN


class TransformTensorDataset(TensorDataset):
    """A TensorDataset of (uint8 image, label) with a torchvision transform on the image."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform) -> None:
        super().__init__(x, y)
        self.transform = transform

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return self.transform(x), y


def digits_splits(split_seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1):
    """The same split nnctl's data=digits makes (nnctl.data.vision.Digits + ImageData.setup)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1).contiguous()
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed + 1))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    (tx, ty), (x, y) = (x[test], y[test]), (x[train], y[train])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_val = max(1, int(round(len(y) * val_fraction)))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return (x[train], y[train]), (x[val], y[val]), (tx, ty)


class LitClassifier(L.LightningModule):
    def __init__(self, lr: float, weight_decay: float, warmup_fraction: float, total_steps: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = CNN(in_shape=(1, 8, 8), num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _shared(self, batch, prefix: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        on_step = prefix == "train"
        self.log(f"{prefix}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True)
        self.log(f"{prefix}/acc", acc, prog_bar=prefix != "train", on_step=on_step, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared(batch, "test")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=(0.9, 0.999))
        total = max(1, self.hparams.total_steps)
        warmup = max(1, int(total * self.hparams.warmup_fraction))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EpochTimes(Callback):
    """Wall-clock time at the end of every training epoch (after validation and checkpointing)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.time())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader num_workers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True, help="where logs, checkpoints and times.json go")
    args = parser.parse_args()

    L.seed_everything(42)
    (x, y), (vx, vy), (tx, ty) = digits_splits()
    sample = x[:10_000].float() / 255
    mean, std = sample.mean(dim=(0, 2, 3)).tolist(), sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    normalize = [transforms.ConvertImageDtype(torch.float32), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose([transforms.RandomCrop(8, padding=1), *normalize])
    eval_tf = transforms.Compose(normalize)
    loader = dict(num_workers=args.workers, persistent_workers=args.workers > 0)
    train = DataLoader(TransformTensorDataset(x, y, train_tf), batch_size=args.batch_size, shuffle=True,
                       drop_last=True, **loader)
    val = DataLoader(TransformTensorDataset(vx, vy, eval_tf), batch_size=512, **loader)
    test = DataLoader(TransformTensorDataset(tx, ty, eval_tf), batch_size=512, **loader)

    module = LitClassifier(lr=3e-3, weight_decay=0.05, warmup_fraction=0.05,
                           total_steps=args.epochs * len(train))
    timer = EpochTimes()
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, default_root_dir=str(args.out),
        logger=TensorBoardLogger(str(args.out), name="tensorboard"),
        callbacks=[ModelCheckpoint(dirpath=args.out / "checkpoints", monitor="val/acc", mode="max", save_last=True),
                   timer],
        enable_progress_bar=True,
    )
    trainer.fit(module, train, val)
    results = trainer.test(module, test, ckpt_path="best")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "times.json").write_text(json.dumps({"epoch_end": timer.times, "test": results}))


if __name__ == "__main__":
    main()
