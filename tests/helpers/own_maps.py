"""Helpers for the tests of maps of the operator's own (``[publisher.maps.NAME]``): tables of
an operator's own in a database, and a cluster whose channel mx lists maps defined on them."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, create_engine, text

from tests.conftest import Cluster
from tests.helpers.publisher import MX_MAPS

# A Postfix check_recipient_access list, a per-domain TLS policy (smtp_tls_policy_maps), and
# per-relay SASL credentials (smtp_sasl_password_maps: a secret), as an operator keeps them.
ACCESS = [
    ("Spam-Trap@Example-1.org", "REJECT this address takes no mail"),
    ("abuse@example-2.org", "OK"),
    ("noreply@example-3.org", "550 5.1.1 this address is not read"),
]
TLS = [
    ("example.net", "secure match=.example.net"),
    ("legacy.example", "may"),
    ("bank.example", "verify match=hostname"),
]
SASL = [("[smtp.relay.example]:587", "relayuser:s3cret-relay-pass")]

OWN_MAPS = """\
[publisher.maps.recipient_access]
query = "SELECT address, action FROM recipient_access"
description = "check_recipient_access: addresses refused or let through"

[publisher.maps.tls_policy]
query = "SELECT domain, policy FROM tls_policy"

[publisher.maps.sasl_passwords]
query = "SELECT nexthop, credentials FROM sasl_passwords"
secret = true

[publisher.maps.ticket_addresses]
query = "SELECT address, 'ticket' FROM ticket_queue"
cdb = false
"""
OWN_NAMES = ("recipient_access", "tls_policy", "sasl_passwords", "ticket_addresses")


def own_tables(url: str, access: Iterable[tuple[str, str]] = ACCESS) -> None:
    """Create the operator's tables of :data:`OWN_MAPS` in the database at ``url`` and fill
    them (``access`` rows for ``recipient_access``)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for name, key, value in (
                ("recipient_access", "address", "action"),
                ("tls_policy", "domain", "policy"),
                ("sasl_passwords", "nexthop", "credentials"),
            ):
                conn.execute(
                    text(f"CREATE TABLE {name} ({key} VARCHAR(300), {value} VARCHAR(300))")
                )
            conn.execute(text("CREATE TABLE ticket_queue (address VARCHAR(300))"))
            insert_rows(conn, "recipient_access", access)
            insert_rows(conn, "tls_policy", TLS)
            insert_rows(conn, "sasl_passwords", SASL)
            for address in ("support@example-1.org", "billing@example-1.org"):
                conn.execute(text("INSERT INTO ticket_queue VALUES (:a)"), {"a": address})
    finally:
        engine.dispose()


def insert_rows(conn: Connection, table: str, rows: Iterable[tuple[object, object]]) -> None:
    """INSERT (key, value) ``rows`` into the two-column ``table``."""
    for key, value in rows:
        conn.execute(text(f"INSERT INTO {table} VALUES (:k, :v)"), {"k": key, "v": value})


def run_sql(url: str, *statements: str) -> None:
    """Run ``statements`` in one transaction on the database at ``url``."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def list_own_maps(
    cluster: Cluster, names: Iterable[str] = OWN_NAMES, maps: str = OWN_MAPS, **config: str
) -> None:
    """Rewrite ``cluster``'s config (``config``: as for :meth:`Cluster.write_config`) with the
    ``[publisher.maps]`` of ``maps``, and channel mx listing ``names`` beside its built-in maps."""
    extra = config.pop("extra_publisher", "")
    cluster.write_config(extra_publisher=extra + "\n" + maps, **config)
    listed = MX_MAPS.rstrip("]\n") + "".join(f', "{n}"' for n in names) + "]\n"
    body = cluster.config_path.read_text()
    assert MX_MAPS in body
    cluster.config_path.write_text(body.replace(MX_MAPS, listed, 1))
