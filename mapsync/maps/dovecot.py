"""The Dovecot maps: ``dovecot_users`` (a mailstore's passdb+userdb), ``dovecot_proxy``,
``dovecot_deny`` (per-service login rules) and ``dovecot_submission`` (a relay's passdb).

Both are passwd-files (``user:password:uid:gid:gecos:home:shell:extra_fields``): always all
seven colons (a short line authenticates but fails userdb), extra fields space-separated.
Text only: Debian's Dovecot has no cdb dict.

- ``dovecot_users``: only the accounts housed on the channel's ``mailstore`` (all accounts when
  the channel names none), with the password hash, uid/gid, home and quota as a
  ``userdb_quota_rule``; login-disabled accounts (and those of suspended domains) get
  ``nologin=y``. The only map that carries password hashes.
- ``dovecot_proxy``: every account → ``proxy=y nopassword=y host=IP port=N`` of its mailstore;
  the backend checks the password, so no hash ever reaches a proxy. Accounts that may not log
  in, or are being moved between mailstores, get ``nologin=y`` instead of a proxy target.
- ``dovecot_deny``: a deny passdb (``deny = yes``) keyed ``SERVICE/user`` for each service an
  account may not log in to (its ``allow_imap``, ``allow_pop3``, ``allow_submission``; the
  last denies Dovecot's ``submission`` and Postfix's SASL ``smtp``), read with
  ``username_format=%s/%Lu``: Dovecot's documented per-service deny passwd-file, in one file
  (one map, swapped with the others; a service with no line is simply not denied). No
  hashes, nothing but the keys.
- ``dovecot_submission``: the passdb of a submission relay: every account of every mailstore
  that may send (``allow_submission``, not login-disabled, domain not suspended) with its
  hash, and nothing else (no uid, gid, home or quota); the others are not in it, so their
  hashes never reach the relay.
"""

from __future__ import annotations

from collections.abc import Iterator

from mapsync.config import PublisherChannel
from mapsync.maps.base import Map
from mapsync.maps.directory import Directory
from mapsync.release import BUILTIN_MAPS
from mapsync.snapshot import Account, Domain

# Dovecot's service names for each allow_* column: `submission` is Dovecot's own submission
# service, `smtp` what Postfix's Dovecot SASL client sends.
DOVECOT_SERVICES = {"imap": ("imap",), "pop3": ("pop3",), "submission": ("smtp", "submission")}


class DovecotUsersMap(Map):
    """A mailstore's Dovecot passdb and userdb ``passwd-file``: its accounts' hashes, uid, gid, home, quota."""

    spec = BUILTIN_MAPS["dovecot_users"]
    # quota_bytes becomes its userdb_quota_rule.
    reads = frozenset(
        {
            "domain",
            "account",
            "mailstore",
            "account.password_hash",
            "account.home",
            "account.quota_bytes",
            "customer.ext_id",
        }
    )
    per_mailstore = True
    description = (
        "passwd-file for one mailstore: user:{SCHEME}hash:uid:gid::home::userdb_quota_rule=..."
    )

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        customers = directory.snapshot.customers if channel.customer_field else {}
        for d in directory.of_kind("hosted"):
            for a in directory.accounts.get(d.id, ()):
                store = directory.store_of(a)
                if channel.mailstore is not None and store.name != channel.mailstore:
                    continue
                extra = []
                if a.quota_bytes:
                    extra.append(f"userdb_quota_rule=*:bytes={a.quota_bytes}")
                if a.status == "login_disabled" or d.status == "suspended":
                    extra.append("nologin=y")
                if customers:
                    customer = _customer_of(a, d)
                    ext_id = customers.get(customer) if customer is not None else None
                    if ext_id is not None:
                        extra.append(f"userdb_{channel.customer_field}={ext_id}")
                fields = [
                    a.password_hash or "",
                    str(channel.uid),
                    str(channel.gid),
                    "",
                    a.home or "",
                    "",
                    " ".join(extra),
                ]
                yield f"{a.local_part}@{d.name}", ":".join(fields)


class DovecotProxyMap(Map):
    """A Dovecot proxy's passdb ``passwd-file``: each user's mailstore as ``host=``."""

    spec = BUILTIN_MAPS["dovecot_proxy"]
    reads = frozenset(
        {"domain", "account", "mailstore", "mailstore.imap_host", "mailstore.imap_port"}
    )
    description = (
        "proxy passdb: user:::::::proxy=y nopassword=y host=IP port=143 (no password hashes)"
    )

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        for d in directory.of_kind("hosted"):
            for a in directory.accounts.get(d.id, ()):
                if a.status in ("login_disabled", "moving") or d.status == "suspended":
                    extra = "nologin=y"
                else:
                    store = directory.store_of(a)
                    extra = f"proxy=y nopassword=y host={store.imap_host} port={store.imap_port}"
                yield f"{a.local_part}@{d.name}", "::::::" + extra


def _customer_of(a: Account, d: Domain) -> int | None:
    """The account's own customer, else its domain's."""
    return a.customer_id if a.customer_id is not None else d.customer_id


class DovecotDenyMap(Map):
    """Dovecot's deny passdb: ``SERVICE/user`` for each service an account may not log in to."""

    spec = BUILTIN_MAPS["dovecot_deny"]
    reads = frozenset(
        {
            "domain",
            "account",
            "mailstore",
            "account.allow_imap",
            "account.allow_pop3",
            "account.allow_submission",
        }
    )
    per_mailstore = True
    description = "deny passdb: SERVICE/user: for each service an account may not log in to"

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        denied = directory.snapshot.denied
        if not denied:
            return
        for d in directory.of_kind("hosted"):
            for a in directory.accounts.get(d.id, ()):
                services = denied.get(a.id)
                if not services:
                    continue
                if (
                    channel.mailstore is not None
                    and directory.store_of(a).name != channel.mailstore
                ):
                    continue
                user = f"{a.local_part}@{d.name}"
                for service in services:
                    for name in DOVECOT_SERVICES[service]:
                        yield f"{name}/{user}", ""


class DovecotSubmissionMap(Map):
    """A submission relay's passdb ``passwd-file``: the hash of every account that may send."""

    spec = BUILTIN_MAPS["dovecot_submission"]
    reads = frozenset({"domain", "account", "account.password_hash"})
    description = "submission relay passdb: user:{SCHEME}hash:::::: for every account that may send"

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        denied = directory.snapshot.denied
        for d in directory.of_kind("hosted"):
            if d.status == "suspended":
                continue  # a suspended customer sends nothing (as in senders)
            for a in directory.accounts.get(d.id, ()):
                if a.status == "login_disabled" or not a.password_hash:
                    continue
                if "submission" in denied.get(a.id, ()):
                    continue
                yield f"{a.local_part}@{d.name}", a.password_hash + "::::::"
