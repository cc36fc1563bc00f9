"""The one exception type for mistakes a user can fix.

Everything raised as :class:`SSLBenchError` is reported by the CLI as one line with exit status 2 and
no traceback; any other exception is a bug in sslbench or in a plugin (exit status 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class SSLBenchError(Exception):
    """A user error: a malformed spec, an unknown name, a missing file, unusable data."""


class PluginError(SSLBenchError):
    """A plugin that cannot be loaded or that breaks the plugin contract."""


class CardError(SSLBenchError):
    """A model card file (or card mapping) that cannot be read or breaks the card schema.

    ``card_ids`` are the ids of the cards it defines, as far as they could be read: what a plugin
    registering these cards would have provided (the loader names that plugin when a spec asks for one).
    """

    def __init__(self, message: str, card_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.card_ids = tuple(card_ids)


def closest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` known names closest to ``name`` (what :func:`did_you_mean` suggests), best first."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.6)


def did_you_mean(name: str, known: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean 'x'?)"`` for the ``n`` closest known names, or an empty string."""
    matches = closest(name, known, n)
    if not matches:
        return ""
    quoted = " or ".join(f"'{m}'" for m in matches)
    return f" (did you mean {quoted}?)"


def exception_line(exc: BaseException) -> str:
    """``"Type: message"`` on one line, the message whole: the lines of a multi-line message are joined
    by ``" / "`` (blank lines and surrounding spaces dropped)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' / '.join(lines)}" if lines else type(exc).__name__


class PluginFailure(RuntimeError):
    """A plugin's code raised where it must not (a backbone's ``preprocess`` or ``embed``): a bug in
    that plugin, not a user error. The CLI prints the traceback and exits with status 1; the message
    names the plugin and its distribution so the user knows whom to report it to."""
