"""A database password never leaves the config file: every spelling of it is hidden.

``safe_url`` is what output, logs and every signed manifest show of ``[publisher].database``;
``redact`` cleans a driver's or SQLAlchemy's message of the URL's passwords.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from mapsync.sources.builtin import redact, safe_url

PW = "Zq7-secret-Pw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql+psycopg://mapsync:{PW}@db/mail", "postgresql+psycopg://mapsync:***@db/mail"),
        (
            f"postgresql+psycopg://mapsync@db/mail?password={PW}&sslmode=require",
            "postgresql+psycopg://mapsync@db/mail?password=***&sslmode=require",
        ),
        (
            f"postgresql+psycopg://m@db/mail?PASSWORD={PW}",
            "postgresql+psycopg://m@db/mail?PASSWORD=***",
        ),
        (f"mysql+pymysql://m@db/mail?Passwd={PW}", "mysql+pymysql://m@db/mail?Passwd=***"),
        (
            f"postgresql+psycopg://m@db/mail?sslpassword={PW}&sslmode=verify-full",
            "postgresql+psycopg://m@db/mail?sslmode=verify-full&sslpassword=***",
        ),
        (
            f"mysql+pymysql://m@db/mail?ssl_password={PW}",
            "mysql+pymysql://m@db/mail?ssl_password=***",
        ),
        (f"mssql+pyodbc://m@dsn?PWD={PW}", "mssql+pyodbc://m@dsn?PWD=***"),
        (
            f"postgresql+psycopg:///mail?host=db&user=m&password={PW}",
            "postgresql+psycopg:///mail?host=db&password=***&user=m",
        ),
        (  # a libpq conninfo inside a query value
            f"postgresql+psycopg:///mail?dsn=host%3Ddb%20password%3D{PW}",
            "postgresql+psycopg:///mail?dsn=host%3Ddb+password%3D***",
        ),
        (  # percent-encoded userinfo
            "postgresql+psycopg://m:Zq7%40secret@db/mail",
            "postgresql+psycopg://m:***@db/mail",
        ),
        (f"not a url://m:{PW}@db password={PW}", "not a url://m:***@db password=***"),
        (
            "sqlite:////var/lib/mapsync/password/central.db",
            "sqlite:////var/lib/mapsync/password/central.db",
        ),
    ],
)
def test_every_form_of_password_is_hidden(url: str, shown: str) -> None:
    assert safe_url(url) == shown
    for secret in (PW, "Zq7@secret", "Zq7%40secret"):
        assert secret not in safe_url(url)


@pytest.mark.parametrize(
    ("url", "password"),
    [
        (f"postgresql+psycopg://m:{PW}@db/mail", PW),
        (f"postgresql+psycopg://m@db/mail?password={PW}", PW),
        (f"mysql+pymysql://m@db/mail?PASSWD={PW}", PW),
        (f"postgresql+psycopg://m@db/mail?SSLPassword={PW}", PW),
        (f"postgresql+psycopg:///mail?dsn=host%3Ddb%20sslpassword%3D{PW}", PW),
        ("postgresql+psycopg://m:Zq7%40secret@db/mail", "Zq7@secret"),
        (f"postgresql+psycopg:///mail?dsn=host%3Ddb%20password%3D%27{PW}%27", PW),
    ],
)
def test_driver_messages_lose_the_password(url: str, password: str) -> None:
    # What drivers and SQLAlchemy have been seen to echo: the URL, the connect arguments,
    # the conninfo string, the password decoded or quoted.
    message = (
        f"could not connect with {url}; connect args {{'password': '{password}'}}; "
        f"conninfo 'host=db password={password}'; quoted {quote(password, safe='')}"
    )
    cleaned = redact(message, url)
    for secret in (password, quote(password, safe="")):
        assert secret not in cleaned
    assert cleaned.startswith("could not connect with ") and "***" in cleaned
