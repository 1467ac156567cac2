"""Normalisation on the inference device (``prep="device"``) against numpy preprocessing.

The device graphs (``stampclf/_graphs``) are chained to the model with IOBinding on
either device, so these tests run the GPU's code path on the CPU: statuses must be
equal and numbers equal to float rounding, for stamps with masks, constant channels,
zero MAD, empty channels, overflow, padding and any batch length.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HITS_PREPROCESSING, card_dict, image_card_dict, make_stamps, write_hits_h5, write_model
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stampclf import Classifier, Predictions
from stampclf._errors import InputError
from stampclf.preprocess import channel_major, prepare_stamps

GRAPHS = Path(__file__).resolve().parents[1] / "stampclf" / "_graphs"
METHODS = ("robust_asinh", "minmax")


def _card(method: str) -> dict:
    spec = copy.deepcopy(HITS_PREPROCESSING)
    spec["normalisation"] = {"method": method, "softening": 1.7} if method == "robust_asinh" else {"method": method}
    spec["nan_policy"] = {"fill": -0.5, "max_bad_fraction": 0.5, "flag": True}
    return card_dict(preprocessing=spec)


@pytest.fixture(scope="module", params=METHODS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Classifier, Classifier]:
    path = write_model(tmp_path_factory.mktemp("prep") / f"{request.param}.onnx", _card(request.param))
    return (Classifier(path, device="cpu", prep="host", batch_size=32),
            Classifier(path, device="cpu", prep="device", batch_size=32))  # fmt: skip


def _awkward(n: int = 96, seed: int = 0) -> np.ndarray:
    x = make_stamps(n, seed)
    x[0:6, :, :4, :] = np.nan  # masked edge: flagged
    x[6:9, 0] = 0.0  # missing template: constant channel
    x[9:12, 1, ::2] = 7.0  # more than half one value: MAD 0, std instead
    x[12:14, 2] = np.nan  # a channel without a finite pixel: failed
    x[14:17, :, :, :15] = np.inf  # mostly not finite: failed
    x[17, 3, 0, 0], x[17, 3, 0, 1] = 3e38, -3e38  # overflow in the scaling
    x[18, :, 5, 5] = -np.inf
    x[19] = 0.0  # every channel constant
    return x


def _channel_major(x: np.ndarray, extra: int = 0) -> np.ndarray:
    """*x*'s values in channel-major memory, as the HDF5 reader gives them (with *extra*: part of a longer block)."""
    block = np.full((x.shape[1], len(x) + extra, *x.shape[2:]), 99.0, np.float32)
    block[:, : len(x)] = x.transpose(1, 0, 2, 3)
    view = block.transpose(1, 0, 2, 3)[: len(x)]
    assert channel_major(view) and not view.flags.c_contiguous
    return view


@pytest.mark.parametrize("channel_major_input", [False, True])
def test_device_graph_files_are_what_the_builder_makes(channel_major_input: bool) -> None:
    prep_graph = pytest.importorskip("train.prep_graph")
    onnx = pytest.importorskip("onnx")
    for method in METHODS:
        name = prep_graph.graph_name(method, channel_major_input)
        built = prep_graph.build(method, channel_major_input).SerializeToString()
        assert (GRAPHS / name).read_bytes() == built, f"rerun python train/prep_graph.py ({name})"
        # every node has a CUDA kernel: none is sent back to the CPU (ORT's CUDA provider has no Asinh)
        ops = {n.op_type for n in onnx.load(GRAPHS / name).graph.node}
        assert ops <= prep_graph.CUDA_OPS and "Asinh" not in prep_graph.CUDA_OPS
        assert ("Transpose" in ops) == channel_major_input


def test_device_prep_equals_host_on_awkward_stamps(pair: tuple[Classifier, Classifier]) -> None:
    host, dev = pair
    assert (host.prep, dev.prep) == ("host", "device")
    x = _awkward()
    ids = np.arange(len(x))
    ids[40] = ids[41]  # a reader/caller flag merged after the device run
    a, b = host.classify(x, ids), dev.classify(x, ids)
    assert list(a.status) == list(b.status)
    assert {s.split(":")[0] for s in a.status} == {"ok", "flagged", "failed"}
    assert any("constant channel" in s for s in a.status) and any("duplicate id" in s for s in a.status)
    np.testing.assert_allclose(a.proba, b.proba, rtol=0, atol=2e-6)
    assert list(a.labels) == list(b.labels)


@pytest.mark.parametrize("extra", [0, 7])  # a whole block; part of one (copied per channel)
def test_channel_major_input_gives_the_same_rows(pair: tuple[Classifier, Classifier], extra: int) -> None:
    host, dev = pair
    x = _awkward()
    view = _channel_major(x, extra)
    a, a_cm, b_cm = host.classify(x), host.classify(view), dev.classify(view)
    assert dev._runner_now()._cm is not None  # the channel-major graph ran, not a copy into (N, C) order
    assert list(a.status) == list(a_cm.status) == list(b_cm.status)
    np.testing.assert_array_equal(a.proba, a_cm.proba)  # numpy: the same numbers in either memory order
    np.testing.assert_allclose(a.proba, b_cm.proba, rtol=0, atol=2e-6)


def test_channel_major_graph_output_equals_prepare_stamps(pair: tuple[Classifier, Classifier]) -> None:
    _, dev = pair
    x = _awkward(dev.batch_size, seed=4)
    want, _ = prepare_stamps(x, dev.card.input, dev.card.preprocessing)
    np.testing.assert_allclose(_graph_x(dev, _channel_major(x)), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("batch", "chunk"), [(12, 16), (32, 16), (50, None)])  # slices and joins of blocks, a short tail
def test_device_prep_of_a_file_equals_host(
    pair: tuple[Classifier, Classifier], tmp_path: Path, batch: int, chunk: int | None
) -> None:
    host, dev = pair
    h5 = write_hits_h5(tmp_path / "in.h5", stamps=_awkward(50, seed=11), chunks=(chunk, 21, 21) if chunk else None)
    a, b = (Predictions.concat(list(c.classify_file(h5, batch_size=batch))) for c in (host, dev))
    assert list(a.status) == list(b.status) and list(a.ids) == list(b.ids)
    np.testing.assert_allclose(a.proba, b.proba, rtol=0, atol=2e-6)


@pytest.mark.parametrize("prep", ["host", "device"])
def test_the_device_thread_gives_the_same_rows_in_order(tmp_path: Path, prep: str) -> None:
    """CUDA runs each batch on a thread of its own (`BatchRunner.background`); here the same code on the CPU."""
    path = write_model(tmp_path / "m.onnx", _card("robust_asinh"))
    h5 = write_hits_h5(tmp_path / "in.h5", stamps=_awkward(90, seed=12), chunks=(16, 21, 21))
    ref = Predictions.concat(list(Classifier(path, device="cpu", prep=prep, batch_size=16).classify_file(h5)))
    clf = Classifier(path, device="cpu", prep=prep, batch_size=16, threads=1)
    runner = clf._runner_now()
    runner.background = True
    got = Predictions.concat(list(clf.classify_file(h5)))
    assert runner._device_thread is not None  # the batches went through it
    assert list(got.ids) == list(ref.ids) and list(got.status) == list(ref.status)
    np.testing.assert_array_equal(got.proba, ref.proba)
    clf.close()
    assert runner._device_thread is None


def test_a_one_row_batch_stays_on_the_channel_major_graph(tmp_path: Path) -> None:
    # one row is the same bytes in either layout: a file's 1-row tail must not bring the (N, C)
    # graph's session, and its memory, into a run
    dev = Classifier(write_model(tmp_path / "m.onnx", _card("robust_asinh")), device="cpu", prep="device", batch_size=32)
    runner = dev._runner_now()
    runner._prep_binding = None  # the (N, C) graph cannot run now
    h5 = write_hits_h5(tmp_path / "tail.h5", stamps=make_stamps(33, seed=1), chunks=(32, 21, 21))
    res = Predictions.concat(list(dev.classify_file(h5, batch_size=32)))
    assert len(res) == 33 and set(res.status) == {"ok"}
    assert list(dev.classify(make_stamps(1, seed=2)).status) == ["ok"]


def _graph_x(dev: Classifier, x: np.ndarray) -> np.ndarray:
    """The model input the device graph made of one full batch *x* (read back from the bound buffer)."""
    assert len(x) == dev.batch_size
    runner = dev._runner_now()
    runner.submit_raw(x)()
    return runner._x_dev.numpy()


def test_device_graph_output_equals_prepare_stamps(pair: tuple[Classifier, Classifier]) -> None:
    _, dev = pair
    x = _awkward(dev.batch_size, seed=3)
    want, _ = prepare_stamps(x, dev.card.input, dev.card.preprocessing)
    np.testing.assert_allclose(_graph_x(dev, x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [(25, 25), (20, 20), (21, 24)])  # cropped, padded (even count), mixed
def test_device_prep_equals_host_after_crop_or_pad(pair: tuple[Classifier, Classifier], size: tuple[int, int]) -> None:
    host, dev = pair
    x = make_stamps(10, seed=5, size=size)
    x[0, 1, 3, 3] = np.nan
    a, b = host.classify(x), dev.classify(x)
    assert list(a.status) == list(b.status)
    np.testing.assert_allclose(a.proba, b.proba, rtol=0, atol=2e-6)


@pytest.mark.parametrize("n", [0, 1, 31, 33, 200])  # empty, short, around a batch, several batches (streamed)
def test_device_prep_any_length(pair: tuple[Classifier, Classifier], n: int) -> None:
    host, dev = pair
    x = _awkward(max(n, 20), seed=n)[:n]
    a, b = host.classify(x), dev.classify(x)
    assert len(b) == n and list(a.status) == list(b.status)
    np.testing.assert_allclose(a.proba, b.proba, rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def prop_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Classifier, Classifier]:
    path = write_model(tmp_path_factory.mktemp("prop") / "m.onnx", _card("robust_asinh"))
    return (Classifier(path, device="cpu", prep="host", batch_size=16),
            Classifier(path, device="cpu", prep="device", batch_size=16))  # fmt: skip


@settings(max_examples=30, deadline=None)
@example(seed=0, masked=0.0, scale=1e-30, ties=True)  # found: asinh of |y| < 6e-8 must not round to 0
@given(
    seed=st.integers(0, 2**16),
    masked=st.floats(0.0, 0.9),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]),
    ties=st.booleans(),
)
def test_device_prep_matches_host_property(
    prop_pair: tuple[Classifier, Classifier], seed: int, masked: float, scale: float, ties: bool
) -> None:
    host, dev = prop_pair
    rng = np.random.default_rng(seed)
    x = make_stamps(dev.batch_size, seed) * np.float32(scale)
    if ties:
        x = np.round(x / np.float32(scale * 20)) * np.float32(scale * 20)  # many equal pixels
    x[rng.random(x.shape) < masked] = np.nan
    a, b = host.classify(x), dev.classify(x)
    assert list(a.status) == list(b.status)
    np.testing.assert_allclose(_graph_x(dev, x), prepare_stamps(x, dev.card.input, dev.card.preprocessing)[0],
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def test_prep_choice(tiny_model_path: Path, tmp_path: Path) -> None:
    assert Classifier(tiny_model_path, device="cpu").prep == "host"  # numpy is faster on a CPU
    with pytest.raises(InputError, match="unknown prep 'gpu'"):
        Classifier(tiny_model_path, device="cpu", prep="gpu")
    images = write_model(tmp_path / "img.onnx", image_card_dict())
    with pytest.raises(InputError, match="model 'tiny_image' has image preprocessing"):
        Classifier(images, device="cpu", prep="device")
    spec = copy.deepcopy(HITS_PREPROCESSING)
    spec["normalisation"] = {"method": "none"}
    plain = write_model(tmp_path / "none.onnx", card_dict(preprocessing=spec))
    with pytest.raises(InputError, match="normalisation 'none', which runs on the host only"):
        Classifier(plain, device="cpu", prep="device")


def test_cli_prep_device_writes_the_same_rows(tiny_model_path: Path, tmp_path: Path) -> None:
    stamps = _awkward(50, seed=9)
    h5 = write_hits_h5(tmp_path / "in.h5", stamps=stamps)
    rows = {}
    for prep in ("host", "device"):
        out = tmp_path / f"{prep}.csv"
        r = subprocess.run(
            [sys.executable, "-m", "stampclf", "classify", str(h5), "-m", str(tiny_model_path), "--device", "cpu",
             "--prep", prep, "-b", "16", "-o", str(out), "-q"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        rows[prep] = out.read_text().splitlines()
    assert len(rows["host"]) == 51
    for a, b in zip(rows["host"], rows["device"], strict=True):
        fa, fb = a.split(","), b.split(",")
        assert [f for f in fa if not _is_float(f)] == [f for f in fb if not _is_float(f)]
        np.testing.assert_allclose([float(f) for f in fa if _is_float(f)], [float(f) for f in fb if _is_float(f)],
                                   atol=1e-5)  # fmt: skip


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return "." in text or "nan" in text.lower()


def test_auto_falls_back_to_host_when_the_graph_cannot_run(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stampclf.classifier as classifier_mod
    from stampclf._errors import DeviceError

    real = classifier_mod.create_session

    def fake(data: bytes, device: str, threads: int | None = None, **kw: object) -> object:
        if str(kw.get("source", "")).endswith("robust_asinh.onnx"):
            raise DeviceError("device cuda: CUDA cannot be used: TopK not supported here")
        info = real(data, "cpu", threads, **kw)
        info.device = "cuda"  # as if the model ran on a GPU: auto then wants the device graph
        return info

    monkeypatch.setattr(classifier_mod, "create_session", fake)
    clf = Classifier(tiny_model_path, device="auto")
    assert clf.prep == "host" and "prep auto: normalising on the host (device cuda" in (clf.notice or "")
    with pytest.raises(DeviceError, match="TopK not supported"):
        Classifier(tiny_model_path, device="auto", prep="device")


def test_preprocessed_input_skips_the_device_graph(pair: tuple[Classifier, Classifier]) -> None:
    host, dev = pair
    x, _ = prepare_stamps(make_stamps(100, seed=21), host.card.input, host.card.preprocessing)
    np.testing.assert_array_equal(dev.predict_proba(x, preprocessed=True), host.predict_proba(x, preprocessed=True))
    assert dev._runner_now().parallel == dev.threads  # model-only calls keep the CPU's parallel sessions
