"""Freeze protection as monitoring sees it: an installed release nearing its expiry.

The publisher renews a release once half its lifetime has passed. When a node's installed
release has a quarter of its lifetime left, the publisher has not renewed it (it is down, or
the node cannot reach it): status goes WARNING, naming how long is left; once expired,
CRITICAL. The maps keep serving all along. Real manifests from the real publisher with a
short ``expires``, real waiting — no mocked clock.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from mapsync.release import MANIFEST, parse_manifest
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import lookup
from tests.helpers.config import publish_expiring

OLD = "postmaster@example-1.org"


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _status(cluster: Cluster) -> tuple[int, str, dict[str, object]]:
    p = cluster.cli("status")
    j = json.loads(cluster.cli("status", "--json").stdout)
    channel = j["channels"][0]
    assert isinstance(channel, dict)
    return p.returncode, p.stdout, channel


def test_status_warns_with_a_quarter_of_the_lifetime_left_and_is_critical_once_expired(
    tmp_path: Path,
) -> None:
    c = make_cluster(tmp_path / "c", f"sqlite:///{tmp_path / 'central.db'}")
    publish_expiring(c, "8s")
    c.pull()
    m = parse_manifest((c.target / ".mapsync" / "current" / MANIFEST).read_bytes(), "current")
    created, expires = m.created_at().timestamp(), m.expires_at().timestamp()
    assert expires - created == 8

    # More than a quarter left: OK.
    assert time.time() < created + 5.5, "the publish and pull took too long for this test"
    code, out, ch = _status(c)
    assert code == 0, out
    assert ch["status"] == "OK"
    assert "expires in" not in out

    # A quarter (2s) or less left: WARNING, saying how long.
    _sleep_until(created + 6.2)
    code, out, ch = _status(c)
    assert code == 1, out
    assert out.startswith("MAPSYNC WARNING - mx WARNING")
    assert "; expires in 1s" in out
    assert ch["status"] == "WARNING"
    assert ch["expires"] == m.expires
    assert lookup(c, OLD) == "OK"

    # Expired: CRITICAL; the maps still answer.
    _sleep_until(expires + 0.2)
    code, out, ch = _status(c)
    assert code == 2, out
    assert "mx: CRITICAL" in out and re.search(r"; expired [01]s ago", out), out
    assert ch["status"] == "CRITICAL"
    assert lookup(c, OLD) == "OK"


def test_a_renewal_before_the_last_quarter_keeps_status_ok(tmp_path: Path) -> None:
    c = make_cluster(tmp_path / "c", f"sqlite:///{tmp_path / 'central.db'}")
    publish_expiring(c, "8s")
    c.pull()
    m = parse_manifest((c.target / ".mapsync" / "current" / MANIFEST).read_bytes(), "current")
    # Half the lifetime gone: the publisher renews, the node records the new expiry.
    _sleep_until(m.created_at().timestamp() + 4.2)
    assert "renewed serial 2" in publish_expiring(c, "8s").stdout
    assert "serial 2 renews 1" in c.pull().stdout
    _sleep_until(m.created_at().timestamp() + 6.2)  # serial 1 would warn now
    code, out, ch = _status(c)
    assert code == 0, out
    assert ch["serial"] == 2
