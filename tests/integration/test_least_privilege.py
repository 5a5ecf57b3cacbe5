"""Least privilege per channel, on real releases: an MX never receives a password hash;
a mailstore receives only its own accounts."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Cluster

CHANNELS = """
[publisher.channels.scanner]
maps = ["domains", "transport"]

[publisher.channels.exim]
maps = ["domains", "recipients", "virtual", "exim_routes", "senders"]

[publisher.channels.imap]
maps = ["dovecot_proxy"]

[publisher.channels.store-1]
maps = ["dovecot_users"]
mailstore = "store-1"

[publisher.channels.store-2]
maps = ["dovecot_users"]
mailstore = "store-2"
"""


def _publish_all(cluster: Cluster) -> None:
    text = cluster.config_path.read_text()
    head, agent = text.split("[agent]", 1)
    cluster.config_path.write_text(head + CHANNELS + "\n[agent]" + agent)
    cluster.publish()


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_only_mailstore_channels_carry_password_hashes(cluster: Cluster) -> None:
    _publish_all(cluster)
    for channel in ("mx", "scanner", "exim", "imap"):
        for name, content in _files(cluster.repo / channel).items():
            assert "{SHA512-CRYPT}" not in content and "$6$" not in content, f"{channel}/{name}"
    store1 = (cluster.repo / "store-1" / "releases" / "1" / "dovecot_users").read_text()
    assert "{SHA512-CRYPT}$6$" in store1


def test_each_mailstore_gets_only_its_own_accounts(cluster: Cluster) -> None:
    _publish_all(cluster)
    users = {}
    for store in ("store-1", "store-2"):
        lines = (cluster.repo / store / "releases" / "1" / "dovecot_users").read_text().splitlines()
        users[store] = {line.split(":", 1)[0] for line in lines if not line.startswith("#")}
    proxy = (cluster.repo / "imap" / "releases" / "1" / "dovecot_proxy").read_text()
    assert users["store-1"] and users["store-2"]
    assert not users["store-1"] & users["store-2"]
    for user in users["store-1"]:
        assert (
            f"{user}:::::::proxy=y nopassword=y host=10.0.1.11 port=143" in proxy
            or f"{user}:::::::nologin=y" in proxy
        )
    for user in users["store-2"]:
        assert (
            f"{user}:::::::proxy=y nopassword=y host=10.0.1.12 port=143" in proxy
            or f"{user}:::::::nologin=y" in proxy
        )


def test_an_unknown_mailstore_in_a_channel_is_a_clear_error(cluster: Cluster) -> None:
    text = cluster.config_path.read_text()
    head, agent = text.split("[agent]", 1)
    extra = '\n[publisher.channels.store-9]\nmaps = ["dovecot_users"]\nmailstore = "store-9"\n'
    cluster.config_path.write_text(head + extra + "\n[agent]" + agent)
    proc = cluster.cli("publish")
    assert proc.returncode == 2
    assert "[publisher.channels.store-9] mailstore: no mailstore named 'store-9'" in proc.stderr


def test_a_mailstore_node_installs_password_hashes_readable_by_root_and_dovecot_only(
    cluster: Cluster,
) -> None:
    import grp
    import stat

    from mapsync.maps import CATALOGUE
    from mapsync.release import SECRET_MAPS

    assert {n for n, m in CATALOGUE.items() if m.secrets} == SECRET_MAPS
    _publish_all(cluster)
    cluster.write_config(source=str(cluster.repo / "store-1"))
    text = cluster.config_path.read_text().replace(
        "[agent.channels.mx]", "[agent.channels.store-1]"
    )
    head, agent = text.split("[agent]", 1)
    cluster.config_path.write_text(head + CHANNELS + "\n[agent]" + agent)
    cluster.pull()
    live = cluster.target / "dovecot_users"
    st = live.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    try:
        assert st.st_gid == grp.getgrnam("dovecot").gr_gid
    except KeyError:
        assert st.st_gid == 0  # no dovecot group on this machine: root only
    assert "{SHA512-CRYPT}" in live.read_text()
