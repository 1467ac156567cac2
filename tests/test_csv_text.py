"""CSV text built by numpy (`stampclf.io._csvtext`) is exactly what ``csv.writer`` writes with ``%.7g``."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from stampclf.io._csvtext import _csv_text, csv_rows


def reference(ids, labels, proba, status, fixed, more) -> str:  # type: ignore[no-untyped-def]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for i in range(len(ids)):
        p = ["" if not np.isfinite(v) else f"{v:.7g}" for v in proba[i].tolist()]
        w.writerow([ids[i], labels[i], *p, status[i], *fixed, *(m[i] for m in more)])
    return buf.getvalue()


def as_text(values: np.ndarray) -> list[str]:
    """Each value through the numpy way, one row each (the other columns constant)."""
    n = len(values)
    text = csv_rows(np.zeros(n, np.int64), np.full(n, "a", object), values[:, None], np.full(n, "ok", object), [], [], ["a"])
    assert text is not None
    return [line.split(",")[2] for line in text.splitlines()]


def near_decades_and_ties(dtype: type) -> np.ndarray:
    """Values where %.7g rounding is easiest to get wrong: next to powers of ten, and next to x.5 in the 8th digit."""
    rng = np.random.default_rng(0)
    lo, hi = (-44, 38) if dtype is np.float32 else (-320, 306)
    out = []
    for k in range(lo, hi):
        for base in (10.0**k, 10.0**k * (1 - 5e-8), 10.0**k * (1 - 5.0001e-8), 10.0**k * (1 - 4.9999e-8)):
            x = dtype(base)
            for _ in range(3):
                out += [x, np.nextafter(x, dtype(0))]
                x = np.nextafter(x, dtype(np.inf))
        for j in rng.integers(10**6, 10**7, 3):
            x = dtype((j + 0.5) * 10.0 ** (k - 6))
            out += [x, np.nextafter(x, dtype(0)), np.nextafter(x, dtype(np.inf))]
    return np.array(out, dtype)


@pytest.mark.parametrize(
    "case", ["uniform float32", "tiny float32", "float32 bit patterns", "float64 bit patterns", "float32 edges",
             "float64 edges", "powers of two", "special"],
)  # fmt: skip
def test_floats_are_printf_7g(case: str) -> None:
    rng = np.random.default_rng(len(case))
    values = {
        "uniform float32": lambda: rng.random(20_000).astype(np.float32),
        "tiny float32": lambda: (rng.random(20_000) ** 30).astype(np.float32),  # exponent notation, denormals
        "float32 bit patterns": lambda: rng.integers(0, 2**32, 40_000, dtype=np.uint32).view(np.float32),
        "float64 bit patterns": lambda: rng.integers(0, 2**64, 40_000, dtype=np.uint64).view(np.float64),
        "float32 edges": lambda: near_decades_and_ties(np.float32),
        "float64 edges": lambda: near_decades_and_ties(np.float64),
        "powers of two": lambda: np.array([2.0**k for k in range(-149, 128)], np.float32),  # exact ties: 2**-11
        "special": lambda: np.array(
            [0.0, -0.0, 1.0, -1.0, 0.5, 1e-4, 9.9999995e-05, 1e-5, 999999.5, 9999999.5, 1234567.5, 1e7, 123.0, 100.0,
             1e-300, -1e300, 5e-324, 1.7976931348623157e308, np.nan, np.inf, -np.inf], np.float64,
        ),  # fmt: skip
    }[case]()
    expected = ["" if not np.isfinite(v) else f"{v:.7g}" for v in values.tolist()]
    assert as_text(values) == expected


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint64", "uint8", "int8"])
def test_integer_ids_are_str(dtype: str) -> None:
    info = np.iinfo(dtype)
    ids = np.array([0, 1, 9, 10, 99, 12345, info.max, info.min, info.max - 1, *range(-3, 200)], dtype=object)
    ids = np.array([v for v in ids if info.min <= v <= info.max], dtype=dtype)
    n = len(ids)
    text = csv_rows(ids, np.full(n, "a", object), np.zeros((n, 1), np.float32), np.full(n, "ok", object), [], [], [])
    assert text is not None and [line.split(",")[0] for line in text.splitlines()] == [str(v) for v in ids.tolist()]


def test_a_batch_is_what_csv_writer_writes() -> None:
    rng = np.random.default_rng(3)
    n = 500
    ids = rng.integers(-(10**12), 10**12, n)
    proba = rng.random((n, 3)).astype(np.float32) ** 9
    proba[5] = np.nan  # a failed row: empty fields
    proba[9, 1] = np.inf
    labels = np.array(["réel", "bogus", "x"] * (n // 3) + ["réel"] * (n % 3), dtype=object)  # UTF-8 class name
    labels[5] = ""
    status = np.full(n, "ok", dtype=object)
    status[5] = "failed: 441 of 1764 pixels not finite"
    status[7::50] = "flagged: 3 non-finite pixels replaced"
    fixed = ["hits", "1.1.0", "/data/100%/night 1.h5"]
    more = [[f"e{i % 4}" for i in range(n)], ["" for _ in range(n)]]  # few distinct values, and empty ones
    text = csv_rows(ids, labels, proba, status, fixed, more, ["réel", "bogus", "x"])
    assert text == reference(ids, labels, proba, status, fixed, more)


@pytest.mark.parametrize("where", ["status", "label", "extra", "two columns", "first and last rows", "many", "very long"])
def test_rows_with_long_text_are_written_by_python_in_place(where: str) -> None:
    n = 2000
    rng = np.random.default_rng(4)
    ids = np.arange(n) * 3
    proba = rng.random((n, 2)).astype(np.float32)
    proba[11] = np.nan
    labels = np.array(["a", "b"] * (n // 2), dtype=object)
    status = np.full(n, "ok", dtype=object)
    more = [np.array(["x", "y"] * (n // 2), dtype=object)]
    rows = [11, 500, 501, 1999] if where != "first and last rows" else [0, n - 1]
    if where == "many":  # over 1 in 16: every row takes their room instead
        rows = list(range(0, n, 9))
    for k, i in enumerate(rows):
        long = f"failed: {'é' * (20 + k)} of 441 pixels" if where != "many" else "failed: 441 of 441 pixels not finite"
        if where == "very long":  # longer than any row's room: only Python can write it
            long = "failed: " + "x" * 4000
        if where in ("status", "first and last rows", "many", "two columns", "very long"):
            status[i] = long
        if where in ("label", "two columns"):
            labels[i] = "a-very-long-class-name-" + "z" * k
        if where == "extra":
            more[0][i] = long
    text = csv_rows(ids, labels, proba, status, ["m", "1"], more, ["a", "b"])
    assert text == reference(ids, labels, proba, status, ["m", "1"], more)


@pytest.mark.parametrize("more", [[], [["x"] * 40]])
def test_no_fixed_columns(more: list[list[str]]) -> None:
    n = 40
    status = ["ok"] * n
    status[3] = "y" * 40  # written by Python
    args = (np.arange(n), ["a"] * n, np.full((n, 1), 0.5), status, [], more)
    assert csv_rows(*args, ["a"]) == reference(*args)
    assert _csv_text(*args) == reference(*args)  # 40 rows: one % format


def test_a_file_name_that_is_not_utf8_keeps_its_bytes() -> None:
    import os

    name = os.fsdecode(b"/data/st\xffamps.h5")  # a lone surrogate, as Linux file names come
    n = 3
    args = (np.arange(n), np.array(["a"] * n, object), np.full((n, 1), 0.5), np.array(["ok"] * n, object))
    text = csv_rows(*args, ["m", "1", name], [], ["a"])
    assert text == reference(*args, ["m", "1", name], [])
    assert text.encode("utf-8", "surrogateescape").splitlines()[0] == b"0,a,0.5,ok,m,1,/data/st\xffamps.h5"


@pytest.mark.parametrize(
    "case", ["text ids", "float ids", "quoting", "many distinct", "not text", "quoting in fixed", "2-D ids",
             "long double", "many very long statuses"],
)  # fmt: skip
def test_other_batches_go_the_general_way(case: str) -> None:
    n = 300
    ids: np.ndarray = np.arange(n)
    labels = np.array(["a", "b"] * (n // 2), dtype=object)
    status = np.full(n, "ok", dtype=object)
    proba = np.random.default_rng(1).random((n, 2)).astype(np.float32)
    fixed, more = ["m", "1"], []
    if case == "text ids":
        ids = np.array([f"c{i}" for i in range(n)], dtype=object)
    if case == "float ids":
        ids = np.arange(n) + 0.5
    if case == "quoting":
        status[3] = 'flagged: a, "b"'
    if case == "many distinct":
        more = [[f"alert{i}" for i in range(n)]]
    if case == "not text":
        more = [[i % 3 for i in range(n)]]
    if case == "quoting in fixed":
        fixed = ["m", "a,b"]
    if case == "2-D ids":
        ids = ids[:, None]
    if case == "long double":  # past float64's range: "inf", not empty as a float64 cast would make it
        proba = proba.astype(np.longdouble)
        proba[0, 0] = np.longdouble("1e4000") if np.finfo(np.longdouble).max > 1e4000 else np.inf
    if case == "many very long statuses":  # every row would take their room
        status[::10] = "failed: " + "x" * 4000
    assert csv_rows(ids, labels, proba, status, fixed, more, ["a", "b"]) is None
    text = _csv_text(ids, labels, proba, status, fixed, [[str(v) for v in m] for m in more], ["a", "b"])
    if case in ("quoting", "quoting in fixed"):
        assert text is None  # the writer then quotes through csv.writer itself
    elif case == "2-D ids":
        assert text is not None and text.startswith("[0],a,")
    else:
        assert text == reference(ids, labels, proba, status, fixed, [[str(v) for v in m] for m in more])


def test_the_writer_uses_numpy_for_a_large_batch(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stampclf.io import _csvtext
    from stampclf.io._writers import ResultWriter

    calls: list[int] = []
    real = _csvtext.csv_rows
    monkeypatch.setattr(_csvtext, "csv_rows", lambda ids, *a: calls.append(len(ids)) or real(ids, *a))
    rng = np.random.default_rng(5)
    batches = [5000, 10, 3000]  # numpy, %, numpy
    out = tmp_path / "out.csv"
    w = ResultWriter(str(out), ["bogus", "real"], "hits", "1.1.0")
    rows = []
    for k, n in enumerate(batches):
        ids = rng.integers(0, 10**15, n)
        proba = rng.random((n, 2)).astype(np.float32) ** 5
        labels = np.asarray(["bogus", "real"], dtype=object)[(proba[:, 1] > 0.5).astype(int)]
        status = np.full(n, "ok", dtype=object)
        status[::97] = "flagged: 2 non-finite pixels replaced"
        w.write(ids, labels, proba, status, f"night{k}.h5")
        rows.append(reference(ids, labels, proba, status, ["hits", "1.1.0", f"night{k}.h5"], []))
    w.commit()
    header = "id,label,p_bogus,p_real,status,model,model_version,file\n"
    assert calls == [5000, 3000] and out.read_text() == header + "".join(rows)


@pytest.mark.parametrize(
    "case", ["labels", "statuses", "unicode", "numpy str", "many distinct", "not text", "mixed", "empty", "2-D"],
)  # fmt: skip
def test_hdf5_text_is_each_value_encoded(case: str) -> None:
    """The HDF5 writer's text of labels and statuses (`_encode_few`), looked up per distinct value, is ``str(v).encode()`` of every value."""
    from stampclf.io._writers import _encode_few

    rng = np.random.default_rng(len(case))
    pick = rng.integers(0, 3, 5000)
    values = {
        "labels": lambda: np.array(["bogus", "real", "real"], object)[pick],
        "statuses": lambda: np.array(["ok", "flagged: 3 pixels saturated", "failed: " + "x" * 300], object)[pick],
        "unicode": lambda: np.array(["é", "猫", "ok\0"], object)[pick],
        "numpy str": lambda: np.array(["b", "a", "c"])[pick],  # a "U" array
        "many distinct": lambda: np.array([f"alert{i}" for i in rng.integers(0, 10**6, 5000)], object),
        "not text": lambda: np.array([1, True, "a"], object)[pick],  # 1 == True: a lookup would merge them
        "mixed": lambda: np.array([np.str_("ok"), "ok", None], object)[pick],
        "empty": lambda: np.array([], object),
        "2-D": lambda: np.array(["x", "yy", "z"], object)[pick].reshape(50, 100),
    }[case]()
    got = _encode_few(values)
    expected = np.array([str(v).encode("utf-8") for v in values.ravel().tolist()] or [b""], dtype="S")[: values.size]
    assert got.dtype == expected.dtype and got.shape == values.shape
    assert got.ravel().tolist() == expected.tolist()
