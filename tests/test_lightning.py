"""The Lightning callback: a real Trainer on the CPU logs what a direct evaluate_model call on the same
weights returns, through the trainer's own logger (CSVLogger's file); the DDP run is a subprocess."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sslbench
from sslbench.errors import SSLBenchError

if importlib.util.find_spec("lightning") is None and os.environ.get("SSLBENCH_REQUIRE_LIGHTNING") != "1":
    pytest.skip("pip install 'sslbench[lightning]'", allow_module_level=True)

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from sslbench.lightning import SSLBenchCallback

from helpers.lightning_tiny import PROTOCOL, Encoder, TinyModule, digits_loader, to_tensor

pytestmark = [
    # Lightning's advice for real runs (more loader workers, …) is beside the point of a three-batch CPU run.
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    # Lightning 2.6 calls torch's pytree API in a way torch 2.10+ deprecates (not sslbench's code).
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
]

DDP_WORKER = Path(__file__).with_name("lightning_ddp_worker.py")


def expected_metrics(encoder: torch.nn.Module) -> dict[str, float]:
    """What the callback should log: a direct evaluate_model call, read from its Results by hand."""
    results = sslbench.evaluate_model(encoder, "digits", transform=to_tensor, **PROTOCOL)
    (row,) = results.summary
    expected = {f"sslbench/digits/{name}": summary.mean for name, summary in row.metrics.items()}
    (knn,) = results.probes
    expected["sslbench/digits/knn_top1_k5"] = knn.metrics["knn_top1_k5"]
    return expected


def logged_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("sslbench/digits/acc")]


def trainer(tmp_path: Path, callback: SSLBenchCallback, **options) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="logs"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **options,
    )


def test_every_n_epochs_logs_what_evaluate_model_returns(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    callback = SSLBenchCallback(["digits"], encoder="backbone", every_n_epochs=2, transform=to_tensor, **PROTOCOL)
    run = trainer(tmp_path, callback, max_epochs=2, limit_train_batches=3)
    run.fit(module, digits_loader())
    # After epoch index 1 only (every second epoch); training ended there, so the weights are those evaluated.
    expected = expected_metrics(module.backbone)
    (row,) = logged_rows(run.logger)
    assert {name: float(row[name]) for name in expected} == expected
    assert row["step"] == "6"  # trainer.global_step after 2 × 3 batches
    assert {name: run.callback_metrics[name].item() for name in expected} == expected
    assert run.callback_metrics["sslbench/digits/acc"].dtype == torch.float64


def test_every_n_steps_reaches_the_logger_whatever_log_every_n_steps(tmp_path):
    torch.manual_seed(1)
    module = TinyModule()
    callback = SSLBenchCallback(
        ["digits"], encoder=lambda m: m.backbone, every_n_steps=2, transform=to_tensor, **PROTOCOL
    )
    run = trainer(tmp_path, callback, max_steps=4, log_every_n_steps=50)
    run.fit(module, digits_loader())
    rows = logged_rows(run.logger)
    assert [row["step"] for row in rows] == ["2", "4"]
    expected = expected_metrics(module.backbone)
    assert {name: float(rows[-1][name]) for name in expected} == expected
    assert float(rows[0]["sslbench/digits/acc"]) != expected["sslbench/digits/acc"]  # the model moved


def test_model_checkpoint_monitors_the_logged_metric(tmp_path):
    """The metrics are in trainer.callback_metrics: ModelCheckpoint keeps the epoch with the best ACC."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(2)
    callback = SSLBenchCallback(["digits"], encoder="backbone", transform=to_tensor, **PROTOCOL)
    best = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="sslbench/digits/acc", mode="max", save_on_train_epoch_end=True
    )
    run = pl.Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="logs"),
        callbacks=[callback, best],
        max_epochs=3,
        limit_train_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    run.fit(TinyModule(), digits_loader())
    accuracies = [float(row["sslbench/digits/acc"]) for row in logged_rows(run.logger)]
    assert len(accuracies) == 3
    assert best.best_model_score.item() == max(accuracies)
    assert best.best_model_path.endswith(
        f"epoch={accuracies.index(max(accuracies))}-step={2 * (accuracies.index(max(accuracies)) + 1)}.ckpt"
    )


def test_a_wrong_encoder_fails_before_training(tmp_path):
    module = TinyModule()
    callback = SSLBenchCallback(["digits"], encoder="backbone.nope", transform=to_tensor)
    with pytest.raises(SSLBenchError, match=r"encoder 'backbone\.nope': Encoder has no attribute 'nope'"):
        trainer(tmp_path, callback, max_steps=1).fit(module, digits_loader())
    assert module.global_step == 0


def test_bad_arguments_are_one_line():
    with pytest.raises(SSLBenchError, match="every_n_epochs or every_n_steps, not both"):
        SSLBenchCallback(["digits"], every_n_epochs=1, every_n_steps=1)
    with pytest.raises(SSLBenchError, match="unknown keyword 'seed'"):
        SSLBenchCallback(["digits"], seed=3)
    with pytest.raises(SSLBenchError, match="every must be a positive integer"):
        SSLBenchCallback(["digits"], every_n_steps=0)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_logs_the_single_process_numbers(tmp_path):
    """Trainer(strategy="ddp", devices=2) on the CPU: both ranks evaluate together (evaluate_model is
    collective) and hold the numbers a single process computes with the trained weights."""
    proc = subprocess.run(
        [sys.executable, str(DDP_WORKER), str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(DDP_WORKER.parent), os.environ.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    encoder = Encoder()
    encoder.load_state_dict(torch.load(tmp_path / "backbone.pt"))
    expected = expected_metrics(encoder)
    for rank in (0, 1):
        held = json.loads((tmp_path / f"callback_metrics_rank{rank}.json").read_text())
        assert {name: held[name] for name in expected} == expected, rank
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("sslbench/digits/acc")]
    assert len(rows) == 1 and {name: float(rows[0][name]) for name in expected} == expected
