"""Helpers for the tests of a damaged node: lookups through real postmap, a changed database,
a renewal, and the channel's state file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from sqlalchemy import create_engine, insert, select

from mapsync.signing import keygen
from mapsync.sources import schema as t
from tests.conftest import Cluster


def lookup(cluster: Cluster, key: str, map_name: str = "recipients") -> tuple[int, str]:
    """``postmap -q KEY cdb:TARGET/MAP`` as Postfix would: (exit code, stdout + stderr)."""
    p = subprocess.run(
        ["postmap", "-q", key, f"cdb:{cluster.target / map_name}"],
        capture_output=True,
        text=True,
    )
    return p.returncode, (p.stdout + p.stderr).strip()


def add_account(cluster: Cluster, local: str, domain: str = "example-1.org") -> str:
    """Insert an active account into the central database; return its address."""
    engine = create_engine(cluster.db_url)
    try:
        with engine.begin() as conn:
            d = conn.execute(
                select(t.domain.c.id, t.domain.c.customer_id).where(t.domain.c.name == domain)
            ).one()
            conn.execute(
                insert(t.account).values(
                    domain_id=d.id,
                    local_part=local,
                    customer_id=d.customer_id,
                    password_hash="{SHA512-CRYPT}$6$0123456789abcdef$" + "b" * 64,
                    home=f"/var/vmail/{domain}/{local}",
                    quota_bytes=1 << 30,
                    status="active",
                )
            )
    finally:
        engine.dispose()
    return f"{local}@{domain}"


def renew(cluster: Cluster) -> None:
    """Make the publisher renew the last release now (same maps, a new serial): it signs with
    a second key the node also trusts, as in a key rotation."""
    keys = cluster.root / "keys"
    keygen(keys / "signing-2.key")
    cluster.config_path.write_text(
        cluster.config_path.read_text()
        .replace(f'"{keys / "signing.key"}"', f'"{keys / "signing-2.key"}"')
        .replace(
            f'trusted_keys = ["{keys / "signing.pub"}"]',
            f'trusted_keys = ["{keys / "signing.pub"}", "{keys / "signing-2.pub"}"]',
        )
    )
    assert "renewed serial" in cluster.publish().stdout


def state_file(cluster: Cluster) -> Path:
    return cluster.state / "mx" / "state.json"


def read_state(cluster: Cluster) -> dict[str, object]:
    data = json.loads(state_file(cluster).read_text())
    assert isinstance(data, dict)
    return data


def live_file(cluster: Cluster, name: str) -> Path:
    """The file of the live set behind ``TARGET/name`` (not the link)."""
    return cluster.target / ".mapsync" / os.readlink(cluster.target / ".mapsync" / "current") / name


def forget_live_record(cluster: Cluster) -> None:
    """Drop the record of the live files from the state, as a mapsync that kept none left it:
    only a full check can then find damage that keeps size and mtime."""
    data = read_state(cluster)
    data["live_files"] = {}
    state_file(cluster).write_text(json.dumps(data))


def flip_byte_keep_stat(path: Path) -> None:
    """Change one byte of ``path`` in place and put its mtime back: damage a size and mtime
    check cannot see (bit rot, or an edit that restored the mtime); its ctime changes."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(path, "r+b") as fh:
        fh.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
