"""A PyTorch Lightning callback: sslbench's evaluation every N epochs or steps, logged through the
trainer's own loggers (optional extra: ``pip install 'sslbench[lightning]'``).

It subclasses ``lightning.pytorch.Callback``: a ``lightning.Trainer``'s callback (the ``lightning``
package; the older ``pytorch_lightning`` package's Trainer takes its own Callback class). It is an
adapter around :class:`sslbench.training.Evaluator` (the same object a hand-written loop uses).
Under DDP Lightning calls the callback on every rank; :func:`sslbench.evaluate_model` is collective
(each rank embeds a shard, every rank returns the same results), so every rank evaluates and logs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sslbench.errors import SSLBenchError
from sslbench.interfaces import Dataset
from sslbench.plugins import Plugins
from sslbench.training import Evaluator

try:
    import lightning.pytorch as pl
    import torch
except ImportError:
    raise SSLBenchError("sslbench.lightning needs PyTorch Lightning: pip install 'sslbench[lightning]'") from None


class SSLBenchCallback(pl.Callback):
    """Evaluate the encoder of a ``LightningModule`` every N epochs (or steps) while it trains.

    ::

        trainer = lightning.Trainer(callbacks=[SSLBenchCallback(["digits"], encoder="backbone",
                                                                 every_n_epochs=5, epochs=20, seeds=3)])

    Each evaluation's metrics (:func:`sslbench.training.flat_metrics`: ``sslbench/<dataset>/<metric>``,
    clustering metrics as the mean over seeds, a probe's as its single value) are

    * written to every logger of the trainer (``trainer.loggers``) by global rank zero, at step
      ``trainer.global_step`` (directly, so that Trainer's ``log_every_n_steps`` cannot drop them);
    * logged with ``pl_module.log(..., logger=False)`` on every rank, so they are in
      ``trainer.callback_metrics`` and ``ModelCheckpoint`` or ``EarlyStopping`` can monitor them. The
      ranks hold the same values (the evaluator checks it), so the ``sync_dist`` reduction Lightning asks
      for in a distributed run is a maximum, which returns them unchanged.

    Values are float64 (float32 on Apple's MPS, which has no float64).

    :param datasets: as :class:`~sslbench.training.Evaluator` takes them (ids, Datasets, mappings).
    :param encoder: what to evaluate: ``None`` (the LightningModule itself), the name of an attribute
        (``"backbone"``, dotted for a nested one: ``"model.encoder"``), or a callable
        ``LightningModule → model`` (a module or any callable batch → ``(batch, dims)`` features).
    :param every_n_epochs: evaluate after every N-th training epoch (the default, 1).
    :param every_n_steps: instead, after every N-th optimiser step (``trainer.global_step``).
    :param keywords: every other keyword of :func:`sslbench.evaluate_model` (``transform``, ``epochs``,
        ``seeds``, ``probes`` …), for all datasets.
    """

    def __init__(
        self,
        datasets: Sequence[str | Dataset | Mapping[str, Any]],
        *,
        encoder: str | Callable[[Any], Any] | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        plugins: Plugins | None = None,
        **keywords: Any,
    ) -> None:
        if every_n_epochs is not None and every_n_steps is not None:
            raise SSLBenchError("SSLBenchCallback: give every_n_epochs or every_n_steps, not both")
        if encoder is not None and not (isinstance(encoder, str) and encoder) and not callable(encoder):
            raise SSLBenchError(f"SSLBenchCallback: encoder must be an attribute name or a callable, got {encoder!r}")
        self.by_step = every_n_steps is not None
        every = every_n_steps if every_n_steps is not None else every_n_epochs if every_n_epochs is not None else 1
        self.evaluator = Evaluator(datasets, every=every, plugins=plugins, **keywords)
        self.encoder = encoder
        self._evaluated_step = -1

    def encoder_of(self, pl_module: Any) -> Any:
        """The model evaluated for ``pl_module``, as ``encoder`` says."""
        if self.encoder is None:
            return pl_module
        if not isinstance(self.encoder, str):
            return self.encoder(pl_module)
        found = pl_module
        for part in self.encoder.split("."):
            if not hasattr(found, part):
                raise SSLBenchError(
                    f"SSLBenchCallback: encoder '{self.encoder}': {type(found).__name__} has no attribute '{part}'"
                )
            found = getattr(found, part)
        return found

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.encoder_of(pl_module)  # a wrong attribute name fails before training, not after an epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.by_step and self.evaluator.due(trainer.current_epoch):
            self._evaluate_and_log(trainer, pl_module, on_step=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With gradient accumulation several batches end at one global step: evaluate it once.
        step = trainer.global_step
        if self.by_step and step > 0 and step != self._evaluated_step and self.evaluator.due(step - 1):
            self._evaluated_step = step
            self._evaluate_and_log(trainer, pl_module, on_step=True)

    def _evaluate_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        metrics = self.evaluator.evaluate(self.encoder_of(pl_module))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
        for name, value in metrics.items():
            pl_module.log(
                name,
                torch.tensor(value, dtype=dtype, device=pl_module.device),
                on_step=on_step,
                on_epoch=not on_step,
                logger=False,
                sync_dist=True,
                reduce_fx="max",
            )
