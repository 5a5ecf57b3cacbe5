"""Helpers of the database-trouble and fault tests: what a repository holds."""

from __future__ import annotations

import hashlib
from pathlib import Path

RUNLOG = ".publisher.json"  # mapsync.publish.runlog.RUNLOG, spelled out: runs on older code too


def repo_tree(root: Path) -> dict[str, str]:
    """Every file under the repository ``root`` and its sha256, but for the publisher's run
    note (``.publisher.json``, rewritten by every run, published or not)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != RUNLOG
    }
