"""The Debian package, installed for real: built with scripts/build-deb, `dpkg -i` on this
machine (as root), used as an operator uses it, upgraded, removed and purged.

The tests run in file order against one installed package (module-scoped fixtures); whatever
happens, the package, its user and its files are purged at the end. Other tests run beside
them (pytest-xdist) and never use /usr/bin/mapsync, /etc/mapsync or a `mapsync` user. Select
them with `-m package`.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mapsync import __version__

# One worker runs them all under `scripts/test` (pytest-xdist, --dist loadgroup): they share
# the module's built packages and installed one.
pytestmark = [pytest.mark.package, pytest.mark.slow, pytest.mark.xdist_group("package")]

SRC = Path(__file__).parents[2]
UNITS = Path("/lib/systemd/system")
UNIT_NAMES = [
    "mapsync-agent.service",
    "mapsync-mirror.service",
    "mapsync-publish.service",
    "mapsync-publish.timer",
    "mapsync-publisher.service",
    "mapsync-pull.service",
    "mapsync-pull.timer",
    "mapsync-status.service",
    "mapsync-status.timer",
]
CONFFILE = Path("/etc/mapsync/mapsync.toml")
# Everything the package or its maintainer scripts put on the machine; purge removes it all.
LEFTOVERS = [
    Path("/usr/bin/mapsync"),
    Path("/usr/lib/mapsync"),
    Path("/etc/mapsync"),
    Path("/var/lib/mapsync"),
    Path("/etc/cron.d/mapsync"),
    Path("/usr/share/doc/mapsync"),
    Path("/usr/share/man/man1/mapsync.1.gz"),
    *(UNITS / name for name in UNIT_NAMES),
]


def _run(argv: list[str], timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc  # type: ignore[no-any-return]


def _dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    """dpkg, waiting while another engineer's apt or dpkg holds the lock."""
    deadline = time.monotonic() + 180
    while True:
        proc = subprocess.run(["dpkg", *args], capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            return proc
        if "lock" not in proc.stderr or time.monotonic() > deadline:
            raise AssertionError(f"dpkg {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        time.sleep(2)


def _status() -> str:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev}${Version}", "mapsync"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _purge() -> None:
    if _status():
        _dpkg("--purge", "mapsync")


def _settings(unit: Path) -> dict[str, str]:
    """``[Service]`` settings of an installed unit."""
    out: dict[str, str] = {}
    section = None
    for line in unit.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def _as_unit(unit: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run an installed unit's ExecStart as its User= (root without one), the way systemd
    would, but with a clean environment and from /: this machine's PID 1 is not systemd."""
    service = _settings(UNITS / unit)
    argv = [*shlex.split(service["ExecStart"]), *extra]
    user = service.get("User", "root")
    env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]
    return _run(["runuser", "-u", user, "--", *env, *argv], cwd="/")


@pytest.fixture(scope="module")
def debs() -> Iterator[dict[int, Path]]:
    """scripts/build-deb, once per session per revision; built on first use."""
    if os.geteuid() != 0:
        pytest.fail("the package tests install a .deb: run them as root (scripts/test does)")
    out = Path(tempfile.mkdtemp(prefix="mapsync-test-deb-dist."))

    class Debs(dict[int, Path]):
        def __missing__(self, revision: int) -> Path:
            if revision == 1:
                env = {**os.environ, "DEB_OUT": str(out / "1"), "DEB_REVISION": "1"}
                proc = _run([str(SRC / "scripts" / "build-deb")], timeout=900, env=env)
                deb = Path(proc.stdout.strip().splitlines()[-1])
            else:
                # What `DEB_REVISION=N scripts/build-deb` makes, the same files under a newer
                # version: revision 1 unpacked and packed again with it (2 s, not a second
                # 25 s build of the same venv).
                tree = out / f"{revision}.tree"
                _run(["dpkg-deb", "-R", str(self[1]), str(tree)])
                control = tree / "DEBIAN" / "control"
                text = control.read_text()
                assert f"\nVersion: {__version__}-1\n" in text, text
                control.write_text(
                    text.replace(
                        f"\nVersion: {__version__}-1\n", f"\nVersion: {__version__}-{revision}\n"
                    )
                )
                deb = out / str(revision) / f"mapsync_{__version__}-{revision}_amd64.deb"
                deb.parent.mkdir()
                _run(
                    [
                        "dpkg-deb",
                        "--root-owner-group",
                        "-Zgzip",
                        "-z1",
                        "--build",
                        str(tree),
                        str(deb),
                    ]
                )
            assert deb.name.startswith("mapsync_") and deb.name.endswith(f"-{revision}_amd64.deb")
            self[revision] = deb
            return deb

    try:
        yield Debs()
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(debs: dict[int, Path]) -> Iterator[Path]:
    """The package installed with `dpkg -i`; yields a scratch directory the `mapsync` user
    owns. Purged at the end whatever happened."""
    # One package test on this machine at a time: others run the suite beside us.
    lock = open("/run/lock/mapsync-test-deb.lock", "w")  # noqa: SIM115  (held for the module)
    fcntl.flock(lock, fcntl.LOCK_EX)
    scratch: Path | None = None
    try:
        if _status() or _user_exists("mapsync") or Path("/usr/bin/mapsync").exists():
            pytest.fail(
                "mapsync is already installed on this machine, or a `mapsync` user exists "
                f"(dpkg: {_status() or 'not installed'}): the package test would purge it"
            )
        _dpkg("-i", str(debs[1]))
        scratch = Path(tempfile.mkdtemp(prefix="mapsync-test-deb."))
        scratch.chmod(0o755)
        os.chown(scratch, pwd.getpwnam("mapsync").pw_uid, grp.getgrnam("mapsync").gr_gid)
        yield scratch
    finally:
        try:
            _purge()
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


def _mode(path: Path) -> tuple[str, str, int]:
    st = path.lstat()
    return (
        pwd.getpwuid(st.st_uid).pw_name,
        grp.getgrgid(st.st_gid).gr_name,
        stat.S_IMODE(st.st_mode),
    )


def test_lintian_finds_no_errors(debs: dict[int, Path]) -> None:
    if shutil.which("lintian") is None:
        pytest.fail("lintian is missing (scripts/install --test installs it)")
    proc = subprocess.run(
        ["lintian", "--tag-display-limit", "0", str(debs[1])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_installed_mapsync_runs_and_has_its_man_page(installed: Path) -> None:
    version = _run(["/usr/bin/mapsync", "--version"], cwd="/").stdout.strip()
    assert version == f"mapsync {__version__}"
    assert _status() == f"ii {__version__}-1", _status()
    # The package's own interpreter and libraries, not this checkout's virtualenv.
    where = _run(["/usr/bin/mapsync", "--help"], cwd="/", env={"PATH": "/usr/bin:/bin"}).stdout
    assert "publish" in where
    prefix = _run(
        [
            "/usr/lib/mapsync/bin/python",
            "-c",
            "import mapsync, sys; print(sys.prefix, mapsync.__file__)",
        ],
        cwd="/",
    ).stdout.split()
    assert prefix[0] == "/usr/lib/mapsync" and prefix[1].startswith("/usr/lib/mapsync/lib/"), prefix
    page = _run(["man", "-w", "mapsync"]).stdout.strip()
    assert page == "/usr/share/man/man1/mapsync.1.gz"
    text = _run(["man", "-P", "cat", "mapsync"], env={**os.environ, "MANWIDTH": "100"}).stdout
    # Generated from the CLI's help: every command is there, with its own help text.
    for command in ("publish", "pull", "agent", "status", "rollback", "keygen"):
        help_text = _run(["/usr/bin/mapsync", command, "--help"], cwd="/").stdout
        first_option = next(line for line in help_text.splitlines() if "--" in line)
        assert command in text and first_option.split()[0] in text, command


def test_files_users_and_modes_are_as_documented(installed: Path) -> None:
    user = pwd.getpwnam("mapsync")
    assert user.pw_uid < 1000 and user.pw_shell == "/usr/sbin/nologin"
    assert user.pw_dir == "/var/lib/mapsync"
    assert grp.getgrgid(user.pw_gid).gr_name == "mapsync"
    # docs/security.md "File modes": the agent's state directory 0700; its parent is root's,
    # so the `mapsync` account (a push user on a node) cannot replace the agent's state.
    assert _mode(Path("/var/lib/mapsync")) == ("root", "root", 0o755)
    assert _mode(Path("/var/lib/mapsync/agent")) == ("root", "root", 0o700)
    assert _mode(Path("/etc/mapsync")) == ("root", "root", 0o755)
    assert _mode(CONFFILE) == ("root", "root", 0o644)
    conffiles = _run(["dpkg-query", "-W", "-f=${Conffiles}", "mapsync"]).stdout
    assert {line.split()[0] for line in conffiles.strip().splitlines()} == {
        "/etc/mapsync/mapsync.toml",
        "/etc/cron.d/mapsync",
    }
    cron = Path("/etc/cron.d/mapsync").read_text().splitlines()
    assert cron and all(line.startswith("#") or not line.strip() for line in cron), cron
    assert any("/usr/bin/mapsync" in line and " pull" in line for line in cron)
    assert os.path.realpath("/usr/bin/mapsync") == "/usr/lib/mapsync/bin/mapsync"
    assert Path("/usr/share/doc/mapsync/operator-guide.md").is_file()  # units' Documentation=
    assert Path("/usr/share/doc/mapsync/install.md").is_file()
    assert Path("/usr/share/doc/mapsync/examples/agents/postfix-mx/agent.toml").is_file()
    for name in UNIT_NAMES:
        assert _mode(UNITS / name) == ("root", "root", 0o644), name
    # Installed, not enabled: the operator picks the role.
    enabled = list(Path("/etc/systemd/system").glob("*/mapsync-*"))
    assert enabled == [], enabled


def test_installed_units_pass_systemd_analyze_verify(installed: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(UNITS / n) for n in UNIT_NAMES)],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    for name in UNIT_NAMES:
        if name.endswith(".service"):
            assert _settings(UNITS / name)["ExecStart"].startswith("/usr/bin/mapsync "), name


def _configure(scratch: Path) -> str:
    """Edit the conffile as an operator would: a publisher and an MX agent on one host."""
    text = f"""\
# edited by the package test
[publisher]
database = "sqlite:///{scratch}/central.db"
repository = "{scratch}/repo"
signing_key = "{scratch}/keys/signing.key"

[publisher.channels.mx]
maps = ["domains", "recipients", "virtual", "transport"]

[agent]
state = "/var/lib/mapsync/agent"
trusted_keys = ["{scratch}/keys/signing.pub"]

[agent.channels.mx]
source = "{scratch}/repo/mx"
target = "{scratch}/postfix"
"""
    CONFFILE.write_text(text)
    return text


def test_publish_and_pull_as_the_installed_units_run_them(installed: Path) -> None:
    scratch = installed
    _configure(scratch)
    mapsync = ["runuser", "-u", "mapsync", "--", "/usr/bin/mapsync", "--config", str(CONFFILE)]
    _run([*mapsync, "keygen", str(scratch / "keys" / "signing.key")], cwd="/")
    _run([*mapsync, "seed", "--accounts", "30", "--domains", "3", "--aliases", "5"], cwd="/")
    # mapsync-publish.service: its ExecStart, as its User=mapsync.
    assert _settings(UNITS / "mapsync-publish.service")["User"] == "mapsync"
    _as_unit("mapsync-publish.service")
    release = next((scratch / "repo" / "mx" / "releases").iterdir())
    assert _mode(release / "MANIFEST.json") == ("mapsync", "mapsync", 0o644)
    assert _mode(scratch / "keys" / "signing.key") == ("mapsync", "mapsync", 0o600)
    # mapsync-pull.service: its ExecStart, as root (no User=: it writes the live maps).
    assert "User" not in _settings(UNITS / "mapsync-pull.service")
    _as_unit("mapsync-pull.service")
    live = (scratch / "postfix" / "recipients.cdb").resolve()
    assert live.is_file() and _mode(live)[2] == 0o644
    assert _mode(Path("/var/lib/mapsync/agent")) == ("root", "root", 0o700)
    # docs/security.md: state.json and the kept releases' files 0600 (the empty lock file
    # carries nothing; the 0700 directory keeps it private too).
    modes = {
        str(p): oct(_mode(p)[2])
        for p in Path("/var/lib/mapsync/agent").rglob("*")
        if p.is_file() and p.name != "lock"
    }
    assert "/var/lib/mapsync/agent/mx/state.json" in modes
    assert set(modes.values()) == {"0o600"}, modes
    status = _run(["/usr/bin/mapsync", "--config", str(CONFFILE), "status"], cwd="/")
    assert "OK" in status.stdout
    # NRPE runs checks as an unprivileged user: it reads the world-readable copy of the state.
    nagios = ["runuser", "-u", "nobody", "--", "/usr/bin/mapsync", "--config", str(CONFFILE)]
    assert _run([*nagios, "status"], cwd="/").stdout.startswith("MAPSYNC OK - mx OK")
    assert _mode(Path("/var/lib/mapsync/agent-status/mx.json")) == ("root", "root", 0o644)
    # mapsync-status.service keeps node_exporter's textfile fresh.
    textfiles = Path("/var/lib/prometheus/node-exporter")
    made = not textfiles.exists()
    textfiles.mkdir(parents=True, exist_ok=True)
    try:
        _as_unit("mapsync-status.service")
        metrics = (textfiles / "mapsync.prom").read_text()
        assert 'mapsync_status{channel="mx"} 0' in metrics
    finally:
        (textfiles / "mapsync.prom").unlink(missing_ok=True)
        if made:
            shutil.rmtree(textfiles)
    # The installed program needs no root to pull: the `mapsync` user, with a state and a
    # target of its own.
    own = scratch / "as-mapsync.toml"
    own.write_text(
        f"""\
[agent]
state = "{scratch}/state"
trusted_keys = ["{scratch}/keys/signing.pub"]

[agent.channels.mx]
source = "{scratch}/repo/mx"
target = "{scratch}/postfix-as-mapsync"
"""
    )
    _run(["runuser", "-u", "mapsync", "--", "/usr/bin/mapsync", "--config", str(own), "pull"])
    live = (scratch / "postfix-as-mapsync" / "recipients.cdb").resolve()
    assert _mode(live) == ("mapsync", "mapsync", 0o644)
    # The channel's state directory is the agent's own, 0700 (the packaged state root,
    # /var/lib/mapsync/agent, is made 0700 by postinst).
    assert _mode(scratch / "state" / "mx") == ("mapsync", "mapsync", 0o700)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_upgrade_keeps_state_and_the_edited_config(installed: Path, debs: dict[int, Path]) -> None:
    edited = CONFFILE.read_text()
    assert edited.startswith("# edited by the package test"), "run the file in order"
    state = _tree(Path("/var/lib/mapsync"))
    uid = pwd.getpwnam("mapsync").pw_uid
    _dpkg("-i", str(debs[2]))
    assert _status() == f"ii {__version__}-2", _status()
    assert CONFFILE.read_text() == edited
    assert not Path(f"{CONFFILE}.dpkg-dist").exists()
    assert _tree(Path("/var/lib/mapsync")) == state
    assert pwd.getpwnam("mapsync").pw_uid == uid
    # The upgraded package still runs, and the unchanged release is a good check.
    _as_unit("mapsync-pull.service")
    _as_unit("mapsync-publish.service")


def test_remove_keeps_config_and_state_and_purge_leaves_nothing(installed: Path) -> None:
    edited = CONFFILE.read_text()
    _dpkg("--remove", "mapsync")
    assert _status().startswith("rc "), _status()
    assert not Path("/usr/bin/mapsync").exists() and not Path("/usr/lib/mapsync").exists()
    assert CONFFILE.read_text() == edited
    assert Path("/var/lib/mapsync/agent").is_dir() and _user_exists("mapsync")
    _dpkg("--purge", "mapsync")
    assert _status() == ""
    left = [str(p) for p in LEFTOVERS if p.exists() or p.is_symlink()]
    assert left == []
    assert not _user_exists("mapsync") and not _group_exists("mapsync")
