"""docs/migrating.md's "before" configuration — PostfixAdmin's documented Postfix table files,
main.cf lines and Dovecot SQL config — written out for a test database, and a publisher
reading that database with ``schema = "postfixadmin"``.

The files are the documentation's own code blocks (those starting ``# file: PATH``), so the
docs cannot drift from what the tests run; only the connection settings are the test
database's, and, on PostgreSQL and SQLite, ``CONCAT(a, b, c)`` becomes ``a || b || c`` as the
page (and PostfixAdmin's own note) says.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sqlalchemy import make_url

from mapsync.signing import keygen
from tests.helpers import postfixadmin as pfa

ROOT = Path(__file__).resolve().parents[2]
MIGRATING = ROOT / "docs" / "migrating.md"

_BLOCK = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)


def doc_blocks(path: Path = MIGRATING, marker: str = "# file: ") -> dict[str, str]:
    """The code blocks of ``path`` whose first line is ``marker PATH ...``, by that PATH."""
    out = {}
    for m in _BLOCK.finditer(path.read_text()):
        first, _, rest = m.group(1).partition("\n")
        if first.startswith(marker):
            out[first[len(marker) :].split()[0]] = rest
    return out


def _concat_to_pipes(query: str) -> str:
    """``CONCAT('%u', '@', x)`` → ``'%u' || '@' || x`` (arguments hold no commas or parens)."""
    return re.sub(
        r"CONCAT\(([^()]*)\)",
        lambda m: " || ".join(a.strip() for a in m.group(1).split(",")),
        query,
    )


def write_before(root: Path, url: str) -> tuple[Path, Path]:
    """docs/migrating.md's main.cf lines, table files and dovecot-sql.conf.ext under ``root``,
    connected to the PostfixAdmin database at ``url``: (main.cf, dovecot-sql.conf.ext)."""
    u = make_url(url)
    kind = {"mysql": "mysql", "postgresql": "pgsql", "sqlite": "sqlite"}[u.get_backend_name()]
    if kind == "sqlite":
        connection = f"dbpath = {u.database}\n"
        dovecot_connect = f"connect = {u.database}"
    else:
        host = f"{u.host}:{u.port}" if u.port else str(u.host)
        connection = (
            f"user = {u.username or ''}\npassword = {u.password or ''}\n"
            f"hosts = {host}\ndbname = {u.database}\n"
        )
        dovecot_connect = (
            f"connect = host={u.host} port={u.port} dbname={u.database} user={u.username}"
        )
    sql_dir = root / "sql"
    sql_dir.mkdir(parents=True, exist_ok=True)
    main_cf = root / "main.cf"
    dovecot = root / "dovecot-sql.conf.ext"
    for name, body in doc_blocks().items():
        if name.startswith("/etc/postfix/sql/"):
            lines = [
                line
                for line in body.splitlines()
                if line.split("=")[0].strip() not in ("user", "password", "hosts", "dbname")
            ]
            body = connection + "\n".join(lines) + "\n"
            if kind != "mysql":
                body = _concat_to_pipes(body)
            (sql_dir / Path(name).name).write_text(body)
        elif name == "/etc/postfix/main.cf":
            body = body.replace("/etc/postfix/sql/", f"{sql_dir}/")
            main_cf.write_text(body.replace("proxy:mysql:", f"proxy:{kind}:"))
        elif name == "/etc/dovecot/dovecot-sql.conf.ext":
            body = re.sub(r"(?m)^driver = .*$", f"driver = {kind}", body)
            body = re.sub(r"(?m)^connect = .*$", dovecot_connect, body)
            if kind != "mysql":
                body = _concat_to_pipes(body)
            dovecot.write_text(body)
        else:
            raise AssertionError(f"docs/migrating.md: unexpected file block {name}")
    assert main_cf.exists() and dovecot.exists()
    return main_cf, dovecot


def write_publisher(root: Path, url: str) -> Path:
    """A publisher of the PostfixAdmin database at ``url`` (an MX channel and a mailstore
    channel; the test data set's mail base, vacation domain and mailstores); the config path."""
    root.mkdir(parents=True, exist_ok=True)
    keygen(root / "keys" / "signing.key")
    path = root / "mapsync.toml"
    mx_maps = ["domains", "recipients", "virtual", "transport", "senders"]
    path.write_text(
        f"""[publisher]
database = "{url}"
schema = "postfixadmin"
repository = "{root / "repo"}"
signing_key = "{root / "keys" / "signing.key"}"

[publisher.postfixadmin]
mail_base = "{pfa.MAIL_BASE}"
vacation_domain = "{pfa.VACATION_DOMAIN}"
vacation_nexthop = "{pfa.VACATION_NEXTHOP}"

[publisher.postfixadmin.mailstores.local]
lmtp_host = "127.0.0.1"

[publisher.channels.mx]
maps = {json.dumps(mx_maps)}

[publisher.channels.store]
maps = ["dovecot_users"]

[agent]
state = "{root / "node" / "state"}"
trusted_keys = ["{root / "keys" / "signing.pub"}"]

[agent.channels.mx]
source = "{root / "repo" / "mx"}"
target = "{root / "node" / "mx"}"
timeout = "30s"
"""
    )
    return path
