"""The Dovecot maps: ``dovecot_users`` (a mailstore's passdb+userdb) and ``dovecot_proxy``.

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
"""

from __future__ import annotations

from collections.abc import Iterator

from mapsync.config import PublisherChannel
from mapsync.maps.base import Map
from mapsync.maps.directory import Directory


class DovecotUsersMap(Map):
    name = "dovecot_users"
    # quota_bytes becomes its userdb_quota_rule.
    reads = frozenset(
        {
            "domain",
            "account",
            "mailstore",
            "account.password_hash",
            "account.home",
            "account.quota_bytes",
        }
    )
    cdb = False
    secrets = True
    per_mailstore = True
    separator = ":"
    description = (
        "passwd-file for one mailstore: user:{SCHEME}hash:uid:gid::home::userdb_quota_rule=..."
    )

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
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
    name = "dovecot_proxy"
    reads = frozenset(
        {"domain", "account", "mailstore", "mailstore.imap_host", "mailstore.imap_port"}
    )
    cdb = False
    separator = ":"
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
