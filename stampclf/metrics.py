"""Classification metrics in numpy, shared by training reports and ``--evaluate``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._errors import InputError

__all__ = ["label_indices", "roc_auc", "roc_curve", "confusion_matrix", "summary", "threshold_at_fpr", "expected_calibration_error"]



def label_indices(labels: np.ndarray, classes: Sequence[str], what: str) -> np.ndarray:
    """Class indices (int64) of stored labels: indices ``0..K-1``, whole floats or class names.

    Raises
    ------
    InputError
        Naming *what* and the first label that is not one of *classes*.
    """
    k = len(classes)
    if labels.dtype.kind == "f":  # checked before the cast: 1e20 would wrap around
        whole = np.isfinite(labels) & (labels == np.round(labels)) & (labels >= 0) & (labels < k)
        if not whole.all():
            raise InputError(f"{what}: label {labels[~whole][0]:g} is not a class index 0..{k - 1}")
        labels = labels.astype(np.int64)  # labels stored as 0.0/1.0
    if labels.dtype.kind == "b":
        raise InputError(f"{what}: labels are booleans; store class indices 0..{k - 1} or names {list(classes)}")
    if labels.dtype.kind in "iu":
        bad = (labels < 0) | (labels >= k)
        if bad.any():
            raise InputError(f"{what}: label {labels[bad][0]} is not a class index 0..{k - 1}")
        return labels.astype(np.int64)
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in labels]
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = next((v for v in names if v not in lookup), None)
    if unknown is not None:
        raise InputError(f"{what}: label {unknown!r} is not one of {list(classes)}")
    return np.array([lookup[v] for v in names], dtype=np.int64)

def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates over all thresholds, and the thresholds (descending)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    p, n = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / n], np.r_[0.0, tps / p], np.r_[np.inf, s[distinct]]


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (NaN when only one class is present)."""
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)  # trapezoid rule (np.trapezoid needs numpy 2)


def threshold_at_fpr(y_true: np.ndarray, score: np.ndarray, fpr_target: float) -> float:
    """Smallest threshold whose false positive rate is at most *fpr_target*."""
    fpr, _, thr = roc_curve(y_true, score)
    ok = np.flatnonzero(fpr <= fpr_target)
    return float(min(thr[ok[-1]], 1.0))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]``."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def summary(
    y_true: np.ndarray, proba: np.ndarray, y_pred: np.ndarray, classes: list[str], positive: int | None = None
) -> dict[str, object]:
    """Accuracy, precision, recall, F1, ROC AUC, per-class figures and the confusion matrix.

    With a *positive* class index (binary task) precision/recall/F1/AUC are for
    that class; otherwise they are macro averages (AUC one-vs-rest).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(cm.sum(0) > 0, tp / cm.sum(0), 0.0)
        rec = np.where(cm.sum(1) > 0, tp / cm.sum(1), 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    aucs = [roc_auc(y_true == i, proba[:, i]) for i in range(k)]
    out: dict[str, object] = {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "per_class": {
            c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(cm[i].sum())}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
    }
    if positive is not None and not len(y_true):  # nothing scored: no figures, not zeros
        out.update(precision=float("nan"), recall=float("nan"), f1=float("nan"), roc_auc=float("nan"))
        out["average"] = f"class {classes[positive]}"
    elif positive is not None:
        out.update(precision=float(prec[positive]), recall=float(rec[positive]), f1=float(f1[positive]))
        out["roc_auc"] = aucs[positive]
        out["average"] = f"class {classes[positive]}"
    else:
        present = cm.sum(1) > 0
        out["average"] = "macro"  # over the classes present in the labels; AUC one-vs-rest

        def macro(v: np.ndarray) -> float:
            return float(v[present].mean()) if present.any() else float("nan")

        out.update(
            precision=macro(prec),
            recall=macro(rec),
            f1=macro(f1),
            roc_auc=float(np.nanmean([a for a in aucs if np.isfinite(a)])) if any(np.isfinite(aucs)) else float("nan"),
        )
    return out


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence over equal-width bins."""
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)
