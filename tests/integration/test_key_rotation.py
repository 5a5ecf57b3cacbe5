"""Key rotation, end to end, following docs/operator-guide.md ("Rotating the signing key")."""

from __future__ import annotations

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
