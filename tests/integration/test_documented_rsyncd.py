"""The rsync daemon setup of docs/security.md, served as written by a real ``rsync --daemon``,
pulled by each role's shipped ``agents/*/agent.toml`` with only host, paths and reload changed.

Each node role's credential installs its own channel; the MX's credential is refused at the
mailstore's channel (which carries ``dovecot_users``); a client without a credential is
refused everywhere and sees no module list; and no credential can list or download a
dot-file in a channel directory (a publish's ``.staging``, the notes an earlier mapsync kept
there: ``.checked``, ``.push.lock``, ``.pushed.json``; today's live in ``REPO/.private``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mapsync import config
from mapsync.publish.repository import LEGACY
from tests.conftest import Cluster
from tests.daemons.roles import AGENTS, ROLES, Role, role
from tests.helpers.rsyncd import documented_rsyncd_conf, documented_secrets, modules, serving

DOT_FILES = tuple(sorted(LEGACY.values()))


@dataclass
class Served:
    cluster: Cluster
    port: int
    roles: dict[str, Role]
    secrets: dict[str, str]  # user → password, as documented
    users: dict[str, str]  # channel → its module's `auth users`

    def node_config(self, name: str, module: str | None = None) -> Path:
        """The role's shipped agent.toml with host, paths and reload made local; ``module``
        points its source at another channel's module (same user, same password)."""
        r = self.roles[name]
        home = self.cluster.root / "nodes" / name
        home.mkdir(parents=True, exist_ok=True)
        etc = home / "etc"
        etc.mkdir(exist_ok=True)
        pw = etc / f"{r.channel}.password"
        pw.write_text(self.secrets[self.users[r.channel]] + "\n")
        pw.chmod(0o600)
        text = (AGENTS / name / "agent.toml").read_text()
        url = f"@publisher.example.net/{r.channel}"
        assert url in text
        text = text.replace(url, f"@127.0.0.1:{self.port}/{module or r.channel}")
        text = text.replace(
            '"/etc/mapsync/signing.pub"', json.dumps(str(self.cluster.root / "keys/signing.pub"))
        )
        text = text.replace('"/etc/mapsync/', json.dumps(str(etc))[:-1] + "/")
        text = text.replace('"/var/lib/mapsync/agent"', json.dumps(str(home / "state")))
        text = text.replace(json.dumps(str(r.target)), json.dumps(str(home / "live")))
        text = text.replace('reload = ["postfix", "reload"]', 'reload = ["true"]')
        path = home / "agent.toml"
        path.write_text(text)
        agent = config.load(path).need_agent()  # nothing left pointing at the real /etc, /var
        ((_, ch),) = agent.channels.items()
        for p in (agent.state, *agent.trusted_keys, ch.target, ch.password_file):
            assert p is not None and self.cluster.root in p.parents, p
        return path

    def pull(self, config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mapsync", "--config", str(config), "pull"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    def rsync(self, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        """Plain rsync against the daemon, with ``user``'s documented password, else a guess
        (rsync itself refuses to send an empty one)."""
        env = {k: v for k, v in os.environ.items() if k != "RSYNC_PASSWORD"}
        pw = ["--password-file=-"]
        stdin = self.secrets.get(user or "", "a-guessed-password") + "\n"
        return subprocess.run(
            ["rsync", "--no-motd", "--contimeout=20", "--timeout=30", *pw, *args],
            input=stdin, capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip

    def url(self, module: str, path: str = "", user: str | None = None) -> str:
        return f"rsync://{user + '@' if user else ''}127.0.0.1:{self.port}/{module}/{path}"


@pytest.fixture
def served(cluster: Cluster, tmp_path: Path) -> Iterator[Served]:
    roles = {name: role(name) for name in ROLES}
    channels = ""
    for r in roles.values():
        channels += f"\n[publisher.channels.{r.channel}]\nmaps = {json.dumps(list(r.maps))}\n"
        if r.mailstore:
            channels += f"mailstore = {json.dumps(r.mailstore)}\n"
    cluster.config_path.write_text(
        f'[publisher]\ndatabase = "{cluster.db_url}"\nrepository = "{cluster.repo}"\n'
        f'signing_key = "{cluster.root / "keys" / "signing.key"}"\n{channels}'
    )
    cluster.publish()
    for r in roles.values():  # the notes an earlier mapsync kept in each channel directory
        for name in DOT_FILES:
            (cluster.repo / r.channel / name).write_text("{}\n")

    daemon = tmp_path / "rsyncd"
    daemon.mkdir()
    secrets = documented_secrets()
    (daemon / "rsyncd.secrets").write_text("".join(f"{u}:{p}\n" for u, p in secrets.items()))
    (daemon / "rsyncd.secrets").chmod(0o600)
    conf = documented_rsyncd_conf()
    # As docs/security.md says of its test: root and no chroot only because pytest's
    # temporary directories are 0700. Everything else is the documented file.
    for doc, here in (("uid = nobody", "uid = root"), ("gid = nogroup", "gid = root"),
                      ("use chroot = yes", "use chroot = no"),
                      ("/srv/mapsync/", f"{cluster.repo}/"),
                      ("/etc/rsyncd.secrets", str(daemon / "rsyncd.secrets"))):  # fmt: skip
        assert doc in conf
        conf = conf.replace(doc, here)
    users = {name: m["auth users"] for name, m in modules(conf).items() if name}
    with serving(conf, daemon) as port:
        yield Served(cluster, port, roles, secrets, users)


def test_every_shipped_role_installs_its_channel_from_the_documented_daemon(
    served: Served,
) -> None:
    for name, r in served.roles.items():
        p = served.pull(served.node_config(name))
        assert p.returncode == 0, (name, p.stdout, p.stderr)
        assert f"{r.channel}: installed serial 1" in p.stdout, p.stdout
        assert "without authentication" not in p.stderr, p.stderr
        live = served.cluster.root / "nodes" / name / "live"
        assert sorted(m for m in r.maps if (live / m).is_file()) == sorted(r.maps)
        assert not any(f.name.startswith(".") and f.name != ".mapsync" for f in live.iterdir())


def test_the_mx_credential_cannot_fetch_the_mailstore_channel(served: Served) -> None:
    p = served.pull(served.node_config("postfix-mx", module="store-1"))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "@ERROR: auth failed on module store-1" in p.stderr, p.stderr
    live = served.cluster.root / "nodes" / "postfix-mx" / "live"
    assert not live.exists() or not any(live.iterdir())
    # Plain rsync, the MX's user and password: refused too, nothing written.
    out = served.cluster.root / "stolen"
    got = served.rsync("-r", served.url("store-1", "", "mx-agent"), str(out), user="mx-agent")
    assert got.returncode == 5 and "auth failed on module store-1" in got.stderr, got.stderr
    assert not out.exists()


def test_without_a_credential_nothing_is_listed_or_served(served: Served) -> None:
    listing = served.rsync("--list-only", f"rsync://127.0.0.1:{served.port}/")
    assert listing.returncode == 0 and listing.stdout.strip() == "", listing.stdout  # list = no
    for channel in served.users:
        for user in (None, "nobody", "root"):
            out = served.cluster.root / "anonymous"
            got = served.rsync("-r", served.url(channel, "", user), str(out), user=user)
            assert got.returncode == 5, (channel, user, got.stdout, got.stderr)
            assert f"auth failed on module {channel}" in got.stderr
            assert not out.exists()


def test_no_credential_can_list_or_download_the_publishers_dot_files(served: Served) -> None:
    for channel, user in served.users.items():
        listing = served.rsync("--list-only", "-r", served.url(channel, "", user), user=user)
        assert listing.returncode == 0, listing.stderr
        names = [line.split()[-1] for line in listing.stdout.splitlines()]
        assert "LATEST" in names and "releases/1/MANIFEST.json" in names
        assert [n for n in names if any(part.startswith(".") for part in n.split("/"))] == ["."]
        for dot in DOT_FILES:
            for path in (dot, f"releases/../{dot}", f"releases/1/../../{dot}"):
                out = served.cluster.root / "dl" / channel
                got = served.rsync(served.url(channel, path, user), f"{out}/", user=user)
                assert got.returncode != 0, (channel, path, got.stdout)
                assert not (out / dot).exists()


def test_the_documented_daemon_sends_small_writes_at_once() -> None:
    """``socket options = TCP_NODELAY`` in the global section: without it each small write of
    the daemon protocol's opening waits for the node's delayed ACK (40 ms apiece; a
    nothing-changed pull over loopback 0.20 s instead of 0.12-0.16 s, docs/benchmarks.md), and
    the agents' own ``--sockopts=TCP_NODELAY`` cannot help the daemon's side."""
    assert modules(documented_rsyncd_conf())[""].get("socket options") == "TCP_NODELAY"
