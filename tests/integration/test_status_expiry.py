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


# Lifetime of the test releases. Its last quarter (4 s) is when status warns: room for the
# two status runs below on a busy machine (pytest-xdist runs other tests beside these).
LIFETIME = 16


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _status(cluster: Cluster) -> tuple[int, str, dict[str, object], float, float]:
    """``status`` and ``status --json``, and the times before and after them."""
    before = time.time()
    p = cluster.cli("status")
    j = json.loads(cluster.cli("status", "--json").stdout)
    after = time.time()
    channel = j["channels"][0]
    assert isinstance(channel, dict)
    return p.returncode, p.stdout, channel, before, after


def test_status_warns_with_a_quarter_of_the_lifetime_left_and_is_critical_once_expired(
    tmp_path: Path,
) -> None:
    c = make_cluster(tmp_path / "c", f"sqlite:///{tmp_path / 'central.db'}")
    publish_expiring(c, f"{LIFETIME}s")
    c.pull()
    m = parse_manifest((c.target / ".mapsync" / "current" / MANIFEST).read_bytes(), "current")
    created, expires = m.created_at().timestamp(), m.expires_at().timestamp()
    assert expires - created == LIFETIME
    quarter = expires - LIFETIME / 4

    # More than a quarter left: OK.
    code, out, ch, _, after = _status(c)
    assert after < quarter, "premise: the publish, pull and status ran before the last quarter"
    assert code == 0, out
    assert ch["status"] == "OK"
    assert "expires in" not in out

    # A quarter (4s) or less left: WARNING, saying how long (whole seconds, rounded down,
    # as of when status ran).
    _sleep_until(quarter + 0.2)
    code, out, ch, before, after = _status(c)
    assert after < expires, "premise: status ran before the expiry"
    assert code == 1, out
    assert out.startswith("MAPSYNC WARNING - mx WARNING")
    left = re.search(r"; expires in (\d+)s", out)
    assert left, out
    assert int(expires - after) <= int(left[1]) <= int(expires - before) < LIFETIME / 4, out
    assert ch["status"] == "WARNING"
    assert ch["expires"] == m.expires
    assert lookup(c, OLD) == "OK"

    # Expired: CRITICAL; the maps still answer.
    _sleep_until(expires + 0.2)
    code, out, ch, before, after = _status(c)
    assert code == 2, out
    ago = re.search(r"mx: CRITICAL.*; expired (\d+)s ago", out)
    assert ago, out
    assert int(before - expires) <= int(ago[1]) <= int(after - expires), out
    assert ch["status"] == "CRITICAL"
    assert lookup(c, OLD) == "OK"


def test_a_renewal_before_the_last_quarter_keeps_status_ok(tmp_path: Path) -> None:
    c = make_cluster(tmp_path / "c", f"sqlite:///{tmp_path / 'central.db'}")
    publish_expiring(c, f"{LIFETIME}s")
    c.pull()
    m = parse_manifest((c.target / ".mapsync" / "current" / MANIFEST).read_bytes(), "current")
    # Half the lifetime gone: the publisher renews, the node records the new expiry.
    _sleep_until(m.created_at().timestamp() + LIFETIME / 2 + 0.2)
    assert "renewed serial 2" in publish_expiring(c, f"{LIFETIME}s").stdout
    assert "serial 2 renews 1" in c.pull().stdout
    _sleep_until(m.expires_at().timestamp() - LIFETIME / 4 + 0.2)  # serial 1 would warn now
    code, out, ch, _, after = _status(c)
    assert after < m.expires_at().timestamp(), "premise: status ran before serial 1 expired"
    assert code == 0, out
    assert ch["serial"] == 2
