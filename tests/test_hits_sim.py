"""Fast tests of the HiTS candidate simulator (train/data/hits_sim.py) and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
from train.data import hits_sim  # noqa: E402
from train.data.hits_sim import CENTRE_HALF, DETECT_SNR, KINDS, NAN_KINDS, REAL_KINDS, simulate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "hits"
IMAGES = ("temp_images", "sci_images", "diff_images", "SNR_images")
N = 600


@pytest.fixture(scope="module")
def sim() -> dict[str, np.ndarray]:
    return simulate(N, seed=11)


def test_shapes_dtypes(sim):
    for k in IMAGES:
        assert sim[k].shape == (N, 21, 21) and sim[k].dtype == np.float32
    assert sim["labels"].shape == (N,) and sim["labels"].dtype == np.int64
    assert sim["kind"].shape == (N,) and sim["kind"].dtype == np.int16
    assert set(np.unique(sim["labels"])) <= {0, 1}
    assert sim["kind"].min() >= 0 and sim["kind"].max() < len(KINDS)
    assert isinstance(hits_sim.SIM_VERSION, str) and isinstance(KINDS, tuple)


def test_labels_follow_kinds(sim):
    real = sim["kind"] < len(REAL_KINDS)
    assert np.array_equal(sim["labels"], real.astype(np.int64))


def test_balance_exact(sim):
    assert sim["labels"].sum() == N // 2
    d = simulate(101, seed=3, real_fraction=0.25)
    assert d["labels"].sum() == round(101 * 0.25)


def test_deterministic(sim):
    again = simulate(N, seed=11)
    for k in (*IMAGES, "labels", "kind"):
        np.testing.assert_array_equal(sim[k], again[k])


def test_seeds_differ(sim):
    other = simulate(N, seed=12)
    assert not np.array_equal(np.nan_to_num(sim["diff_images"]), np.nan_to_num(other["diff_images"]))
    assert not np.array_equal(sim["kind"], other["kind"])


def test_chunks_match_single_call(monkeypatch):
    """Chunks simulated separately (as the CLI and workers do) equal one call."""
    monkeypatch.setattr(hits_sim, "CHUNK", 64)
    n = 64 * 2 + 37
    whole = simulate(n, seed=5)
    assert whole["labels"].sum() == round(n / 2)
    parts = [hits_sim.simulate_chunk(i, n, 5) for i in range(3)]
    for k in ("SNR_images", "kind"):
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))


def test_every_candidate_is_detected(sim):
    """|SNR| >= 5 within the central (2*CENTRE_HALF+1)^2 box, for every stamp."""
    c = 10
    box = sim["SNR_images"][:, c - CENTRE_HALF : c + CENTRE_HALF + 1, c - CENTRE_HALF : c + CENTRE_HALF + 1]
    peak = np.nanmax(np.abs(box).reshape(N, -1), axis=1)
    assert np.all(peak >= DETECT_SNR)


def test_real_reach_threshold(sim):
    """The real class goes down to the detection limit, not only bright sources."""
    c = 10
    real = sim["labels"] == 1
    box = np.abs(sim["SNR_images"][real, c - 4 : c + 5, c - 4 : c + 5]).reshape(real.sum(), -1)
    peak = np.nanmax(box, axis=1)
    assert np.mean(peak < 10) > 0.15
    assert np.mean(peak > 100) > 0.05


def test_nan_only_in_nan_kinds(sim):
    has_nan = np.zeros(N, dtype=bool)
    for k in IMAGES:
        has_nan |= np.isnan(sim[k]).any(axis=(1, 2))
    allowed = np.isin(sim["kind"], [KINDS.index(k) for k in NAN_KINDS])
    assert not np.any(has_nan & ~allowed)
    assert has_nan.any()  # the NaN kinds do produce masked pixels
    for k in IMAGES:  # never infinite
        assert not np.isinf(sim[k]).any()


def test_all_kinds_present():
    d = simulate(2000, seed=1)
    assert set(np.unique(d["kind"])) == set(range(len(KINDS)))


def test_snr_background_is_unit_noise(sim):
    """Far from sources the SNR channel is ~N(0, 1): SNR = difference / its noise."""
    ok = np.isin(sim["kind"], [KINDS.index(k) for k in ("sn", "noise_peak", "cosmic_ray", "hot_pixel")])
    border = np.concatenate(
        [sim["SNR_images"][ok, :3].reshape(ok.sum(), -1), sim["SNR_images"][ok, -3:].reshape(ok.sum(), -1)], 1
    )
    mad = 1.4826 * np.median(np.abs(border - np.median(border, 1, keepdims=True)), 1)
    assert 0.7 < np.median(mad) < 1.4


def test_small_and_empty():
    d = simulate(0, seed=0)
    assert d["SNR_images"].shape == (0, 21, 21)
    d = simulate(1, seed=0)
    assert d["SNR_images"].shape == (1, 21, 21) and d["labels"][0] == 0  # round(0.5) = 0 reals
    with pytest.raises(ValueError):
        simulate(10, seed=0, real_fraction=1.5)


def _run_cli(args: list[str], module: bool) -> None:
    cmd = [sys.executable, "-m", "train.simulate", *args] if module else [sys.executable, "train/simulate.py", *args]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)


@pytest.mark.parametrize("module", [False, True])
def test_cli_roundtrip(tmp_path, module):
    out = tmp_path / "sim.h5"
    _run_cli(["--n", "150", "--seed", "4", "--out", str(out)], module)
    ref = simulate(150, seed=4)
    with h5py.File(out, "r") as f:
        for k in IMAGES:
            assert f[k].shape == (150, 21, 21) and f[k].dtype == np.float32
            np.testing.assert_array_equal(f[k][:], ref[k])
        np.testing.assert_array_equal(f["labels"][:], ref["labels"])
        np.testing.assert_array_equal(f["kind"][:], ref["kind"])
        np.testing.assert_array_equal(f["id"][:], np.arange(150))
        names = json.loads(f["kind"].attrs["names"])
        assert [names[str(i)] for i in range(len(KINDS))] == list(KINDS)
        assert f.attrs["seed"] == 4 and f.attrs["n"] == 150
        assert f.attrs["sim_version"] == hits_sim.SIM_VERSION
        assert "--n 150" in f.attrs["command"]
    assert not (tmp_path / "sim.h5.partial").exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/hits")
def test_conditions_summary_is_current():
    """The committed summary matches the shared HiTS table it was derived from."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("derive", REPO / "train/data/derive_hits_conditions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    derived = mod.derive(SHARED / "hits2015_camera_and_obs_conditions.json")
    from train.data._hits_conditions import CONDITIONS

    assert derived == CONDITIONS


# ----------------------------------------------------------------------------- real SNe
def _fake_sn_sequence(rng: np.random.Generator, n_ep: int = 24, t_exp: int = 12):
    """A host galaxy + a supernova appearing at epoch ``t_exp``, in HiTS-like conditions."""
    from train.data.hits_real import PIXEL_SCALE

    yy, xx = np.mgrid[:21, :21] - 10.0
    mjd = 57070.0 + np.arange(n_ep) * 0.3
    rows, images = [], []
    for e in range(n_ep):
        seeing = rng.uniform(0.95, 1.6)
        rows.append(
            {"obs_days": mjd[e], "seeing": seeing, "zero_point": 25.0, "exp_time": 86.0, "sky_brightness": 110.0}
        )
        s2 = (seeing / PIXEL_SCALE / 2.3548) ** 2
        host = 3000.0 * np.exp(-0.5 * ((xx - 1.5) ** 2 + yy**2) / (s2 + 4.0)) / (2 * np.pi * (s2 + 4.0))
        sn = (4000.0 if e >= t_exp else 0.0) * np.exp(-0.5 * (xx**2 + yy**2) / s2) / (2 * np.pi * s2)
        model = 110.0 + host + sn
        images.append(model + rng.normal(0.0, np.sqrt(model / 4.0 + (6.0 / 4.0) ** 2)))
    ep = {"obs_days": mjd, "gain": np.full(n_ep, 4.0), "read_noise": np.full(n_ep, 6.0)}
    return np.array(images, np.float32), ep, mjd, rows


def test_real_builder_on_synthetic_sequence():
    from train.data.hits_real import build_one

    rng = np.random.default_rng(0)
    images, ep, mjd, rows = _fake_sn_sequence(rng)
    perm = rng.permutation(len(mjd))  # epochs need not be in time order
    ep = {k: v[perm] for k, v in ep.items()}
    r = build_one(images[perm], ep, np.array([x["obs_days"] for x in rows]), rows)
    assert r["explosion_mjd"] == pytest.approx(mjd[12])
    assert r["science_mjd"] >= mjd[12] and r["clean_template"] and r["detected"]
    assert KINDS[r["kind"]] == "sn_on_host"
    c = 10
    assert r["SNR_images"][c - 1 : c + 2, c - 1 : c + 2].max() > 10
    assert abs(float(np.median(r["diff_images"]))) < 2.0  # host and sky subtracted
    border = r["SNR_images"][np.hypot(*np.mgrid[:21, :21] - 10.0) >= 7]
    assert 0.6 < 1.4826 * np.median(np.abs(border - np.median(border))) < 1.4
    for k in IMAGES:
        assert r[k].shape == (21, 21) and r[k].dtype == np.float32 and np.isfinite(r[k]).all()


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/hits")
def test_real_builder_on_shared_data():
    import h5py as h5

    from train.data.hits_real import DEFAULT_CONDITIONS, _conditions_by_mjd, build_one

    mjd, rows = _conditions_by_mjd(DEFAULT_CONDITIONS)
    with h5.File(SHARED / "hits2015_sn_science_stamps.h5", "r") as f:
        for i in (0, 39):  # 39 has all-zero (missing) epochs
            ep = {k: f["epochs"][k][i] for k in f["epochs"]}
            r = build_one(f["images"][i], ep, mjd, rows)
            for k in IMAGES:
                assert r[k].shape == (21, 21) and np.isfinite(r[k]).all()


def test_simulator_does_not_import_torch() -> None:
    # simulate.py's worker processes start fast only if the numpy-only simulator stays torch-free
    code = "import sys, train.data.hits_sim; sys.exit(1 if 'torch' in sys.modules else 0)"
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_diagnose_prints_every_kind_and_parameter(tiny_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from train import diagnose_hits

    assert diagnose_hits.main(["--model", str(tiny_model_path), "--n", "400", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "n=400, seed=3: accuracy" in out
    for kind in KINDS:
        assert any(line.startswith(f"{kind} ") for line in out.splitlines())
    assert "star/change:" in out and "template convolved:" in out


def test_cli_refuses_to_replace_a_file_without_force(tmp_path):
    out = tmp_path / "sim.h5"
    out.write_bytes(b"keep me")
    r = subprocess.run([sys.executable, "train/simulate.py", "--n", "5", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "exists; give --force" in r.stderr and out.read_bytes() == b"keep me"
    _run_cli(["--n", "5", "--out", str(out), "--force"], module=False)
    assert out.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
