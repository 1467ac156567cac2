"""Size, parameters, test figures and CPU throughput of the shipped image models, as a Markdown table.

Usage
-----
    python benchmarks/image_models.py [--models galaxy pokemon-cnn ...] [--images DIR] [--n 2000] [--threads N]

For each model: the ONNX file size, the parameter count and test metrics from its card,
in-memory inference rate (prepared float32 input, as ``stampclf bench``), and the
end-to-end rate of ``classify_files`` on real image files (decode + preprocess + infer +
CSV), taking up to ``--n`` files from ``--images`` (default: a folder of generated JPEGs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stampclf import Classifier
from stampclf._registry import resolve_model
from stampclf._run import classify_files


def _jpegs(folder: Path, n: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"{i:05d}.jpg"
        if not p.exists():
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(p, quality=90)
        out.append(str(p))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["galaxy", "pokemon-cnn", "pokemon-resnet", "cifar10"])
    p.add_argument("--images", type=Path, default=None, help="folder of image files (searched recursively)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=None, help="default: each card's default batch")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.images:
        files = sorted(str(f) for f in args.images.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.n]
    else:
        files = _jpegs(Path(tempfile.gettempdir()) / "stampclf_bench_images", args.n)
    print(f"{len(files)} image files from {args.images or 'generated 256x256 JPEGs'}; {os.cpu_count()} CPUs", file=sys.stderr)
    print("| model | input | batch | ONNX size | parameters | test accuracy | macro-F1 | top-3 | in-memory images/s | "
          "end-to-end images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        try:
            path = resolve_model(name)
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            print(f"| {name} | not available: {exc} ||||||||")
            continue
        clf = Classifier(name, device="cpu", threads=args.threads, batch_size=args.batch_size)
        card = clf.card
        x = np.random.default_rng(0).normal(0, 1, (min(args.n, 2000), *card.shape)).astype(np.float32)
        clf._run(x[: clf.batch_size])  # warm-up
        t = time.perf_counter()
        clf._run(x)
        mem = len(x) / (time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as tmp:
            s = classify_files(clf, files, os.path.join(tmp, "out.csv"), clf.batch_size, progress=False)
        e2e = s.rows / s.seconds
        test = card.metrics.get("test", {})
        top3 = test.get("top3_accuracy")
        print(
            f"| {name} | {card.shape[1]}x{card.shape[2]} | {clf.batch_size} | {os.path.getsize(path) / 1e6:.2f} MB | "
            f"{card.training.get('parameters', 0):,} | {test.get('accuracy', float('nan')):.4f} | "
            f"{test.get('f1', float('nan')):.4f} | {'' if top3 is None else f'{top3:.4f}'} | {mem:,.0f} | {e2e:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
