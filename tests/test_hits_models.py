"""HiTS models: ONNX export with rotations inside the graph, rotation invariance, the hits_sim loader."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from train.data import hits as hits_data  # noqa: E402
from train.export import Deployable, to_onnx_bytes  # noqa: E402
from train.models._layers import Rot4  # noqa: E402
from train.registry import create_model, get_spec, list_models  # noqa: E402

HITS_MODELS = [n for n in list_models() if get_spec(n).dataset == "hits_sim"]
SHAPE = (4, 21, 21)


def _net(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model(name)
    # untrained BatchNorm has unit statistics; give it some so that the test means something
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return Deployable(net, temperature=1.3).eval()


def _stamps(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1.5, (n, *SHAPE)).astype(np.float32)


def test_registry_has_the_hits_models() -> None:
    assert {"hits", "hits-tiny", "hits-fullres", "hits-deep", "hits-seed-pytorch", "hits-seed-keras"} <= set(HITS_MODELS)
    for name in HITS_MODELS:
        spec = get_spec(name)
        assert spec.recipe == get_spec("hits").recipe, f"{name}: every HiTS model uses the same recipe"
        assert spec.preprocessing == get_spec("hits").preprocessing


@pytest.mark.parametrize("name", HITS_MODELS)
def test_export_matches_torch(name: str) -> None:
    model = _net(name)
    sess = ort.InferenceSession(to_onnx_bytes(model, SHAPE, "stamps"), providers=["CPUExecutionProvider"])
    x = _stamps(5)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = sess.run(None, {"stamps": x})[0]
    assert got.shape == (5, 2)
    assert np.abs(got - ref).max() <= 1e-5
    if any(isinstance(m, Rot4) for m in model.modules()):
        # the rotations are in the graph: ONNX gives the same output for a rotated stamp (mean join)
        # or at least runs the rotated views (concat join: checked against torch above)
        rot = np.ascontiguousarray(np.rot90(x, 1, (2, 3)))
        with torch.no_grad():
            ref_rot = model(torch.from_numpy(rot)).numpy()
        assert np.abs(sess.run(None, {"stamps": rot})[0] - ref_rot).max() <= 1e-5


@pytest.mark.parametrize("name", [n for n in HITS_MODELS if any(
    isinstance(m, Rot4) and m.join == "mean" for m in create_model(n).modules())])
def test_mean_join_is_rotation_invariant(name: str) -> None:
    model = _net(name)
    x = torch.from_numpy(_stamps(6, seed=1))
    with torch.no_grad():
        p = model(x)
        for k in (1, 2, 3):
            assert torch.allclose(model(torch.rot90(x, k, (2, 3))), p, atol=1e-6)
        # a mirror is not one of the four views: not invariant by construction
        assert not torch.allclose(model(x.flip(3)), p, atol=1e-6)


def test_concat_join_permutes_the_views() -> None:
    """Deep-HiTS concatenation: rotating the stamp rotates the order of the four feature blocks,
    so the dense layer after it is invariant only as far as training made it."""
    torch.manual_seed(0)
    rot = Rot4(torch.nn.Sequential(torch.nn.Conv2d(4, 3, 3), torch.nn.Flatten()), join="concat").eval()
    x = torch.from_numpy(_stamps(2, seed=2))
    with torch.no_grad():
        f = rot(x).reshape(2, 4, -1)
        g = rot(torch.rot90(x, 1, (2, 3))).reshape(2, 4, -1)
    assert torch.allclose(g, torch.roll(f, -1, dims=1), atol=1e-6)
    assert not torch.allclose(g, f, atol=1e-3)


def test_loader_returns_preprocessed_finite_tensors() -> None:
    spec = get_spec("hits")
    opts = {"n_train": 64, "n_val": 32, "n_test": 32, "real_sn": "none", "sim_workers": 1}
    data = hits_data.load_hits(spec, opts, seed=0)
    for split, n in ((data.train, 64), (data.val, 32), (data.test, 32)):
        x, y = split.tensors
        assert x.shape == (n, *SHAPE) and x.dtype == torch.float32
        assert torch.isfinite(x).all()
        assert set(y.tolist()) == {0, 1} and int(y.sum()) == n // 2  # balanced
        assert float(x.abs().max()) < 30  # asinh-scaled, not raw ADU
    assert data.extra_tests == {}
    assert data.provenance["split_seeds"] == {"train": 1, "val": 2, "test": 3}
    # the splits are different draws (disjoint seeds)
    assert not torch.equal(data.val.tensors[0][:16], data.test.tensors[0][:16])


def test_simulation_does_not_depend_on_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_spec("hits")
    monkeypatch.setattr(hits_data, "SHARD", 24)
    one = hits_data.simulate_prepared(60, 5, spec.input, spec.preprocessing, workers=1)
    two = hits_data.simulate_prepared(60, 5, spec.input, spec.preprocessing, workers=2)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)
    raw, labels, _ = hits_data.simulate_prepared(24, 5, None, None, workers=1)
    np.testing.assert_array_equal(labels, one[1][:24])
    assert not np.allclose(raw, one[0][:24])  # raw pixels, not the preprocessed input


def test_augment_rotates_mirrors_and_derives_snr() -> None:
    x = torch.from_numpy(_stamps(64, seed=3))
    y = torch.arange(64) % 2
    gen = torch.Generator().manual_seed(0)
    xa, ya = hits_data.HitsAugment(snr_derived=1.0)(x, y, gen)
    assert torch.equal(ya, y)
    assert torch.equal(xa[:, 3], xa[:, 2])  # SNR channel = difference channel
    xb, _ = hits_data.HitsAugment(snr_derived=0.0)(x, y, gen)
    # every stamp is one of the 8 symmetries of the original
    views = [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(3)) for k in range(4)]
    assert all(any(torch.equal(xb[i], v[i]) for v in views) for i in range(64))


def test_evaluate_hits_runs_through_the_runtime(tiny_model_path, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from train import evaluate_hits

    out = tmp_path / "eval.json"
    argv = ["--model", str(tiny_model_path), "--n", "48", "--workers", "1", "--real-sn", "none", "--decam", "none",
            "--json", str(out), "--markdown"]
    assert evaluate_hits.main(argv) == 0
    (r,) = json.loads(out.read_text())
    m = r["sim_test"]
    assert m["n"] == 48 and m["split_seed"] == evaluate_hits.EVAL_SPLIT_SEED
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 1.0
    assert sum(k["n"] for k in m["per_kind"].values()) == 48
    assert {k["label"] for k in m["per_kind"].values()} == {"real", "bogus"}
    assert "real_sn" not in r and "decam" not in r
    assert "| `tiny` |" in capsys.readouterr().out


def test_evaluate_hits_counts_the_flops_of_a_renamed_model(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import card_dict, write_model

    from train import evaluate_hits

    card = card_dict(name="my-hits")
    card["training"] = {**card["training"], "architecture": "hits", "parameters": 123}
    path = write_model(tmp_path / "my-hits.onnx", card)
    asked: list[tuple[str, int | None]] = []
    monkeypatch.setattr(evaluate_hits, "mflop_per_stamp", lambda name, params=None: asked.append((name, params)) or 1.0)
    r = evaluate_hits.evaluate(str(path), None, None, None, threads=1)
    assert asked == [("hits", 123)] and r["name"] == "my-hits" and r["mflop_per_stamp"] == 1.0


def test_cache_round_trip(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = ["--set", "n_train=40", "--set", "n_val=8", "--set", "n_test=8", "--set", "sim_workers=1"]
    assert hits_data.main(["--cache", str(tmp_path), "--epochs", "1", *sizes]) == 0
    assert "cached 40 8 8" in capsys.readouterr().out
    assert len(list(tmp_path.glob("hits_sim_*_x.npy"))) == 3
    opts = {"n_train": 40, "n_val": 8, "n_test": 8, "real_sn": "none", "sim_workers": 1}
    fresh = hits_data.load_hits(get_spec("hits"), opts, seed=0)
    cached = hits_data.load_hits(get_spec("hits"), {**opts, "cache": str(tmp_path)}, seed=0)
    assert fresh.provenance["sha256"] == cached.provenance["sha256"]
    assert torch.equal(fresh.train.tensors[0], cached.train.tensors[0])
