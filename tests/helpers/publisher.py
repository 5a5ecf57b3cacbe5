"""Helpers for the publisher's tests: channels and push destinations added to a cluster's
config, rows changed, releases read back and checked whole, the push record, what a publish
run imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, delete, or_, select, update

from mapsync.formats import cdb, text
from mapsync.release import MANIFEST, SIGNATURE, Manifest, parse_manifest
from mapsync.signing import key_id, load_public, verify
from mapsync.sources import schema as t
from tests.conftest import Cluster


def add_channels(cluster: Cluster, block: str) -> None:
    """Add publisher channels (TOML ``block``) to ``cluster``'s config, beside ``mx``."""
    text = cluster.config_path.read_text()
    assert "\n[agent]\n" in text
    cluster.config_path.write_text(text.replace("\n[agent]\n", f"\n{block}\n[agent]\n", 1))


def manifest_path(cluster: Cluster, channel: str, serial: int | None = None) -> Path:
    """The manifest file of release ``serial`` of ``channel`` (LATEST's when None)."""
    root = cluster.repo / channel
    if serial is None:
        serial = int(json.loads((root / "LATEST").read_text())["serial"])
    return root / "releases" / str(serial) / MANIFEST


def manifest(cluster: Cluster, channel: str, serial: int | None = None) -> dict[str, Any]:
    """The manifest of release ``serial`` of ``channel`` (LATEST's when None), as JSON."""
    data: dict[str, Any] = json.loads(manifest_path(cluster, channel, serial).read_text())
    return data


def parsed_manifest(cluster: Cluster, channel: str, serial: int | None = None) -> Manifest:
    """The manifest of release ``serial`` of ``channel`` (LATEST's when None), parsed."""
    path = manifest_path(cluster, channel, serial)
    return parse_manifest(path.read_bytes(), str(path))


def lines(cluster: Cluster, channel: str, name: str, serial: int | None = None) -> list[str]:
    """The entry lines of map ``name`` in release ``serial`` of ``channel`` (LATEST's when
    None), without the header."""
    m = manifest(cluster, channel, serial)
    path: Path = cluster.repo / channel / "releases" / str(m["serial"]) / m["maps"][name]["file"]
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def keys(cluster: Cluster, channel: str, name: str, serial: int | None = None) -> set[str]:
    """The keys of map ``name`` in release ``serial`` of ``channel`` (LATEST's when None)."""
    sep = ":" if name.startswith("dovecot") else " "
    return {line.split(sep, 1)[0] for line in lines(cluster, channel, name, serial)}


def account_on(cluster: Cluster, store: str, skip: int = 0) -> tuple[int, str]:
    """(id, address) of an active account housed on mailstore ``store`` by its domain's default,
    allowed every service (the first by id, after ``skip`` others)."""
    engine = create_engine(cluster.db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(t.account.c.id, t.account.c.local_part, t.domain.c.name)
                .join(t.domain, t.account.c.domain_id == t.domain.c.id)
                .join(t.mailstore, t.domain.c.default_mailstore_id == t.mailstore.c.id)
                .where(
                    t.mailstore.c.name == store,
                    t.account.c.mailstore_id.is_(None),
                    t.account.c.status == "active",
                    t.domain.c.kind == "hosted",
                    t.domain.c.status == "active",
                    t.account.c.local_part != "postmaster",
                    t.account.c.allow_imap.is_(True),
                    t.account.c.allow_pop3.is_(True),
                    t.account.c.allow_submission.is_(True),
                )
                .order_by(t.account.c.id)
                .offset(skip)
            ).first()
    finally:
        engine.dispose()
    assert row is not None, f"no active account on {store}"
    return row[0], f"{row[1]}@{row[2]}"


def set_row(cluster: Cluster, table: Any, row_id: int, **values: Any) -> None:
    """UPDATE one row of ``table`` (a mapsync schema table) by id."""
    engine = create_engine(cluster.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(update(table).where(table.c.id == row_id).values(**values))
    finally:
        engine.dispose()


def drop_aliases_into(conn: Connection, domains: set[str]) -> None:
    """Delete the aliases with a target in one of ``domains`` (their names): what an operator
    must do with a domain's closing, a target there being refused (nothing receives it)."""
    into = select(t.alias_target.c.alias_id).where(
        or_(*(t.alias_target.c.target.like(f"%@{name}") for name in domains))
    )
    gone = [row.alias_id for row in conn.execute(into)]
    conn.execute(delete(t.alias_target).where(t.alias_target.c.alias_id.in_(gone)))
    conn.execute(delete(t.alias).where(t.alias.c.id.in_(gone)))


def mailstore_id(cluster: Cluster, name: str) -> int:
    """The id of mailstore ``name``."""
    engine = create_engine(cluster.db_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(select(t.mailstore.c.id).where(t.mailstore.c.name == name)).first()
    finally:
        engine.dispose()
    assert found is not None, f"no mailstore {name}"
    return int(found[0])


def assert_complete(cluster: Cluster, serial: int) -> Manifest:
    """Release ``serial`` is whole: signed manifest, exactly its files, every hash right,
    and the cdb an agent would build from the text is the one the manifest names."""
    d = cluster.repo / "mx" / "releases" / str(serial)
    data = (d / MANIFEST).read_bytes()
    pub = load_public(cluster.root / "keys" / "signing.pub")
    assert verify({key_id(pub): pub}, data, (d / SIGNATURE).read_bytes(), str(d)) == key_id(pub)
    m = parse_manifest(data, str(d))
    assert m.serial == serial and m.channel == "mx"
    assert set(os.listdir(d)) == {MANIFEST, SIGNATURE} | m.files()
    for name, entry in m.maps.items():
        assert text.sha256_file(d / entry.file) == (entry.sha256, entry.size), name
        assert sum(1 for _ in text.pairs(d / entry.file)) == entry.entries
        assert entry.cdb is not None
        built = d.parent.parent / f".check-{serial}-{name}.cdb"
        try:
            assert cdb.build(built, text.pairs(d / entry.file)) == (
                entry.cdb.sha256,
                entry.cdb.size,
            )
        finally:
            built.unlink(missing_ok=True)
    return m


MX_MAPS = 'maps = ["domains", "recipients", "virtual", "transport"]\n'


def push_to(
    cluster: Cluster, *destinations: str, source: str | None = None, publisher: str = ""
) -> None:
    """Configure channel mx to push to ``destinations``; the agent pulls from ``source``."""
    cluster.write_config(source=source, extra_publisher=publisher)
    text = cluster.config_path.read_text()
    push = "push = [" + ", ".join(json.dumps(d) for d in destinations) + "]\n"
    cluster.config_path.write_text(text.replace(MX_MAPS, MX_MAPS + push, 1))


def serial_of(latest: Path) -> int:
    return int(json.loads(latest.read_text())["serial"])


def record(cluster: Cluster) -> dict[str, dict[str, object]]:
    data = json.loads((cluster.repo / ".private" / "mx" / "pushed.json").read_text())
    return dict(data["destinations"])


# `python -m mapsync ...`, then the mapsync and SQLAlchemy modules the run had loaded, on the
# last line of standard error.
_LOADED = (
    "import json, sys\n"
    "from mapsync.cli.main import main\n"
    "code = main()\n"
    "sys.stdout.flush()\n"
    "loaded = [m for m in sys.modules if m.partition('.')[0] in ('mapsync', 'sqlalchemy')]\n"
    "print(json.dumps(sorted(loaded)), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def cli_loading(
    cluster: Cluster, *args: str, code: int = 0
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``mapsync --config CLUSTER'S ARGS`` in a process of its own, checked to exit ``code``,
    and the mapsync and SQLAlchemy modules it loaded (that last line of its standard error is
    left out of ``stderr``)."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOADED, "--config", str(cluster.config_path), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    rest, _, last = proc.stderr.rstrip("\n").rpartition("\n")
    assert proc.returncode == code, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    proc.stderr = rest + "\n" if rest else ""
    return proc, set(json.loads(last))
