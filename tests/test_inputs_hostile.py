"""Hostile inputs and outputs: nothing silent, nothing lost.

One contract for features and labels (the API and the ``features`` dataset alike), extreme but finite
magnitudes clustered as exact arithmetic would, output places checked before any work, damaged
results and predictions files named in one line, SIGTERM/SIGHUP cleaning up, and property tests
(hypothesis) of all of it on random inputs.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sslbench import SSLBenchError, evaluate_features
from sslbench.arrays import projection_scale
from sslbench.cache import run_scratch
from sslbench.inputs import MAX_FEATURE_MAGNITUDE, checked_labels, checked_split, class_index
from sslbench.pipeline import plan_protocol, run_protocol
from sslbench.plugins import get_plugins
from sslbench.results import load_results, write_atomic
from sslbench.spec import ProtocolSpec, parse_spec, resolve_spec

from conftest import blobs, run_cli

#: Ranges of the metrics every run records: fractions, and the chance-adjusted ARI and AMI.
UNIT_METRICS = ("acc", "acc_majority", "acc_eval_assignment", "nmi", "v_measure", "fowlkes_mallows")
SIGNED_METRICS = ("ari", "ami")


@pytest.fixture(scope="module")
def separable():
    """Five well-separated blobs: every backend and seed recovers them exactly."""
    x, y = blobs(40, 5, 6, seed=4, spread=0.3)
    return x[:150], y[:150], x[150:], y[150:]


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def api_error(*args, **kwargs) -> str:
    with pytest.raises(SSLBenchError) as info:
        evaluate_features(*args, **{"seeds": 1, "epochs": 1, "device": "cpu", **kwargs})
    return one_line(info.value)


def cli_error(capsys, *argv: str) -> str:
    """``sslbench ARGV`` in this process: exit 2, one ``sslbench: error:`` line last on stderr, no traceback."""
    from sslbench import cli

    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("sslbench: error: ")]
    assert errors == [lines[-1]], err
    return errors[0]


def assert_cli_user_error(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("sslbench: error: ")]
    assert errors == [lines[-1]], proc.stderr
    assert expected in errors[0], errors[0]


FEATURES_SPEC = """\
models: [{{id: raw}}]
datasets:
  - id: features
    options:
{source}
protocol: {{epochs: {epochs}, seeds: 1{extra}}}
device: cpu
extraction: {{cache: {cache}}}
"""


def features_spec(folder: Path, xtr, ytr, xev, yev, *, epochs: int = 2, cache: bool = True, extra: str = "") -> Path:
    """A spec of the ``features`` dataset over .npy files written to ``folder``."""
    for name, array in (("train", xtr), ("train_labels", ytr), ("val", xev), ("val_labels", yev)):
        np.save(folder / f"{name}.npy", array)
    source = (
        "      splits:\n"
        f"        train: {{features: {folder / 'train.npy'}, labels: {folder / 'train_labels.npy'}}}\n"
        f"        val: {{features: {folder / 'val.npy'}, labels: {folder / 'val_labels.npy'}}}"
    )
    spec = folder / "spec.yaml"
    spec.write_text(
        FEATURES_SPEC.format(source=source, epochs=epochs, cache=str(cache).lower(), extra=extra), encoding="utf-8"
    )
    return spec


def npz_spec(folder: Path, archive: Path) -> Path:
    spec = folder / "spec.yaml"
    spec.write_text(
        FEATURES_SPEC.format(source=f"      file: {archive}", epochs=1, cache="true", extra=""), encoding="utf-8"
    )
    return spec


# --------------------------------------------------------------------------------------------------
# 1. The feature input contract


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (lambda x: x > 0, "train features must be real numbers (a floating or integer dtype), got dtype bool"),
        (lambda x: x.astype(np.complex64), "got dtype complex64"),
        (lambda x: x.astype("datetime64[s]"), "got dtype datetime64[s]"),
        (lambda x: x.astype("timedelta64[s]"), "got dtype timedelta64[s]"),
        (lambda x: x.astype(str), "got dtype <U"),
        (lambda x: x.astype(object), "got dtype object"),
        (lambda x: np.zeros(len(x), dtype=[("a", "f4"), ("b", "f4")]), "got dtype [('a', '<f4'), ('b', '<f4')]"),
        (lambda x: np.float32(3.0), "train features must be a 2-D array (samples × dims), got shape ()"),
        (lambda x: x[:, 0], "train features must be a 2-D array (samples × dims), got shape (150,)"),
        (lambda x: x[:0], "train features have no rows (shape (0, 6))"),
        (lambda x: x[:, :0], "train features have no dimensions (shape (150, 0))"),
        (lambda x: [[1.0, 2.0], [3.0]], "train features cannot be read as an array"),
        (lambda x: x * np.float32(2.0**101), "train features reach a magnitude of"),
        (lambda x: x.astype(np.float64) * 1e200, "outside what float32 arithmetic keeps"),
        (lambda x: x.astype(np.float64) * 1e-200, "train features reach a magnitude of"),
    ],
)
def test_unusable_features_are_refused_in_one_line(separable, features, message):
    xtr, ytr, xev, yev = separable
    assert message in api_error(features(xtr), ytr, xev, yev)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (lambda y: y.astype(str), "train labels must be integer class indices, got dtype <U"),
        (lambda y: y.astype(object), "got dtype object"),
        (lambda y: y > 2, "got dtype bool"),
        (lambda y: y.astype(complex), "got dtype complex128"),
        (
            lambda y: np.where(np.arange(len(y)) == 7, np.nan, y),
            "train labels must be integer class indices, got nan at row 7",
        ),
        (lambda y: np.where(np.arange(len(y)) == 3, np.inf, y), "got inf at row 3"),
        (lambda y: y + 0.25, "got 2.25 at row 0"),
        (lambda y: y - 3, "train labels must be non-negative class indices, found -3"),
        (lambda y: y.astype(np.uint64) + np.uint64(2**63), "train labels must be below 2^63"),
        (lambda y: y.astype(np.float64) + 2.0**64, "train labels must be below 2^63"),
        (
            lambda y: y[:, None].repeat(2, axis=1),
            "train labels must be a 1-D array of class indices, got shape (150, 2)",
        ),
        (lambda y: y[:0], "train is empty"),
    ],
)
def test_unusable_labels_are_refused_in_one_line(separable, labels, message):
    xtr, ytr, xev, yev = separable
    assert message in api_error(xtr, labels(ytr), xev, yev)


def test_any_integer_dtype_and_whole_floats_are_labels(separable):
    xtr, ytr, xev, yev = separable
    reference = evaluate_features(xtr, ytr, xev, yev, seeds=1, epochs=1, device="cpu")
    for dtype in (np.uint8, np.int16, np.uint32, np.float16):
        same = evaluate_features(xtr, ytr.astype(dtype), xev, yev.astype(dtype), seeds=1, epochs=1, device="cpu")
        assert same.runs[0].metrics == reference.runs[0].metrics, dtype


def test_integer_features_are_features(separable):
    xtr, ytr, xev, yev = separable
    as_int = evaluate_features(
        np.rint(xtr * 100).astype(np.int32), ytr, np.rint(xev * 100).astype(np.int32), yev, seeds=1, epochs=2
    )
    assert as_int.runs[0].metrics["acc"] == 1.0


def test_numpy_integers_are_accepted_as_parameters(separable):
    xtr, ytr, xev, yev = separable
    plain = evaluate_features(xtr, ytr, xev, yev, n_clusters=5, pca_dim=4, seeds=[0, 1], epochs=2, n_classes=5)
    numpy = evaluate_features(
        xtr,
        ytr,
        xev,
        yev,
        n_clusters=np.int64(5),
        pca_dim=np.int32(4),
        seeds=np.arange(2),
        epochs=np.int16(2),
        n_classes=np.uint8(5),
        overcluster=np.float32(1.0),
        whiten=np.bool_(False),
        batch_size=np.int64(2048),
    )
    assert [r.metrics for r in numpy.runs] == [r.metrics for r in plain.runs]
    assert evaluate_features(xtr, ytr, xev, yev, seeds=np.int64(1), epochs=1).runs[0].seed == 0
    lloyd = {"algorithm": "lloyd", "max_iter": 5}
    a = evaluate_features(xtr, ytr, xev, yev, seeds=1, protocol={**lloyd, "max_iter": np.int64(5)})
    b = evaluate_features(xtr, ytr, xev, yev, seeds=1, protocol=lloyd)
    assert a.runs[0].metrics == b.runs[0].metrics
    assert "evaluate_features: n_classes: must be a positive integer (got 2.5)" in api_error(
        xtr, ytr, xev, yev, n_classes=2.5
    )
    assert "evaluate_features: k: Input should be a valid integer" in api_error(xtr, ytr, xev, yev, n_clusters=np.True_)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", "CPU"])
def test_unknown_device_lists_the_valid_ones(separable, device):
    assert api_error(*separable, device=device) == (
        f"evaluate_features: device: {device!r} is not a device; valid devices: auto, cpu, cuda, cuda:N, mps"
    )


@pytest.mark.parametrize(
    ("device", "cuda", "count", "mps", "missing"),
    [
        ("cuda", False, 0, False, "torch sees no CUDA GPU"),
        ("cuda:1", True, 1, False, "torch sees 1 CUDA GPU(s), numbered from 0"),
        ("mps", False, 0, False, "torch has no MPS device here"),
    ],
)
def test_a_device_that_is_not_here_is_refused_as_a_spec_refuses_it(
    separable, plugins, monkeypatch, device, cuda, count, mps, missing
):
    """The API and a spec check a device in one place: the same words after their own prefix."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    said = f"'{device}' was asked for but {missing}; use auto or cpu"
    assert api_error(*separable, device=device) == f"evaluate_features: device: {said}"
    spec = "models: [{id: raw}]\ndatasets: [{id: digits}]\ndevice: " + device + "\n"
    with pytest.raises(SSLBenchError) as refused:
        resolve_spec(parse_spec(spec, "spec.yaml"), plugins)
    assert str(refused.value) == f"spec.yaml:3: device: {said}"


def test_class_index_renumbers_sparse_labels_only():
    contiguous = class_index([np.arange(10), np.arange(5)])
    assert contiguous.n_classes == 10 and contiguous.ids is None
    gapped = class_index([np.array([0, 1, 2, 4, 70])])  # 70 < 2·5 + 64: as given
    assert gapped.n_classes == 71 and gapped.ids is None
    sparse = class_index([np.array([10**12, 5, 5]), np.array([74])])
    assert sparse.n_classes == 3
    np.testing.assert_array_equal(sparse.ids, [5, 74, 10**12])
    np.testing.assert_array_equal(sparse.apply(np.array([74, 10**12, 5])), [1, 2, 0])
    assert checked_labels("x", np.array([3.0, 1.0])).dtype == np.int64


def test_sparse_labels_cluster_as_their_dense_renumbering(separable):
    """A label of 10^12 does not make 10^12 classes: sparse labels are renumbered in increasing order,
    so any order-preserving relabelling gives the same numbers; contiguous labels are never renumbered."""
    xtr, ytr, xev, yev = separable
    dense = evaluate_features(xtr, ytr, xev, yev, seeds=2, epochs=2)
    sparse = evaluate_features(xtr, ytr * 10**12 + 7, xev, yev * 10**12 + 7, seeds=2, epochs=2)
    assert sparse.runs[0].protocol.n_classes == 5 and sparse.runs[0].protocol.n_clusters == 5
    assert [r.metrics for r in sparse.runs] == [r.metrics for r in dense.runs]
    # A few missing classes are not sparse: max label + 1 classes, as before.
    shifted = evaluate_features(xtr, ytr + 1, xev, yev + 1, seeds=1, epochs=1)
    assert shifted.runs[0].protocol.n_classes == 6
    # An explicit n_classes is taken as given (and labels must be below it).
    assert "labels go up to 1000000000004 but the dataset has 5 classes" in api_error(
        xtr, ytr + 10**12, xev, yev, n_classes=5
    )


# --------------------------------------------------------------------------------------------------
# 2. Finite but extreme magnitudes


def eval_predictions(tmp_path: Path, x: np.ndarray, y: np.ndarray, backend: str, options=None) -> tuple[dict, list]:
    """Per seed, the eval split's cluster ids and the run's metrics, through the protocol's stages."""
    xtr, ytr, xev, yev = x[:150], y[:150], x[150:], y[150:]
    folder = tmp_path / f"predictions-{len(list(tmp_path.iterdir()))}"
    protocol = ProtocolSpec.model_validate({"epochs": [3], "seeds": [0, 1], "backend": backend, **(options or {})})
    plan = plan_protocol(
        checked_split("train", xtr, ytr),
        checked_split("eval", xev, yev),
        n_classes=5,
        protocol=protocol,
        plugins=get_plugins(),
        model="m",
        dataset="d",
        predictions_dir=folder,
    )
    notes: list[str] = []
    with run_scratch(tmp_path / "cache") as scratch:
        runs = list(
            run_protocol(plan, scratch=scratch, emit=lambda e: notes.append(e.text) if e.kind == "note" else None)
        )
    preds = {}
    for path in sorted(folder.iterdir()):
        with np.load(path) as saved:
            preds[path.name] = saved["eval_pred"]
    return preds, [r.metrics for r in runs], notes


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("torch", {}),
        ("torch", {"backend_options": {"pca_precision": "float32"}}),
        ("torch", {"algorithm": "lloyd"}),
        ("reference", {}),
    ],
)
def test_extreme_magnitudes_cluster_as_ordinary_ones(tmp_path, backend, options):
    """float32 squared distances of features ×1e20 overflow and of ×1e-30 underflow (every run used
    to score NMI 0.000): the protocol rescales by powers of two, so the clusters are those of ×1."""
    x, y = blobs(40, 5, 6, seed=4, spread=0.3)
    base_preds, base_metrics, base_notes = eval_predictions(tmp_path, x, y, backend, options)
    assert all(m["acc"] == 1.0 and m["nmi"] == 1.0 for m in base_metrics) and not base_notes
    # the label-free scores are scale-free but read the projections and features, whose rounding
    # differs with the scale: equal to float precision, the label metrics exactly
    free = {entry.name for entry in get_plugins().metrics if not entry.needs_labels}
    for scale in (1e20, 1e-30, 2.0**66, 2.0**-99):
        preds, metrics, notes = eval_predictions(tmp_path, x * np.float32(scale), y, backend, options)
        for run, base in zip(metrics, base_metrics, strict=True):
            assert {k: v for k, v in run.items() if k not in free} == {
                k: v for k, v in base.items() if k not in free
            }, scale
            assert {k: run[k] for k in free} == pytest.approx({k: base[k] for k in free}, rel=1e-4), scale
        assert preds.keys() == base_preds.keys()
        for name, pred in preds.items():
            np.testing.assert_array_equal(pred, base_preds[name])
        assert len(notes) == 1 and "scaled by 2^" in notes[0], notes


def test_power_of_two_scaling_is_exact(tmp_path):
    """Scaling by a power of two changes no bit of the assignments, rescaled or not."""
    x, y = blobs(40, 5, 6, seed=9, spread=2.5)  # overlapping: a rounding difference would show
    base_preds, base_metrics, _ = eval_predictions(tmp_path, x, y, "torch")
    for exponent in (-90, -40, -20, 20, 40, 90):
        preds, metrics, _ = eval_predictions(tmp_path, np.ldexp(x, exponent), y, "torch")
        assert metrics == base_metrics, exponent
        for name, pred in preds.items():
            np.testing.assert_array_equal(pred, base_preds[name])


def test_projection_scale():
    assert projection_scale(0.0) == 0
    assert projection_scale(1.0) == projection_scale(2.0**32) == projection_scale(2.0**-32) == 0
    assert projection_scale(1e20) == -67 and 0.5 <= 1e20 * 2.0**-67 < 1
    assert projection_scale(1e-30) == 99 and 0.5 <= 1e-30 * 2.0**99 < 1


# --------------------------------------------------------------------------------------------------
# The features dataset: the same contract, one line naming the file


def test_features_dataset_refuses_what_the_api_refuses(tmp_path, capsys, separable):
    xtr, ytr, xev, yev = separable
    cases = {
        "complex": (xtr.astype(np.complex64), ytr, "train (", "features must be real numbers"),
        "bool": (xtr > 0, ytr, "train.npy) features must be real numbers", "got dtype bool"),
        "datetime": (xtr.astype("datetime64[s]"), ytr, "train.npy) features", "got dtype datetime64[s]"),
        "empty": (xtr[:0], ytr[:0], "train.npy) features have no rows", "(0, 6)"),
        "no dims": (xtr[:, :0], ytr, "features have no dimensions", "(150, 0)"),
        "1-D": (xtr[:, 0], ytr, "features must be a 2-D array", "got shape (150,)"),
        "string labels": (xtr, ytr.astype(str), "train_labels.npy) labels must be integer class indices", "<U"),
        "nan labels": (xtr, np.where(ytr == 2, np.nan, ytr), "labels must be integer class indices, got nan", "row"),
        "one-hot-ish": (xtr, np.eye(5)[ytr] * 0.5, "must be one-hot rows", "(150, 5)"),
        "nan features": (
            np.where(ytr[:, None] == 1, np.nan, xtr),
            ytr,
            "features/train (raw) features contain NaN",
            "row 3",
        ),
    }
    for case, (features, labels, *expected) in cases.items():
        folder = tmp_path / case.replace(" ", "-")
        folder.mkdir()
        spec = features_spec(folder, features, labels, xev, yev)
        message = cli_error(capsys, "run", str(spec), "--out", str(folder / "out"))
        assert all(part in message for part in expected), (case, message)


def test_features_dataset_labels_sparse_one_hot_and_columns(tmp_path, capsys, separable):
    """Sparse labels are renumbered (their names kept as class names), one-hot rows and a single
    column of indices are labels: all give the numbers of plain labels."""
    from sslbench import cli

    xtr, ytr, xev, yev = separable
    results = {}
    for case, (train, val) in {
        "plain": (ytr, yev),
        "sparse": (ytr * 10**12, yev * 10**12),
        "one-hot": (np.eye(5, dtype=np.uint8)[ytr], np.eye(5, dtype=np.uint8)[yev]),
        "column": (ytr[:, None], yev[:, None]),
    }.items():
        folder = tmp_path / case
        folder.mkdir()
        spec = features_spec(folder, xtr, train, xev, val)
        assert cli.main(["run", str(spec), "--out", str(folder / "out")]) == 0, capsys.readouterr().err
        results[case] = load_results(folder / "out")
    capsys.readouterr()
    for case, got in results.items():
        assert got.runs[0].protocol.n_classes == 5, case
        assert got.runs[0].metrics == results["plain"].runs[0].metrics, case


@pytest.mark.slow
def test_features_dataset_bad_files_in_a_real_process(tmp_path, separable):
    """The CLI in its own process: exit 2, one line, no traceback (a .npy where `file` wants an .npz
    was an AttributeError; complex features lost their imaginary part without a word)."""
    xtr, ytr, xev, yev = separable
    np.save(tmp_path / "feats.npy", xtr)
    proc = run_cli("run", str(npz_spec(tmp_path, tmp_path / "feats.npy")), "--out", "out", cwd=tmp_path)
    assert_cli_user_error(proc, "feats.npy: `file` takes an .npz archive of <split>_embs and <split>_labs arrays")

    spec = features_spec(tmp_path, xtr + 1j * xtr, ytr, xev, yev)
    proc = run_cli("run", str(spec), "--out", "out", cwd=tmp_path)
    assert_cli_user_error(
        proc, "train.npy) features must be real numbers (a floating or integer dtype), got dtype complex"
    )
    assert not (tmp_path / "out" / "results.json").exists()


def test_npz_layout_problems_name_the_file(tmp_path, capsys, separable):
    xtr, ytr, xev, yev = separable
    np.savez(tmp_path / "labs.npz", train_embs=xtr, val_embs=xev, val_labs=yev)
    assert "labs.npz: has train_embs but no train_labs" in cli_error(
        capsys, "run", str(npz_spec(tmp_path, tmp_path / "labs.npz")), "--out", str(tmp_path / "out")
    )
    np.savez(tmp_path / "pickled.npz", train_embs=xtr, train_labs=np.array([{}] * 150, dtype=object))
    assert "cannot read" in cli_error(
        capsys, "run", str(npz_spec(tmp_path, tmp_path / "pickled.npz")), "--out", str(tmp_path / "out")
    )
    np.savez(tmp_path / "cut.npz", train_embs=xtr, train_labs=ytr, val_embs=xev, val_labs=yev)
    data = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    assert f"cannot read {tmp_path / 'cut.npz'}: BadZipFile: File is not a zip file" in cli_error(
        capsys, "run", str(npz_spec(tmp_path, tmp_path / "cut.npz")), "--out", str(tmp_path / "out")
    )
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04" + os.urandom(200))
    assert "garbage.npz" in cli_error(
        capsys, "run", str(npz_spec(tmp_path, tmp_path / "garbage.npz")), "--out", str(tmp_path / "out")
    )
    # An .npz where `splits` wants .npy files.
    spec = features_spec(tmp_path, xtr, ytr, xev, yev)
    np.savez(tmp_path / "train.npy.npz", x=xtr)
    os.replace(tmp_path / "train.npy.npz", tmp_path / "train.npy")
    assert "train.npy: `splits` takes .npy files, this is an .npz archive" in cli_error(
        capsys, "run", str(spec), "--out", str(tmp_path / "out")
    )


# --------------------------------------------------------------------------------------------------
# 3. Output checked before any work


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("file", "the output directory {tmp}/file exists and is not a directory"),
        ("file/below", "cannot create the output directory {tmp}/file/below: Not a directory"),
        ("x" * 300, "cannot create the output directory {tmp}/" + "x" * 300 + ": File name too long"),
        ("nul\0name", "cannot create the output directory '{tmp}/nul\\x00name': embedded null byte"),
    ],
)
def test_unusable_output_directory_is_refused_before_any_work(tmp_path, capsys, separable, out, message):
    (tmp_path / "file").write_text("not a directory")
    spec = features_spec(tmp_path, *separable, epochs=10_000)  # would take minutes
    started = time.perf_counter()
    assert cli_error(capsys, "run", str(spec), "--out", f"{tmp_path}/{out}") == "sslbench: error: " + message.format(
        tmp=tmp_path
    )
    assert time.perf_counter() - started < 10


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_refused(tmp_path, capsys, separable):
    spec = features_spec(tmp_path, *separable)
    (tmp_path / "ro").mkdir(mode=0o555)
    assert f"cannot write to the output directory {tmp_path}/ro: Permission denied" in cli_error(
        capsys, "run", str(spec), "--out", str(tmp_path / "ro")
    )


def test_unusable_cache_directory_is_refused_before_any_work(tmp_path, capsys, separable):
    (tmp_path / "file").write_text("")
    spec = features_spec(tmp_path, *separable, epochs=10_000)
    spec.write_text(spec.read_text() + f"cache_dir: {tmp_path / 'file' / 'cache'}\n")
    expected = f"cannot create the cache directory {tmp_path}/file/cache: Not a directory"
    assert expected in cli_error(capsys, "run", str(spec), "--out", str(tmp_path / "out"))
    assert expected in cli_error(capsys, "extract", str(spec))


def test_results_are_written_with_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        os.umask(0o077)
        write_atomic(tmp_path / "b.json", "{}")
        (tmp_path / "c.json").write_text("")
        (tmp_path / "c.json").chmod(0o640)
        write_atomic(tmp_path / "c.json", "{}")  # a replaced file keeps its permissions
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "a.json": 0o644,
        "b.json": 0o600,
        "c.json": 0o640,
    }


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, separable):
    from sslbench import predictions

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    spec = features_spec(tmp_path, *separable, epochs=1)
    with monkeypatch.context() as patch:
        patch.setattr("sslbench.results.os.fsync", full)
        message = cli_error(capsys, "run", str(spec), "--out", str(tmp_path / "out"))
    assert message == f"sslbench: error: cannot write {tmp_path}/out/results.json: No space left on device"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]

    with monkeypatch.context() as patch:
        patch.setattr(predictions.np, "savez_compressed", full)
        message = cli_error(capsys, "run", str(spec), "--out", str(tmp_path / "out2"), "--save-predictions")
    assert message.startswith(f"sslbench: error: cannot write predictions {tmp_path}/out2/predictions/raw__features")
    assert message.endswith(": No space left on device")

    results = evaluate_features(*separable, seeds=1, epochs=1)
    with monkeypatch.context() as patch:
        patch.setattr("sslbench.results.os.fsync", full)
        with pytest.raises(SSLBenchError) as info:
            results.write(tmp_path / "r.json")
    assert one_line(info.value) == f"cannot write {tmp_path}/r.json: No space left on device"


# --------------------------------------------------------------------------------------------------
# 4. Damaged results and predictions files; signals; Lloyd's progress


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not an sslbench results file: not UTF-8 text (a binary file?)"),
        (b"", "not an sslbench results file: (top level): Invalid JSON"),
        (b"{runs: [}", "not an sslbench results file: (top level): Invalid JSON"),
        (b"[1, 2]", "not an sslbench results file: (top level): Input should be an object"),
        (b'{"schema_version": 1}', "not an sslbench results file: sslbench_version: Field required"),
    ],
)
def test_report_of_a_file_that_is_not_results(tmp_path, capsys, content, message):
    (tmp_path / "results.json").write_bytes(content)
    assert f"{tmp_path}/results.json: {message}" in cli_error(capsys, "report", str(tmp_path))
    assert message in cli_error(capsys, "plot", str(tmp_path / "results.json"), "--out", str(tmp_path / "f"))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, separable):
    """A run directory with predictions, written once by the CLI."""
    from sslbench import cli

    folder = tmp_path_factory.mktemp("saved")
    spec = features_spec(folder, *separable, epochs=1)
    assert cli.main(["run", str(spec), "--out", str(folder / "run"), "--save-predictions"]) == 0
    (path,) = (folder / "run" / "predictions").iterdir()
    return folder / "run", path


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


def _write_npz(path: Path, **arrays) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b"not a zip"), "{path}: not a predictions file (not an .npz archive)"),
        (lambda p: p.write_bytes(p.read_bytes()[:-40]), "cannot read predictions {path}: File is not a zip file"),
        (lambda p: _write_npy(p, np.arange(3)), "{path}: not a predictions file (not an .npz archive)"),
        (
            lambda p: _write_npz(p, train_pred=np.arange(3)),
            "{path}: not a predictions file: no eval_pred or eval_labels",
        ),
        (
            lambda p: _write_npz(p, eval_pred=np.zeros(3), eval_labels=np.zeros(3, int)),
            "{path}: eval_pred must be a 1-D integer array, got float64 of shape (3,)",
        ),
        (
            lambda p: _write_npz(p, eval_pred=np.zeros((3, 2), int), eval_labels=np.zeros(3, int)),
            "eval_pred must be a 1-D integer array, got int64 of shape (3, 2)",
        ),
        (
            lambda p: _write_npz(p, eval_pred=np.array(["a"]), eval_labels=np.zeros(1, int)),
            "eval_pred must be a 1-D integer array, got <U1",
        ),
        (
            lambda p: _write_npz(p, eval_pred=np.array([0, -1]), eval_labels=np.zeros(2, int)),
            "eval_pred holds values outside [0, 2^63) (-1 to 0)",
        ),
        (
            lambda p: _write_npz(p, eval_pred=np.zeros(3, int), eval_labels=np.zeros(2, int)),
            "eval_pred has 3 entries but eval_labels 2",
        ),
        (
            lambda p: _write_npz(p, eval_pred=np.zeros(0, int), eval_labels=np.zeros(0, int)),
            "the eval split has no predictions",
        ),
        (
            lambda p: _write_npz(p, eval_pred=np.array([0, 1], dtype=object), eval_labels=np.zeros(2, int)),
            "cannot read predictions {path}: Object arrays cannot be loaded when allow_pickle=False",
        ),
    ],
)
def test_clusters_of_a_damaged_predictions_file(saved_run, capsys, damage, message):
    run_dir, path = saved_run
    original = path.read_bytes()
    try:
        damage(path)
        got = cli_error(capsys, "clusters", str(run_dir), "--model", "raw")
    finally:
        path.write_bytes(original)
    assert message.format(path=path) in got


def test_clusters_with_huge_labels_and_cluster_ids_use_little_memory(saved_run, capsys):
    from sslbench import cli

    run_dir, path = saved_run
    original = path.read_bytes()
    try:
        _write_npz(path, eval_pred=np.array([10**12, 10**12, 3] * 4), eval_labels=np.array([10**15, 10**15, 2] * 4))
        assert cli.main(["clusters", str(run_dir), "--model", "raw", "--min-size", "1"]) == 0
    finally:
        path.write_bytes(original)
    out = capsys.readouterr().out
    assert "2 non-empty clusters" in out and "1000000000000" in out and "1000000000000000" in out


@pytest.mark.slow
def test_a_terminated_run_removes_its_scratch_folder(tmp_path, separable):
    """``cache: false`` keeps features in the run's scratch folder: SIGTERM runs the cleanup that
    Ctrl-C runs (it used to leave the folder until the next run), and the exit status says so."""
    signum = signal.SIGTERM
    x, y = blobs(400, 5, 32, seed=1)
    spec = features_spec(tmp_path, x[:1500], y[:1500], x[1500:], y[1500:], epochs=1_000_000, cache=False)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sslbench", "run", str(spec), "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env={**os.environ, "SSLBENCH_CACHE": str(cache)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        mine: list[Path] = []
        while not mine or not any((folder / "projections").exists() for folder in mine):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached clustering"
            time.sleep(0.2)
            mine = list((cache / ".scratch").glob(f"{proc.pid}-*")) if (cache / ".scratch").is_dir() else []
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"sslbench: terminated ({signal.Signals(signum).name})"
    assert not [folder for folder in mine if folder.exists()]


def test_sighup_unwinds_like_sigterm_and_handlers_are_restored(capsys, monkeypatch):
    from sslbench import cli

    cleaned = []

    def hung_up(args, plugins):
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler interrupts this
        finally:
            cleaned.append(True)
        return 0

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(cli, "cmd_models", hung_up)
    started = time.perf_counter()
    assert cli.main(["models"]) == 128 + signal.SIGHUP
    assert time.perf_counter() - started < 4 and cleaned == [True]
    assert capsys.readouterr().err.strip() == "sslbench: terminated (SIGHUP)"
    assert {signum: signal.getsignal(signum) for signum in before} == before


class _Recorder:
    """A Progress that records each task's total, unit and advances."""

    def __init__(self) -> None:
        self.tasks: list[dict] = []

    def task(self, description, total, unit=""):
        record = {"description": description, "total": total, "unit": unit, "done": 0}
        self.tasks.append(record)

        class Task:
            def advance(self, amount=1):
                record["done"] += amount

        return Task()


@pytest.mark.parametrize(
    ("options", "total", "unit"),
    [
        ({}, 2, "epochs"),
        ({"algorithm": "lloyd"}, 300, "iterations"),
        ({"algorithm": "lloyd", "max_iter": 7}, 7, "iterations"),
    ],
)
def test_kmeans_progress_counts_what_the_algorithm_runs(tmp_path, separable, options, total, unit):
    """Lloyd runs up to max_iter iterations, not epochs: the bar says so, and ends full when the fit
    converges early (it used to show "10 of 2 epochs")."""
    xtr, ytr, xev, yev = separable
    protocol = ProtocolSpec.model_validate({"epochs": [2], "seeds": [0], **options})
    plugins = get_plugins()
    plan = plan_protocol(
        checked_split("train", xtr, ytr),
        checked_split("eval", xev, yev),
        n_classes=5,
        protocol=protocol,
        plugins=plugins,
        model="m",
        dataset="d",
    )
    recorder = _Recorder()
    with run_scratch(tmp_path) as scratch:
        list(run_protocol(plan, scratch=scratch, progress=recorder))
    (kmeans,) = [t for t in recorder.tasks if t["description"].startswith("k-means")]
    assert (kmeans["total"], kmeans["unit"], kmeans["done"]) == (total, unit, total)


# --------------------------------------------------------------------------------------------------
# 5. Properties on random inputs (hypothesis; derandomized, bounded)

#: Features and labels every backend takes, in every dtype and magnitude the contract allows.
FEATURE_DTYPES = (np.float32, np.float32, np.float64, np.float16, np.int64, np.int16, np.uint8)
MAGNITUDES = (1.0, 1.0, 2.0**40, 2.0**-40, 1e20, 1e-30, 2.0**90, 2.0**-95)
LABEL_KINDS = ("int64", "int64", "uint8", "int32", "whole floats", "sparse", "sparse")
#: What may be wrong with an example, at most two things at once (half the examples have none).
FLAWS = (
    "dtype bool",
    "dtype complex",
    "dtype datetime",
    "dtype str",
    "dtype object",
    "nan",
    "inf",
    "huge",
    "tiny",
    "no rows",
    "no dims",
    "1-D",
    "3-D",
    "fraction labels",
    "nan labels",
    "str labels",
    "negative labels",
    "bool labels",
    "2-D labels",
    "fewer labels",
)


@st.composite
def hostile_inputs(draw):
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    n_classes = draw(st.integers(1, 4))
    n_train, n_eval, dims = draw(st.integers(4, 40)), draw(st.integers(1, 15)), draw(st.integers(1, 5))
    centres = rng.normal(scale=4.0, size=(n_classes, dims))
    ytr, yev = rng.integers(0, n_classes, n_train), rng.integers(0, n_classes, n_eval)
    xtr = centres[ytr] + rng.normal(size=(n_train, dims))
    xev = centres[yev] + rng.normal(size=(n_eval, dims))
    count = draw(st.sampled_from([0, 0, 1, 1, 2]))
    flaws = set(draw(st.lists(st.sampled_from(FLAWS), min_size=count, max_size=count)))
    event(f"flaws: {len(flaws)}")
    magnitude = draw(st.sampled_from(MAGNITUDES))
    magnitude = 2.0**120 if "huge" in flaws else 2.0**-120 if "tiny" in flaws else magnitude
    xtr, xev = xtr * magnitude, xev * magnitude
    if "nan" in flaws or "inf" in flaws:
        xtr.flat[draw(st.integers(0, xtr.size - 1))] = np.nan if "nan" in flaws else -np.inf
    dtype = draw(st.sampled_from(FEATURE_DTYPES))
    for flaw, bad in (("bool", np.bool_), ("complex", np.complex64), ("datetime", "datetime64[ms]")):
        dtype = bad if f"dtype {flaw}" in flaws else dtype
    dtype = np.str_ if "dtype str" in flaws else object if "dtype object" in flaws else dtype
    with np.errstate(all="ignore"):
        if dtype == "datetime64[ms]":
            xtr, xev = xtr.astype(np.int64), xev.astype(np.int64)
        xtr, xev = (np.asarray(x).astype(dtype) for x in (xtr, xev))
    if "no rows" in flaws:
        xtr, ytr = xtr[:0], ytr[:0]
    if "no dims" in flaws:
        xev = xev[:, :0]
    if "1-D" in flaws:
        xtr = xtr[:, 0]
    if "3-D" in flaws:
        xev = xev[:, :, None]
    kind = draw(st.sampled_from(LABEL_KINDS))
    if kind == "sparse":
        ids = np.array(draw(st.lists(st.integers(0, 2**62), min_size=n_classes, max_size=n_classes, unique=True)))
        ytr, yev = ids[ytr], ids[yev]
    elif kind == "whole floats":
        ytr, yev = ytr.astype(np.float64), yev.astype(np.float32)
    elif kind != "int64":
        ytr, yev = ytr.astype(kind), yev.astype(kind)
    if "fraction labels" in flaws:
        ytr = ytr + 0.5
    if "nan labels" in flaws:
        yev = np.where(np.arange(len(yev)) == 0, np.nan, yev)
    if "str labels" in flaws:
        ytr = ytr.astype(str)
    if "negative labels" in flaws:
        ytr = ytr.astype(np.int64) - 2**62
    if "bool labels" in flaws:
        yev = yev > 0
    if "2-D labels" in flaws:
        ytr = ytr[:, None].repeat(2, axis=1)
    if "fewer labels" in flaws:
        yev = yev[:-1]
    params = {
        "n_clusters": draw(st.sampled_from([None, None, 1, 2, np.int64(2), np.uint16(3)])),
        "epochs": draw(st.sampled_from([1, 2, np.int32(1)])),
        "seeds": draw(st.sampled_from([1, np.int64(1), [np.int16(3)]])),
        "backend": draw(st.sampled_from(["torch", "reference"])),
        "pca_dim": draw(st.sampled_from([None, None, 1, np.int8(2)])),
    }
    return xtr, ytr, xev, yev, params


def assert_valid_metrics(results) -> None:
    for run in results.runs:
        for name in UNIT_METRICS:
            assert -1e-9 <= run.metrics[name] <= 1 + 1e-9, (name, run.metrics[name])
        for name in SIGNED_METRICS:
            assert -1 - 1e-9 <= run.metrics[name] <= 1 + 1e-9, (name, run.metrics[name])


@settings(
    derandomize=True,
    max_examples=70,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(hostile_inputs())
def test_any_input_is_refused_in_one_line_or_scored_in_range(inputs):
    """Random dtypes, shapes, NaN/inf sprinkles, huge and tiny magnitudes, sparse or broken labels and
    NumPy-typed parameters: either a one-line SSLBenchError, or metrics in their ranges."""
    xtr, ytr, xev, yev, params = inputs
    try:
        results = evaluate_features(xtr, ytr, xev, yev, device="cpu", **params)
    except SSLBenchError as exc:
        one_line(exc)
        event(f"refused: {str(exc).split(' ', 1)[1][:40]}")
        return
    event("scored")
    assert_valid_metrics(results)


@st.composite
def lossless_changes(draw):
    """Clean inputs, and a lossless change of them: features times a power of two, labels through an
    order-preserving map onto sparse ids (renumbered back to the same classes)."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    n_classes, dims = draw(st.integers(2, 4)), draw(st.integers(1, 5))
    n_train, n_eval = draw(st.integers(8, 40)), draw(st.integers(2, 15))
    centres = rng.normal(scale=draw(st.sampled_from([1.0, 4.0])), size=(n_classes, dims))
    ytr, yev = rng.integers(0, n_classes, n_train), rng.integers(0, n_classes, n_eval)
    ytr[:n_classes] = np.arange(n_classes)  # every class occurs: the classes are 0..n-1 either way
    xtr = (centres[ytr] + rng.normal(size=(n_train, dims))).astype(np.float32)
    xev = (centres[yev] + rng.normal(size=(n_eval, dims))).astype(np.float32)
    exponent = draw(st.sampled_from([0, 3, -7, 40, -40, 66, -95, 90]))
    steps = np.cumsum(draw(st.lists(st.integers(1, 2**50), min_size=n_classes, max_size=n_classes)))
    relabel = draw(st.booleans())
    params = {
        "backend": draw(st.sampled_from(["torch", "reference"])),
        "epochs": draw(st.sampled_from([1, 2])),
        "n_clusters": draw(st.sampled_from([None, 2, 3])),
        "whiten": draw(st.booleans()),
    }
    return (xtr, ytr, xev, yev), exponent, (steps + 2**60 if relabel else None), params


@settings(derandomize=True, max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lossless_changes())
def test_lossless_changes_change_no_metric(change):
    (xtr, ytr, xev, yev), exponent, ids, params = change
    clean = evaluate_features(xtr, ytr, xev, yev, seeds=1, device="cpu", **params)
    assert_valid_metrics(clean)
    assert np.all(np.abs(np.ldexp(xtr, exponent)) <= MAX_FEATURE_MAGNITUDE)
    train_labels, eval_labels = (ytr, yev) if ids is None else (ids[ytr], ids[yev])
    changed = evaluate_features(
        np.ldexp(xtr, exponent), train_labels, np.ldexp(xev, exponent), eval_labels, seeds=1, device="cpu", **params
    )
    assert changed.runs[0].metrics == clean.runs[0].metrics
    assert changed.runs[0].protocol.n_classes == clean.runs[0].protocol.n_classes
