"""Values particular to one database engine, in the tables the publisher reads: each is read
as the engine means it, or refused naming its table and row, never a failure naming nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from mapsync.sources.postfixadmin import PostfixAdminSource
from tests.helpers import postfixadmin as pfa


def _sql(url: str, *statements: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


@pytest.mark.postgresql
@pytest.mark.parametrize("modified", ["infinity", "-infinity"])
def test_postfixadmins_infinite_modified_on_postgresql_is_read(pg_url: str, modified: str) -> None:
    """PostfixAdmin's `modified` (a timestamptz) set to 'infinity' by hand: every publish
    failed with psycopg's "timestamp too large (after year 10K)", naming nothing. Now read as
    the latest time (an edit under it waits for the full check, as under any stamp ahead)."""
    pfa.build(pg_url, "", 1847)
    _sql(pg_url, f"UPDATE alias SET modified = '{modified}'")
    source = PostfixAdminSource(pg_url)
    try:
        before = source.fingerprint().tables["alias"]
        assert source.snapshot().aliases
        _sql(
            pg_url,
            "UPDATE alias SET modified = now() WHERE address = (SELECT min(address) FROM alias)",
        )
        assert (source.fingerprint().tables["alias"] != before) == (modified == "-infinity")
    finally:
        source.close()
