"""``mapsync init-db`` and ``mapsync seed``: mapsync's schema, filled with realistic synthetic data.

Deterministic for a given ``--seed`` (same rows, same ids), and fast enough for a million
accounts (bulk inserts in batches, ids chosen here). What it makes, for N domains:
N hosted domains ``example-1.org`` …, each with ``postmaster@``; one alias domain per ten
hosted (``example-K.net`` → ``example-K.org``), one relay domain per twenty
(``relay-K.example.com``), one IDN domain (``bücher-1.example``); a catch-all on one hosted
domain in 25; accounts spread over the domains and mailstores ``store-1`` … (1 in 20 housed
off its domain's default store), with a few login-disabled, disabled and moving; aliases
with one to three targets, mostly internal. One account in 25 may not use POP3, one in 50 may
not send (``allow_pop3``, ``allow_submission``).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.exc import SQLAlchemyError

from mapsync.errors import MapsyncError, SourceError
from mapsync.sources import schema as t
from mapsync.sources.builtin import make_engine, no_privilege, redact, safe_url
from mapsync.sources.upgrade import install

_FIRST = [
    "anna",
    "bernd",
    "clara",
    "david",
    "emma",
    "felix",
    "greta",
    "hugo",
    "ida",
    "jonas",
    "karl",
    "lena",
    "marie",
    "nils",
    "olga",
    "paul",
    "quinn",
    "rosa",
    "sven",
    "tara",
    "ulf",
    "vera",
    "wim",
    "xenia",
    "yusuf",
    "zoe",
    "ali",
    "bea",
    "chen",
    "dana",
    "eli",
    "fatima",
]
_LAST = [
    "meyer",
    "schmidt",
    "novak",
    "rossi",
    "garcia",
    "smith",
    "nguyen",
    "kowalski",
    "jensen",
    "dubois",
    "silva",
    "tanaka",
    "okafor",
    "larsen",
    "moreau",
    "fischer",
    "weber",
    "wagner",
    "becker",
    "hoffmann",
]
_ROLES = [
    "info",
    "sales",
    "support",
    "billing",
    "jobs",
    "press",
    "team",
    "office",
    "events",
    "hello",
    "abuse",
    "noc",
]
BATCH = 20_000


@dataclass(frozen=True)
class SeedCounts:
    """How many rows of each kind ``mapsync seed`` makes."""

    accounts: int = 200
    domains: int = 10
    aliases: int = 50
    mailstores: int = 2


def _create(engine: Engine) -> None:
    """Create the tables; a SQLite file is switched to WAL, so that the publisher's
    snapshot (one long read transaction) never blocks the writers that change accounts."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    t.metadata.create_all(engine)
    install(engine)  # server-side defaults and updated_at triggers, also on an older database


def init_db(url: str) -> None:
    """Create mapsync's tables (idempotent)."""
    engine = make_engine(url)
    try:
        _create(engine)
    except SQLAlchemyError as exc:
        raise _create_failed(url, exc) from None
    finally:
        engine.dispose()


def _create_failed(url: str, exc: SQLAlchemyError) -> SourceError:
    """init-db's error: a user who may not create tables (the publisher's read-only user,
    most often) is told to run init-db as the owner; anything else is the driver's message."""
    orig = getattr(exc, "orig", None)
    if orig is None or not no_privilege(orig):
        return SourceError(
            f"database {safe_url(url)}: creating the schema failed: {redact(str(exc), url)}"
        )
    args: tuple[Any, ...] = getattr(orig, "args", ())
    said = args[1] if len(args) > 1 and isinstance(args[0], int) else orig  # PyMySQL: (code, text)
    first = (str(said).strip().splitlines() or [type(orig).__name__])[0]
    return SourceError(
        f"database {safe_url(url)}: creating the schema failed: this user may not create or "
        f"change tables ({redact(first, url)}). Run init-db as the schema's owner: "
        "`mapsync init-db --database OWNER_URL`; [publisher].database stays the publisher's "
        "read-only user (docs/database.md)"
    )


def sha512_crypt(password: str, rng: random.Random) -> str:
    """A ``{SHA512-CRYPT}$6$...`` hash Dovecot accepts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:  # Python 3.13 removed it
            raise MapsyncError("--password needs Python's crypt module (Python < 3.13)") from None
    alphabet = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    salt = "".join(rng.choice(alphabet) for _ in range(16))
    return "{SHA512-CRYPT}" + crypt.crypt(password, f"$6${salt}")


def _batches(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def seed(
    url: str,
    counts: SeedCounts,
    seed: int = 1,
    password: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, int]:
    """Fill an empty mapsync database; return how many rows went into each table."""
    if counts.domains < 1 or counts.mailstores < 1:
        raise MapsyncError("seed needs at least one domain and one mailstore")
    rng = random.Random(seed)
    engine = make_engine(url)
    try:
        _create(engine)
        with engine.begin() as conn:
            existing = conn.execute(select(func.count()).select_from(t.domain)).scalar_one()
            if existing:
                raise MapsyncError(
                    f"database {safe_url(url)} already has {existing} domains; seed fills an empty database"
                )
            made = _fill(conn, counts, rng, password, progress)
            if conn.dialect.name == "postgresql":
                for table in (t.customer, t.mailstore, t.domain, t.account, t.alias):
                    conn.execute(
                        text(
                            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                            f"(SELECT COALESCE(MAX(id), 1) FROM {table.name}))"
                        )
                    )
            return made
    except SQLAlchemyError as exc:
        raise SourceError(
            f"database {safe_url(url)}: seeding failed: {redact(str(exc), url)}"
        ) from None
    finally:
        engine.dispose()


def _fill(
    conn: Any,
    counts: SeedCounts,
    rng: random.Random,
    password: str | None,
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, int]:
    stores = [
        {
            "id": i,
            "name": f"store-{i}",
            "lmtp_host": f"10.0.1.{10 + i}",
            "lmtp_port": 24,
            "imap_host": f"10.0.1.{10 + i}",
            "imap_port": 143,
        }
        for i in range(1, counts.mailstores + 1)
    ]
    conn.execute(insert(t.mailstore), stores)
    n_customers = max(1, counts.domains // 5)
    conn.execute(
        insert(t.customer),
        [
            {"id": i, "ext_id": f"C{i:06d}", "name": f"Customer {i}"}
            for i in range(1, n_customers + 1)
        ],
    )
    domains: list[dict[str, Any]] = []
    hosted: list[dict[str, Any]] = []
    for i in range(1, counts.domains + 1):
        d: dict[str, Any] = {
            "id": i,
            "name": f"example-{i}.org",
            "name_unicode": None,
            "kind": "hosted",
            "customer_id": 1 + (i - 1) % n_customers,
            "default_mailstore_id": 1 + (i - 1) % counts.mailstores,
            "target_domain_id": None,
            "relay_nexthop": None,
        }
        domains.append(d)
        hosted.append(d)
    next_id = counts.domains + 1
    idn = "bücher-1.example"
    domains.append(
        {
            **domains[0],
            "id": next_id,
            "name": idn.encode("idna").decode(),
            "name_unicode": idn,
            "kind": "alias",
            "target_domain_id": 1,
            "default_mailstore_id": None,
        }
    )
    next_id += 1
    for k in range(10, counts.domains + 1, 10):
        domains.append(
            {
                **domains[k - 1],
                "id": next_id,
                "name": f"example-{k}.net",
                "kind": "alias",
                "target_domain_id": k,
                "default_mailstore_id": None,
            }
        )
        next_id += 1
    for k in range(1, max(1, counts.domains // 20) + 1):
        domains.append(
            {
                "id": next_id,
                "name": f"relay-{k}.example.com",
                "name_unicode": None,
                "kind": "relay",
                "customer_id": 1,
                "default_mailstore_id": None,
                "target_domain_id": None,
                "relay_nexthop": f"[mx.relay-{k}.example.com]:25",
            }
        )
        next_id += 1
    conn.execute(insert(t.domain), domains)

    shared_hash = sha512_crypt(password, rng) if password else None
    taken: dict[int, set[str]] = {d["id"]: {"postmaster"} for d in hosted}
    addresses: list[str] = []

    def accounts() -> Iterator[dict[str, Any]]:
        aid = 0
        for d in hosted:  # every hosted domain has postmaster@
            aid += 1
            addresses.append(f"postmaster@{d['name']}")
            yield _account(aid, d, "postmaster", "active", None, shared_hash, rng)
        while aid < counts.accounts:
            d = hosted[rng.randrange(len(hosted))]
            local = f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}"
            if local in taken[d["id"]]:
                local = f"{local}{rng.randrange(10, 100000)}"
                if local in taken[d["id"]]:
                    continue
            taken[d["id"]].add(local)
            aid += 1
            roll = rng.random()
            status = (
                "active"
                if roll < 0.97
                else "login_disabled"
                if roll < 0.98
                else "disabled"
                if roll < 0.995
                else "moving"
            )
            store = None
            if counts.mailstores > 1 and rng.random() < 0.05:
                store = 1 + rng.randrange(counts.mailstores)
                if store == d["default_mailstore_id"]:
                    store = None
            if status != "disabled":
                addresses.append(f"{local}@{d['name']}")
            yield _account(aid, d, local, status, store, shared_hash, rng)

    made = {"mailstore": len(stores), "customer": n_customers, "domain": len(domains)}
    made["account"] = _insert(conn, t.account, accounts(), counts.accounts, progress)

    alias_rows: list[dict[str, Any]] = []
    target_rows: list[dict[str, Any]] = []
    alias_id = 0
    for i, d in enumerate(hosted):
        if i % 25 == 24:
            alias_id += 1
            alias_rows.append({"id": alias_id, "domain_id": d["id"], "local_part": ""})
            target_rows.append({"alias_id": alias_id, "target": f"postmaster@{d['name']}"})
    attempts = 0
    while alias_id < counts.aliases + len(hosted) // 25 and attempts < counts.aliases * 20:
        attempts += 1
        d = hosted[rng.randrange(len(hosted))]
        local = f"{rng.choice(_ROLES)}-{rng.randrange(1, 1_000_000)}"
        if local in taken[d["id"]]:
            continue
        taken[d["id"]].add(local)
        alias_id += 1
        alias_rows.append({"id": alias_id, "domain_id": d["id"], "local_part": local})
        for target in sorted(
            {
                addresses[rng.randrange(len(addresses))]
                if rng.random() < 0.9
                else f"{rng.choice(_FIRST)}@mail-{rng.randrange(1, 50)}.example.net"
                for _ in range(rng.randint(1, 3))
            }
        ):
            target_rows.append({"alias_id": alias_id, "target": target})
    made["alias"] = _insert(conn, t.alias, iter(alias_rows), len(alias_rows), progress)
    made["alias_target"] = _insert(
        conn, t.alias_target, iter(target_rows), len(target_rows), progress
    )
    return made


def _account(
    aid: int,
    d: dict[str, Any],
    local: str,
    status: str,
    store: int | None,
    shared_hash: str | None,
    rng: random.Random,
) -> dict[str, Any]:
    # Without --password every account gets a well-formed hash nobody knows the password of.
    pw = (
        shared_hash
        or "{SHA512-CRYPT}$6$" + f"{rng.getrandbits(64):016x}$" + f"{rng.getrandbits(256):064x}"
    )
    return {
        "id": aid,
        "domain_id": d["id"],
        "local_part": local,
        "customer_id": d["customer_id"],
        "password_hash": pw,
        "mailstore_id": store,
        "home": f"/var/vmail/{d['name']}/{local}",
        "quota_bytes": 2 * 1024**3,
        "status": status,
        # By id, not by the random generator (every other row stays as it was): one account in
        # 25 reads its mail over IMAP only, one in 50 may not send. Never a postmaster.
        "allow_pop3": local == "postmaster" or aid % 25 != 0,
        "allow_submission": local == "postmaster" or aid % 50 != 7,
    }


def _insert(
    conn: Any,
    table: Any,
    rows: Iterator[dict[str, Any]],
    total: int,
    progress: Callable[[str, int, int], None] | None,
) -> int:
    done = 0
    for batch in _batches(rows):
        conn.execute(insert(table), batch)
        done += len(batch)
        if progress:
            progress(f"insert {table.name}", done, total)
    return done
