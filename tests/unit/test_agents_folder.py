"""``agents/``: one folder per node role, each an agent.toml an operator can copy and the
daemon snippet that reads the maps. Every agent.toml is a valid agent config with one
channel, and names the publisher channel (maps) it needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapsync import config
from mapsync.maps import CATALOGUE
from tests.daemons.roles import AGENTS, ROLES, role
from tests.helpers.rsyncd import documented_rsyncd_conf, documented_secrets, modules

SNIPPETS = {
    "postfix-mx": ("main.cf", "master.cf"),
    "scanner": ("main.cf", "master.cf"),
    "exim-mx": ("main.conf", "routers.conf", "transports.conf"),
    "dovecot-store": ("dovecot.conf",),
    "dovecot-proxy": ("dovecot.conf",),
    "submission": ("main.cf", "master.cf", "dovecot.conf"),
}


def test_there_is_one_folder_per_role() -> None:
    assert sorted(p.name for p in AGENTS.iterdir() if p.is_dir()) == sorted(ROLES)
    assert set(SNIPPETS) == set(ROLES)
    assert (AGENTS / "README.md").is_file()


@pytest.mark.parametrize("name", ROLES)
def test_each_agent_toml_is_a_valid_agent_config_with_one_channel(name: str) -> None:
    # Trusted keys and targets need not exist to parse: config.load checks syntax and values.
    cfg = config.load(AGENTS / name / "agent.toml")
    assert cfg.publisher is None  # a node holds only its agent side
    agent = cfg.need_agent()
    assert agent.trusted_keys == (Path("/etc/mapsync/signing.pub"),)
    ((_channel, ch),) = agent.channels.items()
    assert ch.target.is_absolute()


@pytest.mark.parametrize("name", ROLES)
def test_each_agent_pulls_its_own_module_with_its_own_credential(name: str) -> None:
    """The shipped config and docs/security.md's rsyncd.conf agree exactly: the channel's own
    module, the user of its `auth users`, a password file, and the maps it expects."""
    ((channel, ch),) = config.load(AGENTS / name / "agent.toml").need_agent().channels.items()
    served = modules(documented_rsyncd_conf())
    assert channel in served, f"docs/security.md has no module [{channel}]"
    module = served[channel]
    user = module["auth users"]
    assert ch.source == f"rsync://{user}@publisher.example.net/{channel}"
    assert ch.mirrors == ()
    assert ch.password_file == Path(f"/etc/mapsync/{channel}.password")
    assert user in documented_secrets()
    assert module["path"] == f"/srv/mapsync/{channel}"
    assert (module["read only"], module["list"]) == ("yes", "no")
    assert served[""]["exclude"] == ".*"  # no module serves the publisher's dot-files
    assert ch.maps == role(name).maps  # the maps key says what the publisher line says
    users = [m["auth users"] for n, m in served.items() if n]
    assert len(set(users)) == len(users), "one credential per channel"


@pytest.mark.parametrize("name", ROLES)
def test_each_role_names_known_maps_and_ships_its_snippets(name: str) -> None:
    r = role(name)
    assert r.maps and all(m in CATALOGUE for m in r.maps)
    for snippet in SNIPPETS[name]:
        assert (AGENTS / name / snippet).is_file()
    assert name in (AGENTS / "README.md").read_text()


def test_only_the_mailstore_and_the_submission_relay_receive_password_hashes() -> None:
    for name in ROLES:
        secret = any(CATALOGUE[m].secrets for m in role(name).maps)
        assert secret == (name in ("dovecot-store", "submission")), name


def test_postfix_nodes_reload_and_dovecot_nodes_rely_on_the_fresh_mtime() -> None:
    reload = {
        name: config.load(AGENTS / name / "agent.toml").need_agent().channels for name in ROLES
    }
    for name in ("postfix-mx", "scanner", "submission"):
        assert [ch.reload for ch in reload[name].values()] == [("postfix", "reload")]
    for name in ("dovecot-store", "dovecot-proxy", "exim-mx"):
        assert [ch.reload for ch in reload[name].values()] == [()]
