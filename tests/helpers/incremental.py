"""Random changes to mapsync's own schema, for the incremental publisher's property test:
each keeps the database valid (no alias left pointing at nothing, no cycle), so every step
publishes, and each says whether an incremental run can take it (rows) or not (domains,
mailstores: the publisher reads everything)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from mapsync.sources import schema as t
from mapsync.sources.builtin import make_engine

HASH = "{SHA512-CRYPT}$6$" + "a" * 16 + "$" + "b" * 86

Op = Callable[[Connection, random.Random], bool | None]  # False: structural; None: not done


def _hosted(conn: Connection) -> list[tuple[int, str]]:
    return [
        (i, name)
        for i, name in conn.execute(
            select(t.domain.c.id, t.domain.c.name).where(
                t.domain.c.kind == "hosted", t.domain.c.status == "active"
            )
        )
    ]


def _addresses(conn: Connection) -> list[str]:
    """Live accounts' addresses (alias targets that lead somewhere)."""
    rows = conn.execute(
        select(t.account.c.local_part, t.domain.c.name)
        .join(t.domain, t.domain.c.id == t.account.c.domain_id)
        .where(t.domain.c.kind == "hosted", t.domain.c.status == "active")
        .where(t.account.c.status != "disabled")
    )
    return [f"{local}@{name}" for local, name in rows]


def _targeted(conn: Connection) -> set[str]:
    return {target.lower() for target in conn.scalars(select(t.alias_target.c.target))}


def _free_local(conn: Connection, rnd: random.Random, domain_id: int) -> str:
    taken = set(
        conn.scalars(select(t.account.c.local_part).where(t.account.c.domain_id == domain_id))
    ) | set(conn.scalars(select(t.alias.c.local_part).where(t.alias.c.domain_id == domain_id)))
    while True:
        local = f"p{rnd.randrange(10**6)}"
        if local not in taken:
            return local


def _stores(conn: Connection) -> list[int]:
    return list(conn.scalars(select(t.mailstore.c.id)))


def add_account(conn: Connection, rnd: random.Random) -> bool | None:
    domain_id, _ = rnd.choice(_hosted(conn))
    conn.execute(
        insert(t.account).values(
            domain_id=domain_id,
            local_part=_free_local(conn, rnd, domain_id),
            password_hash=HASH,
            mailstore_id=rnd.choice([None, *_stores(conn)]),
            status=rnd.choice(["active", "active", "login_disabled", "moving"]),
            quota_bytes=rnd.choice([None, 10**9]),
            allow_pop3=rnd.random() < 0.8,
        )
    )
    return True


def _account(conn: Connection, rnd: random.Random, free: bool = False) -> tuple[int, str] | None:
    rows = list(
        conn.execute(
            select(t.account.c.id, t.account.c.local_part, t.domain.c.name).join(
                t.domain, t.domain.c.id == t.account.c.domain_id
            )
        )
    )
    if free:  # no alias leads to it
        targeted = _targeted(conn)
        rows = [r for r in rows if f"{r[1]}@{r[2]}" not in targeted and r[1] != "postmaster"]
    if not rows:
        return None
    i, local, name = rnd.choice(rows)
    return i, f"{local}@{name}"


def change_account(conn: Connection, rnd: random.Random) -> bool | None:
    found = _account(conn, rnd, free=True)
    if found is None:
        return None
    values = rnd.choice(
        [
            {"status": rnd.choice(["active", "login_disabled", "moving", "disabled"])},
            {"mailstore_id": rnd.choice([None, *_stores(conn)])},  # a mailstore move
            {"password_hash": HASH.replace("a", "c")},
            {"quota_bytes": rnd.randrange(1, 10**10)},
            {"allow_imap": rnd.random() < 0.5, "allow_submission": rnd.random() < 0.5},
        ]
    )
    conn.execute(update(t.account).where(t.account.c.id == found[0]).values(**values))
    return True


def delete_account(conn: Connection, rnd: random.Random) -> bool | None:
    found = _account(conn, rnd, free=True)
    if found is None:
        return None
    conn.execute(delete(t.sender_grant).where(t.sender_grant.c.account_id == found[0]))
    conn.execute(delete(t.account).where(t.account.c.id == found[0]))
    return True


def rename_account(conn: Connection, rnd: random.Random) -> bool | None:
    found = _account(conn, rnd, free=True)
    if found is None:
        return None
    domain_id, _ = rnd.choice(_hosted(conn))
    conn.execute(
        update(t.account)
        .where(t.account.c.id == found[0])
        .values(domain_id=domain_id, local_part=_free_local(conn, rnd, domain_id))
    )
    return True


def _targets(conn: Connection, rnd: random.Random) -> list[str]:
    pool = _addresses(conn)
    picked = rnd.sample(pool, min(len(pool), rnd.randrange(1, 4)))
    if rnd.random() < 0.3:
        picked.append(f"x{rnd.randrange(1000)}@elsewhere.example")
    return picked


def add_alias(conn: Connection, rnd: random.Random, catchall: bool = False) -> bool | None:
    domain_id, _ = rnd.choice(_hosted(conn))
    if catchall:
        if conn.scalar(
            select(t.alias.c.id).where(t.alias.c.domain_id == domain_id, t.alias.c.local_part == "")
        ):
            return None
        local = ""
    else:
        local = _free_local(conn, rnd, domain_id)
    alias_id = conn.execute(
        insert(t.alias).values(domain_id=domain_id, local_part=local)
    ).inserted_primary_key[0]
    targets = _targets(conn, rnd)
    if not catchall and rnd.random() < 0.3:  # a chain: this new alias leads to another one
        others = _alias_addresses(conn, exclude=alias_id)
        if others:
            targets.append(rnd.choice(others))
    for target in targets:
        conn.execute(insert(t.alias_target).values(alias_id=alias_id, target=target))
    return True


def add_catchall(conn: Connection, rnd: random.Random) -> bool | None:
    return add_alias(conn, rnd, catchall=True)


def _alias_addresses(conn: Connection, exclude: int) -> list[str]:
    rows = conn.execute(
        select(t.alias.c.local_part, t.domain.c.name)
        .join(t.domain, t.domain.c.id == t.alias.c.domain_id)
        .where(t.alias.c.id != exclude, t.alias.c.local_part != "", t.alias.c.active.is_(True))
        .where(t.domain.c.kind == "hosted")
    )
    return [f"{local}@{name}" for local, name in rows]


def _alias(conn: Connection, rnd: random.Random, free: bool = True) -> tuple[int, str] | None:
    rows = list(
        conn.execute(
            select(t.alias.c.id, t.alias.c.local_part, t.domain.c.name).join(
                t.domain, t.domain.c.id == t.alias.c.domain_id
            )
        )
    )
    if free:
        targeted = _targeted(conn)
        rows = [r for r in rows if f"{r[1]}@{r[2]}" not in targeted]
    if not rows:
        return None
    i, local, name = rnd.choice(rows)
    return i, f"{local}@{name}"


def change_alias(conn: Connection, rnd: random.Random) -> bool | None:
    found = _alias(conn, rnd, free=False)
    if found is None:
        return None
    current = list(
        conn.scalars(select(t.alias_target.c.target).where(t.alias_target.c.alias_id == found[0]))
    )
    if len(current) > 1 and rnd.random() < 0.5:
        conn.execute(
            delete(t.alias_target).where(
                t.alias_target.c.alias_id == found[0],
                t.alias_target.c.target == rnd.choice(current),
            )
        )
    else:
        new = [a for a in _addresses(conn) if a not in current]
        if not new:
            return None
        conn.execute(insert(t.alias_target).values(alias_id=found[0], target=rnd.choice(new)))
    return True


def rename_alias(conn: Connection, rnd: random.Random) -> bool | None:
    found = _alias(conn, rnd)
    if found is None or found[1].startswith("@"):
        return None
    domain_id = conn.scalar(select(t.alias.c.domain_id).where(t.alias.c.id == found[0]))
    conn.execute(
        update(t.alias)
        .where(t.alias.c.id == found[0])
        .values(local_part=_free_local(conn, rnd, domain_id))
    )
    return True


def drop_alias(conn: Connection, rnd: random.Random) -> bool | None:
    found = _alias(conn, rnd)
    if found is None:
        return None
    if rnd.random() < 0.5:
        conn.execute(delete(t.alias_target).where(t.alias_target.c.alias_id == found[0]))
        conn.execute(delete(t.alias).where(t.alias.c.id == found[0]))
    elif rnd.random() < 0.5:
        conn.execute(update(t.alias).where(t.alias.c.id == found[0]).values(active=False))
    else:  # expired a moment ago
        past = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1)
        conn.execute(update(t.alias).where(t.alias.c.id == found[0]).values(expires_at=past))
    return True


def grant(conn: Connection, rnd: random.Random) -> bool | None:
    found = _account(conn, rnd)
    if found is None:
        return None
    _, name = rnd.choice(_hosted(conn))
    address = rnd.choice(
        [f"@{name}", f"g{rnd.randrange(100)}@{name}", f"ext{rnd.randrange(9)}@elsewhere.example"]
    )
    if conn.scalar(
        select(t.sender_grant.c.account_id).where(
            t.sender_grant.c.account_id == found[0], t.sender_grant.c.address == address
        )
    ):
        return None
    conn.execute(insert(t.sender_grant).values(account_id=found[0], address=address))
    return True


def revoke(conn: Connection, rnd: random.Random) -> bool | None:
    rows = list(conn.execute(select(t.sender_grant.c.account_id, t.sender_grant.c.address)))
    if not rows:
        return None
    account_id, address = rnd.choice(rows)
    conn.execute(
        delete(t.sender_grant).where(
            t.sender_grant.c.account_id == account_id, t.sender_grant.c.address == address
        )
    )
    return True


def alias_domain(conn: Connection, rnd: random.Random) -> bool | None:
    """An alias domain added, or one moved to another target: a change of the domain table."""
    hosted = _hosted(conn)
    existing = list(conn.scalars(select(t.domain.c.id).where(t.domain.c.kind == "alias")))
    target, _ = rnd.choice(hosted)
    if existing and rnd.random() < 0.5:
        conn.execute(
            update(t.domain)
            .where(t.domain.c.id == rnd.choice(existing))
            .values(target_domain_id=target)
        )
    else:
        conn.execute(
            insert(t.domain).values(
                name=f"alias{rnd.randrange(10**6)}.example", kind="alias", target_domain_id=target
            )
        )
    return False


def mailstore_port(conn: Connection, rnd: random.Random) -> bool | None:
    conn.execute(
        update(t.mailstore)
        .where(t.mailstore.c.id == rnd.choice(_stores(conn)))
        .values(lmtp_port=rnd.choice([24, 2424]))
    )
    return False


ROW_OPS: list[Op] = [
    add_account,
    add_account,
    change_account,
    change_account,
    delete_account,
    rename_account,
    add_alias,
    add_alias,
    change_alias,
    rename_alias,
    drop_alias,
    add_catchall,
    add_catchall,
    grant,
    revoke,
]
STRUCTURAL_OPS: list[Op] = [alias_domain, mailstore_port]


def step(url: str, rnd: random.Random) -> tuple[str, bool]:
    """One random change, committed: its name, and whether it changed only rows."""
    engine = make_engine(url)
    try:
        while True:
            op = rnd.choice(STRUCTURAL_OPS) if rnd.random() < 0.08 else rnd.choice(ROW_OPS)
            with engine.begin() as conn:
                done = op(conn, rnd)
            if done is not None:
                return op.__name__, done
    finally:
        engine.dispose()


def bodies(repo: Path, channel: str) -> dict[str, bytes]:
    """Each map of ``channel``'s LATEST release, without its header."""
    from mapsync.publish.repository import Repository

    r = Repository(repo)
    manifest = r.latest_manifest(channel)
    assert manifest is not None
    release = r.release(channel, manifest.serial)
    return {
        name: b"".join(
            line
            for line in (release / entry.file).read_bytes().splitlines(keepends=True)
            if not line.startswith(b"#")
        )
        for name, entry in manifest.maps.items()
    }


def run(url: str, *statements: str) -> None:
    """``statements`` in one transaction, committed."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def literal(when: datetime) -> str:
    """``when`` as an SQL timestamp literal every engine reads (and SQLite compares as text
    with what its triggers write): microseconds always."""
    return "'" + when.isoformat(sep=" ", timespec="microseconds") + "'"


def _late(
    url: str,
    statement: str,
    other: str,
    read: Callable[[], None],
    on_sqlite: Callable[[Engine], None],
) -> None:
    """``statement`` committed after ``other`` commits and ``read`` runs. On PostgreSQL and
    MariaDB in a transaction left open meanwhile (as a late commit really happens); SQLite has
    one writer at a time: there ``other`` and ``read`` run first, then ``on_sqlite`` runs
    ``statement`` and makes it lie as the late commit would have."""
    engine = make_engine(url)
    try:
        if engine.dialect.name == "sqlite":
            run(url, other)
            read()
            on_sqlite(engine)
            return
        with engine.connect() as conn:
            tx = conn.begin()
            conn.exec_driver_sql(statement)
            time.sleep(0.002)  # other's stamp after this one's, whatever the clock's grain
            run(url, other)
            read()
            tx.commit()
    finally:
        engine.dispose()


def late_delete(url: str, statement: str, other: str, read: Callable[[], None]) -> None:
    """Commit ``statement`` (a DELETE) with a deletion-log id below the newest id ``read``
    (a publisher's run) saw, after that read: what a transaction that logs its delete before
    another writer's ``other`` (a DELETE too, committed at once) and commits after the read
    leaves. On PostgreSQL and MariaDB as it happens (ids are taken when logged, seen at
    commit); SQLite has one writer at a time (its ids commit in order): there ``statement``
    runs after the read and its log row changes places with ``other``'s, as the two would
    lie had they run so."""

    def reorder(engine: Engine) -> None:
        with engine.begin() as conn:
            mark = conn.execute(select(func.max(t.deleted.c.id))).scalar_one()
            conn.exec_driver_sql(statement)
            log = t.deleted
            assert conn.execute(select(func.max(log.c.id))).scalar_one() == mark + 1
            for old, new in ((mark, -1), (mark + 1, mark), (-1, mark + 1)):
                conn.execute(update(log).where(log.c.id == old).values(id=new))

    _late(url, statement, other, read, reorder)


def newest(url: str, table: str) -> datetime:
    """The newest ``updated_at`` of ``table``, naive UTC."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            column = t.metadata.tables[table].c.updated_at
            value = conn.execute(select(func.max(column))).scalar_one()
    finally:
        engine.dispose()
    assert isinstance(value, datetime), value
    return value.replace(tzinfo=None)


def late_insert(url: str, statement: str, other: str, read: Callable[[], None]) -> None:
    """Commit ``statement`` (an INSERT) stamped before ``other`` (an INSERT into the same
    table, committed at once) and committed after ``read`` (a publisher's run): the table's
    newest ``updated_at`` is ``other``'s before and after, so the fingerprint does not move.
    On PostgreSQL and MariaDB as it happens (a row is stamped when written, seen at commit);
    SQLite has one writer at a time: there ``statement`` runs after the read and its row is
    stamped 1 ms before ``other``'s (its UPDATE trigger keeps a stamp that an UPDATE sets)."""

    def stamp_before(engine: Engine) -> None:
        table = statement.split()[2]
        stamp = newest(url, table) - timedelta(milliseconds=1)
        with engine.begin() as conn:
            row = conn.exec_driver_sql(statement).lastrowid
            conn.exec_driver_sql(
                f"UPDATE {table} SET updated_at = {literal(stamp)} WHERE id = {row}"
            )

    _late(url, statement, other, read, stamp_before)
