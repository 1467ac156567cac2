"""Score alert cut-outs in Spark with a pandas UDF, the way Fink-style brokers run their science modules.

A broker keeps alerts in a Spark DataFrame with one column per cut-out (for ZTF:
``cutoutScience.stampData``, ``cutoutTemplate.stampData``, ``cutoutDifference.stampData``,
gzipped FITS bytes). `make_udf` returns a pandas UDF that takes those three binary
columns and the candidate's pixel position (ZTF ``candidate.xpos``/``ypos``; null
elsewhere: it only serves to recentre cut-outs cut at a CCD edge) and returns a struct
``(p, label, status)`` per alert:

* ``p``      probability of the model's positive class (``real`` for ``hits``), NaN when the row failed,
* ``label``  the predicted class ("" when failed),
* ``status`` ``ok`` / ``flagged: <reason>`` / ``failed: <reason>``, as in ``stampclf classify``.

How the model reaches the executors: a shipped model name (``"hits"``) resolves inside
the stampclf wheel installed on every executor; a local ``.onnx`` file is shipped with
``spark.sparkContext.addFile(path)`` and found on the executor with ``SparkFiles.get``.
Each executor's Python worker builds the ONNX Runtime session once and reuses it for
every Arrow batch.

Run (needs ``pip install pyspark pandas pyarrow`` and a Java runtime)::

    python examples/spark_udf.py ALERTS.avro [ALERTS.avro ...] [--model hits|PATH.onnx]

This reads the Avro files with fastavro on the driver (a broker reads its Kafka stream
instead), builds the DataFrame, scores it and prints one line per alert.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import pandas as pd  # the UDF's type hints must resolve at module level

RESULT_TYPE = "p double, label string, status string"

_CLASSIFIERS: dict[str, Any] = {}


def _classifier(model: str) -> Any:
    """The executor's classifier for *model*, made on first use (one session per Python worker)."""
    clf = _CLASSIFIERS.get(model)
    if clf is None:
        import stampclf

        path = model
        if model.endswith(".onnx") and not os.path.exists(model):
            from pyspark import SparkFiles

            path = SparkFiles.get(os.path.basename(model))  # shipped with addFile
        # one thread: Spark runs one Python worker per task slot
        clf = _CLASSIFIERS[model] = stampclf.Classifier(path, device="cpu", threads=1)
    return clf


def make_udf(model: str = "hits", positive: str | None = None, cutout_size: int = 63) -> Any:
    """A pandas UDF ``(science, template, difference, xpos, ypos) -> struct<p, label, status>``.

    Parameters
    ----------
    model
        Shipped model name, or an ``.onnx`` path that was added with ``sparkContext.addFile``.
    positive
        Class whose probability is returned (default: the card's positive class).
    cutout_size
        Full cut-out side of the survey (ZTF: 63), for edge cut-outs.
    """
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(RESULT_TYPE)  # type: ignore[call-overload]
    def score(
        science: pd.Series, template: pd.Series, difference: pd.Series, xpos: pd.Series, ypos: pd.Series
    ) -> pd.DataFrame:
        from stampclf.io import classify_cutouts

        clf = _classifier(model)
        pos = [None if pd.isna(x) or pd.isna(y) else (float(x), float(y)) for x, y in zip(xpos, ypos, strict=True)]
        pred = classify_cutouts(
            clf,
            {"science": science.tolist(), "template": template.tolist(), "difference": difference.tolist()},
            nominal=cutout_size,
            positions=pos,
        )
        column = clf.classes.index(positive or clf.card.positive_class or clf.classes[-1])
        return pd.DataFrame(
            {"p": pred.proba[:, column].astype(float), "label": pred.labels.astype(str), "status": pred.status}
        )

    return score


def alerts_dataframe(spark: Any, paths: list[str]) -> Any:
    """A DataFrame ``(candid, objectId, science, template, difference, xpos, ypos)`` from Avro alert files."""
    from stampclf.io._alerts import alert_fields, read_alert_records

    rows = []
    for path in paths:
        for i, rec in enumerate(read_alert_records(path)):
            a = alert_fields(rec, f"{path}: record {i}")
            cut = a["cutouts"]
            x, y = a["position"] or (None, None)
            rows.append(
                (str(a["id"]), str(a["object_id"] or ""), cut["science"], cut["template"], cut["difference"], x, y)
            )
    schema = (
        "candid string, objectId string, science binary, template binary, difference binary, xpos double, ypos double"
    )
    return spark.createDataFrame(rows, schema)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("alerts", nargs="+", help="Avro alert files")
    parser.add_argument("--model", default="hits", help="shipped model name or .onnx path")
    args = parser.parse_args(argv)

    from pyspark.sql import SparkSession

    spark = SparkSession.builder.master("local[1]").appName("stampclf-udf").getOrCreate()
    try:
        if args.model.endswith(".onnx"):
            spark.sparkContext.addFile(os.path.abspath(args.model))
        df = alerts_dataframe(spark, args.alerts)
        rb = make_udf(args.model)("science", "template", "difference", "xpos", "ypos")
        for row in df.withColumn("rb", rb).select("candid", "objectId", "rb.p", "rb.label", "rb.status").collect():
            p = "nan" if row.p is None else f"{row.p:.4f}"  # Spark turns NaN into null
            print(f"{row.candid}\t{row.objectId}\t{p}\t{row.label}\t{row.status}")
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
