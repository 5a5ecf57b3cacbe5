"""`mapsync compare` reads the published maps in pure Python: it must answer every key as
the real Postfix (``postmap -q`` on the cdb files the agent installed) does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mapsync import config
from mapsync.publish.compare import PublishedSide, TextTable, read_published
from mapsync.sources.live import Connections
from tests.helpers import migrating
from tests.helpers import postfixadmin as pfa

pytestmark = pytest.mark.daemons


def test_compare_reads_the_published_maps_as_postmap_does(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'postfixadmin.db'}"
    pfa.build(url)
    path = migrating.write_publisher(tmp_path / "c", url)
    for command in (["publish", "--skip-invalid"], ["pull", "--channel", "mx"]):
        p = subprocess.run(
            [sys.executable, "-m", "mapsync", "-q", "--config", str(path), *command],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
    pub = config.load(path).need_publisher()
    maps, serials = read_published(pub, ["mx"])
    assert serials == {"mx": 1}
    side = PublishedSide(maps)
    node = tmp_path / "c" / "node" / "mx"
    domains = {a.rpartition("@")[2] for a in pfa.addresses()} | {pfa.VACATION_DOMAIN}
    keys = set(pfa.addresses()) | domains | {f"@{d}" for d in domains} | {"ALICE@Example.COM"}
    asked = 0
    for name in ("domains", "recipients", "virtual", "transport", "senders"):
        postmap = pfa.postmap_reader(node / name)
        for key in sorted(keys):
            # Postfix folds a key to lower case before a cdb lookup; compare's callers do too.
            assert side.get(name, key.lower()) == postmap(key), (name, key)
            asked += 1
    assert asked == 5 * len(keys)
    # And it found something: the reader is not answering None for everything.
    assert side.get("virtual", "sales@example.com") == pfa.postmap_reader(node / "virtual")(
        "sales@example.com"
    )
    assert side.get("virtual", "sales@example.com") is not None


def test_a_file_table_of_main_cf_is_read_as_postmap_reads_it(tmp_path: Path) -> None:
    # PostfixAdmin's vacation setup: transport_maps = hash:/etc/postfix/transport, proxy:mysql:...
    source = tmp_path / "transport"
    source.write_text(
        "# the vacation transport\n"
        "autoreply.example.org  vacation:\n"
        "Mixed.Example\tsmtp:[mx.mixed.example]:25\n"
        "long.example smtp:[a.example]:25,\n"
        "   [b.example]:25\n"
        "\n"
        "dup.example first:\n"
        "dup.example second:\n"
    )
    made = subprocess.run(["postmap", f"hash:{source}"], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    table = TextTable("hash", source, "main.cf: transport_maps")
    keys = [
        "autoreply.example.org",
        "mixed.example",
        "MIXED.example",
        "long.example",
        "dup.example",
        "nothing.example",
        "vacation:",
    ]
    for key in keys:
        p = subprocess.run(
            ["postmap", "-q", key, f"hash:{source}"], capture_output=True, text=True, timeout=30
        )
        expected = p.stdout.rstrip("\n") if p.returncode == 0 else None
        assert table.lookup(key, Connections()) == expected, (key, p.stderr)
    assert table.lookup("autoreply.example.org", Connections()) == "vacation:"
