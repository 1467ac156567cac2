"""Classify the shipped HiTS sample with the Python API.

    python examples/classify_api.py [examples/hits_sample.h5]
"""

from __future__ import annotations

import sys

from stampclf import Classifier


def main(path: str = "examples/hits_sample.h5") -> None:
    clf = Classifier("hits")  # shipped model; device="auto" uses CUDA when it really works
    print(clf, "- channels:", clf.card.channels)
    results = list(clf.classify_file(path))  # streams in batches, input order
    n = sum(len(p) for p in results)
    not_ok = [(str(i), s) for p in results for i, s in zip(p.ids, p.status, strict=True) if s != "ok"]
    print(f"{n} stamps with {results[0].model} {results[0].model_version}; not ok: {len(not_ok)} {not_ok[:2]}")
    if any(p.true_labels is not None for p in results):
        m = clf.evaluate(results)  # the figures of stampclf classify --evaluate
        print(f"accuracy {m['accuracy']:.4f}, ROC AUC {m['roc_auc']:.4f} ({m['unscored']} unscored)")
    else:
        print("no usable labels in", path, "(classify_file(..., labels='check') says why)")


if __name__ == "__main__":
    main(*sys.argv[1:])
