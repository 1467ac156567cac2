"""Classification metrics in numpy, shared by training reports and ``--evaluate``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._errors import InputError

__all__ = [
    "label_indices", "roc_auc", "roc_curve", "confusion_matrix", "summary", "threshold_at_fpr",
    "expected_calibration_error",
]


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


_NAMES_HINT = "(class names? stampclf.metrics.label_indices turns them into indices)"


def _binary(y_true: Any, score: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """*y_true* as booleans and *score* as float64, both 1-D and finite; `InputError` naming the problem."""
    y, s = np.asarray(y_true), np.asarray(score)
    if y.dtype.kind not in "biuf" or s.dtype.kind not in "biuf":
        raise InputError(f"{what}: y_true and score must be numbers, got {y.dtype} and {s.dtype} {_NAMES_HINT}")
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise InputError(f"{what}: y_true and score must be 1-D and of one length, got shapes {y.shape} and {s.shape} "
                         "(for a class of a (N, K) proba: y_true == k and proba[:, k])")
    bad = ~np.isfinite(s)
    if bad.any():
        raise InputError(f"{what}: {int(bad.sum())} of {len(s)} scores are not finite (rows that failed?); "
                         "leave them out first")
    values = np.unique(y)
    if not np.isin(values, (0, 1)).all():
        raise InputError(f"{what}: y_true must be 0/1 or booleans (one class against the rest), got values "
                         f"{values[:5].tolist()}")
    return y.astype(bool), s.astype(np.float64)


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates over all thresholds, and the thresholds (descending)."""
    y, s = _binary(y_true, score, "roc_curve")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    p, n = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / n], np.r_[0.0, tps / p], np.r_[np.inf, s[distinct]]


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (NaN when only one class is present).

    *y_true*: 0/1 or booleans (one class against the rest); *score*: finite, 1-D.
    """
    y, score = _binary(y_true, score, "roc_auc")
    if y.all() or not y.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)  # trapezoid rule (np.trapezoid needs numpy 2)


def threshold_at_fpr(y_true: np.ndarray, score: np.ndarray, fpr_target: float) -> float:
    """Smallest threshold whose false positive rate is at most *fpr_target* (a fraction: 0.01 is 1 %)."""
    if not 0.0 <= float(fpr_target) <= 1.0:
        raise InputError(f"threshold_at_fpr: fpr_target {fpr_target} is not a fraction in [0, 1] (1 % is 0.01)")
    fpr, _, thr = roc_curve(y_true, score)
    ok = np.flatnonzero(fpr <= fpr_target)
    return float(min(thr[ok[-1]], 1.0))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` of class indices ``0..n_classes-1``."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    t, p = (v.astype(np.int64) if v.dtype.kind == "f" and np.isfinite(v).all() and (v == np.round(v)).all() else v
            for v in (t, p))  # labels stored as 0.0/1.0
    for name, v in (("y_true", t), ("y_pred", p)):
        if v.dtype.kind not in "iu" and not (v.dtype.kind == "b" and n_classes == 2):
            raise InputError(f"confusion_matrix: {name} must be class indices, got {v.dtype} {_NAMES_HINT}")
        out = (v < 0) | (v >= n_classes)
        if out.any():
            raise InputError(f"confusion_matrix: {name} holds {v[out][0]}, not a class index 0..{n_classes - 1} "
                             "(a failed row? leave those out first)")
    if t.shape != p.shape or t.ndim != 1:
        raise InputError(f"confusion_matrix: y_true and y_pred must be 1-D and of one length, got {t.shape} and {p.shape}")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t.astype(np.int64), p.astype(np.int64)), 1)
    return cm


def summary(
    y_true: np.ndarray, proba: np.ndarray, y_pred: np.ndarray, classes: list[str], positive: int | None = None
) -> dict[str, object]:
    """Accuracy, precision, recall, F1, ROC AUC, per-class figures and the confusion matrix.

    With a *positive* class index (binary task) precision/recall/F1/AUC are for
    that class; otherwise they are macro averages over the classes that occur in
    *y_true* or *y_pred* (AUC one-vs-rest, over the classes with both outcomes).
    """
    k = len(classes)
    proba = np.asarray(proba)
    if proba.ndim != 2 or proba.shape[1] != k or len(proba) != len(y_true):
        raise InputError(f"summary: proba must be (N, {k}) for {len(y_true)} labels and {k} classes, got {proba.shape}")
    if positive is not None and (isinstance(positive, bool) or not isinstance(positive, (int, np.integer))
                                 or not 0 <= positive < k):
        raise InputError(f"summary: positive must be a class index 0..{k - 1}, got {positive!r}")
    cm = confusion_matrix(y_true, y_pred, k)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
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
        # over the classes in the labels or the predictions (as scikit-learn): a class predicted
        # but absent from the labels has precision 0, and leaving it out would flatter the average
        present = (cm.sum(1) > 0) | (cm.sum(0) > 0)
        out["average"] = "macro"

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
    """ECE of the top-class confidence over equal-width bins; *proba* ``(N, K)``, finite."""
    proba = np.asarray(proba)
    if proba.ndim != 2 or len(proba) != len(y_true) or not np.isfinite(proba).all():
        raise InputError(f"expected_calibration_error: proba must be finite (N, K) for {len(y_true)} labels, "
                         f"got shape {proba.shape}")
    if int(bins) < 1:
        raise InputError(f"expected_calibration_error: bins must be at least 1, got {bins}")
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
