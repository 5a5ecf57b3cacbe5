"""Access per channel: a node reads its own channel and nothing else.

The publisher's repository is served read-only, one channel per credential, the two ways
docs/security.md describes: an ``rsync --daemon`` module per channel with ``auth users`` and
a secrets file, and ssh keys confined by ``rrsync -ro`` to one channel's directory. The MX's
credentials fetch the mx channel and are refused at the mailstore channel ``store-1``;
every refusal is exit 2 with nothing installed. (``store-1`` stands for a mailstore's
channel; what it carries does not matter here, only who may read it.)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mapsync.transport import rsync as rsync_mod
from mapsync.transport.rsync import Remote
from tests.conftest import Cluster
from tests.helpers.agent import lookup, tree_snapshot
from tests.helpers.transport import free_port, ssh_command, wait_for_port

RRSYNC = "/usr/bin/rrsync"  # Debian's rsync package ships it here (Python, uncompressed)
MX_MAPS = '["domains", "recipients", "virtual", "transport"]'


def write_config(c: Cluster, agent_channels: str) -> None:
    """Publisher with an mx and a store-1 channel; the agent part as given."""
    c.config_path.write_text(
        f"""\
[publisher]
database = "{c.db_url}"
repository = "{c.repo}"
signing_key = "{c.root / "keys" / "signing.key"}"

[publisher.channels.mx]
maps = {MX_MAPS}

[publisher.channels.store-1]
maps = ["recipients"]

[agent]
state = "{c.state}"
trusted_keys = ["{c.root / "keys" / "signing.pub"}"]
{agent_channels}"""
    )


def publish_both(c: Cluster) -> None:
    write_config(c, channel("mx", str(c.repo / "mx"), c.target))  # [agent] needs a channel
    c.publish()
    assert (c.repo / "mx" / "LATEST").is_file() and (c.repo / "store-1" / "LATEST").is_file()


def channel(name: str, source: str, target: Path, *extra: str) -> str:
    lines = [f"[agent.channels.{name}]", f'source = "{source}"', f'target = "{target}"']
    lines += ['timeout = "30s"', *extra]
    return "\n" + "\n".join(lines) + "\n"


def store_target(c: Cluster) -> Path:
    return c.root / "node" / "dovecot"


def nothing_installed(target: Path) -> bool:
    return not target.exists() or not any(target.iterdir())


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


# --- rsync daemon: one module per channel --------------------------------------------------


@dataclass
class ChannelModules:
    """An ``rsync --daemon`` on loopback serving each channel as its own authenticated module."""

    root: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    def url(self, module: str, user: str | None = None) -> str:
        who = f"{user}@" if user else ""
        return f"rsync://{who}127.0.0.1:{self.port}/{module}"


RSYNCD_CONF = """\
pid file = {root}/rsyncd.pid
log file = {root}/rsyncd.log
# uid/gid root only because pytest's tmp directories are 0700; a real server runs as nobody.
uid = root
gid = root
use chroot = no
strict modes = yes
socket options = TCP_NODELAY

[mx]
    path = {repo}/mx
    comment = mapsync channel mx (MX nodes)
    read only = yes
    list = no
    auth users = mx-agent
    secrets file = {root}/rsyncd.secrets

[store-1]
    path = {repo}/store-1
    comment = mapsync channel store-1 (the mailstore store-1)
    read only = yes
    list = no
    auth users = store1-agent
    secrets file = {root}/rsyncd.secrets
"""


@pytest.fixture
def modules(cluster: Cluster, tmp_path: Path) -> Iterator[ChannelModules]:
    root = tmp_path / "rsyncd"
    root.mkdir()
    secret(root / "rsyncd.secrets", "mx-agent:mx-Secret-1\nstore1-agent:store-Secret-2")
    (root / "rsyncd.conf").write_text(RSYNCD_CONF.format(root=root, repo=cluster.repo))
    port = free_port()
    proc = subprocess.Popen(
        [
            "rsync",
            "--daemon",
            "--no-detach",
            f"--config={root / 'rsyncd.conf'}",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    d = ChannelModules(root, port, root / "rsyncd.log", proc)
    try:
        wait_for_port("127.0.0.1", port, proc, d.log)
        # The MX node's and the mailstore's password files, beside the config (relative paths).
        secret(cluster.root / "mx.password", "mx-Secret-1")
        secret(cluster.root / "store-1.password", "store-Secret-2")
        publish_both(cluster)
        yield d
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def test_the_mx_credentials_fetch_the_mx_channel(cluster: Cluster, modules: ChannelModules) -> None:
    write_config(
        cluster,
        channel(
            "mx",
            modules.url("mx", "mx-agent"),
            cluster.target,
            'password_file = "mx.password"',
        ),
    )
    out = cluster.pull().stdout
    assert "mx: installed serial 1" in out
    assert lookup(cluster, "postmaster@example-1.org") == "OK"
    log = modules.log.read_text()
    assert "rsync on mx/releases/1/ from mx-agent@" in log


def test_the_mailstore_credentials_fetch_the_mailstore_channel(
    cluster: Cluster, modules: ChannelModules
) -> None:
    target = store_target(cluster)
    write_config(
        cluster,
        channel(
            "store-1",
            modules.url("store-1", "store1-agent"),
            target,
            'password_file = "store-1.password"',
        ),
    )
    assert "store-1: installed serial 1" in cluster.pull().stdout
    assert "rsync on store-1/releases/1/ from store1-agent@" in modules.log.read_text()


def test_the_mx_credentials_cannot_fetch_the_mailstore_channel(
    cluster: Cluster, modules: ChannelModules
) -> None:
    target = store_target(cluster)
    write_config(
        cluster,
        channel(
            "store-1", modules.url("store-1", "mx-agent"), target, 'password_file = "mx.password"'
        ),
    )
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        "mapsync: channel store-1: rsync failed (exit 5): @ERROR: auth failed on module store-1"
        in (p.stderr)
    )
    assert "check the user in the source URL, the channel's password_file" in p.stderr
    assert nothing_installed(target)
    assert (
        "auth failed on module store-1 from localhost (127.0.0.1) for mx-agent: no matching rule"
        in (modules.log.read_text())
    )
    assert "rsync on store-1" not in modules.log.read_text()


def test_a_wrong_password_is_refused(cluster: Cluster, modules: ChannelModules) -> None:
    secret(cluster.root / "guess.password", "mx-Secret-2")
    write_config(
        cluster,
        channel(
            "mx", modules.url("mx", "mx-agent"), cluster.target, 'password_file = "guess.password"'
        ),
    )
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "rsync failed (exit 5): @ERROR: auth failed on module mx" in p.stderr
    assert nothing_installed(cluster.target)
    assert "for mx-agent: password mismatch" in modules.log.read_text()


@pytest.mark.parametrize("user", [None, "mx-agent"])
def test_no_credentials_are_refused_without_a_prompt(
    cluster: Cluster, modules: ChannelModules, user: str | None
) -> None:
    write_config(cluster, channel("mx", modules.url("mx", user), cluster.target))
    # A terminal of its own would let rsync ask for a password there and hang until the
    # timeout; the agent must fail at once instead (it runs from timers).
    started = time.monotonic()
    command = shlex.join([sys.executable, "-m", "mapsync", "--config", str(cluster.config_path)])
    p = subprocess.run(
        ["script", "-qec", f"{command} pull", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "RSYNC_PASSWORD"},
    )
    assert time.monotonic() - started < 20
    assert p.returncode == 2, p.stdout + p.stderr
    out = p.stdout + p.stderr  # script merges the terminal's output
    assert "Password:" not in out
    assert (
        "the rsync daemon module asks for a password and this channel has no password_file" in out
    )
    assert nothing_installed(cluster.target)


def test_the_mx_credentials_cannot_write(cluster: Cluster, modules: ChannelModules) -> None:
    before = tree_snapshot(cluster.repo)
    planted = cluster.root / "LATEST"
    planted.write_text('{"serial": 99}\n')
    p = subprocess.run(
        [
            "rsync",
            f"--password-file={cluster.root / 'mx.password'}",
            str(planted),
            modules.url("mx", "mx-agent") + "/LATEST",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0
    assert "module is read only" in p.stderr
    assert tree_snapshot(cluster.repo) == before


@pytest.mark.parametrize(
    ("mode", "problem"),
    [(0o644, "mode 0644 lets others read the rsync password"), (0o640, "mode 0640")],
)
def test_a_password_file_others_can_read_is_refused_before_rsync_runs(
    cluster: Cluster, modules: ChannelModules, mode: int, problem: str
) -> None:
    (cluster.root / "mx.password").chmod(mode)
    write_config(
        cluster,
        channel(
            "mx", modules.url("mx", "mx-agent"), cluster.target, 'password_file = "mx.password"'
        ),
    )
    connections = modules.log.read_text().count("connect from")
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        f"mapsync: channel mx: password_file {cluster.root / 'mx.password'}: {problem}" in p.stderr
    )
    assert "chmod 600" in p.stderr
    assert nothing_installed(cluster.target)
    assert modules.log.read_text().count("connect from") == connections


def test_a_missing_password_file_is_named(cluster: Cluster, modules: ChannelModules) -> None:
    write_config(
        cluster,
        channel("mx", modules.url("mx", "mx-agent"), cluster.target, 'password_file = "nope"'),
    )
    p = cluster.cli("pull")
    assert p.returncode == 2
    assert f"password_file {cluster.root / 'nope'}: cannot be read: No such file" in p.stderr
    assert nothing_installed(cluster.target)


def test_a_password_file_needs_a_user_in_the_url(cluster: Cluster, modules: ChannelModules) -> None:
    write_config(
        cluster,
        channel("mx", modules.url("mx"), cluster.target, 'password_file = "mx.password"'),
    )
    p = cluster.cli("pull")
    assert p.returncode == 2
    # Refused when the config is read, naming the file, the key and the URL
    assert f"{cluster.config_path}: [agent.channels.mx] source: " in p.stderr
    assert "names no user, but the channel has a password_file" in p.stderr
    assert "write rsync://USER@host/module/..." in p.stderr


def test_password_file_only_goes_with_an_rsync_source(cluster: Cluster, tmp_path: Path) -> None:
    write_config(
        cluster,
        channel("mx", "ssh://mx@publisher/srv/mapsync/mx", cluster.target, 'password_file = "x"'),
    )
    p = cluster.cli("pull")
    assert p.returncode == 2
    assert (
        f"{cluster.config_path}: [agent.channels.mx] password_file: only an rsync:// source takes "
        "a password"
    ) in p.stderr


class _FakeRun:
    def __init__(self) -> None:
        self.argv: list[str] = []

    def __call__(self, argv: list[str], timeout: int) -> str:
        self.argv = argv
        return "Total bytes sent: 1\nTotal bytes received: 2\n"


def test_rsync_argv_passes_the_password_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = _FakeRun()
    monkeypatch.setattr(rsync_mod, "run", fake)
    pw = secret(tmp_path / "pw", "x")
    Remote("rsync://mx@h/mx", password_file=pw).fetch_file("LATEST", tmp_path / "L")
    assert f"--password-file={pw}" in fake.argv
    monkeypatch.delenv("RSYNC_PASSWORD", raising=False)
    Remote("rsync://h/mx").fetch_file("LATEST", tmp_path / "L")
    assert "--password-file=-" in fake.argv  # never a prompt
    monkeypatch.setenv("RSYNC_PASSWORD", "x")
    Remote("rsync://h/mx").fetch_file("LATEST", tmp_path / "L")
    assert not any(a.startswith("--password-file") for a in fake.argv)  # rsync reads the env
    Remote("ssh://h/srv/mx").fetch_file("LATEST", tmp_path / "L")
    assert not any(a.startswith("--password-file") for a in fake.argv)


# --- ssh with rrsync -ro: one key per channel ---------------------------------------------


@dataclass
class RestrictedSsh:
    port: int
    keys: dict[str, Path]  # channel → private key allowed to read it
    authorized_keys: Path

    def options(self, key: Path) -> list[str]:
        return ssh_command(key)

    def ssh_key(self, channel_name: str) -> str:
        argv = self.options(self.keys[channel_name])
        return "ssh = [" + ", ".join(f'"{a}"' for a in argv) + "]"

    def restrict(self, repo: Path, rrsync_options: str = "-ro") -> None:
        """authorized_keys: each key may only read its channel's directory."""
        self.authorized_keys.write_text(
            "".join(
                f'command="rrsync {rrsync_options} {repo / name}",restrict '
                f"{(key.parent / (key.name + '.pub')).read_text()}"
                for name, key in self.keys.items()
            )
        )


@pytest.fixture
def rrsync_sshd(cluster: Cluster, tmp_path: Path) -> Iterator[RestrictedSsh]:
    if not Path(RRSYNC).is_file():
        pytest.fail(f"{RRSYNC} is missing (Debian ships it in the rsync package)")
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    d = tmp_path / "sshd"
    d.mkdir()
    keys = {}
    for name in ("host", "mx", "store-1"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}-agent", "-f", d / name],
            check=True,
        )
        keys[name] = d / name
    del keys["host"]
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    s = RestrictedSsh(port, keys, d / "authorized_keys")
    s.restrict(cluster.repo)
    Path("/run/sshd").mkdir(exist_ok=True)
    with open(d / "log", "wb") as log:
        proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
        try:
            wait_for_port("127.0.0.1", port, proc, d / "log")
            publish_both(cluster)
            yield s
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_the_mx_key_pulls_the_mx_channel_through_rrsync(
    cluster: Cluster, rrsync_sshd: RestrictedSsh
) -> None:
    # rrsync makes the channel directory the root: the source's path is "/".
    source = f"ssh://root@127.0.0.1:{rrsync_sshd.port}/"
    write_config(cluster, channel("mx", source, cluster.target, rrsync_sshd.ssh_key("mx")))
    assert "mx: installed serial 1" in cluster.pull().stdout
    assert lookup(cluster, "postmaster@example-2.org") == "OK"
    assert cluster.cli("verify").returncode == 0
    assert "mx: serial 1 is current" in cluster.pull().stdout


@pytest.mark.parametrize(
    ("path", "refusal"),
    [
        ("/../store-1", "rrsync error: do not use .. in arg"),
        ("{repo}/store-1", "rrsync error"),  # resolved inside the mx directory: not there
    ],
)
def test_the_mx_key_cannot_fetch_the_mailstore_channel(
    cluster: Cluster, rrsync_sshd: RestrictedSsh, path: str, refusal: str
) -> None:
    target = store_target(cluster)
    source = f"ssh://root@127.0.0.1:{rrsync_sshd.port}" + path.format(repo=cluster.repo)
    write_config(cluster, channel("store-1", source, target, rrsync_sshd.ssh_key("mx")))
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "mapsync: channel store-1: rsync failed (exit 12)" in p.stderr
    assert refusal in p.stderr
    assert nothing_installed(target)
    # The mailstore's own key does reach it, so the refusal above is the key's restriction.
    write_config(
        cluster,
        channel(
            "store-1",
            f"ssh://root@127.0.0.1:{rrsync_sshd.port}/",
            target,
            rrsync_sshd.ssh_key("store-1"),
        ),
    )
    assert "store-1: installed serial 1" in cluster.pull().stdout


def test_the_mx_key_can_neither_write_nor_run_a_shell(
    cluster: Cluster, rrsync_sshd: RestrictedSsh
) -> None:
    ssh = [*rrsync_sshd.options(rrsync_sshd.keys["mx"]), "-p", str(rrsync_sshd.port)]
    before = tree_snapshot(cluster.repo)
    planted = cluster.root / "LATEST"
    planted.write_text('{"serial": 99}\n')
    push = subprocess.run(
        ["rsync", "-e", " ".join(ssh), str(planted), "root@127.0.0.1:/LATEST"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert push.returncode != 0
    assert "rrsync error: sending to read-only server is not allowed" in push.stderr
    shell = subprocess.run(
        [*ssh, "root@127.0.0.1", "cat /etc/passwd"], capture_output=True, text=True, timeout=60
    )
    assert "root:" not in shell.stdout
    assert "SSH_ORIGINAL_COMMAND does not run rsync" in shell.stderr
    assert tree_snapshot(cluster.repo) == before


def test_the_mx_key_cannot_reach_the_publishers_notes(
    cluster: Cluster, rrsync_sshd: RestrictedSsh
) -> None:
    # rrsync has no exclude: the notes (pushed.json names every node's push destination) are
    # kept outside the channel directories, so a channel key cannot even name them.
    inbox = cluster.root / "node-inbox" / "mx"
    inbox.parent.mkdir()
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(
        text.replace("[publisher.channels.mx]\n", f'[publisher.channels.mx]\npush = ["{inbox}"]\n')
    )
    cluster.publish()
    notes = {p.name for p in (cluster.repo / ".private" / "mx").iterdir()}
    assert {"checked.json", "pushed.json", "push.lock"} <= notes
    assert str(inbox) in (cluster.repo / ".private" / "mx" / "pushed.json").read_text()

    ssh = " ".join([*rrsync_sshd.options(rrsync_sshd.keys["mx"]), "-p", str(rrsync_sshd.port)])
    listing = subprocess.run(
        ["rsync", "-e", ssh, "--list-only", "-r", "root@127.0.0.1:/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[-1] for line in listing.stdout.splitlines()]
    assert "LATEST" in names and "releases/1/MANIFEST.json" in names
    assert not [n for n in names if "checked" in n or "push" in n or n.startswith(".private")]
    for path in ("/../.private/mx/pushed.json", "/.private/mx/pushed.json"):
        got = subprocess.run(
            ["rsync", "-e", ssh, f"root@127.0.0.1:{path}", str(cluster.root / "got")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert got.returncode != 0, (path, got.stdout)
        assert not (cluster.root / "got").exists()


def test_rrsync_absolute_keeps_the_publishers_path_in_the_url(
    cluster: Cluster, rrsync_sshd: RestrictedSsh
) -> None:
    # Newer rrsync only; an older one has no -absolute, and there the source path is "/".
    usage = subprocess.run([RRSYNC, "-help"], capture_output=True, text=True)
    if "-absolute" not in usage.stdout + usage.stderr:
        pytest.skip(f"{RRSYNC} has no -absolute option")
    rrsync_sshd.restrict(cluster.repo, "-ro -absolute")
    source = f"ssh://root@127.0.0.1:{rrsync_sshd.port}{cluster.repo}/mx"
    write_config(cluster, channel("mx", source, cluster.target, rrsync_sshd.ssh_key("mx")))
    assert "mx: installed serial 1" in cluster.pull().stdout
    target = store_target(cluster)
    source = f"ssh://root@127.0.0.1:{rrsync_sshd.port}{cluster.repo}/store-1"
    write_config(cluster, channel("store-1", source, target, rrsync_sshd.ssh_key("mx")))
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "rrsync error" in p.stderr
    assert nothing_installed(target)
