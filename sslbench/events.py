"""What the core tells whoever drives it: plain-text, structured events.

The core (runner, pipeline, extraction) never prints and never formats for a terminal; it calls an
``emit`` callback with :class:`Event` objects. The CLI renders them (colours, progress), the Python
API drops them or hands them to a user's callback, and benchmarks read the ``stage`` lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sslbench.results import Run

EventKind = Literal["stage", "note", "features", "probe", "run"]


@dataclass(frozen=True)
class Event:
    """One thing that happened.

    * ``stage``: a protocol stage starts (``name`` in :data:`STAGES`; ``text`` says on what);
    * ``note``: something the user should know that is not an error (an optional model skipped);
    * ``features``: a split's features are ready (``data``: ``source`` = ``cache`` or ``extracted``);
    * ``probe``: a probe of one model × dataset is scored (``text``: its values; ``data``: ``record``, the
      :class:`~sslbench.results.ProbeRecord`);
    * ``run``: one run (model × dataset × protocol point × seed) is scored (``run`` holds it).
    """

    kind: EventKind
    text: str
    name: str = ""
    run: Run | None = None
    data: dict[str, Any] = field(default_factory=dict)


#: The protocol's stages, in the order they happen for one model.
STAGES = ("build", "extract", "check", "fit-pca", "project", "kmeans", "predict", "score", "save")

Emit = Callable[[Event], None]


def ignore(event: Event) -> None:
    """An ``emit`` that drops every event (the Python API's default)."""
