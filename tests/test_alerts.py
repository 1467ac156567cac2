"""Avro alert packets (ZTF, Rubin, DECam) and FITS cut-out files as classifier input.

Every packet and FITS file is written here with fastavro and astropy; the real sample
alerts of ``../shared/data/alerts`` are only read by the last, optional test.
"""

from __future__ import annotations

import csv
import gzip
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import card_dict, write_hits_h5, write_model
from typer.testing import CliRunner

fastavro = pytest.importorskip("fastavro")
fits = pytest.importorskip("astropy.io.fits")

from stampclf import Classifier, InputError  # noqa: E402
from stampclf._card import ModelCard  # noqa: E402
from stampclf.cli import app  # noqa: E402
from stampclf.io import AlertReader, FITSReader, decode_fits, input_kind, open_inputs  # noqa: E402
from stampclf.io._cutouts import DERIVED_SNR, derive_snr  # noqa: E402

SHARED_ALERTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "alerts"

# --- minimal schemas (the fields the reader uses, as the surveys name them) --------------
ZTF_CUTOUT = {
    "type": "record",
    "name": "cutout",
    "namespace": "ztf.alert",
    "fields": [{"name": "fileName", "type": "string"}, {"name": "stampData", "type": "bytes"}],
}
ZTF_SCHEMA = {
    "type": "record",
    "name": "alert",
    "namespace": "ztf",
    "fields": [
        {"name": "schemavsn", "type": "string"},
        {"name": "objectId", "type": "string"},
        {"name": "candid", "type": "long"},
        {
            "name": "candidate",
            "type": {
                "type": "record",
                "name": "candidate",
                "namespace": "ztf.alert",
                "fields": [
                    {"name": "candid", "type": "long"},
                    {"name": "xpos", "type": "float"},
                    {"name": "ypos", "type": "float"},
                    {"name": "rb", "type": ["null", "float"], "default": None},
                ],
            },
        },
        {"name": "cutoutScience", "type": ["null", ZTF_CUTOUT], "default": None},
        {"name": "cutoutTemplate", "type": ["null", "ztf.alert.cutout"], "default": None},
        {"name": "cutoutDifference", "type": ["null", "ztf.alert.cutout"], "default": None},
    ],
}
DECAM_SCHEMA = {
    "type": "record",
    "name": "object",
    "namespace": "decat",
    "fields": [
        {"name": "objectid", "type": "string"},
        {
            "name": "triggersource",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "source",
                    "fields": [
                        {"name": "sourceid", "type": "int"},
                        {"name": "skysig", "type": "float"},
                        {"name": "seeing", "type": "float"},
                        {"name": "magzp", "type": "float"},
                        {"name": "scicutout", "type": ["null", "bytes"]},
                        {"name": "refcutout", "type": ["null", "bytes"]},
                        {"name": "diffcutout", "type": ["null", "bytes"]},
                    ],
                },
            ],
        },
    ],
}
RUBIN_SCHEMA = {
    "type": "record",
    "name": "alert",
    "namespace": "lsst.v7_4",
    "fields": [
        {"name": "diaSourceId", "type": "long"},
        {
            "name": "diaSource",
            "type": {
                "type": "record",
                "name": "diaSource",
                "fields": [{"name": "diaSourceId", "type": "long"}, {"name": "diaObjectId", "type": ["null", "long"]}],
            },
        },
        {"name": "cutoutDifference", "type": ["null", "bytes"], "default": None},
        {"name": "cutoutScience", "type": ["null", "bytes"], "default": None},
        {"name": "cutoutTemplate", "type": ["null", "bytes"], "default": None},
    ],
}


# --- helpers --------------------------------------------------------------------------
def fits_bytes(arr: np.ndarray, gz: bool = True, **header: Any) -> bytes:
    hdu = fits.PrimaryHDU(np.asarray(arr))
    for k, v in header.items():
        hdu.header[k] = v
    buf = io.BytesIO()
    hdu.writeto(buf)
    return gzip.compress(buf.getvalue()) if gz else buf.getvalue()


def triplet(seed: int, size: tuple[int, int] = (21, 21), peak: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Distinct science/template/difference cut-outs with a source at *peak* (default: centre)."""
    rng = np.random.default_rng(seed)
    h, w = size
    py, px = peak if peak is not None else (h // 2, w // 2)
    yy, xx = np.mgrid[:h, :w]
    src = 300 * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / 3.0)
    template = rng.normal(100, 4, size) + 0.3 * src
    science = rng.normal(110, 5, size) + src
    difference = rng.normal(0, 6, size) + 0.7 * src
    return {
        k: v.astype(np.float32) for k, v in (("science", science), ("template", template), ("difference", difference))
    }


def hits_order(t: dict[str, np.ndarray]) -> np.ndarray:
    """The tiny model's channel order: template, science, difference, snr_difference (derived)."""
    return np.stack([t["template"], t["science"], t["difference"], derive_snr(t["difference"])])


def ztf_record(i: int, t: dict[str, np.ndarray] | None, pos: tuple[float, float] = (500.0, 500.0)) -> dict[str, Any]:
    def cut(kind: str) -> dict[str, Any] | None:
        if t is None or t.get(kind) is None:
            return None
        blob = t[kind] if isinstance(t[kind], bytes) else fits_bytes(t[kind])
        return {"fileName": f"candid{i}_{kind}.fits.gz", "stampData": blob}

    return {
        "schemavsn": "3.3",
        "objectId": f"ZTF24aaa{i:04d}",
        "candid": 1_000_000 + i,
        "candidate": {"candid": 1_000_000 + i, "xpos": pos[0], "ypos": pos[1], "rb": 0.5},
        "cutoutScience": cut("science"),
        "cutoutTemplate": cut("template"),
        "cutoutDifference": cut("difference"),
    }


def write_avro(path: Path, schema: dict[str, Any], records: list[dict[str, Any]], codec: str = "null") -> Path:
    with open(path, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), records, codec=codec, sync_interval=2000)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.from_dict(card_dict())


@pytest.fixture(scope="module")
def clf(tiny_model_path: Path) -> Classifier:
    return Classifier(tiny_model_path, device="cpu", threads=1)


# --- ZTF --------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["null", "deflate", "snappy"])
def test_ztf_file_of_many_alerts_matches_in_memory(tmp_path: Path, clf: Classifier, codec: str) -> None:
    trips = [triplet(s) for s in range(5)]
    path = write_avro(tmp_path / "alerts.avro", ZTF_SCHEMA, [ztf_record(i, t) for i, t in enumerate(trips)], codec)
    preds = list(clf.classify_file(path, batch_size=2))
    assert [len(p) for p in preds] == [2, 2, 1]
    ids = np.concatenate([p.ids for p in preds])
    proba = np.concatenate([p.proba for p in preds])
    status = np.concatenate([p.status for p in preds])
    assert ids.tolist() == [1_000_000 + i for i in range(5)]
    assert np.concatenate([p.extra["object_id"] for p in preds]).tolist() == [f"ZTF24aaa{i:04d}" for i in range(5)]
    assert all(s == f"flagged: {DERIVED_SNR}" for s in status)
    # the same numbers as the raw stamps in the card's channel order
    expected = clf.classify(np.stack([hits_order(t) for t in trips])).proba
    np.testing.assert_allclose(proba, expected, rtol=0, atol=1e-6)
    # ... and not as a wrong channel order would give
    swapped = np.stack([hits_order(t)[[1, 0, 2, 3]] for t in trips])
    assert not np.allclose(clf.classify(swapped).proba, proba, atol=1e-4)


def test_ztf_edge_cutout_is_recentred(tmp_path: Path, clf: Classifier, card: ModelCard) -> None:
    """A 48x63 cut-out cut at the CCD's low-y edge gives the same input as the full 63x63 one."""
    full = triplet(7, (63, 63), peak=(31, 31))
    edge = {k: v[15:] for k, v in full.items()}  # rows below y=1 do not exist
    recs = [ztf_record(0, full, pos=(800.0, 46.5)), ztf_record(1, edge, pos=(800.0, 16.5))]
    path = write_avro(tmp_path / "edge.avro", ZTF_SCHEMA, recs)
    batch = next(AlertReader(str(path), card).batches(8))
    assert "edge cut-out 48x63 padded to 63x63" in batch.status[1]
    assert batch.status[1].startswith("flagged")
    np.testing.assert_array_equal(batch.x[1, :3], batch.x[0, :3])
    # the derived SNR channel saw 48 rows instead of 63 for its noise estimate: close, not equal
    np.testing.assert_allclose(batch.x[1, 3], batch.x[0, 3], atol=1e-5)
    # the source is in the centre of the model input, not 7 pixels off
    assert np.unravel_index(np.argmax(batch.x[1, 2]), (21, 21)) == (10, 10)


def test_bad_cutout_is_a_failed_row_others_scored(tmp_path: Path, clf: Classifier) -> None:
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 100
    recs = [
        ztf_record(0, triplet(0)),
        ztf_record(1, {**triplet(1), "science": jpeg}),
        ztf_record(2, {**triplet(2), "template": None}),
        ztf_record(3, {**triplet(3), "difference": b"\x1f\x8b\x08\x00garbage"}),
        ztf_record(4, triplet(4)),
    ]
    path = write_avro(tmp_path / "mixed.avro", ZTF_SCHEMA, recs, "deflate")
    pred = next(clf.classify_file(path))
    assert pred.ids.tolist() == [1_000_000 + i for i in range(5)]
    assert pred.status[1] == "failed: science: not FITS (JPEG image data)"
    assert pred.status[2] == "failed: no template cut-out"
    assert pred.status[3].startswith("failed: difference: corrupt gzip data")
    assert np.isnan(pred.proba[1:4]).all() and pred.labels[1:4].tolist() == ["", "", ""]
    assert np.isfinite(pred.proba[[0, 4]]).all()


def test_corrupt_avro_names_file_and_record(tmp_path: Path, tiny_model_path: Path) -> None:
    good = write_avro(tmp_path / "good.avro", ZTF_SCHEMA, [ztf_record(i, triplet(i)) for i in range(40)], "deflate")
    data = good.read_bytes()
    bad = tmp_path / "bad.avro"
    bad.write_bytes(data[: len(data) * 2 // 3])  # truncated in the middle of a block
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(app, ["classify", str(bad), "-m", str(tiny_model_path), "-o", str(out), "-q"])
    assert result.exit_code == 2
    assert f"{bad}: record " in result.output and "corrupt Avro data" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    # not Avro at all, but named .avro
    fake = tmp_path / "fake.avro"
    fake.write_bytes(b"{'json': 1}")
    result = CliRunner().invoke(app, ["classify", str(fake), "-m", str(tiny_model_path), "-q"])
    assert result.exit_code == 2 and f"{fake}: not an Avro container file" in result.output
    # header damaged after the magic
    broken = tmp_path / "broken.avro"
    broken.write_bytes(data[:4] + b"\xff" * 40)
    with pytest.raises(InputError, match="broken.avro: corrupt Avro"):
        list(Classifier(tiny_model_path, device="cpu").classify_file(broken))


def test_duplicate_and_missing_ids_flagged(tmp_path: Path, card: ModelCard) -> None:
    recs = [ztf_record(i, triplet(i)) for i in range(3)]
    recs[2]["candid"] = recs[0]["candid"]  # the same alert twice
    path = write_avro(tmp_path / "dup.avro", ZTF_SCHEMA, recs)
    status = np.concatenate([b.status for b in AlertReader(str(path), card).batches(2)])  # across batches
    assert status[0] == status[1] == f"flagged: {DERIVED_SNR}"
    assert status[2] == f"flagged: {DERIVED_SNR}; duplicate id"
    schema = {**DECAM_SCHEMA, "fields": [f for f in DECAM_SCHEMA["fields"] if f["name"] != "triggersource"]}
    schema["fields"].append({"name": "triggersource", "type": ["null", "string"]})
    path = write_avro(tmp_path / "noid.avro", schema, [{"objectid": "DC1", "triggersource": None}])
    batch = next(AlertReader(str(path), card).batches(2))
    assert batch.ids.tolist() == ["record0"] and batch.status[0] == "failed: no template cut-out"


def test_snappy_without_cramjam(tmp_path: Path, card: ModelCard, monkeypatch: pytest.MonkeyPatch) -> None:
    import fastavro.read as fread
    from fastavro._read_common import missing_codec_lib

    path = write_avro(tmp_path / "s.avro", ZTF_SCHEMA, [ztf_record(0, triplet(0))], "snappy")
    readers = fread.BLOCK_READERS
    monkeypatch.setitem(readers, "snappy", missing_codec_lib("snappy", "cramjam"))
    with pytest.raises(InputError, match=r"s.avro: snappy-compressed Avro needs .*cramjam.*stampclf\[alerts\]"):
        list(AlertReader(str(path), card).batches(4))


def test_unknown_record_kind(tmp_path: Path, card: ModelCard) -> None:
    schema = {"type": "record", "name": "x", "fields": [{"name": "a", "type": "int"}]}
    path = write_avro(tmp_path / "other.avro", schema, [{"a": 1}])
    with pytest.raises(InputError, match=r"other.avro: record 0: not a ZTF, Rubin or DECam alert"):
        list(AlertReader(str(path), card).batches(4))


# --- DECam and Rubin ---------------------------------------------------------------------
def test_decam_alerts(tmp_path: Path, clf: Classifier) -> None:
    trips = [triplet(s, (51, 51)) for s in range(3)]
    recs = [
        {
            "objectid": f"DC21ab{i}",
            "triggersource": {
                "sourceid": 500 + i,
                "skysig": 5.0,
                "seeing": 1.2,
                "magzp": 26.7,
                "scicutout": fits_bytes(t["science"]),
                "refcutout": fits_bytes(t["template"], gz=False),
                "diffcutout": fits_bytes(t["difference"]),
            },
        }
        for i, t in enumerate(trips)
    ]
    path = write_avro(tmp_path / "decam.avro", DECAM_SCHEMA, recs, "snappy")
    pred = next(clf.classify_file(path))
    assert pred.ids.tolist() == [500, 501, 502]
    assert pred.extra["object_id"].tolist() == ["DC21ab0", "DC21ab1", "DC21ab2"]
    assert all(s == f"flagged: resized 51x51->21x21; {DERIVED_SNR}" for s in pred.status)
    # the SNR channel is derived from the full 51x51 difference, then everything is centre-cropped
    full = np.stack(
        [np.stack([t["template"], t["science"], t["difference"], derive_snr(t["difference"])]) for t in trips]
    )
    np.testing.assert_allclose(pred.proba, clf.classify(full).proba, atol=1e-6)


def test_rubin_alerts_plain_fits(tmp_path: Path, clf: Classifier) -> None:
    t = triplet(3)
    rec = {
        "diaSourceId": 77,
        "diaSource": {"diaSourceId": 77, "diaObjectId": 9001},
        "cutoutDifference": fits_bytes(t["difference"], gz=False),
        "cutoutScience": fits_bytes(t["science"], gz=False),
        "cutoutTemplate": fits_bytes(t["template"], gz=False),
    }
    path = write_avro(tmp_path / "rubin.avro", RUBIN_SCHEMA, [rec], "deflate")
    pred = next(clf.classify_file(path))
    assert pred.ids.tolist() == [77] and pred.extra["object_id"].tolist() == ["9001"]
    np.testing.assert_allclose(pred.proba, clf.classify(hits_order(t)[None]).proba, atol=1e-6)


# --- CLI and output columns -----------------------------------------------------------------
def test_cli_alerts_object_id_column_and_h5_columns_unchanged(tmp_path: Path, tiny_model_path: Path) -> None:
    path = write_avro(tmp_path / "a.avro", ZTF_SCHEMA, [ztf_record(i, triplet(i)) for i in range(3)], "snappy")
    h5 = write_hits_h5(tmp_path / "s.h5", 4)
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(app, ["classify", str(h5), str(path), "-m", str(tiny_model_path), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert list(rows[0])[-1] == "object_id" and len(rows) == 7
    assert [r["object_id"] for r in rows] == ["", "", "", "", "ZTF24aaa0000", "ZTF24aaa0001", "ZTF24aaa0002"]
    assert [r["id"] for r in rows[4:]] == ["1000000", "1000001", "1000002"]
    out_h5 = tmp_path / "out.h5"
    assert (
        CliRunner().invoke(app, ["classify", str(path), "-m", str(tiny_model_path), "-o", str(out_h5)]).exit_code == 0
    )
    import h5py

    with h5py.File(out_h5) as f:
        assert [v.decode() for v in f["object_id"][:]] == ["ZTF24aaa0000", "ZTF24aaa0001", "ZTF24aaa0002"]
    # HDF5 stamps alone: the default columns, no object_id
    out2 = tmp_path / "h5only.csv"
    assert CliRunner().invoke(app, ["classify", str(h5), "-m", str(tiny_model_path), "-o", str(out2)]).exit_code == 0
    assert "object_id" not in read_csv(out2)[0]


def test_input_kind_by_content(tmp_path: Path) -> None:
    avro = write_avro(tmp_path / "packet.bin", ZTF_SCHEMA, [ztf_record(0, triplet(0))])
    assert input_kind(str(avro)) == "alerts"
    raw = tmp_path / "cutout.dat"
    raw.write_bytes(fits_bytes(np.zeros((5, 5), np.float32), gz=False))
    assert input_kind(str(raw)) == "fits"
    for name in ("a.fits", "a.fits.gz", "a.fz", "a.fit"):
        (tmp_path / name).write_bytes(b"x")
        assert input_kind(str(tmp_path / name)) == "fits"


def test_model_needing_other_channels(tmp_path: Path) -> None:
    card = card_dict()
    card["input"]["channels"] = ["science", "u_band"]
    card["input"]["hdf5_datasets"] = ["a", "b"]
    model = write_model(tmp_path / "uband.onnx", card)
    path = write_avro(tmp_path / "a.avro", ZTF_SCHEMA, [ztf_record(0, triplet(0))])
    result = CliRunner().invoke(app, ["classify", str(path), "-m", str(model)])
    assert result.exit_code == 2 and "needs channel 'u_band'" in result.output


def test_reference_alias_and_no_derived_channel(tmp_path: Path) -> None:
    card = card_dict()
    card["input"]["channels"] = ["science", "reference", "difference"]
    card["input"]["hdf5_datasets"] = ["a", "b", "c"]
    clf = Classifier(write_model(tmp_path / "three.onnx", card), device="cpu")
    t = triplet(5)
    pred = next(clf.classify_file(write_avro(tmp_path / "a.avro", ZTF_SCHEMA, [ztf_record(0, t)])))
    assert pred.status.tolist() == ["ok"]
    expected = clf.classify(np.stack([t["science"], t["template"], t["difference"]])[None]).proba
    np.testing.assert_allclose(pred.proba, expected, atol=1e-6)


# --- FITS files -----------------------------------------------------------------------------
def test_fits_per_channel_and_multi_extension(tmp_path: Path, clf: Classifier) -> None:
    t0, t1 = triplet(10), triplet(11)
    names = {"science": "sci", "template": "ref", "difference": "diff"}
    files = []
    for kind, token in names.items():
        p = tmp_path / f"cand0_{token}.fits.gz"
        p.write_bytes(fits_bytes(t0[kind]))
        files.append(str(p))
    mef = tmp_path / "cand1.fits"
    hdul = fits.HDUList(
        [fits.PrimaryHDU()] + [fits.ImageHDU(t1[k], name=k.upper()) for k in ("difference", "science", "template")]
    )
    hdul.writeto(mef)
    out = tmp_path / "out.csv"
    args = ["classify", *files, str(mef), "-m", str(clf.path), "-o", str(out), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert [r["id"] for r in rows] == ["cand0", "cand1"]
    assert [r["file"] for r in rows] == [files[0], str(mef)]  # each row's own (science) file
    assert all(r["status"] == f"flagged: {DERIVED_SNR}" for r in rows)
    expected = clf.classify(np.stack([hits_order(t0), hits_order(t1)])).proba
    got = np.array([[float(r["p_bogus"]), float(r["p_real"])] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_fits_missing_channel_and_corrupt_file(tmp_path: Path, card: ModelCard) -> None:
    t = triplet(1)
    a = tmp_path / "c9_science.fits"
    a.write_bytes(fits_bytes(t["science"], gz=False))
    b = tmp_path / "c9_difference.fits"
    b.write_bytes(fits_bytes(t["difference"], gz=False))
    batch = next(FITSReader([str(a), str(b)], card).batches(4))
    assert batch.ids.tolist() == ["c9"] and batch.status.tolist() == ["failed: no template cut-out"]
    bad = tmp_path / "c8_template.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b"\x00" * 50)
    with pytest.raises(InputError, match="c8_template.fits: corrupt FITS"):
        list(FITSReader([str(bad)], card).batches(4))
    plain = tmp_path / "nochannel.fits"
    plain.write_bytes(fits_bytes(t["science"], gz=False))
    with pytest.raises(InputError, match="nochannel.fits: cannot tell the channel"):
        list(FITSReader([str(plain)], card).batches(4))


def write_fits_stamps(folder: Path) -> tuple[list[str], list[str]]:
    """Per-channel FITS files of two whole stamps (cand0, cand1) and of one without a template (cand2)."""
    whole: list[str] = []
    for k in range(2):
        t = triplet(20 + k)
        for kind, token in (("science", "sci"), ("template", "ref"), ("difference", "diff")):
            (folder / f"cand{k}_{token}.fits").write_bytes(fits_bytes(t[kind], gz=False))
            whole.append(str(folder / f"cand{k}_{token}.fits"))
    t = triplet(22)
    (folder / "cand2_sci.fits").write_bytes(fits_bytes(t["science"], gz=False))
    (folder / "cand2_diff.fits").write_bytes(fits_bytes(t["difference"], gz=False))
    return whole, [str(folder / "cand2_sci.fits"), str(folder / "cand2_diff.fits")]


@pytest.mark.parametrize("last", [True, False])
def test_a_fits_stamp_that_cannot_be_scored_is_an_input_error_wherever_it_stands(
    tmp_path: Path, clf: Classifier, last: bool
) -> None:
    whole, partial = write_fits_stamps(tmp_path)
    out = tmp_path / "out.csv"
    paths = [*whole, *partial] if last else [*partial, *whole]
    result = CliRunner().invoke(app, ["classify", *paths, "-m", str(clf.path), "-o", str(out), "-q"])
    # each stamp is an input of its own, as each image is: its failed row stays, and it is an error
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"stampclf: error: {partial[0]}: stamp 'cand2' could not be scored "
                                     "(failed: no template cut-out)")  # fmt: skip
    rows = read_csv(out)
    assert sorted(r["id"] for r in rows) == ["cand0", "cand1", "cand2"]
    assert {r["id"]: r["status"] for r in rows}["cand2"] == "failed: no template cut-out"


def test_open_inputs_groups_fits(tmp_path: Path, card: ModelCard) -> None:
    paths = []
    for name in ("a_sci.fits", "a_ref.fits", "a_diff.fits", "mef.fits", "b_sci.fits"):
        (tmp_path / name).write_bytes(b"SIMPLE  =")
        paths.append(str(tmp_path / name))
    groups = open_inputs(paths, card)
    assert [len(g) for g, _ in groups] == [3, 1, 1]


@pytest.mark.parametrize("bitpix", ["f4", "f8", "i2", "u1"])
def test_decode_fits_fast_path_equals_astropy(bitpix: str) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(50, 10, (17, 23)).clip(0, 200)).astype(bitpix)
    for gz in (True, False):
        got = decode_fits(fits_bytes(arr, gz=gz), "x")
        assert got.dtype == np.float32 and got.shape == (17, 23)
        np.testing.assert_array_equal(got, arr.astype(np.float32))
    scaled = fits.PrimaryHDU(arr.astype(np.float32))
    scaled.scale("int16", bscale=0.5, bzero=10)  # integer pixels with scaling: astropy's path
    buf = io.BytesIO()
    scaled.writeto(buf)
    np.testing.assert_allclose(decode_fits(buf.getvalue()), arr.astype(np.float32), atol=0.5)


def test_derive_snr_is_robust_and_nan_aware() -> None:
    rng = np.random.default_rng(0)
    diff = rng.normal(0, 4.0, (63, 63)).astype(np.float32)
    diff[30, 30] = 1e5  # a bright source does not inflate the noise estimate
    diff[:5] = np.nan  # masked rows are ignored
    snr = derive_snr(diff)
    assert np.nanstd(snr[10:25]) == pytest.approx(1.0, abs=0.1)
    assert np.isnan(snr[:5]).all()


# --- the real samples, where present (not in a fresh clone) ----------------------------------
@pytest.mark.skipif(not SHARED_ALERTS.is_dir(), reason="sample alerts of ../shared/data/alerts not present")
def test_real_sample_alerts(card: ModelCard) -> None:
    seen = {}
    for path in sorted(SHARED_ALERTS.glob("*/*.avro")):
        for batch in AlertReader(str(path), card).batches(16):
            for i, s in zip(batch.ids, batch.status, strict=True):
                seen[path.name] = (i, s)
            assert np.isfinite(batch.x).all()
    assert len(seen) == 11
    assert "edge cut-out 48x63" in seen["000010510300844919.avro"][1]
    assert seen["1726958725155000_eb518895.avro"][1].startswith("failed: ")  # a test alert with JPEG cut-outs


# --- broker integration ---------------------------------------------------------------------
def test_classify_cutouts_equals_reader(tmp_path: Path, clf: Classifier) -> None:
    from stampclf.io import classify_cutouts

    full = triplet(7, (63, 63))
    edge = {k: v[15:] for k, v in full.items()}
    blobs = {k: [fits_bytes(full[k]), fits_bytes(edge[k]), None if k == "template" else b"x"] for k in full}
    pred = classify_cutouts(clf, blobs, ids=[1, 2, 3], nominal=63, positions=[(800, 46.5), (800, 16.5), None])
    assert pred.ids.tolist() == [1, 2, 3] and pred.status[2] == "failed: no template cut-out"
    np.testing.assert_allclose(pred.proba[1], pred.proba[0], atol=1e-5)  # the edge cut-out is recentred
    pred = classify_cutouts(clf, blobs, ids=["a", "b", "a"], nominal=63)
    assert pred.status[2] == "failed: no template cut-out"  # a failure stays a failure
    pred = classify_cutouts(clf, {k: v[:2] for k, v in blobs.items()}, ids=["a", "a"], nominal=63)
    assert pred.status[1].endswith("duplicate id")  # as in every other reader
    with pytest.raises(InputError, match=r"ids: shape \(2,\) for 3 stamps"):
        classify_cutouts(clf, blobs, ids=[1, 2], nominal=63)
    as_arrays = {k: np.array(v, dtype=object) for k, v in blobs.items()}  # e.g. a pandas column's to_numpy()
    assert len(classify_cutouts(clf, as_arrays, nominal=63)) == 3
    aliased = {"sci": blobs["science"], "reference": blobs["template"], "diff": blobs["difference"]}
    np.testing.assert_array_equal(classify_cutouts(clf, aliased, nominal=63).proba[:2], pred.proba)
    for bad, message in (
        ({**blobs, "foo": blobs["science"]}, "unknown kind 'foo'"),
        ({**blobs, "ref": blobs["template"]}, "two keys for the template cut-outs"),
        ({k: v[0] for k, v in blobs.items()}, "must hold one cut-out per row"),
        ({**blobs, "science": blobs["science"][:2]}, "different numbers of rows"),
    ):
        with pytest.raises(InputError, match=message):
            classify_cutouts(clf, bad)
    with pytest.raises(InputError, match="expected FITS bytes, got str"):
        decode_fits("cutout.fits")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::ResourceWarning")
def test_spark_udf_example(tmp_path: Path, tiny_model_path: Path) -> None:
    """examples/spark_udf.py on a local Spark session (skipped without pyspark and Java)."""
    import importlib.util
    import shutil

    pytest.importorskip("pyspark")
    pytest.importorskip("pyarrow")
    if shutil.which("java") is None:
        pytest.skip("no Java runtime for Spark")
    spec = importlib.util.spec_from_file_location("spark_udf", Path(__file__).parents[1] / "examples" / "spark_udf.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    trips = [triplet(s, (63, 63)) for s in range(3)]
    recs = [ztf_record(i, t) for i, t in enumerate(trips)]
    recs[1]["cutoutScience"]["stampData"] = b"\xff\xd8\xff not fits"
    path = write_avro(tmp_path / "a.avro", ZTF_SCHEMA, recs, "snappy")
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.master("local[1]").appName("stampclf-test").getOrCreate()
    try:
        spark.sparkContext.addFile(str(tiny_model_path))
        df = example.alerts_dataframe(spark, [str(path)])
        rb = example.make_udf(str(tiny_model_path))("science", "template", "difference", "xpos", "ypos")
        rows = df.withColumn("rb", rb).select("candid", "rb.p", "rb.status").collect()
    finally:
        spark.stop()
    want = next(Classifier(tiny_model_path, device="cpu").classify_file(path))
    assert [r.candid for r in rows] == [str(i) for i in want.ids]
    assert [r.status for r in rows] == want.status.tolist()
    assert rows[1].p is None or np.isnan(rows[1].p)
    np.testing.assert_allclose([rows[0].p, rows[2].p], want.proba[[0, 2], 1], atol=1e-6)


def test_astropy_warnings_stay_quiet_across_threads() -> None:
    """Threads reading non-standard FITS at once must not restore each other's filters.

    ``warnings.catch_warnings`` swaps the process-wide filter list; unserialised, one
    thread's exit re-enables the warning inside another (an error under ``-W error``).
    """
    fits = pytest.importorskip("astropy.io.fits")
    buf = io.BytesIO()
    fits.PrimaryHDU(np.arange(12, dtype=np.int16).reshape(3, 4)).writeto(buf)  # int16: astropy's path
    blob = bytearray(buf.getvalue())
    blob[:80] = b"SIMPLE  = T".ljust(80)  # astropy warns: the card's format is not the standard's
    blob = bytes(blob)

    def read(_: int) -> float:
        return float(decode_fits(blob).sum())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the unserialised version failed ~5 in 2,000
    try:
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(read, range(3000))) == {66.0}
    finally:
        sys.setswitchinterval(interval)
