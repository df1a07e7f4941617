"""Classification metrics: accuracy, macro precision / recall / F1, a per-class report, the
confusion matrix and a PNG of it.

    rep = report(y_true, y_pred, labels=["neg", "pos"])   # label indices in, names for display
    print(format_report(rep))
    plot_confusion(rep["confusion"], rep["labels"], "confusion.png")

Every class of `labels` counts, present or not, as scikit-learn counts them when given
labels=range(n): a ratio with nothing to divide by (precision of a class never predicted,
recall of a class never present) is 0, and macro averages are plain means over all classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _as_ids(name: str, y, n_classes: int) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D sequence of class indices, got shape {a.shape} dtype {a.dtype}")
    bad = a[(a < 0) | (a >= n_classes)]
    if bad.size:
        raise ValueError(f"{name} holds class {int(bad[0])}, outside 0..{n_classes - 1}")
    return a.astype(np.int64)


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: row = true class, column = predicted class."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes <= 0:
        raise ValueError(f"confusion_matrix: n_classes must be a positive int, got {n_classes!r}")
    t, p = _as_ids("y_true", y_true, n_classes), _as_ids("y_pred", y_pred, n_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true ({t.size}) and y_pred ({p.size}) must be as long")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def report(y_true, y_pred, labels: Sequence[str]) -> dict:
    """accuracy, macro_precision, macro_recall, macro_f1, per_class [{label, precision, recall,
    f1, support}], confusion (a list of rows), labels, n. y_true and y_pred are class indices."""
    labels = list(labels)
    cm = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    n = int(cm.sum())
    if n == 0:
        raise ValueError("report: no examples")
    return {
        "n": n, "labels": labels, "accuracy": float(tp.sum() / n),
        "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": [{"label": lab, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for lab, p, r, f, s in zip(labels, precision, recall, f1, support)],
        "confusion": cm.tolist(),
    }


def format_report(rep: dict) -> str:
    """The per-class table and the summary lines, as text."""
    width = max(12, *(len(r["label"]) for r in rep["per_class"]))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for r in rep["per_class"]:
        lines.append(f"{r['label']:<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:.4f}  "
                     f"{r['support']:7d}")
    lines.append(f"{'macro avg':<{width}}  {rep['macro_precision']:9.4f}  {rep['macro_recall']:6.4f}  "
                 f"{rep['macro_f1']:.4f}  {rep['n']:7d}")
    lines.append(f"accuracy {rep['accuracy']:.4f} ({round(rep['accuracy'] * rep['n'])} of {rep['n']})")
    return "\n".join(lines)


def plot_confusion(cm, labels: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """A PNG of the confusion matrix, each row normalised to the share of its true class (so a
    small class is as visible as a large one), with the counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    n = len(labels)
    share = _ratio(cm.astype(np.float64), cm.sum(axis=1, keepdims=True).repeat(n, axis=1))
    size = max(4.0, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=60 if n > 4 else 0, ha="right" if n > 4 else "center",
                  fontsize=8 if n > 10 else 10)
    ax.set_yticks(range(n), labels, fontsize=8 if n > 10 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=6 if n > 10 else 9,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
