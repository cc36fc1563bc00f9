"""Imported first by every Python process that has this folder on PYTHONPATH: networking is blocked.

Every attempt to resolve a name or open a connection raises ``OSError`` and is appended to the file
named by ``SSLBENCH_TEST_NETLOG``, so a test can assert that a command never reached for the network.
``SSLBENCH_TEST_HIDE_MODULES`` (comma-separated) makes those modules unimportable, as if not installed.
"""

from __future__ import annotations

import os
import socket
import sys

_LOG = os.environ.get("SSLBENCH_TEST_NETLOG", "")


def _blocked(what: str):  # type: ignore[no-untyped-def]
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        if _LOG:
            with open(_LOG, "a") as handle:
                handle.write(f"{os.getpid()} {what} {args[1:2] if what.startswith('socket.') else args[:1]}\n")
        raise OSError(f"network blocked by the test ({what})")

    return refuse


def _inet_only(what: str, real):  # type: ignore[no-untyped-def]
    """Refuse internet sockets; local (AF_UNIX) ones carry DataLoader workers' file descriptors."""
    refuse = _blocked(what)

    def connect(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.family in (socket.AF_INET, socket.AF_INET6):
            return refuse(self, *args, **kwargs)
        return real(self, *args, **kwargs)

    return connect


socket.getaddrinfo = _blocked("getaddrinfo")
socket.create_connection = _blocked("create_connection")
socket.socket.connect = _inet_only("socket.connect", socket.socket.connect)  # type: ignore[method-assign]
socket.socket.connect_ex = _inet_only("socket.connect_ex", socket.socket.connect_ex)  # type: ignore[method-assign]

for _name in filter(None, os.environ.get("SSLBENCH_TEST_HIDE_MODULES", "").split(",")):
    sys.modules[_name] = None  # type: ignore[assignment]
