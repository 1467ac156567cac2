"""Avro alert packets: ZTF, Rubin/LSST and DECam (DECam Alliance for Transients).

One packet or a file of many, any codec fastavro reads (null, deflate; snappy
needs ``cramjam``); the schema is read from the file. One output row per alert:

=========  ===========================================  ==========================  ====================
survey     cut-outs (science, template, difference)      id                          object id
=========  ===========================================  ==========================  ====================
ZTF        ``cutoutScience/Template/Difference``         ``candid``                  ``objectId``
           ``.stampData`` (gzipped FITS)
Rubin      ``cutoutScience/Template/Difference``         ``diaSourceId``             ``diaObjectId``
           (FITS bytes)
DECam      ``triggersource.scicutout/refcutout/           ``triggersource.sourceid``  ``objectid``
           diffcutout`` (FITS bytes, often gzipped)
=========  ===========================================  ==========================  ====================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .._errors import InputError, open_failure
from ..preprocess import merge_status, text_column
from ._base import DUPLICATE_ID, InputBatch
from ._cutouts import card_channels, cutouts_to_input

__all__ = ["AlertReader", "AVRO_MAGIC", "SURVEYS", "alert_fields", "read_alert_records"]

#: First bytes of an Avro object container file.
AVRO_MAGIC = b"Obj\x01"
#: Surveys whose alert packets the reader understands.
SURVEYS = ("ztf", "rubin", "decam")
#: Side of a full ZTF cut-out (pixels); smaller ones were cut at a CCD edge.
ZTF_CUTOUT_SIZE = 63

#: Status note of an alert without a candidate/source id (the record number is used).
NO_ID = "flagged: alert has no id; record number used"

_KINDS = ("science", "template", "difference")
_ZTF_FIELDS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
_DECAM_FIELDS = ("scicutout", "refcutout", "diffcutout")


def _blob(value: Any) -> Any:
    """Cut-out bytes from a field: bytes, a ZTF cut-out record, or None."""
    if isinstance(value, dict):
        return value.get("stampData")
    return value


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None and v != ""), None)


def alert_fields(rec: dict[str, Any], where: str) -> dict[str, Any]:
    """Survey, ids, cut-outs and observing metadata of one decoded alert record.

    Returns a dict with ``survey``, ``id``, ``object_id``, ``cutouts`` ({kind:
    bytes or None}), ``position`` (1-based (x, y) pixel on the survey image or
    None) and ``meta`` (survey-specific numbers such as DECam's ``skysig``,
    ``seeing``, ``magzp``, or ZTF's ``rb``/``drb``).

    Raises
    ------
    InputError
        When the record is none of the known alert kinds.
    """
    if not isinstance(rec, dict):
        raise InputError(f"{where}: record is a {type(rec).__name__}, not an alert")
    if "triggersource" in rec:
        ts = rec.get("triggersource") or {}
        return {
            "survey": "decam",
            "id": ts.get("sourceid"),
            "object_id": rec.get("objectid"),
            "cutouts": {k: ts.get(f) for k, f in zip(_KINDS, _DECAM_FIELDS, strict=True)},
            "position": None,  # DECAT sources carry no CCD pixel position
            "meta": {k: ts.get(k) for k in ("skysig", "seeing", "magzp", "rb", "mjd", "ccdnum")},
        }
    if any(f in rec for f in _ZTF_FIELDS):
        cutouts = {k: _blob(rec.get(f)) for k, f in zip(_KINDS, _ZTF_FIELDS, strict=True)}
        if isinstance(rec.get("diaSource"), dict):
            src = rec["diaSource"]
            obj = rec.get("diaObject") if isinstance(rec.get("diaObject"), dict) else {}
            return {
                "survey": "rubin",
                "id": _first(rec.get("diaSourceId"), src.get("diaSourceId"), rec.get("alertId")),
                "object_id": _first(src.get("diaObjectId"), obj.get("diaObjectId"), src.get("ssObjectId")),
                "cutouts": cutouts,
                "position": None,
                "meta": {k: src.get(k) for k in ("reliability", "snr", "midpointMjdTai", "band")},
            }
        cand = rec.get("candidate") if isinstance(rec.get("candidate"), dict) else {}
        pos = (cand.get("xpos"), cand.get("ypos"))
        return {
            "survey": "ztf",
            "id": _first(rec.get("candid"), cand.get("candid")),
            "object_id": _first(rec.get("objectId"), rec.get("objectid")),
            "cutouts": cutouts,
            "position": pos if None not in pos else None,
            "meta": {k: cand.get(k) for k in ("rb", "drb", "jd", "fid", "magzpsci")},
        }
    fields = ", ".join(sorted(rec)[:12])
    raise InputError(f"{where}: not a ZTF, Rubin or DECam alert (no cut-out fields; fields: {fields})")


def _open_avro(path: str) -> tuple[Any, Any]:
    try:
        import fastavro
    except ImportError:
        raise InputError(f"{path}: reading Avro alerts needs fastavro (pip install 'stampclf[alerts]')") from None
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise (open_failure(path, exc) or InputError(f"{path}: cannot read: {exc}")) from None
    try:
        if fh.read(4) != AVRO_MAGIC:
            raise InputError(f"{path}: not an Avro container file (schemaless packets need their schema)")
        fh.seek(0)
        reader = fastavro.reader(fh)
    except InputError:
        fh.close()
        raise
    except Exception as exc:  # noqa: BLE001 - fastavro raises many untyped errors on bad headers
        fh.close()
        raise InputError(f"{path}: corrupt Avro header ({_why(exc)})") from None
    return fh, reader


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def _missing_codec(path: str, exc: BaseException) -> InputError | None:
    """fastavro's "codec is supported but you need to install ..." as one clear line."""
    text = str(exc)
    if "codec is supported but you need to install" not in text:
        return None
    codec = text.split(" codec", 1)[0]
    libs = text.rsplit(":", 1)[-1].strip()
    return InputError(f"{path}: {codec}-compressed Avro needs {libs} (pip install 'stampclf[alerts]')")


def read_alert_records(path: str) -> Iterator[dict[str, Any]]:
    """Decoded records of an Avro alert file, in order; `InputError` naming the record on corruption."""
    fh, reader = _open_avro(path)
    index = 0
    try:
        it = iter(reader)
        while True:
            try:
                rec = next(it)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - truncated blocks, bad codecs, schema mismatch
                missing = _missing_codec(path, exc)
                if missing is not None:
                    raise missing from None
                raise InputError(f"{path}: record {index}: corrupt Avro data ({_why(exc)})") from None
            yield rec
            index += 1
    finally:
        fh.close()


class AlertReader:
    """Stream model input from an Avro alert file, one row per alert.

    Parameters
    ----------
    path
        Avro container file holding one or many alerts.
    card
        Model card; its ``input.channels`` pick the cut-outs.

    Rows keep the alert's ids: ``id`` is the candidate/source id and the batch's
    ``extra["object_id"]`` the object id. A cut-out that cannot be decoded makes
    its row ``failed``; a corrupt record stops the file with an `InputError`.
    """

    has_labels = False
    extra_columns = ("object_id",)

    def __init__(self, path: str, card: Any) -> None:
        self.path = str(path)
        self.card = card
        card_channels(card)  # a channel no alert provides: fail before reading
        self.n_rows: int | None = None
        self._fh, self._reader = _open_avro(self.path)
        self.schema = self._reader.writer_schema
        self.codec = self._reader.codec
        self.surveys: set[str] = set()
        self._seen: set[Any] = set()  # ids so far, to flag repeats (e.g. an alert sent twice)
        self._fh.close()  # reopened by batches(); the header check is all __init__ does

    def batches(self, batch_size: int) -> Iterator[InputBatch]:
        """Yield batches of preprocessed rows (``x`` and ``status`` set)."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        rows: list[dict[str, Any]] = []
        start = 0
        for index, rec in enumerate(read_alert_records(self.path)):
            rows.append(alert_fields(rec, f"{self.path}: record {index}"))
            if len(rows) == batch_size:
                yield self._batch(rows, start)
                start += len(rows)
                rows = []
        if rows:
            yield self._batch(rows, start)

    def _batch(self, rows: list[dict[str, Any]], start: int) -> InputBatch:
        self.surveys.update(r["survey"] for r in rows)
        is_ztf = [r["survey"] == "ztf" and r["position"] is not None for r in rows]
        x, status = cutouts_to_input(
            {k: [r["cutouts"][k] for r in rows] for k in ("science", "template", "difference")},
            self.card,
            self.path,
            nominal=ZTF_CUTOUT_SIZE if any(is_ztf) else None,
            positions=[r["position"] if z else None for r, z in zip(rows, is_ztf, strict=True)],
        )
        ids = np.array([f"record{start + i}" if r["id"] is None else r["id"] for i, r in enumerate(rows)], object)
        notes = text_column(len(rows))
        for i, r in enumerate(rows):
            if r["id"] is None:
                notes[i] = NO_ID
            elif r["id"] in self._seen:
                notes[i] = DUPLICATE_ID
            else:
                self._seen.add(r["id"])
        status = merge_status(status, notes)
        objects = np.array(["" if r["object_id"] is None else str(r["object_id"]) for r in rows], dtype=object)
        return InputBatch(ids=ids, x=x, status=status, extra={"object_id": objects})

    def close(self) -> None:
        """Nothing stays open between batches."""
