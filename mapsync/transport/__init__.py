"""Transports move releases from the publisher's repository to a node. rsync lives only here."""

from __future__ import annotations

from mapsync.transport.rsync import Remote, parse_source

__all__ = ["Remote", "parse_source"]
