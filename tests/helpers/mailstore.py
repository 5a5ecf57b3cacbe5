"""A mailstore for the tests of a mailbox move: the ``dovecot-store`` role's passdb and userdb
(its channel's ``dovecot_users``) behind a real Dovecot LMTP service on this machine, and the
central-database changes that move an account."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, update

from mapsync.sources import schema as t
from tests.daemons.roles import Nodes
from tests.helpers.dovecot import Dovecot

STORE_ROLE = "dovecot-store"
VMAIL_UID = 5000  # the uid and gid dovecot_users gives every account (channel default)


def update_account(db_url: str, address: str, **values: Any) -> None:
    """Set ``values`` on the account ``address`` (``status``, ``mailstore_id``, ...);
    SQLAlchemy gives the row a fresh ``updated_at``."""
    local, _, domain = address.partition("@")
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            did = select(t.domain.c.id).where(t.domain.c.name == domain).scalar_subquery()
            done = conn.execute(
                update(t.account)
                .where(t.account.c.domain_id == did, t.account.c.local_part == local)
                .values(**values)
            )
            assert done.rowcount == 1, address
    finally:
        engine.dispose()


def mailstore_id(db_url: str, name: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            query = select(t.mailstore.c.id).where(t.mailstore.c.name == name)
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def set_lmtp(db_url: str, store: str, host: str, port: int) -> None:
    """Point mailstore ``store``'s LMTP service at ``host``:``port``."""
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                update(t.mailstore)
                .where(t.mailstore.c.name == store)
                .values(lmtp_host=host, lmtp_port=port)
            )
    finally:
        engine.dispose()


def account_elsewhere(db_url: str, store: str) -> str:
    """An active account (not a postmaster) housed on another mailstore than ``store``."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            here = select(t.mailstore.c.id).where(t.mailstore.c.name == store).scalar_subquery()
            rows = conn.execute(
                select(t.account.c.local_part, t.domain.c.name)
                .join(t.domain, t.domain.c.id == t.account.c.domain_id)
                .where(t.account.c.status == "active", t.account.c.local_part != "postmaster")
                .where(t.domain.c.kind == "hosted", t.domain.c.status == "active")
                .where(
                    (t.account.c.mailstore_id != here)
                    | (
                        t.account.c.mailstore_id.is_(None)
                        & (t.domain.c.default_mailstore_id != here)
                    )
                )
                .order_by(t.account.c.id)
            )
            local, domain = rows.first() or ("", "")
    finally:
        engine.dispose()
    assert local, f"no active account off {store}"
    return f"{local}@{domain}"


class LmtpMailstore(Dovecot):
    """Dovecot with the ``dovecot-store`` role's configuration (its passwd-file: the accounts
    housed on the role's mailstore), delivering over LMTP into maildirs under ``work/mail``."""

    def __init__(self, nodes: Nodes, work: Path) -> None:
        self.mail = work / "mail"
        self.mail.mkdir(parents=True)
        os.chown(self.mail, VMAIL_UID, VMAIL_UID)  # LMTP delivers as the account's uid
        role = nodes.roles[STORE_ROLE]
        super().__init__(
            work / "dovecot",
            "store",
            role.snippet("dovecot.conf", nodes.target(STORE_ROLE))
            + f"mail_location = maildir:{self.mail}/%d/%n\n",
            lmtp=True,
        )

    def mailbox(self, address: str) -> Path:
        """Where ``address``'s maildir is on this store (mail_location ``DIR/%d/%n``)."""
        local, _, domain = address.partition("@")
        return self.mail / domain / local

    def subjects(self, address: str) -> list[str]:
        """The Subject of each message in ``address``'s INBOX (``doveadm fetch``)."""
        p = self.doveadm("fetch", "-u", address, "hdr.subject", "mailbox", "INBOX")
        assert p.returncode == 0, p.stdout + p.stderr
        return [line.split(":", 1)[1].strip() for line in p.stdout.splitlines() if ":" in line]


def old_mailbox(root: Path, address: str) -> Path:
    """``address``'s maildir on the mailstore it leaves: one message, as the account's uid."""
    box = root / address.partition("@")[2] / address.partition("@")[0]
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    (box / "cur" / "1764460800.M1P1.old-store:2,S").write_text(
        "From: <someone@example.net>\nSubject: copied from the old mailstore\n\nhello\n"
    )
    for path in (root, *root.rglob("*")):
        os.chown(path, VMAIL_UID, VMAIL_UID)
    return box
