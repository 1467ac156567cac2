"""Training side: registry, tiny training run, ONNX export with card, parity, classify."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import make_stamps, write_hits_h5  # noqa: E402

from stampclf import Classifier, read_card  # noqa: E402
from train import export as export_mod  # noqa: E402
from train import train as train_mod  # noqa: E402
from train.registry import create_model, get_spec, list_models, register_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _write_split(path: Path, n: int, seed: int) -> None:
    """HiTS-layout file where 'real' rows have a PSF-like bump in the difference."""
    import h5py

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    yy, xx = np.mgrid[:21, :21]
    psf = np.exp(-((yy - 10) ** 2 + (xx - 10) ** 2) / 4.0).astype(np.float32)
    with h5py.File(path, "w") as f:
        for k in ("temp_images", "sci_images", "diff_images", "SNR_images"):
            a = rng.normal(100, 5, (n, 21, 21)).astype("f4")
            if k in ("diff_images", "SNR_images", "sci_images"):
                a[y == 1] += 40 * psf
            f[k] = a
        f["labels"] = y
        f["ID"] = np.arange(n) + 1000


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train `hits` for one short epoch on tiny data and export it."""
    d = tmp_path_factory.mktemp("hits_run")
    files = []
    for name, n, seed in (("train", 768, 1), ("val", 256, 2), ("test", 256, 3)):
        _write_split(d / f"{name}.h5", n, seed)
        files.append(str(d / f"{name}.h5"))
    run = d / "run"
    rc = train_mod.main(
        ["--model", "hits", "--epochs", "2", "--seed", "3", "--out", str(run), "--device", "cpu",
         "--set", "data=" + ",".join(files), "--set", "batch_size=128"]
    )
    assert rc == 0
    out = d / "exported"
    assert export_mod.main(["--model", "hits", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out)]) == 0
    return {"run": run, "onnx": out / "hits.onnx", "test": Path(files[2]), "dir": out}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_and_runs(name: str) -> None:
    spec = get_spec(name)
    k = len(spec.classes) or 4  # a model that takes its classes from the data: any number
    model = create_model(name, k).eval()
    c, h, w = len(spec.input["channels"]), spec.input["height"], spec.input["width"]
    with torch.no_grad():
        out = model(torch.randn(3, c, h, w))
    assert out.shape == (3, k)
    assert torch.isfinite(out).all()
    assert spec.positive_class is None or spec.positive_class in spec.classes


def test_registry_refuses_duplicate_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("hits", task="x", classes=("a", "b"), input={}, preprocessing={}, dataset="hits_sim")(lambda: None)


def test_unknown_model_lists_registered() -> None:
    with pytest.raises(KeyError, match="hits"):
        get_spec("no-such-model")


def test_training_writes_report_and_figures(trained: dict[str, Path]) -> None:
    run = trained["run"]
    report = json.loads((run / "report.json").read_text())
    for f in ("learning_curves.png", "confusion_matrix.png", "roc.png", "checkpoint.pt"):
        assert (run / f).stat().st_size > 1000, f
    assert report["seed"] == 3
    assert len(report["history"]["val_loss"]) == 2
    assert report["metrics"]["test"]["accuracy"] > 0.9  # the bump is easy to see
    assert "fpr_1pct" in report["operating_points"]
    assert 0.05 <= report["temperature"] <= 20
    # the training code's commit (none outside a git checkout), carried into the card
    assert report.get("code") == (train_mod.code_state() or None)
    assert read_card(trained["onnx"])[0].training.get("code") == report.get("code")


def test_code_state_outside_a_checkout_is_empty(tmp_path: Path) -> None:
    assert train_mod.code_state(tmp_path) == {}
    state = train_mod.code_state()
    if state:  # in a checkout: a commit, and whether tracked files differ from it
        assert len(state["git_commit"]) == 40 and isinstance(state["uncommitted_changes"], bool)


def test_export_card_round_trip(trained: dict[str, Path]) -> None:
    card, _ = read_card(trained["onnx"])
    assert card.name == "hits"
    assert card.channels == ["template", "science", "difference", "snr_difference"]
    assert card.classes == ["bogus", "real"] and card.positive_class == "real"
    assert card.training["seed"] == 3 and "train/train.py" in card.training["command"]
    assert card.preprocessing["normalisation"]["method"] == "robust_asinh"
    assert "test" in card.metrics and "accuracy" in card.metrics["test"]
    assert all((trained["dir"] / f).is_file() for f in card.report["figures"])
    # the runtime's reader and the onnx package agree on the card
    import onnx

    proto = onnx.load(str(trained["onnx"]))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["stampclf.card"]) == card.to_dict()


def test_export_parity_within_tolerance(trained: dict[str, Path]) -> None:
    spec = get_spec("hits")
    model = export_mod.load_trained(spec, trained["run"] / "checkpoint.pt")
    assert export_mod.parity(model, trained["onnx"], (4, 21, 21), seed=5) <= export_mod.TOLERANCE


def test_export_without_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_mod.main(["--model", "hits", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "train first" in capsys.readouterr().err


def test_exported_model_classifies_with_high_accuracy(trained: dict[str, Path]) -> None:
    clf = Classifier(trained["onnx"], device="cpu")
    preds = list(clf.classify_file(trained["test"]))
    y = np.concatenate([p.true_labels for p in preds])
    labels = np.concatenate([p.labels for p in preds])
    assert (np.array([clf.classes.index(v) for v in labels]) == y).mean() > 0.9


def test_export_module_entry_point_help() -> None:
    for argv in (["-m", "train.export", "--help"], [str(ROOT / "train" / "export.py"), "--help"]):
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "--checkpoint" in r.stdout


def test_export_output_is_only_its_own_lines(trained: dict[str, Path], tmp_path: Path) -> None:
    # torch.onnx logged "torchvision is not installed. Skipping torchvision::nms" four times
    argv = [str(ROOT / "train" / "export.py"), "--model", "hits", "--checkpoint", str(trained["run"] / "checkpoint.pt"),
            "--out", str(tmp_path)]
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and all(line.startswith("[export]") for line in r.stdout.splitlines()), r.stdout + r.stderr


def test_card_metrics_store_undefined_values_as_null() -> None:
    # a single-class extra test set (e.g. real supernovae only) has no ROC AUC
    metrics = {"real_sn": {"recall": 0.97, "roc_auc": float("nan"), "confusion_matrix": [[0, 0], [1, 31]]}}
    clean = {k: export_mod._strip(v) for k, v in metrics.items()}
    assert clean == {"real_sn": {"recall": 0.97, "roc_auc": None}}
    json.dumps(clean, allow_nan=False)


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 8, 20])
@pytest.mark.parametrize("pct", [0.15, 0.25, 0.5])
def test_one_cycle_schedule_works_for_tiny_runs(total: int, pct: float) -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=total, pct_start=train_mod.safe_pct_start(pct, total)
    )
    for _ in range(total):
        opt.step()
        sched.step()
    assert np.isfinite(sched.get_last_lr()[0])


def test_card_command_keeps_only_what_changes_the_result() -> None:
    from train.train import reproduce_command

    argv = ["--model", "hits", "--out", "/tmp/x/run", "--threads", "2", "--set", "cache=/tmp/c", "--seed", "3",
            "--set", "real_sn=none", "--threads=1", "--out=/tmp/y", "--set=decode_threads=8", "--set", "lr=0.1"]
    # --threads stays: CPU kernels split their sums by thread, another count gives other weights
    assert reproduce_command(argv) == ("python train/train.py --model hits --threads 2 --seed 3 --set real_sn=none "
                                       "--threads=1 --set lr=0.1")


def test_default_batch_size_keeps_largest_tensor_under_budget() -> None:
    from train.export import ACTIVATION_BUDGET, default_batch_size

    assert default_batch_size(1000) == 1024  # small stamps: the cap
    assert default_batch_size(ACTIVATION_BUDGET // 100) == 64
    assert default_batch_size(10 * ACTIVATION_BUDGET) == 8  # never below 8
    for per_row in (1, 3_000, 200_000, 3_145_728):
        n = default_batch_size(per_row)
        assert n * per_row <= ACTIVATION_BUDGET or n == 8


def test_export_cleans_old_card_commands() -> None:
    from train.export import canonical_command

    old = "python train/train.py --model galaxy --out /tmp/s9/run/galaxy --threads 2 --set cache=/x --set lr=0.1"
    assert canonical_command(old) == "python train/train.py --model galaxy --threads 2 --set lr=0.1"
    assert canonical_command("bash benchmarks/gpu.sh --out x") == "bash benchmarks/gpu.sh --out x"


def test_shipped_report_and_card_recipe_drop_scratch_options() -> None:
    from train.export import canonical_recipe, shipped_report

    assert canonical_recipe({"lr": 0.1, "cache": "/tmp/x", "decode_threads": 4}) == {"lr": 0.1}
    old = {"command": "python train/train.py --model hits --out /tmp/run --set cache=/tmp/c", "seed": 0,
           "recipe": {"lr": 0.1, "cache": "/tmp/c"}, "options": {"cache": "/tmp/c", "n_train": 10}}
    assert shipped_report(old) == {"command": "python train/train.py --model hits", "seed": 0,
                                   "recipe": {"lr": 0.1}, "options": {"n_train": 10}}


def test_ema_recipe_key_saves_averaged_weights(trained: dict[str, Path], tmp_path: Path) -> None:
    # the same run as the fixture with an average of the weights: other weights, still a good model
    files = ",".join(str(trained["test"].parent / f"{s}.h5") for s in ("train", "val", "test"))
    args = ["--model", "hits", "--epochs", "2", "--seed", "3", "--device", "cpu", "--set", "data=" + files,
            "--set", "batch_size=128"]
    assert train_mod.main([*args, "--out", str(tmp_path / "ema"), "--set", "ema=0.8"]) == 0
    report = json.loads((tmp_path / "ema" / "report.json").read_text())
    assert report["recipe"]["ema"] == 0.8
    assert report["metrics"]["test"]["accuracy"] > 0.9
    plain = torch.load(trained["run"] / "checkpoint.pt", weights_only=True)["state_dict"]
    averaged = torch.load(tmp_path / "ema" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert plain.keys() == averaged.keys()
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain if plain[k].is_floating_point())
    counters = [k for k in plain if k.endswith("num_batches_tracked")]
    steps = report["best_epoch"] * (768 // 128)  # counted steps up to the kept epoch, not an average of them
    assert counters and all(int(averaged[k]) == steps for k in counters)
    assert train_mod.main([*args, "--out", str(tmp_path / "bad"), "--set", "ema=1.0"]) == 2  # "ema must be in ..."
    with pytest.raises(ValueError, match="ema must be in"):  # --debug: the exception itself
        train_mod.main([*args, "--out", str(tmp_path / "bad"), "--set", "ema=1.0", "--debug"])


# --- unknown --set keys ----------------------------------------------------------------------
def test_unknown_set_key_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    # exit code 2, as for argparse's own usage errors
    assert train_mod.main(["--model", "hits", "--epochs", "1", "--out", str(run), "--set", "n_trian=2000"]) == 2
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and msg.startswith("train: error: unknown --set key 'n_trian'")
    assert "did you mean 'n_train'" in msg
    for key in ("n_train", "lr", "ema", "real_sn", "cache", "decode_threads"):  # recipe, data and no-effect keys
        assert key in msg, key
    assert not run.exists()  # refused before any data or output
    assert train_mod.main(["--model", "galaxy", "--set", "bogus=1"]) == 2
    assert "'bogus' for model galaxy" in capsys.readouterr().err
    assert train_mod.main(["--model", "hits", "--set", "augment={}"]) == 2  # an image-loader option
    assert "'augment' for model hits" in capsys.readouterr().err
    assert train_mod.main(["--model", "hits", "--set", "n_train"]) == 2
    assert "train: error: --set expects key=value, got 'n_train'" in capsys.readouterr().err


# keys of the commands in README.md, docs/*.md, benchmarks/*.sh and the tests
DOCUMENTED_KEYS = {
    "hits_sim": ("n_train", "n_val", "n_test", "real_sn", "cache", "ema", "lr", "sim_workers", "data", "batch_size"),
    "image": ("root", "archive", "limit", "cache", "decode_threads", "batch_size", "lr", "augment"),
}


@pytest.mark.parametrize("name", list_models())
def test_registry_and_documented_set_keys_are_accepted(name: str) -> None:
    spec = get_spec(name)
    keys = DOCUMENTED_KEYS["hits_sim" if spec.dataset == "hits_sim" else "image"]
    valid = {"optimizer": "sgd", "class_weights": [1.0, 2.0]}  # keys whose values are checked for kind
    train_mod.check_options(spec, {k: valid.get(k, 1) for k in (*spec.recipe, *keys, *train_mod.NO_EFFECT_KEYS)})


# --- card version and the shipped folder -----------------------------------------------------
def test_retrained_model_gets_a_local_version(trained: dict[str, Path]) -> None:
    # the fixture trains on its own data, 2 epochs, seed 3: not the registered hits recipe
    spec = get_spec("hits")
    card, _ = read_card(trained["onnx"])
    assert re.fullmatch(re.escape(spec.version) + r"\+local\.\d{8}\.[0-9a-f]{8}", card.version), card.version
    assert Classifier(trained["onnx"], device="cpu").version == card.version  # the runtime takes it
    report = json.loads((trained["dir"] / "hits" / "report.json").read_text())
    assert report["version"] == card.version
    # the report's command is the one given to main, not the test runner's
    assert report["command"].startswith("python train/train.py --model hits --epochs 2 --seed 3")


def test_card_version_is_the_registry_one_only_for_the_registered_recipe() -> None:
    spec = get_spec("hits")
    report = {"seed": 0, "date": "2026-11-23T10:00:00Z",
              "recipe": {**spec.recipe, "cache": "/tmp/c", "real_sn": "none", "sim_workers": 2}}
    assert export_mod.card_version(spec, report) == (spec.version, None)
    for change in ({"recipe": {**report["recipe"], "n_train": 2000}}, {"recipe": {**report["recipe"], "epochs": 1}},
                   {"recipe": {**report["recipe"], "ema": 0.9}}, {"seed": 3}):
        version, notice = export_mod.card_version(spec, {**report, **change})
        assert version == f"{spec.version}+local.20261123"
        assert notice is not None and "\n" not in notice and version in notice and "--version" in notice
    assert export_mod.card_version(spec, {**report, "seed": 3}, "2.0.0+mine") == ("2.0.0+mine", None)
    with pytest.raises(ValueError, match="PEP 440"):
        export_mod.card_version(spec, report, "v2 beta")


def test_export_version_option(trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(trained["run"] / "checkpoint.pt")
    assert export_mod.main(["--model", "hits", "--checkpoint", ckpt, "--out", str(tmp_path), "--version", "bad one"]) == 2
    assert "PEP 440" in capsys.readouterr().err and not (tmp_path / "hits.onnx").exists()
    assert export_mod.main(["--model", "hits", "--checkpoint", ckpt, "--out", str(tmp_path),
                            "--version", "1.2.0+local.mine"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert read_card(tmp_path / "hits.onnx")[0].version == "1.2.0+local.mine"


def test_default_out_does_not_overwrite_a_model_without_force(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = tmp_path / "exported"
    shipped.mkdir()
    monkeypatch.setattr(export_mod, "EXPORTED", shipped)  # never the repository's own folder
    (shipped / "hits.onnx").write_bytes(b"shipped")
    ckpt = str(trained["run"] / "checkpoint.pt")
    for out in ([], ["--out", str(shipped)]):
        assert export_mod.main(["--model", "hits", "--checkpoint", ckpt, *out]) == 2
        err = capsys.readouterr().err
        assert str(shipped / "hits.onnx") in err and "--force" in err and err.count("\n") == 1
    assert (shipped / "hits.onnx").read_bytes() == b"shipped"
    assert not (shipped / "hits").exists()
    assert export_mod.main(["--model", "hits", "--checkpoint", ckpt, "--force"]) == 0
    assert read_card(shipped / "hits.onnx")[0].name == "hits"
    # a new model in the shipped folder needs no --force
    (shipped / "hits.onnx").unlink()
    assert export_mod.main(["--model", "hits", "--checkpoint", ckpt]) == 0


def test_epochs_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from train import train as train_mod

    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--model", "hits", "--epochs", "0"])  # was: silently the recipe's epochs
    assert exc.value.code == 2 and "0 is not at least 1" in capsys.readouterr().err


def test_training_and_export_errors_are_one_line(trained: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from train import export as export_mod
    from train import train as train_mod

    code = train_mod.main(["--model", "hits", "--out", str(tmp_path / "r"), "--set", "data=a.h5,b.h5,nope.h5"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("train: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()  # a failed run leaves no empty run folder
    (tmp_path / "afile").write_text("x")  # refused before any data is loaded, not after training
    assert train_mod.main(["--model", "hits", "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in capsys.readouterr().err
    # a checkpoint of another model: named, not a dump of every tensor
    code = export_mod.main(["--model", "hits-tiny", "--checkpoint", str(trained["run"] / "checkpoint.pt"),
                            "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "the run of model" in err and len(err.strip().splitlines()) == 1, err


def test_training_data_is_read_like_classify_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--set data=``: any layout classify accepts, labels as indices or names, unusable rows counted."""
    from stampclf.io._cutouts import derive_snr
    from stampclf.preprocess import prepare_stamps
    from train.data.hits import read_labelled_h5

    spec = get_spec("hits")
    stamps = make_stamps(24, seed=5)
    y = np.arange(24) % 2
    hits_layout = write_hits_h5(tmp_path / "channels.h5", stamps=stamps, labels=y)
    names = np.array([spec.classes[v] for v in y], dtype="S")
    stacked = write_hits_h5(tmp_path / "stacked.h5", stamps=stamps.astype(np.float64), labels=names, layout="stacked")
    x1, y1, note1 = read_labelled_h5(str(hits_layout), spec, batch_size=5)
    x2, y2, note2 = read_labelled_h5(str(stacked), spec)
    np.testing.assert_array_equal(y1, y)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_allclose(x1, x2, rtol=0, atol=1e-6)
    assert (note1["layout"], note2["layout"]) == ("channels", "stacked") and note1["used"] == 24
    # the same preprocessing as the runtime's
    np.testing.assert_array_equal(x1, prepare_stamps(stamps, spec.input, spec.preprocessing)[0])

    last = str(write_hits_h5(tmp_path / "last.h5", stamps=stamps, labels=y, layout="stacked", channels_last=True))
    with pytest.raises(ValueError, match=r"channels-last data\? use --set data_channels_last=true"):
        read_labelled_h5(last, spec)
    np.testing.assert_array_equal(read_labelled_h5(last, spec, channels_last=True)[0], x1)
    no_snr = write_hits_h5(tmp_path / "no_snr.h5", stamps=stamps, labels=y, drop=("SNR_images",))
    x4, _, note4 = read_labelled_h5(str(no_snr), spec)  # derived from the difference, as classify does
    derived = stamps.copy()
    derived[:, 3] = [derive_snr(d) for d in stamps[:, 2]]
    assert note4["used"] == 24
    np.testing.assert_array_equal(x4, prepare_stamps(derived, spec.input, spec.preprocessing)[0])

    bad = stamps.copy()
    bad[[3, 7]] = np.nan  # no finite pixel: classify fails these rows, so training leaves them out
    bad[10, :, :12], bad[11, :, :13] = np.nan, np.nan  # over the NaN budget, by different counts: one reason
    x3, y3, note3 = read_labelled_h5(str(write_hits_h5(tmp_path / "nan.h5", stamps=bad, labels=y)), spec)
    assert len(x3) == len(y3) == 20 and note3["rows"] == 24
    assert note3["left_out"] == {"K of M pixels not finite (over the card's nan_policy.max_bad_fraction)": 4}
    assert "4 of 24 rows left out" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"label 1e\+20 is not a class index 0..1"):
        from stampclf.metrics import label_indices

        label_indices(np.array([0.0, 1e20]), spec.classes, "f")


@pytest.mark.parametrize(("labels", "message"), [
    (None, "no labels to train on"),
    (np.full(24, 2), "label 2 is not a class index 0..1"),
    (np.array([b"real", b"junk"] * 12), "label 'junk' is not one of"),
])
def test_training_data_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], labels: object,
                                          message: str) -> None:
    f = str(write_hits_h5(tmp_path / "bad.h5", n=24, labels=labels))
    _, val, test = _own_data(tmp_path)
    rc = train_mod.main(["--model", "hits", "--epochs", "1", "--out", str(tmp_path / "run"), "--device", "cpu",
                         "--set", f"data={f},{val},{test}", "--set", "real_sn=none"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and f in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def _own_data(tmp_path: Path, **labels: object) -> list[str]:
    """Three small labelled files; *labels* replaces a split's labels (train=..., val=..., test=...)."""
    files = []
    for k, seed in (("train", 1), ("val", 2), ("test", 3)):
        y = labels.get(k, np.arange(24) % 2)
        files.append(str(write_hits_h5(tmp_path / f"{k}.h5", stamps=make_stamps(24, seed=seed), labels=y)))
    return files


@pytest.mark.parametrize(("case", "message"), [
    ("n_train", "--set n_train does not apply with data="),
    ("same file", "the train and test splits are one file"),
    ("same data", "the train and val splits hold the same stamps and labels"),
    ("one class", "the training split has no 'bogus' stamp"),
    ("empty", "no stamps (0 rows)"),
    ("fraction", "--set val_fraction applies to one data= file"),
])
def test_own_data_that_cannot_give_a_held_out_figure_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    files = _own_data(tmp_path, train=np.ones(24, int)) if case == "one class" else _own_data(tmp_path)
    extra: list[str] = []
    if case == "n_train":
        extra = ["--set", "n_train=500"]
    elif case == "same file":
        files[2] = files[0]
    elif case == "same data":
        Path(files[1]).write_bytes(Path(files[0]).read_bytes())
    elif case == "fraction":
        extra = ["--set", "val_fraction=0.2"]
    elif case == "empty":
        write_hits_h5(files[1], stamps=np.zeros((0, 4, 21, 21), np.float32), labels=np.zeros(0, int), ids=None)
    rc = train_mod.main(["--model", "hits", "--epochs", "1", "--out", str(tmp_path / "run"), "--device", "cpu",
                         "--set", "data=" + " , ".join(files), "--set", "real_sn=none", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_run_folder_is_replaced_only_with_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"an earlier run")
    argv = ["--model", "hits", "--epochs", "1", "--out", str(run), "--device", "cpu", "--set", "real_sn=none",
            "--set", "data=" + ",".join(_own_data(tmp_path)), "--set", "batch_size=8"]
    assert train_mod.main(argv) == 2 and "holds a trained run already" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == b"an earlier run"
    assert train_mod.main([*argv, "--force"]) == 0 and (run / "checkpoint.pt").read_bytes() != b"an earlier run"
    report = json.loads((run / "report.json").read_text())
    assert "--force" not in report["command"] and "n_train" not in report["recipe"]  # sizes came from the files
    assert all(Path(f["file"]).is_absolute() for f in report["data"]["files"].values())


def _interrupt_in_the_second_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C at the second call of `predict_logits` (the second epoch's validation, after the
    first epoch's resume.pt); every later call runs as usual."""
    real, calls = train_mod.predict_logits, []

    def predict(*a: object, **k: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "predict_logits", predict)


def _resume_argv(tmp_path: Path, epochs: int) -> list[str]:
    return ["--model", "hits", "--epochs", str(epochs), "--seed", "3", "--device", "cpu", "--set", "real_sn=none",
            "--set", "data=" + ",".join(_own_data(tmp_path)), "--set", "batch_size=8"]


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # EMA on: its average and counter are part of the state, as are dropout's and the shuffling's generators
    argv = [*_resume_argv(tmp_path, 3), "--set", "ema=0.5"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert train_mod.main([*argv, "--out", str(whole)]) == 0
    assert not (whole / "resume.pt").exists()  # removed once the run is complete
    _interrupt_in_the_second_epoch(monkeypatch)
    capsys.readouterr()
    assert train_mod.main([*argv, "--out", str(run)]) == 130
    assert capsys.readouterr().err == f"train: interrupted; {run} holds epoch 1/3 in resume.pt: continue with --resume\n"
    state = torch.load(run / "resume.pt", map_location="cpu", weights_only=True)  # no general pickle
    assert state["epoch"] == 1 and len(state["history"]["val_loss"]) == 1 and not (run / "checkpoint.pt").exists()
    assert train_mod.main([*argv, "--out", str(run), "--resume"]) == 0
    assert f"[train] resuming after epoch 1/3 ({run / 'resume.pt'})\n" in capsys.readouterr().out
    assert not (run / "resume.pt").exists()
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (whole, run))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert torch.equal(a["temperature"], b["temperature"])
    a, b = (json.loads((d / "report.json").read_text()) for d in (whole, run))
    assert a["history"] == b["history"] and a["best_epoch"] == b["best_epoch"] and a["metrics"] == b["metrics"]
    assert b["command"] == a["command"] and "--resume" not in b["command"]
    assert b["train_seconds"] > state["seconds"]  # both parts


def test_resume_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    argv = [*_resume_argv(tmp_path, 2), "--out", str(run)]

    def refused(extra: list[str], message: str) -> None:
        rc = train_mod.main([*argv, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err

    refused(["--resume"], f"--resume: {run / 'resume.pt'}: no such file")
    refused(["--resume", "--force"], "--resume and --force: --resume continues the unfinished run in --out")
    refused(["--resume", "--evaluate-only"], "--resume and --evaluate-only")
    _interrupt_in_the_second_epoch(monkeypatch)
    assert train_mod.main(argv) == 130 and "continue with --resume" in capsys.readouterr().err
    refused([], f"--out {run}: holds an unfinished run (resume.pt); give --resume to continue it, --force")
    refused(["--resume", "--epochs", "3"], f"--resume: epochs is 3 here but 2 in {run / 'resume.pt'}")
    refused(["--resume", "--set", "lr=0.01"], "--resume: recipe.lr is 0.01 here but 0.003 in")
    refused(["--resume", "--set", "ema=0.5"], "--resume: recipe.ema is 0.5 here but not set in")
    threads = torch.get_num_threads()
    try:  # CPU sums split by thread: another count gives other weights
        refused(["--resume", "--threads", str(threads + 1)], f"--resume: threads is {threads + 1} here but {threads} in")
    finally:
        torch.set_num_threads(threads)
    assert torch.load(run / "resume.pt", weights_only=True)["epoch"] == 1  # left as it was
    assert train_mod.main([*argv, "--resume", "--set", "workers=1"]) == 0  # speed only: the same run
    assert json.loads((run / "report.json").read_text())["threads"] == threads


def test_ctrl_c_right_after_an_epoch_line_keeps_that_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch's state is saved before its line is printed; a Ctrl-C while saving leaves no temporary file."""
    import builtins

    run = tmp_path / "run"
    real_print = builtins.print

    def ctrl_c_after_epoch_line(*a: object, **k: object) -> None:
        real_print(*a, **k)
        if a and str(a[0]).startswith("[train] epoch 1/"):
            raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "print", ctrl_c_after_epoch_line)
    assert train_mod.main([*_resume_argv(tmp_path, 2), "--out", str(run)]) == 130
    assert "holds epoch 1/2 in resume.pt" in capsys.readouterr().err
    assert torch.load(run / "resume.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(builtins, "print", real_print)
    def half_saved(obj: object, f: Path) -> None:  # Ctrl-C half-way through writing the file
        Path(f).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.torch, "save", half_saved)
    assert train_mod.main([*_resume_argv(tmp_path, 2), "--out", str(run), "--resume"]) == 130
    assert sorted(p.name for p in run.iterdir()) == ["resume.pt"]  # no resume.pt.<pid>.tmp left


def test_export_under_another_name_from_the_checkpoint_alone(trained: dict[str, Path], tmp_path: Path) -> None:
    rc = export_mod.main(["--checkpoint", str(trained["run"] / "checkpoint.pt"), "--name", "hits-mine",
                          "--out", str(tmp_path)])  # --model read from the run's report.json
    assert rc == 0 and (tmp_path / "hits-mine" / "report.json").exists()
    card, _ = read_card(tmp_path / "hits-mine.onnx")
    assert card.name == "hits-mine" and card.training["architecture"] == "hits"
    assert all(f.startswith("hits-mine/") for f in card.report["figures"])
    assert Classifier(tmp_path / "hits-mine.onnx", device="cpu").name == "hits-mine"  # the output rows' model
    assert export_mod.main(["--checkpoint", str(trained["run"] / "checkpoint.pt"), "--name", "x.onnx",
                            "--out", str(tmp_path)]) == 2


def test_missing_shared_data_error_gives_the_unpack_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = train_mod.main(["--model", "galaxy", "--epochs", "1", "--out", str(tmp_path / "run"),
                         "--set", f"root={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "tar xzf ../shared/data/galaxy_zoo1/" in err, err


def test_one_data_file_is_split_by_class_from_the_seed(tmp_path: Path) -> None:
    from train.data.hits import _read_given_splits

    y = np.r_[np.zeros(60, int), np.ones(40, int)]
    x = make_stamps(100, seed=9)
    x[:, 0, 0, 0] = np.arange(100)  # tells rows apart after preprocessing
    path = str(write_hits_h5(tmp_path / "all.h5", stamps=x, labels=y))
    spec = get_spec("hits")
    a = _read_given_splits(path, spec, {}, seed=1)
    assert {k: len(v[1]) for k, v in a.items()} == {"train": 70, "val": 15, "test": 15}
    assert [int(v[1].sum()) for v in a.values()] == [28, 6, 6]  # 40 % real in every split
    rows = [{tuple(r) for r in v[0][:, 0].reshape(len(v[0]), -1)} for v in a.values()]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])  # disjoint
    b = _read_given_splits(path, spec, {}, seed=1)
    c = _read_given_splits(path, spec, {"val_fraction": 0.3}, seed=2)
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a) and len(c["val"][1]) == 30
    assert not np.array_equal(a["test"][0], _read_given_splits(path, spec, {}, seed=2)["test"][0])
    assert a["val"][2]["split"] == {"seed": 1, "val_fraction": 0.15, "test_fraction": 0.15, "stratified": True,
                                    "rows": 15}

def test_file_options_are_refused_for_simulated_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = train_mod.main(["--model", "hits", "--epochs", "1", "--out", str(tmp_path / "run"), "--set", "val_fraction=0.2"])
    assert rc == 2 and "applies to data= files, not to simulated data" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--set", "data="], "--set data= names no file or folder"),
    (["--set", "data=null"], "--set data= names no file or folder"),
    (["--set", "root="], "--set root= names no file or folder"),
    (["--set", "batch_size=0"], "--set batch_size=0: expected an integer of at least 1"),
    (["--set", "snr_derived=abc"], "--set snr_derived=abc: expected a number"),
    (["--set", "snr_derived=2"], "--set snr_derived=2: expected a probability from 0 to 1"),
    (["--set", "optimizer=SGD"], "--set optimizer=SGD: expected one of adamw, sgd"),  # trained AdamW as 'SGD'
    (["--set", "class_weights=heavy"], "--set class_weights=heavy: expected a list of positive numbers"),
    (["--set", "class_weights=[1,-2]"], "--set class_weights=[1, -2]: expected a list of positive numbers"),
    (["--device", "gpu"], "--device gpu: not a torch device"),
])
def test_bad_set_values_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                            message: str) -> None:
    model = "image-folder" if "root=" in argv[1] else "hits"
    rc = train_mod.main(["--model", model, "--epochs", "1", "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_training_mistakes_found_with_the_data_are_one_line(trained: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    files = ",".join(str(trained["test"].parent / f"{n}.h5") for n in ("train", "val", "test"))
    base = ["--model", "hits", "--epochs", "1", "--device", "cpu", "--set", f"data={files}"]
    assert train_mod.main([*base, "--out", str(tmp_path / "w"), "--set", "class_weights=[1,2,3]"]) == 2
    err = capsys.readouterr().err
    assert "--set class_weights=[1, 2, 3]: 3 weight(s) for 2 classes ['bogus', 'real']" in err and "Traceback" not in err
    # balanced: N / (K n_c) from the training split, the numbers used kept in the report
    assert train_mod.main([*base, "--out", str(tmp_path / "b"), "--set", "class_weights=balanced",
                           "--set", "batch_size=256"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    import h5py

    with h5py.File(trained["test"].parent / "train.h5") as f:
        counts = np.bincount(f["labels"][()], minlength=2)
    want = [counts.sum() / (2 * c) for c in counts]
    np.testing.assert_allclose(report["recipe"]["class_weights_balanced"], want, rtol=1e-5)
    assert report["recipe"]["class_weights"] == "balanced"
    # --evaluate-only on other data: its test figures would not be held out from the weights
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    other = ",".join(str(trained["test"].parent / f"{n}.h5") for n in ("val", "train", "test"))
    assert train_mod.main(["--model", "hits", "--out", str(run), "--evaluate-only", "--set", f"data={other}"]) == 2
    err = capsys.readouterr().err
    assert "--evaluate-only: the train, val split(s) differ from the run's" in err and "Traceback" not in err
    assert train_mod.main(["--model", "hits", "--out", str(run), "--evaluate-only", "--epochs", "7",
                           "--set", "lr=0.1"]) == 2  # fmt: skip
    assert "--evaluate-only: lr, epochs change(s) training, not evaluation" in capsys.readouterr().err
    # Ctrl-C: one line, the shell's 130, the run folder as it was
    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    assert train_mod.main([*base, "--out", str(tmp_path / "x")]) == 130
    assert capsys.readouterr().err == f"train: interrupted; {tmp_path / 'x'} unchanged\n"


def test_own_stamps_of_another_size_are_named_and_a_given_real_sn_file_must_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from train.data.hits import _real_sn, read_labelled_h5

    h5 = write_hits_h5(tmp_path / "big.h5", stamps=make_stamps(20, seed=1, size=(25, 25)))
    x, _, note = read_labelled_h5(str(h5), get_spec("hits"))
    assert x.shape[2:] == (21, 21) and note["stamp_size"] == [25, 25]
    assert "stamps are 25x25; the model takes 21x21, so they are centre-cropped" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="--set real_sn=nnone: no such file"):  # a typo of 'none'
        _real_sn("nnone", get_spec("hits"))


def test_export_and_classify_name_the_wrong_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    assert export_mod.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert f"--checkpoint {tmp_path / 'missing.pt'}: no such file" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "m.pt")
    from stampclf import ModelError

    with pytest.raises(ModelError, match="a PyTorch checkpoint. export it first"):
        Classifier(tmp_path / "m.pt")


def test_held_out_stamps_that_are_training_stamps_are_counted(capsys: pytest.CaptureFixture[str]) -> None:
    from train.data.hits import _check_splits

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4, 21, 21)).astype(np.float32)
    y = np.arange(50) % 2
    splits = {"train": (x[:40], y[:40], {"file": "tr.h5"}), "val": (x[40:], y[40:], {"file": "va.h5"}),
              "test": (x[30:45], y[30:45], {"file": "te.h5"})}  # 10 of its rows are training rows
    _check_splits(splits, get_spec("hits"), "tr.h5")
    assert splits["test"][2]["also_in_train"] == 10 and "also_in_train" not in splits["val"][2]
    assert "te.h5: 10 of 15 test stamps are also in the training split" in capsys.readouterr().out


def test_a_model_that_gives_every_row_one_class_is_named() -> None:
    y = np.array([0] * 95 + [1] * 5)
    always = np.tile([0.9, 0.1], (100, 1))
    assert train_mod.one_class_note(["bogus", "real"], always, y) == (
        "the model calls every test row 'bogus' (test class counts [95, 5]): more epochs, or "
        "--set class_weights=balanced (or one weight per class: ['bogus', 'real'])"
    )
    mixed = always.copy()
    mixed[-1] = [0.2, 0.8]
    assert train_mod.one_class_note(["bogus", "real"], mixed, y) is None
    assert train_mod.one_class_note(["bogus", "real"], always, np.zeros(100, int)) is None  # one class is all there is


def test_recorded_command_names_the_data_by_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cmd = train_mod.reproduce_command(["--model", "hits", "--set", "data=a.h5,b.h5", "--set=root=imgs", "--out", "r"])
    assert cmd == f"python train/train.py --model hits --set data={tmp_path / 'a.h5'},{tmp_path / 'b.h5'} " \
                  f"--set=root={tmp_path / 'imgs'}"


def test_image_folder_run_report_is_strict_json_and_bad_augment_is_named(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from train.data.images import write_split

    root = tmp_path / "imgs"
    rng = np.random.default_rng(2)
    for label, n in (("a", 8), ("b", 2)):  # two b images: none left for the test split, whose ROC AUC is undefined
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    base = ["--model", "image-folder", "--epochs", "1", "--set", f"root={root}", "--set", "batch_size=4"]
    assert train_mod.main([*base, "--out", str(tmp_path / "x"), "--set", 'augment={"hflp": 0.5}']) == 2
    assert "--set augment: unknown key 'hflp'" in capsys.readouterr().err
    assert train_mod.main([*base, "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    assert report["metrics"]["test"]["roc_auc"] is None  # NaN, written as null
    (root / "a" / "2019").mkdir()
    (root / "a" / "2019" / "0.png").write_bytes((root / "a" / "0.png").read_bytes())  # a name twice, nested
    n = write_split(get_spec("image-folder"), "train", tmp_path / "split", {"root": str(root)})  # classes: the folders
    assert n == 9 and sorted(p.name for p in (tmp_path / "split").iterdir()) == ["a", "b"]
    assert export_mod.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--name", "",
                            "--out", str(tmp_path / "m")]) == 2


def test_report_json_has_no_nan() -> None:
    safe = train_mod.json_safe({"roc_auc": float("nan"), "x": [np.float32(1.5), np.int64(2)], "inf": np.inf})
    assert json.dumps(safe, allow_nan=False) == '{"roc_auc": null, "x": [1.5, 2], "inf": null}'


def test_export_of_a_file_that_is_no_checkpoint_is_one_line(trained: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    for name, write, says in (
        ("junk.pt", lambda p: p.write_bytes(b"\x80\x04not a torch file"), "not a readable checkpoint"),
        ("resume.pt", lambda p: torch.save({"epoch": 1, "fingerprint": {}}, p), "an unfinished run's state; finish it"),
    ):
        run = tmp_path / name.removesuffix(".pt")
        run.mkdir()
        shutil.copy(trained["run"] / "report.json", run / "report.json")
        write(run / name)
        capsys.readouterr()
        rc = export_mod.main(["--model", "hits", "--checkpoint", str(run / name), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and f"{run / name}: " in err and says in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
