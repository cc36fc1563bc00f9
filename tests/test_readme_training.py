"""README's "Evaluating while you train" says only what runs: its plain-loop block is a verbatim excerpt of
examples/ddp_training_loop.py (run under torchrun by tests/test_training.py), its Lightning block runs."""

from __future__ import annotations

import importlib.util
import os
import textwrap
from pathlib import Path

import pytest
from test_readme_commands import README, fenced_blocks

from conftest import REPO

EXAMPLE = REPO / "examples" / "ddp_training_loop.py"


def marked_block(name: str) -> str:
    (body,) = [
        body for marker, info, body in fenced_blocks(README) if info == "python" and marker.startswith(f"test: {name} ")
    ]
    return body


def test_the_loop_block_is_the_example_a_test_runs():
    assert textwrap.indent(marked_block("ddp-loop"), "    ") in EXAMPLE.read_text(encoding="utf-8")
    runner = (REPO / "tests" / "test_training.py").read_text(encoding="utf-8")
    assert 'EXAMPLE = REPO / "examples" / "ddp_training_loop.py"' in runner and "run_torchrun(str(EXAMPLE)" in runner


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")
# The README's Trainer takes Lightning's default logger: CSVLogger, with a note where tensorboard is missing.
@pytest.mark.filterwarnings("ignore:Starting from v1.9.0, `tensorboardX` has been removed:UserWarning")
def test_the_lightning_block_runs(tmp_path, monkeypatch):
    if importlib.util.find_spec("lightning") is None and os.environ.get("SSLBENCH_REQUIRE_LIGHTNING") != "1":
        pytest.skip("pip install 'sslbench[lightning]'")
    if (
        not Path("/usr/share/datasets/fashion-mnist").is_dir()
        and os.environ.get("SSLBENCH_REQUIRE_FASHION_MNIST") != "1"
    ):
        pytest.skip("apt-get install dataset-fashion-mnist")
    from helpers.lightning_tiny import TinyModule, digits_loader, to_tensor

    monkeypatch.chdir(tmp_path)  # the Trainer's logs and checkpoints
    names = {"module": TinyModule(), "train_loader": digits_loader(), "eval_transform": to_tensor, "max_epochs": 5}
    exec(compile(marked_block("lightning"), "README.md (Lightning)", "exec"), names)
    held = names["trainer"].callback_metrics
    for name in ("sslbench/digits/acc", "sslbench/fashion_mnist/nmi", "sslbench/fashion_mnist/knn_top1_k20"):
        assert 0.0 < held[name].item() <= 1.0, name
    results = names["evaluation"].evaluator.results["fashion_mnist"]
    assert (results.runs[0].n_train, results.runs[0].n_eval, len(results.runs)) == (2000, 1000, 3)
