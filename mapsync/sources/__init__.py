"""Sources read the central database into a :class:`~mapsync.snapshot.Snapshot`.

SQLAlchemy lives only here (and in ``schema``); nothing downstream imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mapsync.sources.base import Source

if TYPE_CHECKING:
    from mapsync.config import PostfixAdminConfig, SqlConfig


def open_source(
    url: str,
    schema: str = "mapsync",
    *,
    postfixadmin: PostfixAdminConfig | None = None,
    sql: SqlConfig | None = None,
) -> Source:
    """The source for ``schema`` at SQLAlchemy ``url``: "mapsync" (mapsync's own tables),
    "postfixadmin" (an existing PostfixAdmin database, read as it is, with ``postfixadmin``'s
    settings) or "sql" (any schema, read by the SELECTs of ``sql``)."""
    if schema == "mapsync":
        from mapsync.sources.builtin import BuiltinSource

        return BuiltinSource(url)
    if schema == "postfixadmin":
        from mapsync.sources.postfixadmin import PostfixAdminSource

        return PostfixAdminSource(url, postfixadmin)
    if schema == "sql":
        from mapsync.config import SqlConfig
        from mapsync.sources.sql import SqlSource

        return SqlSource(url, sql or SqlConfig())
    raise ValueError(f"unknown schema {schema!r}")


__all__ = ["Source", "open_source"]
