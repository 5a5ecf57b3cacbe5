"""Helpers for the tests of an agent's node: a changed central database, what Postfix finds
in the live maps (real ``postmap -q``), the node's files and state, a copy of a cluster, a
renewal by key rotation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from sqlalchemy import Connection, create_engine, delete, insert, select

from mapsync.agent.state import ChannelState
from mapsync.signing import keygen
from mapsync.sources import schema as t
from tests.conftest import Cluster

MAPS = ("domains", "recipients", "virtual", "transport")


def postmap(key: str, table: str) -> tuple[int, str, str]:
    """``postmap -q KEY TABLE`` → (exit code, value, stderr)."""
    p = subprocess.run(["postmap", "-q", key, table], capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout.strip(), p.stderr.strip()


def postmap_q(key: str, table: Path | str) -> str | None:
    """What Postfix finds for ``key`` in ``table`` (None: not found): a Postfix table such as
    ``cdb:/path`` as main.cf names it, or a Path, the cdb map there. A map Postfix cannot open
    fails the test."""
    spec = f"cdb:{table}" if isinstance(table, Path) else table
    code, value, err = postmap(key, spec)
    assert err == "", f"postmap -q {key} {spec}: {err}"
    assert code in (0, 1)
    return value if code == 0 else None


def lookup(cluster: Cluster, key: str, map_name: str = "recipients") -> str | None:
    """The value Postfix finds for ``key`` in the live cdb map, None when not found."""
    return postmap_q(key, cluster.target / map_name)


def add_account(
    db: Cluster | str, local: str, domain: str = "example-1.org", mailstore: str | None = None
) -> str:
    """Insert an active account (on ``mailstore``, else its domain's) into the central
    database (``db``: a cluster's, or a URL) with SQLAlchemy Core (``updated_at`` set by the
    default); return its address."""
    return add_accounts(db, [local], domain, mailstore)[0]


def add_accounts(
    db: Cluster | str,
    locals_: list[str],
    domain: str = "example-1.org",
    mailstore: str | None = None,
) -> list[str]:
    """:func:`add_account` for each of ``locals_``, in one transaction (one commit: a
    publisher sees all or none of them)."""
    engine = create_engine(db if isinstance(db, str) else db.db_url)
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
            for local in locals_:
                conn.execute(
                    insert(t.account).values(
                        domain_id=d.id,
                        local_part=local,
                        customer_id=d.customer_id,
                        password_hash="{SHA512-CRYPT}$6$0123456789abcdef$" + "a" * 64,
                        home=f"/var/vmail/{domain}/{local}",
                        mailstore_id=store,
                        quota_bytes=1 << 30,
                        status="active",
                    )
                )
    finally:
        engine.dispose()
    return [f"{local}@{domain}" for local in locals_]


def unreferenced_account(conn: Connection) -> tuple[int, str]:
    """The first active, non-postmaster account that no alias points at: (id, address)."""
    targets = {r[0] for r in conn.execute(select(t.alias_target.c.target))}
    rows = conn.execute(
        select(t.account.c.id, t.account.c.local_part, t.domain.c.name)
        .join(t.domain, t.domain.c.id == t.account.c.domain_id)
        .where(t.account.c.status == "active", t.account.c.local_part != "postmaster")
        .order_by(t.account.c.id)
    ).all()
    row = next(r for r in rows if f"{r.local_part}@{r.name}" not in targets)
    return row.id, f"{row.local_part}@{row.name}"


def delete_unreferenced_account(cluster: Cluster) -> str:
    """Delete one active, non-postmaster account that no alias points at; return its address."""
    engine = create_engine(cluster.db_url)
    try:
        with engine.begin() as conn:
            victim, address = unreferenced_account(conn)
            conn.execute(delete(t.account).where(t.account.c.id == victim))
    finally:
        engine.dispose()
    return address


def tree_snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``: symlink targets, file hash + inode + mtime, directories."""
    snap: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir", st.st_mode)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                snap[rel] = ("file", digest, st.st_ino, st.st_mtime_ns, st.st_mode)
    return snap


def header_serial(path: Path) -> int:
    """The serial named in the ``#`` header of a text map."""
    first = path.read_text().splitlines()[0]
    return int(first.rsplit("serial ", 1)[1].rstrip("."))


def state_file(cluster: Cluster) -> Path:
    """Channel mx's state file on the node."""
    return cluster.state / "mx" / "state.json"


def read_state(cluster: Cluster) -> dict[str, object]:
    """Channel mx's state file, parsed, with the times of the last check as the agent reads
    them (a nothing-changed run writes those beside the file, mapsync.agent.state)."""
    data = json.loads(state_file(cluster).read_text())
    assert isinstance(data, dict)
    data.update(ChannelState.load(state_file(cluster)).check_times())
    return data


def set_dirs(cluster: Cluster) -> list[str]:
    """The entries of the node's ``.mapsync`` directory, sorted."""
    return sorted(os.listdir(cluster.target / ".mapsync"))


def clone(src: Cluster, root: Path) -> Cluster:
    """A copy of ``src`` (database, keys, repository, node) under ``root``, reconfigured."""
    shutil.copytree(src.root, root / "c", symlinks=True)
    db = Path(src.db_url.removeprefix("sqlite:///"))
    for part in (db, *(db.with_name(db.name + x) for x in ("-wal", "-shm"))):
        if part.exists():  # SQLite in WAL mode: copy the log too
            shutil.copyfile(part, root / part.name)
    c = Cluster(root / "c", f"sqlite:///{root / db.name}")
    c.write_config()
    return c


def renew(cluster: Cluster, serial: int | None = None) -> None:
    """Key rotation: the publisher signs with a second key the node also trusts, and renews
    the last release at once (the same maps, a new serial: ``serial`` when given)."""
    keys = cluster.root / "keys"
    if not (keys / "signing-2.key").exists():
        keygen(keys / "signing-2.key")
    cluster.config_path.write_text(
        cluster.config_path.read_text()
        .replace(f'"{keys / "signing.key"}"', f'"{keys / "signing-2.key"}"')
        .replace(
            f'trusted_keys = ["{keys / "signing.pub"}"]',
            f'trusted_keys = ["{keys / "signing.pub"}", "{keys / "signing-2.pub"}"]',
        )
    )
    renewed = "renewed serial" if serial is None else f"renewed serial {serial}"
    assert renewed in cluster.publish().stdout
