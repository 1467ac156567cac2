"""Classify the shipped HiTS sample with the Python API.

    python examples/classify_api.py [examples/hits_sample.h5]
"""

from __future__ import annotations

import sys

import numpy as np

from stampclf import Classifier


def main(path: str = "examples/hits_sample.h5") -> None:
    clf = Classifier("hits")  # shipped model; device="auto" uses CUDA when it really works
    print(clf, "- channels:", clf.card.channels)
    n = correct = 0
    for batch in clf.classify_file(path):  # streams in batches, input order
        if batch.true_labels is not None:
            pred = np.array([clf.classes.index(c) if c else -1 for c in batch.labels])
            correct += int((pred == batch.true_labels).sum())
        n += len(batch)
        flagged = [s for s in batch.status if s != "ok"]
    print(f"{n} stamps, accuracy {correct / n:.4f}; last batch non-ok statuses: {flagged[:3]}")


if __name__ == "__main__":
    main(*sys.argv[1:])
