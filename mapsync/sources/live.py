"""The operator's live SQL lookups, as Postfix and Dovecot run them today (``mapsync compare``).

Reads Postfix's mysql_table(5), pgsql_table(5) and sqlite_table(5) files and Dovecot's
``dovecot-sql.conf.ext`` (the 2.3 ``key = value`` form PostfixAdmin's DOCUMENTS/DOVECOT.txt
uses), and answers a key exactly as those daemons would: the same ``%`` expansions, the same
quoting, every column of every row joined by commas. What PostfixAdmin's documents use is
supported; anything else is refused naming the file and key, so a comparison never silently
runs a different query than the daemon does.

Every query runs in a transaction that is rolled back: nothing is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, event, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from mapsync.errors import ConfigError, SourceError
from mapsync.sources.builtin import make_engine, redact, safe_url

# Keys of the *_table(5) files: those that shape the answer are implemented, those that only
# tune the connection are accepted and ignored; any other key is refused.
_TABLE_KEYS = {"hosts", "user", "password", "dbname", "dbpath", "query", "domain", "result_format"}
_TABLE_KEYS_LEGACY = {"table", "select_field", "where_field", "additional_conditions"}
_TABLE_KEYS_IGNORED = {
    "expansion_limit",  # a limit on how many results are acceptable; compare shows them all
    "idle_interval",
    "retry_interval",
    "connect_timeout",
    "read_timeout",
    "write_timeout",
    "charset",
    "encoding",
    "require_result_set",
}
TABLE_TYPES = ("mysql", "pgsql", "sqlite")
_DRIVERS = {"mysql": "mysql+pymysql", "pgsql": "postgresql+psycopg", "sqlite": "sqlite"}


class LiveLookupError(SourceError):
    """A live lookup could not run (unreachable database, a query the database refuses)."""


def _logical_lines(path: Path, text: str) -> list[tuple[int, str]]:
    """Postfix's config syntax: ``#`` lines are comments; a line starting with whitespace
    continues the previous one."""
    out: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace() and out:
            out[-1] = (out[-1][0], out[-1][1] + " " + raw.strip())
        elif raw[0].isspace():
            raise ConfigError(f"{path}, line {number}: a continuation line with nothing before it")
        else:
            out.append((number, raw.strip()))
    return out


def _read_text(path: Path) -> str:
    """A config file of the operator's, as UTF-8 text; ConfigError naming it otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def read_settings(path: Path) -> dict[str, str]:
    """``name = value`` pairs of a Postfix-syntax file (main.cf or a *_table(5) file)."""
    text = _read_text(path)
    settings: dict[str, str] = {}
    for number, line in _logical_lines(path, text):
        name, eq, value = line.partition("=")
        if not eq or not name.strip():
            raise ConfigError(f"{path}, line {number}: expected 'name = value'")
        settings[name.strip()] = value.strip()
    return settings


def _sql_quote(value: str, kind: str) -> str:
    """``value`` escaped for inside '...', as the daemon's driver escapes it (for MySQL the
    quote doubled, not backslashed: the same value, and under sql_mode NO_BACKSLASH_ESCAPES,
    where mysql_real_escape_string doubles it too, a quote still cannot end the string)."""
    if kind == "mysql":  # mysql_real_escape_string
        # '"' left as it is: inside '...' it is itself in every sql_mode.
        for a, b in (("\\", "\\\\"), ("'", "''"), ("\0", "\\0"), ("\n", "\\n")):
            value = value.replace(a, b)
        return value
    return value.replace("'", "''")


_POSTFIX_EXPANSION = re.compile(r"%(.)", re.DOTALL)


def _labels(domain: str) -> list[str]:
    return list(reversed(domain.split("."))) if domain else []


def postfix_expand(
    template: str, key: str, kind: str, *, result: str | None = None, where: str = ""
) -> str | None:
    """Postfix's ``%`` expansion of a query (``result`` None) or of ``result_format``
    (mysql_table(5), "query"): None when the query is suppressed (``%u`` of an empty local
    part, ``%d`` or ``%1`` of a key without a domain)."""
    subject = key if result is None else result
    suppressed = False

    def parts(text: str) -> tuple[str, str | None]:
        local, at, domain = text.rpartition("@")
        return (local, domain) if at else (text, None)

    def one(m: re.Match[str]) -> str:
        nonlocal suppressed
        c = m.group(1)
        if c == "%":
            return "%"
        # Upper case and %1..%9: the input key, in result_format; in a query, the key anyway.
        source = key if c.isupper() or c.isdigit() else subject
        local, domain = parts(source)
        lc = c.lower()
        if lc == "s":
            value = source
        elif lc == "u":
            if domain is not None and not local:
                suppressed = True
            value = local
        elif lc == "d":
            if not domain:  # no domain, or an empty one ("user@")
                suppressed = True
            value = domain or ""
        elif c in "123456789":
            labels = _labels(domain or "")
            if not domain or int(c) > len(labels):
                suppressed = True
                return ""
            value = labels[int(c) - 1]
        else:
            raise ConfigError(f"{where}: unsupported expansion %{c}")
        return value if result is not None else _sql_quote(value, kind)

    out = _POSTFIX_EXPANSION.sub(one, template)
    if template.endswith("%") and not template.endswith("%%"):
        raise ConfigError(f"{where}: a lone % at the end")
    return None if suppressed else out


def _connection_url(kind: str, settings: dict[str, str], where: Path) -> URL:
    """The SQLAlchemy URL for a table file's connection settings (the first of ``hosts``)."""
    if kind == "sqlite":
        if "dbpath" not in settings:
            raise ConfigError(f"{where}: no 'dbpath' (sqlite_table(5) needs the database file)")
        return URL.create("sqlite", database=settings["dbpath"])
    hosts = settings.get("hosts", "localhost").replace(",", " ").split()
    if not hosts:
        raise ConfigError(f"{where}: 'hosts' is empty")
    host = hosts[0]
    if kind == "pgsql" and re.match(r"postgres(ql)?://", host):
        # pgsql_table(5): a connection URI, given to libpq as is (user, password and dbname
        # of the file are not used with it).
        try:
            url = make_url("postgresql+psycopg" + host[host.index("://") :])
            url.port  # noqa: B018 -- parsed here, not at the first lookup
            return url
        except (ArgumentError, ValueError):
            raise ConfigError(f"{where}: hosts: not a valid postgresql:// URI") from None
    for key in ("dbname",):
        if key not in settings:
            raise ConfigError(f"{where}: no '{key}'")
    query: dict[str, str] = {}
    port: int | None = None
    name: str | None = host
    if host.startswith("inet:"):
        host = host[5:]
    if host.startswith("unix:") or host.startswith("/"):
        socket = host.removeprefix("unix:")
        name = None
        if kind == "mysql":
            query["unix_socket"] = socket
        else:  # libpq takes the socket's directory as host
            query["host"] = (
                str(Path(socket).parent) if Path(socket).name.startswith(".s.") else socket
            )
    elif host.count(":") == 1 and not host.startswith("["):
        name, _, p = host.partition(":")
        if not p.isdigit():
            raise ConfigError(f"{where}: hosts: {host!r} is not host:port")
        port = int(p)
    return URL.create(
        _DRIVERS[kind],
        username=settings.get("user") or None,
        password=settings.get("password") or None,
        host=name,
        port=port,
        database=settings["dbname"],
        query=query,
    )


def _read_only_session(dbapi_connection: Any, _record: Any) -> None:
    """Every session compare opens refuses writes, whatever a query tries."""
    statement = {
        "sqlite3": "PRAGMA query_only = ON",
        "psycopg": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "pymysql": "SET SESSION TRANSACTION READ ONLY",
    }.get(type(dbapi_connection).__module__.split(".")[0])
    if statement is None:
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statement)
    finally:
        cursor.close()
    dbapi_connection.commit()


class Connections:
    """One engine per database (many tables name the same one)."""

    def __init__(self) -> None:
        self.engines: dict[str, Engine] = {}

    def run(self, url: str, sql: str, where: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """(column names, rows) of ``sql``, run as the daemon runs it, then rolled back."""
        engine = self.engines.get(url)
        if engine is None:
            engine = self.engines[url] = make_engine(url)
            event.listen(engine, "connect", _read_only_session)
        try:
            with engine.connect() as conn:
                # The daemon's query text as is: the DB-API cursor with no parameters, so a
                # '%' or ':' inside it means what it means to the database.
                raw = conn.connection.dbapi_connection
                assert raw is not None
                cursor = raw.cursor()
                try:
                    cursor.execute(sql)
                    names = [str(d[0]).lower() for d in cursor.description or ()]
                    rows = [tuple(r) for r in cursor.fetchall()]
                finally:
                    cursor.close()
                    raw.rollback()
                return names, rows
        except SQLAlchemyError as exc:
            raise _failed(url, where, exc) from None
        except Exception as exc:  # the driver's own errors, raised outside SQLAlchemy
            if type(exc).__module__.split(".")[0] in ("pymysql", "psycopg", "sqlite3"):
                raise _failed(url, where, exc) from None
            raise

    def close(self) -> None:
        """Close every engine opened for a lookup."""
        for engine in self.engines.values():
            engine.dispose()


def _failed(url: str, where: str, exc: BaseException) -> LiveLookupError:
    orig = getattr(exc, "orig", None) or exc
    detail = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return LiveLookupError(f"{where}: database {safe_url(url)}: {redact(detail, url)}")


@dataclass(frozen=True)
class SqlTable:
    """One Postfix SQL lookup table (``mysql:/etc/postfix/sql/x.cf`` and the like)."""

    name: str  # as main.cf names it: "mysql:/etc/postfix/sql/x.cf"
    kind: str
    path: Path
    url: str
    query: str
    domains: tuple[str, ...] = ()
    result_format: str | None = None

    def lookup(self, key: str, db: Connections) -> str | None:
        """What Postfix answers for ``key``: every non-empty column of every row, joined
        by commas; None if nothing (or the query is suppressed)."""
        key = key.lower()  # Postfix folds the key of these tables to lower case
        if self.domains:
            local, at, domain = key.rpartition("@")
            if not (at and local and domain in self.domains):
                return None
        where = f"{self.path}: query"
        sql = postfix_expand(self.query, key, self.kind, where=where)
        if sql is None:
            return None
        values: list[str] = []
        for row in db.run(self.url, sql, f"{self.path}: query for {key!r}")[1]:
            for value in row:
                if value is None or str(value) == "":
                    continue
                text = str(value)
                if self.result_format is not None:
                    expanded = postfix_expand(
                        self.result_format,
                        key,
                        self.kind,
                        result=text,
                        where=f"{self.path}: result_format",
                    )
                    if expanded is None:
                        continue
                    text = expanded
                values.append(text)
        return ",".join(values) if values else None


def _only_select(query: str, where: str) -> None:
    """compare reads: a query that is not a SELECT (or WITH ... SELECT) is not run."""
    first = query.lstrip("( \t").split(None, 1)[0].upper() if query.strip() else ""
    if first not in ("SELECT", "WITH"):
        raise ConfigError(
            f"{where}: only SELECT queries are run by mapsync compare, not {first or 'nothing'}"
        )


def sql_table(kind: str, path: Path, url_override: str | None = None) -> SqlTable:
    """Parse a mysql_table(5) / pgsql_table(5) / sqlite_table(5) file."""
    if kind not in TABLE_TYPES:
        raise ConfigError(f"{path}: table type {kind} is not supported ({', '.join(TABLE_TYPES)})")
    settings = read_settings(path)
    for key in settings:
        if key not in _TABLE_KEYS | _TABLE_KEYS_LEGACY | _TABLE_KEYS_IGNORED:
            raise ConfigError(
                f"{path}: key {key!r} is not supported by mapsync compare "
                f"(supported: {', '.join(sorted(_TABLE_KEYS | _TABLE_KEYS_LEGACY))})"
            )
    query = settings.get("query")
    if query is None:
        legacy = [k for k in ("table", "select_field", "where_field") if k in settings]
        if len(legacy) == 3:
            query = (
                f"SELECT {settings['select_field']} FROM {settings['table']}"
                f" WHERE {settings['where_field']} = '%s' {settings.get('additional_conditions', '')}"
            ).strip()
        else:
            raise ConfigError(f"{path}: no 'query' (nor table, select_field and where_field)")
    _only_select(query, f"{path}: query")
    domains = tuple(d.lower() for d in settings.get("domain", "").replace(",", " ").split())
    for d in domains:
        if "/" in d or ":" in d:
            raise ConfigError(
                f"{path}: domain: {d!r}: only domain names are supported, not files or tables"
            )
    postfix_expand(query, "probe@example.com", kind, where=f"{path}: query")  # refuse early
    result_format = settings.get("result_format")
    if result_format is not None:
        postfix_expand(result_format, "a@b", kind, result="a@b", where=f"{path}: result_format")
    url = url_override or _connection_url(kind, settings, path).render_as_string(
        hide_password=False
    )
    return SqlTable(
        name=f"{kind}:{path}",
        kind=kind,
        path=path,
        url=url,
        query=query,
        domains=domains,
        result_format=result_format,
    )


# --- Dovecot ---------------------------------------------------------------------------

_DOVECOT_KEYS = {
    "driver",
    "connect",
    "default_pass_scheme",
    "password_query",
    "user_query",
    "iterate_query",
}
_DOVECOT_DRIVERS = {"mysql": "mysql", "pgsql": "pgsql", "sqlite": "sqlite"}
# %u %n %d %s with an optional L (lower case) modifier, and the 2.4 %{...} names; anything
# else after a % (%r, %Un, %1Mu, ...) is matched too, to be refused rather than sent as is.
_DOVECOT_VAR = re.compile(r"%(%|L?[unds]|\{[^}]*\}|[-.0-9A-Z]*[A-Za-z]|.?)", re.DOTALL)
_DOVECOT_LONG = {
    "user": "u",
    "username": "n",
    "domain": "d",
    "service": "s",
    "user | username": "n",
    "user | domain": "d",
    "user|username": "n",
    "user|domain": "d",
}
SERVICE = "imap"  # the service a compared login is for (%s): an IMAP login


def _dovecot_uncomment(line: str) -> str:
    """A line of a Dovecot settings file without its comment: ``#`` outside '...' and "..."
    (inside, a backslash escapes the next character) starts one, as Dovecot reads it."""
    quote = ""
    escaped = False
    for i, c in enumerate(line):
        if escaped:
            escaped = False
        elif quote:
            if c == "\\":
                escaped = True
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "#":
            return line[:i].rstrip()
    return line


def _dovecot_unescape(value: str) -> str:
    """Dovecot's str_unescape() of a quoted value: a backslash takes the next character as is."""
    return re.sub(r"\\(.)", r"\1", value, flags=re.DOTALL)


def _dovecot_settings(path: Path) -> dict[str, str]:
    text = _read_text(path)
    settings: dict[str, str] = {}
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = _dovecot_uncomment(raw.strip())
        if not line:
            continue
        if not pending:
            start = number
        if line.endswith("\\"):  # Dovecot: a trailing backslash continues the line
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line.startswith("!include") or "{" in line.split("=", 1)[0]:
            raise ConfigError(f"{path}, line {start}: only 'key = value' lines are supported")
        name, eq, value = line.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ConfigError(f"{path}, line {start}: expected 'key = value'")
        if name not in _DOVECOT_KEYS:
            raise ConfigError(
                f"{path}: key {name!r} is not supported by mapsync compare "
                f"(supported: {', '.join(sorted(_DOVECOT_KEYS))})"
            )
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
            value = _dovecot_unescape(value[1:-1])  # Dovecot unquotes a value quoted whole
        elif value.startswith("<"):
            raise ConfigError(f"{path}: {name}: reading the value from a file is not supported")
        settings[name] = value
    return settings


def _dovecot_url(driver: str, connect: str, where: Path) -> str:
    if driver == "sqlite":
        return URL.create("sqlite", database=connect.strip()).render_as_string(hide_password=False)
    fields: dict[str, str] = {}
    for item in re.findall(r"(\w+)=('[^']*'|\"[^\"]*\"|\S+)", connect):
        fields[item[0]] = item[1].strip("'\"")
    if "dbname" not in fields:
        raise ConfigError(f"{where}: connect: no dbname=")
    host = fields.get("host", "localhost")
    settings = {
        "hosts": host + (f":{fields['port']}" if "port" in fields and "/" not in host else ""),
        "dbname": fields["dbname"],
        "user": fields.get("user", ""),
        "password": fields.get("password", ""),
    }
    return _connection_url(driver, settings, where).render_as_string(hide_password=False)


@dataclass(frozen=True)
class DovecotSql:
    """Dovecot's SQL passdb and userdb (``dovecot-sql.conf.ext``)."""

    path: Path
    kind: str
    url: str
    password_query: str | None
    user_query: str | None
    iterate_query: str | None
    default_pass_scheme: str

    def _expand(self, template: str, user: str, where: str) -> str:
        local, at, domain = user.rpartition("@")
        if not at:
            local, domain = user, ""
        values = {"u": user, "n": local, "d": domain, "s": SERVICE}

        def one(m: re.Match[str]) -> str:
            token = m.group(1)
            if token in ("%", ""):  # %% and a % that ends the template
                return "%"
            if token.startswith("{"):
                name = token[1:-1].strip()
                if name not in _DOVECOT_LONG:
                    raise ConfigError(f"{where}: unsupported variable %{token}")
                value = values[_DOVECOT_LONG[name]]
            elif token[-1:] not in values or token[:-1] not in ("", "L"):
                raise ConfigError(f"{where}: unsupported variable %{token}")
            else:
                value = values[token[-1]]
                if token.startswith("L"):
                    value = value.lower()
            return _sql_quote(value, self.kind)

        return _DOVECOT_VAR.sub(one, template)

    def _row(self, which: str, user: str, db: Connections) -> dict[str, Any] | None:
        template = getattr(self, which)
        if template is None:
            return None
        where = f"{self.path}: {which}"
        sql = self._expand(template, user, where)
        names, rows = db.run(self.url, sql, f"{where} for {user!r}")
        return dict(zip(names, rows[0], strict=False)) if rows else None

    def passdb(self, user: str, db: Connections) -> dict[str, Any] | None:
        """The row ``password_query`` returns for ``user``, as a dict (None: no such user)."""
        return self._row("password_query", user, db)

    def userdb(self, user: str, db: Connections) -> dict[str, Any] | None:
        """The row ``user_query`` returns for ``user``, as a dict (None: no such user)."""
        return self._row("user_query", user, db)

    def users(self, db: Connections) -> list[str]:
        """Every user ``iterate_query`` names (none without one)."""
        if not self.iterate_query:
            return []
        where = f"{self.path}: iterate_query"
        rows = db.run(self.url, self.iterate_query, where)[1]
        return [str(r[0]).lower() for r in rows if r and r[0]]


def dovecot_sql(path: Path, url_override: str | None = None) -> DovecotSql:
    """Parse Dovecot's ``dovecot-sql.conf.ext``."""
    settings = _dovecot_settings(path)
    driver = settings.get("driver")
    if driver not in _DOVECOT_DRIVERS:
        raise ConfigError(f"{path}: driver: {driver!r} is not one of mysql, pgsql, sqlite")
    if "connect" not in settings and not url_override:
        raise ConfigError(f"{path}: no 'connect'")
    if "password_query" not in settings and "user_query" not in settings:
        raise ConfigError(f"{path}: neither password_query nor user_query")
    url = url_override or _dovecot_url(driver, settings["connect"], path)
    out = DovecotSql(
        path=path,
        kind=driver,
        url=url,
        password_query=settings.get("password_query"),
        user_query=settings.get("user_query"),
        iterate_query=settings.get("iterate_query"),
        default_pass_scheme=settings.get("default_pass_scheme", "MD5").upper(),
    )
    for which in ("password_query", "user_query", "iterate_query"):
        template = settings.get(which)
        if template is not None:
            _only_select(template, f"{path}: {which}")
            out._expand(template, "probe@example.com", f"{path}: {which}")  # refuse early
    return out
