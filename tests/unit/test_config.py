"""Configuration: every failure mode names the file and the key; good files parse fully.

The fixtures in tests/fixtures/config/ are one file per failure mode (``bad-*.toml``) and one
complete, valid file (``good.toml``) that uses relative paths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mapsync import config
from mapsync.config import Guards, load, parse_duration, parse_percent
from mapsync.errors import ConfigError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "config"

# fixture name → what the one-line message must contain after "<file>: "
BAD = {
    "unknown-section": "[publishr]: unknown section",
    "unknown-key-publisher": "[publisher] colour: unknown key",
    "unknown-key-guards": "[publisher.guards] max_shrnk: unknown key",
    "unknown-key-map-guards": "[publisher.guards.recipients] minimum: unknown key",
    "unknown-key-publisher-channel": "[publisher.channels.mx] mailstores: unknown key",
    "unknown-key-agent": "[agent] statedir: unknown key",
    "unknown-key-agent-channel": "[agent.channels.mx] warn: unknown key",
    "missing-database": "[publisher] database: missing (required)",
    "missing-repository": "[publisher] repository: missing (required)",
    "missing-maps": "[publisher.channels.mx] maps: missing (required)",
    "missing-trusted-keys": "[agent] trusted_keys: missing (required)",
    "missing-source": "[agent.channels.mx] source: missing (required)",
    "missing-target": "[agent.channels.mx] target: missing (required)",
    "wrong-type-keep": "[publisher] keep: must be an integer, not '20'",
    "wrong-type-keep-bool": "[publisher] keep: must be an integer, not True",
    "wrong-type-database": "[publisher] database: must be a string, not 5",
    "wrong-type-maps": "[publisher.channels.mx] maps: must be a list",
    "wrong-type-reload": "[agent.channels.mx] reload: must be a list",
    "wrong-type-warn-after": "[agent.channels.mx] warn_after: must be a duration string",
    "wrong-type-section": "[publisher] must be a table",
    "duration-warn-after": "[agent.channels.mx] warn_after: not a duration: '15 minutes'",
    "duration-expires": "[publisher] expires: not a duration: '7 days'",
    "percent-max-shrink": "[publisher.guards] max_shrink: not a percentage: '10'",
    "percent-map-max-growth": "[publisher.guards.recipients] max_growth: not a percentage: 'lots%'",
    "unknown-map": "[publisher.channels.mx] maps: unknown map 'aliases'",
    "unknown-map-guards": "[publisher.guards.aliases]: unknown map 'aliases'",
    "duplicate-map": "[publisher.channels.mx] maps: a map is listed twice",
    "empty-maps": "[publisher.channels.mx] maps: must name at least one map",
    "critical-before-warn": "[agent.channels.mx] critical_after: must not be shorter than warn_after",
    "keep-too-small": "[publisher] keep: must be at least 2, not 1",
    "negative-min-entries": "[publisher.guards] min_entries: must be at least 0, not -1",
    "channel-name": "[publisher.channels.MX]: channel names are lowercase",
    "channel-name-newline": "channel names are lowercase",
    "no-channels": "[publisher.channels]: define at least one channel",
    "no-agent-channels": "[agent.channels]: define at least one channel",
    "empty-trusted-keys": "[agent] trusted_keys: name at least one public key",
    "empty-string": "[publisher] database: must not be empty",
    "schema": "[publisher] schema: unknown schema 'ldap' (known: 'mapsync', 'postfixadmin', 'sql')",
    "unknown-key-postfixadmin": "[publisher.postfixadmin] maildir_base: unknown key",
    "postfixadmin-table-name": "[publisher.postfixadmin] alias_table: 'alias; DROP TABLE mailbox' is not a table name",
    "postfixadmin-unknown-mailstore": "[publisher.postfixadmin] mailstore: no mailstore 'store-3'",
    "postfixadmin-mailstore-no-host": "[publisher.postfixadmin.mailstores.store-1] lmtp_host: missing (required)",
    "invalid-toml": "not valid TOML: Invalid value (at line 5",
    "not-utf8": "not valid TOML",
    "empty": "empty config: needs a [publisher] or an [agent] section",
    # Values that parse but cannot work (issue 9): refused at load, not as [Errno 21] later.
    "expires-zero": "[publisher] expires: must be at least 1h, not '0s'",
    "expires-too-short": "[publisher] expires: must be at least 1h, not '30m'",
    # A date it is added to would pass the year 9999 (was an unnamed OverflowError).
    "expires-too-long": "[publisher] expires: '3000000d' is more than 36500d (100 years)",
    "timeout-zero": "[agent.channels.mx] timeout: must be at least 1s, not '0s'",
    "warn-after-zero": "[agent.channels.mx] warn_after: must be at least 1m, not '0s'",
    "trusted-keys-directory": f"[agent] trusted_keys: {FIXTURES} is a directory, not a file",
    "signing-key-directory": f"[publisher] signing_key: {FIXTURES} is a directory, not a file",
    "signing-key-in-repository": "[publisher] signing_key: "
    f"{FIXTURES}/repo/signing.key lies inside the repository {FIXTURES}/repo",
    "password-file-directory": "[agent.channels.mx] password_file: "
    f"{FIXTURES} is a directory, not a file",
    "state-under-file": f"[agent] state: {FIXTURES}/good.toml/state lies under "
    f"{FIXTURES}/good.toml, which is not a directory",
    "target-under-file": f"[agent.channels.mx] target: {FIXTURES}/good.toml/live/mx lies under "
    f"{FIXTURES}/good.toml, which is not a directory",
    "inbox-under-file": f"[agent.channels.mx] inbox: {FIXTURES}/good.toml/inbox lies under",
    "repository-under-file": f"[publisher] repository: {FIXTURES}/good.toml/repo lies under",
    "repository-is-file": f"[publisher] repository: {FIXTURES}/good.toml is not a directory",
    # Directories with two owners (issue 15.5).
    "inbox-is-source": f"[agent.channels.mx] inbox: {FIXTURES}/repo/mx overlaps "
    f"[agent.channels.mx] source {FIXTURES}/repo/mx (pruning the inbox",
    "inbox-inside-source": f"[agent.channels.mx] inbox: {FIXTURES}/repo/mx/inbox overlaps "
    f"[agent.channels.mx] source {FIXTURES}/repo/mx (pruning the inbox",
    "inbox-contains-source": f"[agent.channels.mx] inbox: {FIXTURES}/inbox overlaps "
    f"[agent.channels.mx] source {FIXTURES}/inbox/mirror/mx (pruning the inbox",
    "inbox-is-other-channels-source": f"[agent.channels.scanner] inbox: {FIXTURES}/repo/mx "
    "overlaps [agent.channels.mx] source",
    "shared-inbox": f"[agent.channels.scanner] inbox: {FIXTURES}/inbox/shared overlaps "
    f"[agent.channels.mx] inbox {FIXTURES}/inbox/shared",
    "inbox-in-state": f"[agent.channels.mx] inbox: {FIXTURES}/state/mx overlaps [agent] state",
    "status-dir-in-state": f"[agent] status_dir: {FIXTURES}/state/public overlaps [agent] state",
    "target-in-status-dir": f"[agent.channels.mx] target: {FIXTURES}/live/mx overlaps "
    f"[agent] status_dir {FIXTURES}/live",
    "target-in-source": f"[agent.channels.mx] target: {FIXTURES}/repo/mx/live overlaps "
    "[agent.channels.mx] source",
    "inbox-in-repository": f"[agent.channels.mx] inbox: {FIXTURES}/repo/inbox/mx overlaps "
    "[publisher] repository",
    "state-in-repository": f"[agent] state: {FIXTURES}/repo/state overlaps [publisher] repository",
    "push-into-repository": f"[publisher.channels.mx] push: {FIXTURES}/repo/mx overlaps "
    "[publisher] repository",
    "push-shared": f"[publisher.channels.scanner] push: {FIXTURES}/inbox/node overlaps "
    f"[publisher.channels.mx] push {FIXTURES}/inbox/node",
    "push-shared-remote": "[publisher.channels.scanner] push: "
    "ssh://MX1.example.net:22/var/lib/mapsync/inbox/mx overlaps [publisher.channels.mx] "
    "push ssh://mapsync@mx1.example.net/var/lib/mapsync/inbox/mx (an inbox takes the releases",
    # One location, several spellings (issue 15.18).
    "duplicate-source-spelling": "[agent.channels.mx] source: a source is listed twice "
    f"({FIXTURES}/repo/mx)",
    "duplicate-source-url": "[agent.channels.mx] source: a source is listed twice "
    "(rsync://Publisher.Example.NET:873/mapsync/mx)",
    "duplicate-push": "[publisher.channels.mx] push: a push destination is listed twice "
    "(ssh://mapsync@MX1.Example.net:22/var/lib/mapsync/inbox/mx)",
    "customer-field-name": "[publisher.channels.store-1] customer_field: 'home' is not a free "
    "userdb field name",
    "customer-field-maps": "[publisher.channels.imap] customer_field: only a channel with "
    "dovecot_users carries it",
    # Maps of the operator's own.
    "own-map-unknown-key": "[publisher.maps.access] seperator: unknown key",
    "own-map-missing-query": "[publisher.maps.access] query: missing (required)",
    "own-map-blank-query": "[publisher.maps.access] query: must not be blank",
    "own-map-name": "[publisher.maps.Access.cdb]: map names are lowercase letters, digits",
    "own-map-builtin-name": "[publisher.maps.recipients]: 'recipients' is a built-in map",
    "own-map-separator": "[publisher.maps.access] separator: must be one of ' ', '\\t', ':', not '='",
    "own-map-keys": "[publisher.maps.access] keys: must be 'lower' or 'exact', not 'upper'",
    "own-map-wrong-type-cdb": "[publisher.maps.access] cdb: must be true or false, not 'no'",
    "own-map-not-listed-unknown": "[publisher.channels.relay] maps: unknown map 'acess' (known: "
    "access, domains,",
}


def test_every_bad_fixture_is_covered() -> None:
    on_disk = {p.name[len("bad-") : -len(".toml")] for p in FIXTURES.glob("bad-*.toml")}
    assert on_disk == set(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_names_file_and_key(name: str) -> None:
    path = FIXTURES / f"bad-{name}.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert BAD[name] in message, message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    # A directory where the file should be: read fails with an OSError other than "not found".
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: ")


def test_comment_only_file_counts_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("# nothing here yet\n\n")
    with pytest.raises(ConfigError, match="empty config"):
        load(path)


def test_good_config_parses_every_field() -> None:
    path = FIXTURES / "good.toml"
    cfg = load(path)
    base = path.parent
    pub = cfg.need_publisher()
    assert pub.database == "sqlite:///central.db"
    assert pub.schema == "mapsync"
    assert pub.keep == 5
    assert pub.expires == 2 * 86400
    assert pub.guards == Guards(min_entries=2, max_shrink=0.05, max_growth=0.50)
    # A per-map section overrides only what it names and inherits the rest from [publisher.guards].
    assert pub.map_guards == {"recipients": Guards(min_entries=2, max_shrink=0.20, max_growth=0.5)}
    assert list(pub.channels) == ["mx", "store-1"]
    mx = pub.channels["mx"]
    assert mx.maps == ("domains", "recipients", "virtual", "transport")
    assert mx.push == ("rsync://mx1.example.net/inbox/mx",)
    assert mx.mailstore is None
    assert pub.channels["store-1"].mailstore == "store-1"

    agent = cfg.need_agent()
    amx = agent.channels["mx"]
    assert amx.reload == ("postfix", "reload")
    assert (amx.warn_after, amx.critical_after, amx.timeout) == (90, 7200, 60)
    store = agent.channels["store-1"]
    assert store.source == "rsync://publisher.example.net/mapsync/store-1"
    assert store.target == Path("/etc/dovecot/mapsync")
    # Defaults where the file says nothing.
    assert (store.warn_after, store.critical_after, store.timeout) == (900, 7200, 300)
    assert store.inbox is None and store.reload == ()
    assert agent.trusted_keys == (base / "keys" / "signing.pub", Path("/etc/mapsync/old.pub"))
    assert agent.state == base / "state"


def test_relative_paths_resolve_against_the_config_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Working directory one level above the config file, config named relatively: paths in
    # the file must resolve against the file's directory, not against the working directory.
    monkeypatch.chdir(FIXTURES.parent)
    cfg = load(Path("config") / "good.toml")
    base = FIXTURES.resolve()
    pub = cfg.need_publisher()
    agent = cfg.need_agent()
    assert pub.repository == base / "repo"
    assert pub.signing_key == base / "keys" / "signing.key"
    assert agent.state == base / "state"
    assert agent.trusted_keys[0] == base / "keys" / "signing.pub"
    mx = agent.channels["mx"]
    assert mx.source == str(base / "repo" / "mx")
    assert mx.target == base / "live" / "mx"
    assert mx.inbox == base / "inbox" / "mx"
    # Absolute paths and URLs are left alone.
    assert agent.trusted_keys[1] == Path("/etc/mapsync/old.pub")
    assert agent.channels["store-1"].source.startswith("rsync://")


def test_publisher_only_and_agent_only_files(tmp_path: Path) -> None:
    pub_only = tmp_path / "p.toml"
    pub_only.write_text(
        '[publisher]\ndatabase = "sqlite:///x.db"\nrepository = "/srv/r"\n'
        'signing_key = "/k/s.key"\n[publisher.channels.mx]\nmaps = ["domains"]\n'
    )
    cfg = load(pub_only)
    assert cfg.agent is None
    assert cfg.need_publisher().repository == Path("/srv/r")
    with pytest.raises(ConfigError, match=r"needs an \[agent\] section") as info:
        cfg.need_agent()
    assert str(pub_only) in str(info.value)

    agent_only = tmp_path / "a.toml"
    agent_only.write_text(
        '[agent]\nstate = "/s"\ntrusted_keys = ["/k.pub"]\n'
        '[agent.channels.mx]\nsource = "ssh://u@h/srv/r/mx"\ntarget = "/t"\n'
    )
    cfg = load(agent_only)
    assert cfg.publisher is None
    assert cfg.need_agent().channels["mx"].source == "ssh://u@h/srv/r/mx"
    with pytest.raises(ConfigError, match=r"needs a \[publisher\] section"):
        cfg.need_publisher()


def test_resolve_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAPSYNC_CONFIG", "/from/env.toml")
    assert config.resolve_path("/explicit.toml") == Path("/explicit.toml")
    assert config.resolve_path(None) == Path("/from/env.toml")
    monkeypatch.delenv("MAPSYNC_CONFIG")
    assert config.resolve_path(None) == Path("/etc/mapsync/mapsync.toml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800), ("0s", 0), (" 15m ", 900)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["15 minutes", "15", "m", "-5m", "1.5h", "15mm", "", "15m\n5s", "2w", "h2"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "value"), [("10%", 0.10), ("0%", 0.0), ("2.5%", 0.025), ("150%", 1.5), (" 5% ", 0.05)]
)
def test_parse_percent(text: str, value: float) -> None:
    assert parse_percent(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["10", "%", "ten%", "-5%", "10 %", "0.1", "5%%", "1e2%"])
def test_parse_percent_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a percentage"):
        parse_percent(text)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mapsync", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("fixture", "expect"),
    [
        ("bad-duration-warn-after.toml", "[agent.channels.mx] warn_after: not a duration"),
        ("bad-invalid-toml.toml", "not valid TOML"),
        ("bad-unknown-key-publisher.toml", "[publisher] colour: unknown key"),
        ("bad-expires-zero.toml", "[publisher] expires: must be at least 1h"),
        ("bad-trusted-keys-directory.toml", "[agent] trusted_keys: "),
        ("bad-state-under-file.toml", "[agent] state: "),
        ("bad-inbox-is-source.toml", "[agent.channels.mx] inbox: "),
        ("bad-duplicate-source-spelling.toml", "source: a source is listed twice"),
    ],
)
def test_cli_with_bad_config_exits_2_with_one_line(fixture: str, expect: str) -> None:
    path = FIXTURES / fixture
    proc = _cli("--config", str(path), "status")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"mapsync: {path}: ")
    assert expect in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_with_missing_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    proc = _cli("--config", str(path), "publish")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"mapsync: {path}: config file not found (use --config FILE or set MAPSYNC_CONFIG)"
    ]


def test_cli_reads_config_from_environment() -> None:
    path = FIXTURES / "bad-empty.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "mapsync", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAPSYNC_CONFIG": str(path)},
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"mapsync: {path}: empty config: needs a [publisher] or an [agent] section"
    )


_AGENT = """
[agent]
state = "/var/lib/mapsync/agent"
trusted_keys = ["/etc/mapsync/signing.pub"]
{agent_extra}
[agent.channels.mx]
target = "/etc/postfix/mapsync"
{channel}
"""


def _agent_cfg(tmp_path: Path, channel: str, agent_extra: str = "") -> config.AgentConfig:
    f = tmp_path / "mapsync.toml"
    f.write_text(_AGENT.format(channel=channel, agent_extra=agent_extra))
    return load(f).need_agent()


def test_source_list_gives_mirrors_in_order(tmp_path: Path) -> None:
    ag = _agent_cfg(
        tmp_path,
        'source = ["rsync://a.example.net/mapsync/mx", "ssh://b.example.net/srv/mx", "mirror"]',
    )
    ch = ag.channels["mx"]
    assert ch.source == "rsync://a.example.net/mapsync/mx"
    assert ch.sources == (
        "rsync://a.example.net/mapsync/mx",
        "ssh://b.example.net/srv/mx",
        str(tmp_path / "mirror"),
    )


@pytest.mark.parametrize(
    ("channel", "expect"),
    [
        ("source = []", "[agent.channels.mx] source: an empty list names no source"),
        ('source = ["/a", "/a"]', "[agent.channels.mx] source: a source is listed twice"),
        ('source = ["/a", "http://x/y"]', "[agent.channels.mx] source: unsupported URL"),
        (
            'source = "/a"\n[agent.channels.mx.files."Al.iases"]\nmode = "0644"',
            "[agent.channels.mx.files.Al.iases]: 'Al.iases' is not a map name",
        ),
        (
            'source = "/a"\n[agent.channels.mx.files.recipients]\nmode = "644x"',
            "[agent.channels.mx.files.recipients] mode: must be an octal mode string",
        ),
        (
            'source = "/a"\n[agent.channels.mx.files.recipients]\nmode = "0666"',
            "makes a map executable or writable by its group or others",
        ),
        (
            'source = "/a"\n[agent.channels.mx.files.recipients]\nuser = "root"',
            "[agent.channels.mx.files.recipients] user: unknown key",
        ),
        ('source = "/a"\ncheck_timeout = "soon"', "check_timeout: not a duration"),
    ],
)
def test_agent_channel_refusals_name_the_key(tmp_path: Path, channel: str, expect: str) -> None:
    with pytest.raises(ConfigError) as err:
        _agent_cfg(tmp_path, channel)
    assert expect in str(err.value)
    assert str(tmp_path / "mapsync.toml") in str(err.value)


def test_check_files_timeouts_and_schedule_parse(tmp_path: Path) -> None:
    ag = _agent_cfg(
        tmp_path,
        'source = "/srv/mapsync/mx"\n'
        'check = ["postmap", "-q", "postmaster@example.org", "cdb:{dir}/recipients"]\n'
        'check_timeout = "10s"\nreload_timeout = "2m"\n'
        '[agent.channels.mx.files.dovecot_users]\nmode = "0640"\nowner = "root"\ngroup = "dovecot"',
        agent_extra='interval = "1m"\njitter = "5s"',
    )
    ch = ag.channels["mx"]
    assert ch.check == ("postmap", "-q", "postmaster@example.org", "cdb:{dir}/recipients")
    assert (ch.check_timeout, ch.reload_timeout) == (10, 120)
    assert ch.files == {"dovecot_users": config.FileMode(0o640, "root", "dovecot")}
    assert (ag.interval, ag.jitter) == (60, 5)
    assert ch.mirrors == ()


def test_push_destinations_resolve_relative_paths(tmp_path: Path) -> None:
    f = tmp_path / "mapsync.toml"
    f.write_text(
        '[publisher]\ndatabase = "sqlite:///x.db"\nrepository = "repo"\nsigning_key = "k"\n'
        'push_timeout = "20s"\nssh = ["ssh", "-i", "/etc/mapsync/push_key"]\n'
        '[publisher.channels.mx]\nmaps = ["domains"]\n'
        'push = ["inbox", "ssh://mx1.example.net/var/lib/mapsync/inbox/mx", "rsync://mx2/inbox/mx"]\n'
    )
    pub = load(f).need_publisher()
    assert pub.channels["mx"].push == (
        str(tmp_path / "inbox"),
        "ssh://mx1.example.net/var/lib/mapsync/inbox/mx",
        "rsync://mx2/inbox/mx",
    )
    assert pub.push_timeout == 20
    assert pub.ssh == ("ssh", "-i", "/etc/mapsync/push_key")


def test_an_empty_ssh_command_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[agent.channels.mx\] ssh: must name a program"):
        _agent_cfg(tmp_path, 'source = "ssh://h/srv/mx"\nssh = []')


@pytest.mark.parametrize("key", ["check_timeout", "reload_timeout"])
def test_a_zero_hook_timeout_is_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\[agent.channels.mx\] {key}: must be at least 1s"):
        _agent_cfg(tmp_path, f'source = "/a"\n{key} = "0s"')


def test_every_rsync_mirror_must_name_its_user_when_a_password_file_is_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"source: 'rsync://mirror/m/mx' names no user"):
        _agent_cfg(
            tmp_path,
            'source = ["rsync://mx@primary/m/mx", "rsync://mirror/m/mx"]\n'
            'password_file = "/etc/mapsync/rsync.secret"',
        )


def test_a_zero_push_timeout_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "mapsync.toml"
    f.write_text(
        '[publisher]\ndatabase = "sqlite:///x.db"\nrepository = "repo"\nsigning_key = "k"\n'
        'push_timeout = "0s"\n[publisher.channels.mx]\nmaps = ["domains"]\n'
    )
    with pytest.raises(ConfigError, match=r"\[publisher\] push_timeout: must be at least 1s"):
        load(f)


def test_locations_are_kept_in_one_spelling(tmp_path: Path) -> None:
    ag = _agent_cfg(
        tmp_path,
        'source = ["mirror/./mx/", "rsync://a.example.net//mapsync/./mx/", '
        '"file:///srv/m//mx/.", "ssh://u@[2001:db8::10]:2222/srv/mx/"]',
    )
    assert ag.channels["mx"].sources == (
        str(tmp_path / "mirror" / "mx"),
        "rsync://a.example.net/mapsync/mx",
        "file:///srv/m/mx",
        "ssh://u@[2001:db8::10]:2222/srv/mx",
    )


@pytest.mark.parametrize(
    ("spellings", "twice"),
    [
        (("/srv/mapsync/mx", "/srv/mapsync/mx/", "/srv/mapsync/mx/./"), "/srv/mapsync/mx"),
        (("file:///srv/mx", "file:///srv/mx/"), "file:///srv/mx"),
        (("ssh://h/srv/mx", "ssh://h//srv/mx"), "ssh://h/srv/mx"),
    ],
)
def test_a_push_destination_spelled_twice_is_refused(
    tmp_path: Path, spellings: tuple[str, ...], twice: str
) -> None:
    f = tmp_path / "mapsync.toml"
    push = ", ".join(f'"{s}"' for s in spellings)
    f.write_text(
        '[publisher]\ndatabase = "sqlite:///x.db"\nrepository = "repo"\nsigning_key = "k"\n'
        f'[publisher.channels.mx]\nmaps = ["domains"]\npush = [{push}]\n'
    )
    with pytest.raises(ConfigError) as err:
        load(f)
    assert str(err.value) == (
        f"{f}: [publisher.channels.mx] push: a push destination is listed twice ({twice})"
    )


def test_siblings_and_a_shared_source_are_not_overlaps(tmp_path: Path) -> None:
    """The documented layout: inboxes beside the state, two channels reading one repository."""
    f = tmp_path / "mapsync.toml"
    f.write_text(
        '[publisher]\ndatabase = "sqlite:///x.db"\nrepository = "repo"\nsigning_key = "keys/k"\n'
        '[publisher.channels.mx]\nmaps = ["domains"]\npush = ["node/inbox/mx"]\n'
        '[agent]\nstate = "node/state"\ntrusted_keys = ["keys/k.pub"]\n'
        '[agent.channels.mx]\nsource = "repo/mx"\ntarget = "node/postfix"\n'
        'inbox = "node/inbox/mx"\n'
        '[agent.channels.exim]\nsource = "repo/mx"\ntarget = "node/exim4"\n'
        'inbox = "node/inbox/exim"\n'
    )
    cfg = load(f)
    assert cfg.need_agent().channels["exim"].inbox == tmp_path / "node" / "inbox" / "exim"


def test_an_overlap_through_a_symlink_is_found(tmp_path: Path) -> None:
    (tmp_path / "repo" / "mx").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "repo" / "mx")
    with pytest.raises(ConfigError, match=r"\[agent.channels.mx\] inbox: .*/alias overlaps"):
        _agent_cfg(tmp_path, f'source = "{tmp_path}/repo/mx"\ninbox = "alias"')


_STORE = """\
{publisher}[agent]
state = "state"
trusted_keys = ["signing.pub"]
[agent.channels.store-1]
source = "{source}"
target = "live"
{extra}
"""
_WARNING = "channel carries password hashes but is pulled without authentication"


@pytest.mark.parametrize(
    ("publisher", "source", "extra", "warned"),
    [
        # dovecot_users from a module anyone may read: warned, naming channel and source
        ("", "rsync://publisher.example.net/store-1", 'maps = ["dovecot_users"]', True),
        # a user but no password (and no RSYNC_PASSWORD): still warned
        (
            "",
            "rsync://store1-agent@publisher.example.net/store-1",
            'maps = ["dovecot_users"]',
            True,
        ),
        # as agents/dovecot-store ships it: no warning
        (
            "",
            "rsync://store1-agent@publisher.example.net/store-1",
            'maps = ["dovecot_users"]\npassword_file = "store.password"',
            False,
        ),
        # what the channel carries, from the publisher part of the same file
        (
            '[publisher]\ndatabase = "sqlite:///x.db"\nrepository = "/srv/r"\n'
            'signing_key = "/k/s.key"\n[publisher.channels.store-1]\nmaps = ["dovecot_users"]\n',
            "rsync://publisher.example.net/store-1",
            "",
            True,
        ),
        # no hashes in the channel, or not an rsync daemon: nothing to warn about
        ("", "rsync://publisher.example.net/store-1", 'maps = ["recipients"]', False),
        ("", "ssh://mapsync@publisher.example.net/", 'maps = ["dovecot_users"]', False),
    ],
)
def test_hashes_pulled_without_authentication_are_warned_about(
    tmp_path: Path, publisher: str, source: str, extra: str, warned: bool
) -> None:
    f = tmp_path / "mapsync.toml"
    f.write_text(_STORE.format(publisher=publisher, source=source, extra=extra))
    env = {k: v for k, v in os.environ.items() if k != "RSYNC_PASSWORD"}
    proc = subprocess.run(
        [sys.executable, "-m", "mapsync", "--config", str(f), "--log-format", "json", "status"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr  # nothing installed: CRITICAL, as without the warning
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    warnings = [e for e in events if e["event"] == _WARNING]
    if not warned:
        assert warnings == [], proc.stderr
        return
    (w,) = warnings
    assert (w["level"], w["channel"], w["source"]) == ("warning", "store-1", source)
    assert w["maps"] == "dovecot_users" and w["config"] == str(f)
    assert "docs/security.md" in w["fix"]
