"""The installed maps, read back by the programs that really read them: Postfix's
``postmap -q``, pure-cdb (an independent cdb reader) and tinycdb. Every key of every text map
must be found with the same value; the cdb agent built must be byte-identical to tinycdb's
``cdb -c -m`` of the same text."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path

import cdblib
import pytest

from tests.conftest import Cluster, make_cluster

pytestmark = pytest.mark.daemons

MAPS = ("domains", "recipients", "virtual", "transport")
IDN = "bücher-1.example".encode()  # an alias domain's U-label, written as UTF-8


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    """25 domains: alias domains (example-10.net, example-20.net, the IDN one), a catch-all
    on example-25.org, a relay domain, accounts housed off their domain's mailstore."""
    root = tmp_path_factory.mktemp("readers")
    c = make_cluster(root / "c", f"sqlite:///{root / 'central.db'}", 400, 25, 80)
    c.publish()
    c.pull()
    return c


def pairs(path: Path) -> list[tuple[bytes, bytes]]:
    out = []
    for line in path.read_bytes().splitlines():
        if line.startswith(b"#") or not line:
            continue
        key, sep, value = line.partition(b" ")
        assert sep, line
        out.append((key, value))
    return out


def sample(c: Cluster, name: str) -> list[tuple[bytes, bytes]]:
    """~30 random keys, the first and last, every catch-all, every address of the alias domain
    example-10.net and of the IDN alias domain (A-label and U-label)."""
    all_pairs = pairs(c.target / name)
    rng = random.Random(name)
    picked = rng.sample(all_pairs, min(30, len(all_pairs)))
    picked += [all_pairs[0], all_pairs[-1]]
    picked += [
        (k, v)
        for k, v in all_pairs
        if k.startswith(b"@") or k.endswith((b"@example-10.net", b"-1-n2a.example", IDN))
    ]
    return sorted(set(picked))


def test_the_data_set_has_the_interesting_keys(node: Cluster) -> None:
    recipients = dict(pairs(node.target / "recipients"))
    virtual = dict(pairs(node.target / "virtual"))
    transport = dict(pairs(node.target / "transport"))
    assert b"@example-25.org" in virtual and b"@example-25.org" in recipients  # catch-all
    assert b"@relay-1.example.com" in recipients
    assert virtual[b"postmaster@example-10.net"] == b"postmaster@example-10.org"  # alias domain
    assert b"postmaster@xn--bcher-1-n2a.example" in recipients
    assert b"postmaster@" + IDN in recipients  # the U-label too
    assert IDN in dict(pairs(node.target / "domains"))
    assert any(b"@" in k for k in transport)  # an account off its domain's mailstore
    assert transport[b"relay-1.example.com"] == b"relay:[mx.relay-1.example.com]:25"


@pytest.mark.parametrize("name", MAPS)
def test_every_key_is_found_by_pure_cdb(node: Cluster, name: str) -> None:
    text = pairs(node.target / name)
    data = (node.target / f"{name}.cdb").read_bytes()
    reader = cdblib.Reader(data)
    assert len(reader) == len(text)
    for key, value in text:
        assert reader.get(key) == value, key
    # Same records, same order, nothing else.
    assert list(reader.iteritems()) == text
    assert reader.get(b"nobody@nowhere.invalid") is None


@pytest.mark.parametrize("name", MAPS)
def test_keys_are_lowercase_sorted_unique_without_nul(node: Cluster, name: str) -> None:
    reader = cdblib.Reader((node.target / f"{name}.cdb").read_bytes())
    keys = list(reader.iterkeys())
    assert keys == sorted(set(keys))
    for key in keys:
        assert not key.endswith(b"\0") and b"\0" not in key, key
        assert key.decode() == key.decode().lower(), key
        assert not any(c in key for c in b" \t\r\n,"), key


@pytest.mark.parametrize("name", MAPS)
def test_postmap_finds_sampled_keys_one_by_one(node: Cluster, name: str) -> None:
    table = f"cdb:{node.target / name}"
    for key, value in sample(node, name):
        p = subprocess.run(["postmap", "-q", key, table], capture_output=True)
        assert (p.returncode, p.stdout.rstrip(b"\n"), p.stderr) == (0, value, b""), key
    # postmap lowercases the query, so mixed case finds the lowercase key.
    key, value = sample(node, name)[0]
    p = subprocess.run(["postmap", "-q", key.upper(), table], capture_output=True)
    assert (p.returncode, p.stdout.rstrip(b"\n")) == (0, value), key.upper()
    p = subprocess.run(["postmap", "-q", "nobody@nowhere.invalid", table], capture_output=True)
    assert (p.returncode, p.stdout, p.stderr) == (1, b"", b"")


@pytest.mark.parametrize("name", MAPS)
def test_postmap_finds_every_key(node: Cluster, name: str) -> None:
    text = pairs(node.target / name)
    keys = b"".join(k + b"\n" for k, _ in text) + b"nobody@nowhere.invalid\n"
    p = subprocess.run(
        ["postmap", "-q", "-", f"cdb:{node.target / name}"], input=keys, capture_output=True
    )
    assert p.stderr == b""
    found = [tuple(line.split(b"\t", 1)) for line in p.stdout.splitlines()]
    assert found == text  # every key, its value, and the unknown one not at all


@pytest.mark.parametrize("name", MAPS)
def test_tinycdb_finds_sampled_keys(node: Cluster, name: str) -> None:
    path = str(node.target / f"{name}.cdb")
    for key, value in sample(node, name):
        p = subprocess.run(["cdb", "-q", path, key], capture_output=True)
        assert (p.returncode, p.stdout, p.stderr) == (0, value, b""), key
    p = subprocess.run(["cdb", "-q", path, "nobody@nowhere.invalid"], capture_output=True)
    assert p.returncode == 100 and p.stdout == b""


@pytest.mark.parametrize("name", MAPS)
def test_cdb_is_byte_identical_to_tinycdb_and_the_manifest(
    node: Cluster, name: str, tmp_path: Path
) -> None:
    ours = (node.target / f"{name}.cdb").read_bytes()
    theirs = tmp_path / f"{name}.cdb"
    with open(node.target / name, "rb") as text:  # tinycdb -m skips the '#' header lines
        subprocess.run(["cdb", "-c", "-m", str(theirs)], stdin=text, check=True)
    assert theirs.read_bytes() == ours
    manifest = json.loads((node.target / ".mapsync" / "current" / "MANIFEST.json").read_text())

    assert manifest["maps"][name]["cdb"]["sha256"] == hashlib.sha256(ours).hexdigest()
    assert manifest["maps"][name]["cdb"]["size"] == len(ours)
