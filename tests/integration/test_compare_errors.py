"""`mapsync compare` refuses what it cannot compare faithfully: each bad input is one clear
line naming the file and key (or the database, without its password), exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import migrating
from tests.helpers import postfixadmin as pfa


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mapsync", "-q", "--config", str(config), "compare", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(config, main.cf, dovecot-sql.conf.ext) of a published SQLite PostfixAdmin database."""
    root = tmp_path_factory.mktemp("compare-errors")
    url = f"sqlite:///{root / 'postfixadmin.db'}"
    pfa.build(url)
    main_cf, dovecot = migrating.write_before(root / "before", url)
    config = migrating.write_publisher(root / "c", url)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mapsync",
            "-q",
            "--config",
            str(config),
            "publish",
            "--skip-invalid",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return config, main_cf, dovecot


def refused(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    line = p.stderr.strip()
    assert line.startswith("mapsync: ") and "\n" not in line, line
    for needle in needles:
        assert needle in line, (needle, line)


def table_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "x.cf"
    path.write_text(body)
    return path


def test_a_table_file_key_compare_does_not_support_is_named(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    config, _, _ = setup
    cf = table_file(
        tmp_path,
        "hosts = localhost\ndbname = postfix\noption_file = /etc/my.cnf\n"
        "query = SELECT goto FROM alias WHERE address='%s'\n",
    )
    p = run(
        config, "--table", f"virtual_alias_maps=mysql:{cf}", "--table", f"relay_domains=mysql:{cf}"
    )
    refused(p, str(cf), "'option_file'", "not supported")


def test_a_table_file_without_a_query_is_named(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    config, _, _ = setup
    cf = table_file(tmp_path, "hosts = localhost\ndbname = postfix\n")
    refused(run(config, "--table", f"relay_domains=mysql:{cf}"), str(cf), "no 'query'")


def test_an_unknown_expansion_in_a_query_is_named(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    config, _, _ = setup
    cf = table_file(tmp_path, "dbpath = /nonexistent.db\nquery = SELECT 1 WHERE x = '%x'\n")
    refused(run(config, "--table", f"relay_domains=sqlite:{cf}"), f"{cf}: query", "%x")


def test_a_table_type_compare_cannot_read_is_refused_naming_main_cf_and_the_parameter(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    config, main_cf, _ = setup
    edited = tmp_path / "main.cf"
    edited.write_text(main_cf.read_text() + "transport_maps = regexp:/etc/postfix/transport.re\n")
    refused(
        run(config, "--postfix", str(edited)),
        f"{edited}: transport_maps",
        "regexp:/etc/postfix/transport.re",
        "'regexp' is not supported",
    )


def test_an_unsupported_dovecot_key_is_named(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    config, main_cf, dovecot = setup
    edited = tmp_path / "dovecot-sql.conf.ext"
    edited.write_text(dovecot.read_text() + "password_query_extra = 1\n")
    refused(
        run(config, "--postfix", str(main_cf), "--dovecot", str(edited)),
        str(edited),
        "'password_query_extra'",
    )


@pytest.mark.parametrize("variable", ["%r", "%Un", "%1Mu", "%w"])
def test_a_dovecot_variable_compare_does_not_expand_is_named_not_sent_as_is(
    setup: tuple[Path, Path, Path], tmp_path: Path, variable: str
) -> None:
    # Dovecot expands %r (the client's IP), %Un (upper case), %w (the password): a query
    # holding one ran with the literal text and compared another query than Dovecot runs.
    config, main_cf, dovecot = setup
    edited = tmp_path / "dovecot-sql.conf.ext"
    edited.write_text(
        dovecot.read_text().replace(
            "WHERE username = '%u'", f"WHERE username = '%u' AND '{variable}' <> ''", 1
        )
    )
    assert variable in edited.read_text()
    refused(
        run(config, "--postfix", str(main_cf), "--dovecot", str(edited)),
        f"{edited}: password_query: unsupported variable {variable}",
    )


def test_dovecot_comments_and_quoted_values_are_read_as_dovecot_reads_them(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    # Dovecot's settings reader ends a line at a '#' outside quotes (also inside a
    # continuation), skips comment lines between continued ones, and unquotes a value quoted
    # whole: compare sent the comment with the query and took the quotes for part of it.
    config, main_cf, dovecot = setup
    settings = dict(
        line.split(" = ", 1) for line in dovecot.read_text().splitlines() if " = " in line
    )
    user_query = settings["user_query"].replace("'%u'", "'%u' AND '#' = '#'")
    assert "\\" not in user_query and '"' not in user_query
    iterate_query = settings["iterate_query"].replace("'", "\\'")  # \' inside '...'
    edited = tmp_path / "dovecot-sql.conf.ext"
    edited.write_text(
        f"driver = {settings['driver']}  # the PostfixAdmin database\n"
        f'connect = "{settings["connect"]}"\n'
        f"password_query = {settings['password_query']} \\\n"
        "  # a comment line between continued ones\n"
        "  AND 1 = 1 # AND no_such_column = 1\n"
        f'user_query = "{user_query}"\n'
        f"iterate_query = '{iterate_query}'\n"
    )
    p = run(config, "--postfix", str(main_cf), "--dovecot", str(edited), "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    same = run(config, "--postfix", str(main_cf), "--dovecot", str(dovecot), "--json")
    assert json.loads(p.stdout)["differences"] == json.loads(same.stdout)["differences"]
    assert json.loads(p.stdout)["users"] == json.loads(same.stdout)["users"] > 0


def test_an_unreachable_database_names_the_table_file_and_hides_the_password(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    config, _, _ = setup
    cf = table_file(
        tmp_path,
        "user = postfix\npassword = s3cret-pw\nhosts = 127.0.0.1:1\n"
        "dbname = postfix\nconnect_timeout = 2\n"
        "query = SELECT domain FROM domain WHERE domain='%s'\n",
    )
    p = run(config, "--table", f"relay_domains=mysql:{cf}")
    refused(p, f"{cf}: query for ", "127.0.0.1", "Can't connect")
    assert "s3cret-pw" not in p.stderr


def test_nothing_published_or_an_unknown_channel_is_an_error(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    config, main_cf, _ = setup
    refused(run(config, "--postfix", str(main_cf), "--channel", "nope"), "unknown channel nope")
    empty = tmp_path / "mapsync.toml"
    empty.write_text(
        config.read_text().replace(str(config.parent / "repo"), str(tmp_path / "repo"))
    )
    refused(run(empty, "--postfix", str(main_cf)), "nothing published", str(tmp_path / "repo"))


def test_compare_needs_the_live_configuration(setup: tuple[Path, Path, Path]) -> None:
    config, _, _ = setup
    refused(run(config), "--postfix MAIN_CF or --table")
    refused(run(config, "--postfix", "/nonexistent/main.cf"), "/nonexistent/main.cf", "cannot read")


@pytest.mark.mariadb
@pytest.mark.parametrize("sql_mode", ["", "NO_BACKSLASH_ESCAPES", "ANSI_QUOTES"])
def test_a_key_quoted_for_mysql_is_itself_in_every_sql_mode(sql_mode: str) -> None:
    """compare puts each key into the table's query as Postfix does ('%s' quoted): with a
    backslashed quote, a server in NO_BACKSLASH_ESCAPES ended the string at it, and the rest
    of the key ran as SQL. A doubled quote is one quote in every mode."""
    from sqlalchemy import create_engine, text

    from mapsync.sources.live import _sql_quote
    from tests.conftest import MARIADB_URL

    engine = create_engine(MARIADB_URL.format(db="test"))
    key = "x' OR '1'='1\" -- ;"
    try:
        with engine.connect() as conn:
            conn.execute(text(f"SET SESSION sql_mode = '{sql_mode}'"))
            got = conn.exec_driver_sql(f"SELECT '{_sql_quote(key, 'mysql')}'").scalar_one()
    finally:
        engine.dispose()
    assert got == key
