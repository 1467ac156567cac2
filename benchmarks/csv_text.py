"""The CSV text of one batch: numpy's way (`csv_rows`) against one ``%`` format, and the GIL each leaves.

On a GPU the main thread writes the output while the reader thread reads and the
device thread uploads; both need the GIL now and then. For each way this prints the
time per row and the share of the GIL left to another thread meanwhile: a thread
counting in pure Python, its rate next to the CSV work divided by its rate alone
(1.0: the CSV work never holds the GIL; near 0: it always does). Needs two cores to
mean anything. Probabilities are a trained model's (most near 0 or 1).

    python benchmarks/csv_text.py [--model hits] [-b 16384] [--seconds 2]
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import _common
import numpy as np


def per_row(fn: Callable[[], Any], n: int, seconds: float) -> float:
    """Seconds per row of *fn* (one batch of *n* rows), best of the calls made in *seconds*."""
    best, end = np.inf, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n


def counting_rate(seconds: float, work: Callable[[], Any] | None) -> float:
    """Counts per second of a pure-Python thread, while the main thread runs *work* over and over (or sleeps)."""
    stop, counts = threading.Event(), [0]

    def count() -> None:
        k = 0
        while not stop.is_set():
            k += 1
        counts[0] = k

    t = threading.Thread(target=count)
    t0 = time.perf_counter()
    t.start()
    while time.perf_counter() - t0 < seconds:
        if work is None:
            time.sleep(0.01)
        else:
            work()
    stop.set()
    t.join()
    return counts[0] / (time.perf_counter() - t0)


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default 2)")
    p.set_defaults(batch_size=16_384)
    args = p.parse_args()

    from stampclf import Classifier
    from stampclf.io._csvtext import _csv_percent, csv_rows

    card = Classifier(args.model, device="cpu").card
    n, classes = args.batch_size, list(card.classes)
    logits = np.random.default_rng(0).normal(0, 8, (n, len(classes))).astype(np.float32)
    proba = np.exp(logits - logits.max(axis=1, keepdims=True))
    proba /= proba.sum(axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) + 1_000_000_000
    labels = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
    status = np.full(n, "ok", dtype=object)
    fixed = [card.name, card.version, "/data/night/stamps_000123.h5"]
    ways = {
        "numpy (csv_rows)": lambda: csv_rows(ids, labels, proba, status, fixed, [], classes),
        "one % format": lambda: _csv_percent(ids, labels, proba, status, fixed, []),
    }
    assert ways["numpy (csv_rows)"]() == ways["one % format"](), "the two ways differ"
    alone = counting_rate(args.seconds, None)
    figures: dict[str, Any] = {"rows a batch": n, "classes": len(classes), "bytes a row": len(ways["one % format"]()) / n}
    for name, fn in ways.items():
        figures[f"{name}: ns/row"] = per_row(fn, n, args.seconds) * 1e9
        figures[f"{name}: GIL left to another thread"] = counting_rate(args.seconds, fn) / alone
    _common.report("CSV text of one batch", figures, args)


if __name__ == "__main__":
    main()
