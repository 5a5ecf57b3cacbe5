"""Helpers for the tests of the agent's install path: a node's files as they are on disk,
a new account in the central database, a lookup through the real ``postmap``."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

from sqlalchemy import create_engine, insert, select

from mapsync.sources import schema as t


def add_account(
    db_url: str, local: str, domain: str = "example-1.org", mailstore: str | None = None
) -> str:
    """Insert an active account (on ``mailstore``, else its domain's); return its address."""
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            d = conn.execute(
                select(t.domain.c.id, t.domain.c.customer_id).where(t.domain.c.name == domain)
            ).one()
            store = None
            if mailstore is not None:
                store = conn.execute(
                    select(t.mailstore.c.id).where(t.mailstore.c.name == mailstore)
                ).scalar_one()
            conn.execute(
                insert(t.account).values(
                    domain_id=d.id,
                    local_part=local,
                    customer_id=d.customer_id,
                    password_hash="{SHA512-CRYPT}$6$0123456789abcdef$" + "b" * 64,
                    home=f"/var/vmail/{domain}/{local}",
                    mailstore_id=store,
                    quota_bytes=1 << 30,
                    status="active",
                )
            )
    finally:
        engine.dispose()
    return f"{local}@{domain}"


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``: link targets; file hash, inode, mtime and mode; dir modes."""
    snap: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                snap[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir", st.st_mode)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                snap[rel] = ("file", digest, st.st_ino, st.st_mtime_ns, st.st_mode)
    return snap


def postmap_q(key: str, table: Path) -> str | None:
    """What Postfix finds for ``key`` in the cdb map ``table`` (None: not found); a map Postfix
    cannot open fails the test."""
    p = subprocess.run(
        ["postmap", "-q", key, f"cdb:{table}"], capture_output=True, text=True, timeout=30
    )
    assert p.stderr == "", f"postmap -q {key} cdb:{table}: {p.stderr}"
    assert p.returncode in (0, 1)
    return p.stdout.strip() if p.returncode == 0 else None
