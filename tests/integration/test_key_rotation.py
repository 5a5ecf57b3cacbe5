"""Key rotation, end to end, following docs/operator-guide.md ("Rotating the signing key")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert

from mapsync.signing import key_id, keygen, load_public
from mapsync.sources import schema as t
from tests.conftest import Cluster


def test_rotating_the_signing_key_without_a_window_of_untrusted_releases(cluster: Cluster) -> None:
    keys = cluster.root / "keys"
    text = cluster.config_path.read_text()
    cluster.publish()
    cluster.pull()

    # 1. a new key pair on the publisher; 2. every node trusts old and new
    _, new_id = keygen(keys / "signing-2.key")
    text = text.replace(
        f'trusted_keys = ["{keys / "signing.pub"}"]',
        f'trusted_keys = ["{keys / "signing.pub"}", "{keys / "signing-2.pub"}"]',
    )
    cluster.config_path.write_text(text)
    assert "is current" in cluster.pull().stdout

    # 3. the publisher signs with the new key: the next publish re-signs at once, same maps
    text = text.replace(
        f'signing_key = "{keys / "signing.key"}"', f'signing_key = "{keys / "signing-2.key"}"'
    )
    cluster.config_path.write_text(text)
    assert "renewed serial 2" in cluster.publish().stdout
    live = cluster.target / ".mapsync" / "current" / "recipients.cdb"
    inode = live.stat().st_ino
    assert "serial 2 renews 1 (same maps, no swap)" in cluster.pull().stdout
    assert live.stat().st_ino == inode  # nothing for Postfix to reload
    assert "unchanged (serial 2)" in cluster.publish().stdout

    # 4. once every node shows serial 2, nodes drop the old key
    text = text.replace(f'"{keys / "signing.pub"}", ', "")
    cluster.config_path.write_text(text)
    assert cluster.cli("verify").returncode == 0

    # the old key is now worthless: a release it signs is refused
    text_old = text.replace(
        f'signing_key = "{keys / "signing-2.key"}"', f'signing_key = "{keys / "signing.key"}"'
    )
    cluster.config_path.write_text(text_old)
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(
            insert(t.account).values(domain_id=1, local_part="after.rotation", status="active")
        )
    engine.dispose()
    cluster.publish()
    proc = cluster.cli("pull")
    assert proc.returncode == 5
    # The refusal names the key the release says signed it and each trusted key with its file.
    old_id = key_id(load_public(keys / "signing.pub"))
    assert (
        f"signature does not verify with any trusted key; the manifest names signing key "
        f"{old_id} (unverified); trusted keys: {new_id} ({keys / 'signing-2.pub'})"
    ) in proc.stderr
    assert cluster.cli("verify").returncode == 0  # serial 2 still installed and intact


def test_a_signing_key_replaced_without_its_public_half_is_warned_about_when_it_signs(
    cluster: Cluster,
) -> None:
    """The key restored from another backup, or made by another tool over the old file, and
    the ``.pub`` beside it left as it was: that file, copied to the nodes, would have them
    refuse every release. The publish that signs says so, naming both key ids."""
    keys = cluster.root / "keys"
    cluster.publish()
    old_id = key_id(load_public(keys / "signing.pub"))
    _, new_id = keygen(keys / "other.key")
    (keys / "signing.key").write_bytes((keys / "other.key").read_bytes())
    p = cluster.publish()
    assert "renewed serial 2" in p.stdout
    assert "the public key beside the signing key is not its public half" in p.stderr
    assert f"its_key_id={old_id}" in p.stderr and f"signing_key_id={new_id}" in p.stderr
    (keys / "signing.pub").write_bytes((keys / "other.pub").read_bytes())
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(insert(t.account).values(domain_id=1, local_part="zz-new", status="active"))
    engine.dispose()
    p = cluster.publish()
    assert "published serial 3" in p.stdout, p.stdout
    assert "not its public half" not in p.stderr, p.stderr


def test_a_revoked_key_s_live_release_is_reported_at_once_and_replaced_by_a_trusted_one(
    cluster: Cluster,
) -> None:
    """The key that signed the live release is compromised and taken out of ``trusted_keys``.
    ``status`` says so at once (CRITICAL, naming the key), not OK until the next full check;
    every pull refuses it (exit 5), and the first release signed with a trusted key replaces it."""
    keys = cluster.root / "keys"
    text = cluster.config_path.read_text()
    cluster.publish()
    cluster.pull()
    revoked = key_id(load_public(keys / "signing.pub"))
    keygen(keys / "signing-2.key")
    text = text.replace(
        f'trusted_keys = ["{keys / "signing.pub"}"]', f'trusted_keys = ["{keys / "signing-2.pub"}"]'
    )
    cluster.config_path.write_text(text)  # full_check (1h) is far off: only cheap checks

    status = cluster.cli("status")
    assert status.returncode == 2, status.stdout
    assert (
        f"mx CRITICAL (serial 1 is signed by key {revoked}, which trusted_keys no longer lists"
        in status.stdout
    )
    assert cluster.cli("verify").returncode == 5
    for _ in range(2):  # not a failure the next cheap pull forgets
        proc = cluster.cli("pull")
        assert proc.returncode == 5, proc.stdout + proc.stderr
        assert f"the manifest names signing key {revoked}" in proc.stderr
        assert cluster.cli("status").returncode == 2

    text = text.replace(
        f'signing_key = "{keys / "signing.key"}"', f'signing_key = "{keys / "signing-2.key"}"'
    )
    cluster.config_path.write_text(text)
    assert "renewed serial 2" in cluster.publish().stdout
    assert "installed serial 2" in cluster.pull().stdout
    status = cluster.cli("status")
    assert status.returncode == 0, status.stdout
    assert cluster.cli("verify").returncode == 0


def test_a_trusted_key_path_that_names_no_file_is_reported_not_ok(cluster: Cluster) -> None:
    """The revoked key taken out and the new key's path mistyped: status said OK and a pull
    "up to date" (a key file that cannot be read made the check say nothing), while the live
    release is signed by a key no longer trusted and no release would be installed."""
    keys = cluster.root / "keys"
    cluster.publish()
    cluster.pull()
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(
        text.replace(
            f'trusted_keys = ["{keys / "signing.pub"}"]',
            f'trusted_keys = ["{keys / "signin.pub"}"]',
        )
    )
    status = cluster.cli("status")
    assert status.returncode == 2, status.stdout
    assert "which no trusted key that exists holds" in status.stdout
    assert str(keys / "signin.pub") in status.stdout
    assert cluster.cli("pull").returncode != 0


def test_a_trusted_key_its_group_may_write_is_reported_by_status_and_every_pull(
    cluster: Cluster,
) -> None:
    """A trusted key others may replace is refused when a key is loaded (a new release), but
    the cheap key-id read of status and of a nothing-changed pull skipped that check: status
    OK, pull "up to date", until the next release failed."""
    public = cluster.root / "keys" / "signing.pub"
    cluster.publish()
    cluster.pull()
    public.chmod(0o664)
    status = cluster.cli("status")
    assert status.returncode == 2, status.stdout
    assert f"{public}: trusted key has mode 0664" in status.stdout
    assert cluster.cli("pull").returncode != 0
    public.chmod(0o644)
    assert cluster.cli("pull").returncode == 0  # the failed pull's note cleared
    assert cluster.cli("status").returncode == 0


@pytest.mark.parametrize("content", ["empty", "private key", "rsa"])
def test_a_revoked_key_with_a_trusted_key_file_that_holds_no_key_is_reported_not_ok(
    cluster: Cluster, content: str
) -> None:
    """The revoked key taken out and the new key's file on the node an empty copy (a failed
    scp), the private key copied by mistake, or another algorithm's key: status said OK and
    every pull "up to date" (exit 0), as if the file could not be read by a monitoring user,
    while the live release is signed by a key no longer trusted. And the pull that checked the
    signature called the live set damaged and "rebuilt" it, for a fault of the config."""
    keys = cluster.root / "keys"
    cluster.publish()
    cluster.pull()
    new = keys / "signing-2.pub"
    if content == "empty":
        new.write_bytes(b"")
    elif content == "private key":
        new.write_bytes((keys / "signing.key").read_bytes())
    else:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        new.write_bytes(
            rsa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(
        text.replace(f'trusted_keys = ["{keys / "signing.pub"}"]', f'trusted_keys = ["{new}"]')
    )
    status = cluster.cli("status")
    assert status.returncode == 2, status.stdout
    assert "which no trusted key that exists holds" in status.stdout
    assert str(new) in status.stdout
    for _ in range(2):
        proc = cluster.cli("pull")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert str(new) in proc.stderr
        assert "live set is damaged" not in proc.stderr
    assert cluster.cli("status").returncode == 2


def test_two_publishers_with_different_keys_on_one_repository_do_not_renew_each_other(
    cluster: Cluster,
) -> None:
    """A standby promoted (its own signing key) while the primary still runs, both writing
    the shared repository: each run of each renewed the other's release as if after a key
    rotation, a new serial of every channel every run, logged as info only, and a node
    trusting one of the keys refused every other release. The publisher that finds its own
    release renewed with another key refuses (exit 4, naming both keys); --force renews
    (switching signing_key back on purpose)."""
    keys = cluster.root / "keys"
    cluster.publish()
    _, standby_id = keygen(keys / "standby.key")
    primary_id = key_id(load_public(keys / "signing.pub"))
    standby = cluster.root / "standby.toml"
    standby.write_text(
        cluster.config_path.read_text().replace(
            f'signing_key = "{keys / "signing.key"}"', f'signing_key = "{keys / "standby.key"}"'
        )
    )

    def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mapsync", "--config", str(config), "publish", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert "renewed serial 2" in run(standby).stdout  # a promotion renews once
    for _ in range(2):
        primary = run(cluster.config_path)
        assert primary.returncode == 4, primary.stdout + primary.stderr
        assert (
            f"serial 2 renews serial 1, which this publisher's key {primary_id} signed, with "
            f"key {standby_id}: another publisher with another signing_key writes this "
            "repository"
        ) in primary.stderr
        assert "unchanged (serial 2)" in run(standby).stdout
    dry = run(cluster.config_path, "--dry-run")
    assert dry.returncode == 4 and "another publisher" in dry.stdout + dry.stderr
    assert sorted(p.name for p in (cluster.repo / "mx" / "releases").iterdir()) == ["1", "2"]

    forced = run(cluster.config_path, "--force")
    assert forced.returncode == 0 and "renewed serial 3" in forced.stdout, forced.stderr
    assert run(standby).returncode == 4  # the standby, in turn, is told
