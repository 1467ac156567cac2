"""Property-based tests: random shapes, dtypes and values against the documented behaviour.

The library either classifies (one row per input row, in order; probabilities finite and
summing to 1 for every scored row; failed rows NaN with an empty label) or raises
`InputError` — and it raises exactly when the input is one of the documented errors.
Results do not depend on the batch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import card_dict, make_stamps, write_hits_h5, write_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stampclf import Classifier, InputError, Predictions

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
DTYPES = ["float32", "float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "uint64"]


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Classifier]:
    d = tmp_path_factory.mktemp("prop_models")
    strict = card_dict()
    strict["preprocessing"]["size_policy"] = "strict"
    minmax = card_dict()
    minmax["preprocessing"]["normalisation"] = {"method": "minmax"}
    paths = {
        "crop_or_pad": write_model(d / "tiny.onnx"),
        "strict": write_model(d / "strict.onnx", strict),
        "minmax": write_model(d / "minmax.onnx", minmax, seed=3),
    }
    return {k: Classifier(p, device="cpu", threads=1) for k, p in paths.items()}


@st.composite
def raw_stamps(draw: st.DrawFn) -> np.ndarray:
    """Arrays of many shapes and dtypes with NaN, inf, huge, constant and normal values.

    Most examples are valid (4 axes, 4 channels, a numeric dtype) with odd sizes and values;
    the rest change one thing: the dtype, the number of axes or the number of channels.
    """
    change = draw(st.sampled_from(["none"] * 5 + ["dtype", "ndim", "channels"]))
    n = draw(st.integers(0, 5))
    c = draw(st.sampled_from([1, 3, 5, 8])) if change == "channels" else 4
    h = draw(st.sampled_from([21, 21, 0, 1, 5, 14, 15, 20, 22, 25, 30]))
    w = draw(st.sampled_from([21, 21, h, 0, 1, 15, 19, 27]))
    ndim = draw(st.sampled_from([2, 3, 5])) if change == "ndim" else 4
    shape = {4: (n, c, h, w), 3: (n, h, w), 5: (n, c, h, w, 1), 2: (n, h * w)}[ndim]
    bad_dtypes = ["bool", "complex64", "<U2", "object"]
    dtype = np.dtype(draw(st.sampled_from(bad_dtypes if change == "dtype" else DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-30, 30))
    x = rng.normal(0, 1, shape) * scale + draw(st.floats(-1e3, 1e3))
    kind = draw(st.sampled_from(["normal", "constant", "nan_some", "nan_most", "inf", "huge", "all_nan"]))
    if x.size:
        if kind == "constant":
            x[...] = draw(st.floats(-1e6, 1e6))
        elif kind in ("nan_some", "nan_most"):
            x[rng.random(shape) < (0.05 if kind == "nan_some" else 0.7)] = np.nan
        elif kind == "inf":
            x[rng.random(shape) < 0.1] = draw(st.sampled_from([np.inf, -np.inf]))
        elif kind == "huge":
            x[rng.random(shape) < 0.2] = draw(st.sampled_from([1e300, -1e300, 3.4e38, -3.4e38, 1e-300]))
        elif kind == "all_nan":
            x[...] = np.nan
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        x = np.clip(np.nan_to_num(x, posinf=info.max, neginf=info.min), info.min, info.max)
    if dtype.kind == "U":
        return x.astype(str).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype)


def expected_error(x: np.ndarray, strict: bool) -> bool:
    """True when the documented behaviour for *x* is an `InputError`."""
    if x.dtype.kind not in "fiu" or x.ndim != 4 or x.shape[1] != 4:
        return True
    size_ok = x.shape[2:] == (21, 21)
    if strict:
        return not size_ok
    return not size_ok and x.shape[0] > 0 and x.shape[2] * x.shape[3] == 0


def check_predictions(pred: Predictions, n: int, clf: Classifier) -> None:
    assert len(pred) == len(pred.labels) == len(pred.status) == n
    assert pred.proba.shape == (n, len(clf.classes)) and pred.proba.dtype == np.float32
    for s in pred.status:
        assert s == "ok" or s.startswith("flagged: ") or s.startswith("failed: "), s
    failed = np.array([s.startswith("failed") for s in pred.status], dtype=bool)
    assert np.isnan(pred.proba[failed]).all()
    assert all(lab == "" for lab in pred.labels[failed])
    scored = pred.proba[~failed]
    assert np.isfinite(scored).all(), "probabilities are always finite for scored rows"
    assert ((scored >= 0) & (scored <= 1)).all()
    np.testing.assert_allclose(scored.sum(axis=1), 1.0, atol=1e-5)
    assert set(pred.labels[~failed]) <= set(clf.classes)


@SETTINGS
@given(x=raw_stamps(), policy=st.sampled_from(["crop_or_pad", "strict", "minmax"]))
def test_random_arrays_classify_or_raise_documented_error(
    classifiers: dict[str, Classifier], x: np.ndarray, policy: str
) -> None:
    clf = classifiers[policy]
    should_fail = expected_error(x, strict=policy == "strict")
    event(f"{'error' if should_fail else 'classified'}: {x.dtype.kind} ndim {x.ndim} size {x.shape[2:] == (21, 21)}")
    try:
        pred = clf.classify(x)
    except InputError as exc:
        assert should_fail, f"unexpected InputError for shape {x.shape} {x.dtype}: {exc}"
        assert str(exc).startswith("stamps: ") and "\n" not in str(exc)
        return
    assert not should_fail, f"shape {x.shape} dtype {x.dtype} should have raised InputError"
    check_predictions(pred, x.shape[0], clf)


@st.composite
def float_batches(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(1, 40))
    x = make_stamps(n, seed=draw(st.integers(0, 10_000)), size=draw(st.sampled_from([(21, 21), (25, 25), (17, 23)])))
    rng = np.random.default_rng(n)
    for i in draw(st.lists(st.integers(0, n - 1), max_size=5)):
        x[i][rng.random(x[i].shape) < draw(st.sampled_from([0.01, 0.4, 0.9]))] = np.nan
    return x


@SETTINGS
@given(x=float_batches(), data=st.data())
def test_output_order_equals_input_order(
    classifiers: dict[str, Classifier], x: np.ndarray, data: st.DataObject
) -> None:
    clf = classifiers["crop_or_pad"]
    perm = np.array(data.draw(st.permutations(range(len(x)))), dtype=int)
    ids = np.arange(len(x)) * 10
    a = clf.classify(x, ids=ids)
    b = clf.classify(x[perm], ids=ids[perm])
    np.testing.assert_array_equal(b.ids, a.ids[perm])
    np.testing.assert_array_equal(b.proba, a.proba[perm])
    assert list(b.status) == list(a.status[perm]) and list(b.labels) == list(a.labels[perm])


@pytest.fixture(scope="module")
def batch_classifiers(tmp_path_factory: pytest.TempPathFactory) -> list[Classifier]:
    path = write_model(tmp_path_factory.mktemp("batch") / "tiny.onnx")
    return [Classifier(path, device="cpu", batch_size=b, threads=1) for b in (1, 7, 4096)]


@settings(max_examples=10, deadline=None)
@given(x=float_batches())
def test_batch_size_does_not_change_results(batch_classifiers: list[Classifier], x: np.ndarray) -> None:
    results = [c.classify(x) for c in batch_classifiers]
    for r in results[1:]:
        np.testing.assert_array_equal(r.proba, results[0].proba)
        assert list(r.status) == list(results[0].status) and list(r.labels) == list(results[0].labels)


def _collect(clf: Classifier, path: Path, batch_size: int) -> Predictions:
    parts = list(clf.classify_file(path, batch_size=batch_size))
    if not parts:
        return Predictions(np.empty(0), np.empty(0, object), np.empty((0, 2), np.float32), np.empty(0, object))
    return Predictions(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("ids", "labels", "proba", "status")))


def test_batch_size_does_not_change_file_results(tmp_path: Path, batch_classifiers: list[Classifier]) -> None:
    x = make_stamps(50, seed=5)
    x[3, 1] = np.nan
    x[7, :, :4] = np.inf
    for layout in ("channels", "stacked"):
        chunks = (8, 4, 21, 21) if layout == "stacked" else (8, 21, 21)
        path = write_hits_h5(tmp_path / f"{layout}.h5", stamps=x, layout=layout, chunks=chunks)
        results = [_collect(c, path, b) for c, b in zip(batch_classifiers, (1, 7, 4096), strict=True)]
        for r in results:
            np.testing.assert_array_equal(r.ids, np.arange(50) + 1000)
            np.testing.assert_array_equal(r.proba, results[0].proba)
            assert list(r.status) == list(results[0].status)
        np.testing.assert_array_equal(results[0].proba, batch_classifiers[0].classify(x).proba)


@st.composite
def hdf5_specs(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 12))
    size = draw(st.sampled_from([(21, 21), (25, 25), (21, 25), (9, 9), (0, 0)]))
    dtype = draw(st.sampled_from(["float32", "float64", "int16", "uint8", "bool"]))
    layout = draw(st.sampled_from(["channels", "stacked"]))
    x = make_stamps(n, seed=draw(st.integers(0, 1000)), size=size)
    if n and draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = np.nan
    ids = draw(st.sampled_from(["default", None, "dup", "short"]))
    id_arr: Any = {"default": "default", None: None, "dup": np.zeros(n, int), "short": np.arange(max(n - 1, 0))}[ids]
    return dict(
        stamps=np.nan_to_num(x).astype(dtype) if dtype != "float32" else x,
        layout=layout,
        ids=id_arr,
        flatten=layout == "channels" and size[0] == size[1] and draw(st.booleans()),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=hdf5_specs())
def test_random_hdf5_files_classify_or_raise_input_error(
    classifiers: dict[str, Classifier], tmp_path: Path, spec: dict[str, Any]
) -> None:
    clf = classifiers["crop_or_pad"]
    path = write_hits_h5(tmp_path / "random.h5", **spec)
    x = spec["stamps"]
    try:
        pred = _collect(clf, path, 5)
    except InputError as exc:
        assert str(exc).startswith(str(path)), exc
        expected = (
            x.dtype.kind == "b"
            or (isinstance(spec["ids"], np.ndarray) and len(spec["ids"]) != len(x))
            or (len(x) > 0 and x.shape[2] * x.shape[3] == 0)
        )
        assert expected, f"unexpected error: {exc}"
        return
    assert x.dtype.kind != "b"
    check_predictions(pred, len(x), clf)
    if isinstance(spec["ids"], np.ndarray) and len(x) > 1:  # all ids equal: every row after the first flagged
        assert all("duplicate id" in s or s.startswith("failed") for s in pred.status[1:])
