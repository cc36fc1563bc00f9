"""Run as a script by tests/test_lightning.py: a Lightning Trainer with DDP on two CPU processes (Lightning
starts the second one by running this script again), the sslbench callback evaluating after the epoch.

Writes to OUT: each rank's ``trainer.callback_metrics`` (JSON), rank 0's CSV log (metrics.csv) and the
trained encoder's weights (backbone.pt), which the test evaluates in a single process.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from sslbench.lightning import SSLBenchCallback

from helpers.lightning_tiny import PROTOCOL, TinyModule, digits_loader, to_tensor


def main(out: Path) -> None:
    # Lightning's advice for an epoch-level value logged without sync_dist would mean ranks could differ.
    warnings.filterwarnings("error", message=".*sync_dist=True.*")
    torch.manual_seed(0)
    module = TinyModule()
    callback = SSLBenchCallback(["digits"], encoder="backbone", transform=to_tensor, **PROTOCOL)
    logger = CSVLogger(out / "logs", name="ddp")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=3,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, digits_loader())
    held = {name: value.item() for name, value in trainer.callback_metrics.items()}
    (out / f"callback_metrics_rank{trainer.global_rank}.json").write_text(json.dumps(held))
    if trainer.is_global_zero:
        torch.save(module.backbone.state_dict(), out / "backbone.pt")
        shutil.copy(Path(logger.log_dir) / "metrics.csv", out / "metrics.csv")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
