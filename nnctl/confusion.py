"""What a classifier gets wrong: confusion matrix, per-class precision/recall/F1, most confidently wrong images.

Predictions come from running the loaded model over the data module's evaluation batches (with the configured
test-time augmentation, as the metrics do); nothing here depends on the objective class beyond "is a classifier".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

def is_classifier(engine: Any) -> bool:
    """Whether the engine trains an image classifier (its model maps image batches to class logits)."""
    from nnctl.objectives import Classification

    return isinstance(engine.objective, Classification) and engine.spec.get("input") == "image"


@torch.no_grad()
def predict(engine: Any, split: str, tta: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [N, K], labels [N]) over `split`, in the split's order."""
    model = engine.ema.module if engine.ema is not None else engine.model
    model.eval()
    probs, labels = [], []
    for x, y in engine.data.eval_batches(split):  # image data: batch = (x, y)
        with engine.precision.autocast(engine.device):
            logits = engine.objective.predict(model, x, tta=tta)  # [B, K]
        probs.append(logits.float().softmax(1).cpu())
        labels.append(y.cpu())
    return torch.cat(probs), torch.cat(labels)


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[K, K] counts: row = true class, column = predicted class."""
    return torch.bincount(labels * k + pred, minlength=k * k).view(k, k)


def per_class(cm: torch.Tensor, classes: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class from a confusion matrix (0 where undefined)."""
    cm = cm.double()
    tp, predicted, actual = cm.diag(), cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(actual[i])} for i, name in enumerate(classes)}


def plot_confusion(cm: torch.Tensor, classes: list[str], path: Path, title: str) -> Path:
    from nnctl.plots import pyplot, save

    plt = pyplot()
    k = len(classes)
    size = max(5.0, 0.55 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    rates = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)  # colour by row: recall per true class
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45 if max(map(len, classes)) > 2 else 0, ha="right"
                  if max(map(len, classes)) > 2 else "center")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 30:  # counts in the cells while they stay readable
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return save(fig, path)


def plot_worst(engine: Any, split: str, wrong: list[tuple[int, int, int, float]], classes: list[str],
               path: Path) -> Path:
    """A grid of the most confidently wrong images with their true and predicted labels."""
    from nnctl.plots import display_images, grid, save, show

    x = _images(engine, split, [i for i, *_ in wrong])
    images = display_images(engine.data, x)
    fig, axes = grid(len(wrong))
    for ax, image, (_, true, pred, p) in zip(axes, images, wrong):
        show(ax, image)
        ax.set_title(f"true: {classes[true]}\npred: {classes[pred]} ({p:.2f})", fontsize=8, color="firebrick")
    return save(fig, path)


def _images(engine: Any, split: str, index: list[int]) -> torch.Tensor:
    """Normalized images of `split` at `index`, in that order, from the same eval batches the predictions used."""
    size = engine.data.eval_batch_size
    wanted = {i: n for n, i in enumerate(index)}
    out: list[torch.Tensor | None] = [None] * len(index)
    for b, (x, _) in enumerate(engine.data.eval_batches(split)):
        for i in range(b * size, b * size + len(x)):
            if i in wanted:
                out[wanted[i]] = x[i - b * size].float().cpu()
    return torch.stack(out)  # type: ignore[arg-type]


def analyze(engine: Any, split: str, tta: Any, worst_k: int, run_dir: Path) -> dict[str, Any]:
    """Write confusion_matrix.png (and worst_k.png); return the per-class table and the matrix for metrics.json."""
    classes = [str(c) for c in engine.data.classes]
    probs, labels = predict(engine, split, tta)
    confidence, pred = probs.max(1)
    cm = confusion_matrix(pred, labels, len(classes))
    table = per_class(cm, classes)
    accuracy = float(cm.diag().sum()) / max(1, int(cm.sum()))
    plot_confusion(cm, classes, run_dir / "confusion_matrix.png", f"{split}: accuracy {accuracy:.4f}")
    result: dict[str, Any] = {"per_class": table, "confusion_matrix": cm.tolist(), "classes": classes}
    wrong = (pred != labels).nonzero().flatten()
    if worst_k > 0 and len(wrong):
        worst = wrong[confidence[wrong].argsort(descending=True)[:worst_k]]
        rows = [(int(i), int(labels[i]), int(pred[i]), float(confidence[i])) for i in worst]
        plot_worst(engine, split, rows, classes, run_dir / "worst_k.png")
        result["worst"] = [{"index": i, "true": classes[t], "pred": classes[p], "confidence": c}
                           for i, t, p, c in rows]
    return result


def print_per_class(table: dict[str, dict[str, float]], title: str) -> None:
    from rich.table import Table

    from nnctl.reporting import console

    out = Table(title=title)
    for name in ("class", "precision", "recall", "f1", "support"):
        out.add_column(name, justify="left" if name == "class" else "right")
    for name, row in table.items():
        out.add_row(name, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    console.print(out)
