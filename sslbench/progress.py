"""Progress reporting: a rich progress bar on a terminal, nothing in the Python API and tests.

Bars live only while their work runs: a finished bar is removed, so a long spec leaves on the
terminal the lines the CLI prints per stage (features ready, one summary per protocol point), not
hundreds of finished bars.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Task(Protocol):
    def advance(self, amount: float = 1) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: float | None, unit: str = "") -> Task: ...


class _NullTask:
    def advance(self, amount: float = 1) -> None:
        pass


class NullProgress:
    """Reports nothing."""

    def task(self, description: str, total: float | None, unit: str = "") -> Task:
        return _NullTask()


class RichProgress:
    """Bars with rate (images/s for extraction, epochs/s for k-means) and time remaining."""

    def __init__(self, console: object | None = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichBar

        self._bar = RichBar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,  # type: ignore[arg-type]
            transient=False,
        )

    def __enter__(self) -> RichProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def task(self, description: str, total: float | None, unit: str = "") -> Task:
        return _RichTask(self._bar, self._bar.add_task(description, total=total, rate=""), unit)


class _RichTask:
    def __init__(self, bar: Any, task_id: Any, unit: str) -> None:
        self.bar, self.task_id, self.unit = bar, task_id, unit

    def advance(self, amount: float = 1) -> None:
        if self.task_id not in self.bar.task_ids:
            return
        self.bar.advance(self.task_id, amount)
        task = self.bar._tasks[self.task_id]
        if task.finished:
            self.bar.remove_task(self.task_id)
            return
        if task.speed and self.unit:
            self.bar.update(self.task_id, rate=f"{task.speed:,.1f} {self.unit}/s")


@contextmanager
def rich_progress(console: object | None = None) -> Iterator[RichProgress]:
    with RichProgress(console) as progress:
        yield progress
