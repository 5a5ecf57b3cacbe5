"""Maps of the operator's own: each row checked so none can inject a line, a key or a comment;
duplicates refused naming both rows; the manifest's additive ``custom`` field; a node's config
accepting their names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mapsync.agent.checks import read_signed
from mapsync.config import AgentChannel, MapConfig, load
from mapsync.errors import ConfigError, VerificationError
from mapsync.maps.custom import MAX_LINE, check_rows
from mapsync.release import (
    MANIFEST,
    SIGNATURE,
    CdbInfo,
    CustomInfo,
    Manifest,
    MapEntry,
    parse_manifest,
)
from mapsync.signing import key_id, sign

ACCESS = MapConfig("access", "SELECT a, b FROM t")
H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64


def test_good_rows_become_entries_with_keys_lowercased() -> None:
    entries, problems = check_rows(
        ACCESS,
        [("Spam@Example.ORG", "REJECT no thanks"), (b"abuse@example.org", "OK"), ("1.2.3.4", 554)],
    )
    assert problems == []
    assert entries == [
        ("spam@example.org", "REJECT no thanks"),
        ("abuse@example.org", "OK"),
        ("1.2.3.4", "554"),
    ]


def test_exact_keys_are_kept_and_differ_by_case() -> None:
    spec = MapConfig("routes", "q", keys="exact")
    entries, problems = check_rows(spec, [("A@x.org", "1"), ("a@x.org", "2")])
    assert problems == []
    assert entries == [("A@x.org", "1"), ("a@x.org", "2")]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ((None, "OK"), "key is NULL"),
        (("a@x.org", None), "value is NULL"),
        (("", "OK"), "key is empty"),
        (("a@x.org", ""), "value is empty"),
        (("a@x.org\nb@x.org", "OK"), "key contains a line break"),
        (("a@x.org\r", "OK"), "key contains a line break"),
        (("a@x.org", "OK\nb@x.org OK"), "value contains a line break"),
        (("a@x.org", "OK\r"), "value contains a line break"),
        (("a\0@x.org", "OK"), "key contains a NUL byte"),
        (("a@x.org", "O\0K"), "value contains a NUL byte"),
        # A terminal showing `mapsync diff --keys` acts on an ESC sequence (here: clear screen).
        (("a@x.org", "REJECT \x1b[2J"), "value contains the control character U+001B"),
        (("a@x.org", "REJECT a\x0bb"), "value contains the control character U+000B"),
        (("a@x.org", "REJECT a\x85b"), "value contains the control character U+0085"),
        (("a@x.org", "REJECT a\u2028b"), "value contains the control character U+2028"),
        (("a\x01@x.org", "OK"), "key contains the control character U+0001"),
        (("a\x7f@x.org", "OK"), "key contains the control character U+007F"),
        (("a @x.org", "OK"), "key contains whitespace"),
        (("a\t@x.org", "OK"), "key contains whitespace"),
        (("a\u00a0@x.org", "OK"), "key contains whitespace"),
        (("a,b@x.org", "OK"), "key contains a comma"),
        (("#a@x.org", "OK"), "key starts with '#'"),
        ((b"\xff@x.org", "OK"), "key is not valid UTF-8"),
        (("a@x.org", b"\xc3"), "value is not valid UTF-8"),
        (("a\udcff@x.org", "OK"), "key is not valid UTF-8"),
        (("a@x.org", 1.5), "value is float, not text"),
        (("a@x.org", True), "value is bool, not text"),
        (("a@x.org", " OK"), "value starts or ends with whitespace"),
        (("a@x.org", "OK "), "value starts or ends with whitespace"),
        (("a@x.org", "x" * MAX_LINE), f"longer than {MAX_LINE} bytes"),
    ],
)
def test_a_bad_row_is_refused_naming_map_row_key_and_reason(
    row: tuple[Any, Any], reason: str
) -> None:
    entries, problems = check_rows(ACCESS, [("ok@x.org", "OK"), row])
    assert entries == [("ok@x.org", "OK")]  # the good row stays: --skip-invalid publishes it
    assert len(problems) == 1
    p = problems[0]
    assert (p.table, p.row) == ("[publisher.maps.access]", 2)
    assert str(p).startswith("[publisher.maps.access] row 2 key ")
    assert reason in str(p)


def test_a_tab_may_be_in_a_value() -> None:
    entries, problems = check_rows(ACCESS, [("a@x.org", "REJECT\tno")])
    assert (entries, problems) == ([("a@x.org", "REJECT\tno")], [])


def test_the_separator_may_not_be_in_a_key_but_may_be_in_a_value() -> None:
    spec = MapConfig("lists", "q", separator=":")
    entries, problems = check_rows(spec, [("a:b", "x"), ("c", "smtp:[h]:25")])
    assert entries == [("c", "smtp:[h]:25")]
    assert [str(p) for p in problems] == [
        "[publisher.maps.lists] row 1 key 'a:b': key contains the separator ':' "
        "(it would split into another key)"
    ]


def test_duplicate_keys_name_every_row_and_none_is_published() -> None:
    entries, problems = check_rows(
        ACCESS, [("a@x.org", "OK"), ("b@x.org", "OK"), ("A@X.org", "REJECT")]
    )
    assert entries == [("b@x.org", "OK")]
    assert [str(p) for p in problems] == [
        "[publisher.maps.access] row 1 key 'a@x.org': duplicate key 'a@x.org' once "
        "lowercased: also row 3 key 'A@X.org'",
        "[publisher.maps.access] row 3 key 'A@X.org': duplicate key 'a@x.org' once "
        "lowercased: also row 1 key 'a@x.org'",
    ]
    _, same = check_rows(ACCESS, [("a@x.org", "OK"), ("a@x.org", "OK")])
    assert "duplicate key 'a@x.org': also row 2" in str(same[0])


def _manifest(entry: MapEntry) -> Manifest:
    return Manifest(
        channel="mx",
        serial=3,
        previous=2,
        created="2026-01-01T00:00:00Z",
        expires="2026-01-08T00:00:00Z",
        generator="mapsync 0.1.0",
        source={"url": "sqlite:///x.db", "schema": "mapsync", "fingerprint": "sha256:ab"},
        maps={entry.file: entry},
    )


def test_the_custom_field_is_additive_and_round_trips() -> None:
    own = MapEntry("access", 2, H1, 10, H2, CdbInfo("access.cdb", H3, 2100), custom=CustomInfo())
    data = _manifest(own).to_bytes()
    assert json.loads(data)["maps"]["access"]["custom"] == {"separator": " ", "secret": False}
    assert parse_manifest(data, "m").maps["access"] == own
    # A built-in map's entry is as before: an older manifest and a newer one read alike.
    builtin = MapEntry("recipients", 2, H1, 10, H2, None)
    raw = json.loads(_manifest(builtin).to_bytes())
    assert "custom" not in raw["maps"]["recipients"]
    assert parse_manifest(_manifest(builtin).to_bytes(), "m").maps["recipients"].custom is None


@pytest.mark.parametrize(
    ("custom", "error"),
    [
        ({"separator": "=", "secret": False}, "separator '=' is not allowed"),
        ({"separator": " "}, "missing field 'secret'"),
        ({"separator": " ", "secret": "yes"}, "field 'secret' has the wrong type"),
        ("yes", "field 'custom' has the wrong type"),
    ],
)
def test_a_bad_custom_field_is_refused(custom: Any, error: str) -> None:
    raw = json.loads(_manifest(MapEntry("access", 2, H1, 10, H2, None)).to_bytes())
    raw["maps"]["access"]["custom"] = custom
    with pytest.raises(VerificationError, match=error):
        parse_manifest(json.dumps(raw).encode(), "m")


def test_custom_maps_keep_their_file_name() -> None:
    raw = json.loads(_manifest(MapEntry("access", 2, H1, 10, H2, None)).to_bytes())
    raw["maps"]["access"]["custom"] = {"separator": " ", "secret": False}
    raw["maps"]["access"]["file"] = "recipients"
    with pytest.raises(VerificationError, match="is not the map's name"):
        parse_manifest(json.dumps(raw).encode(), "m")


_NODE = """
[agent]
state = "/var/lib/mapsync/agent"
trusted_keys = ["/etc/mapsync/signing.pub"]
[agent.channels.mx]
source = "/srv/mapsync/mx"
target = "/etc/postfix/mapsync"
maps = ["recipients", "tls_policy"]
[agent.channels.mx.files.sasl_passwords]
group = "postfix"
"""


def test_a_node_alone_accepts_the_names_of_the_publishers_own_maps(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(_NODE)
    ch = load(path).need_agent().channels["mx"]
    assert ch.maps == ("recipients", "tls_policy")
    assert set(ch.files) == {"sasl_passwords"}
    path.write_text(_NODE.replace('"tls_policy"', '"TLS policy"'))
    with pytest.raises(ConfigError, match=r"maps: 'TLS policy' is not a map name"):
        load(path)


def test_with_the_publisher_in_the_same_file_a_node_names_only_maps_it_knows(
    tmp_path: Path,
) -> None:
    publisher = """
[publisher]
database = "sqlite:///central.db"
repository = "/srv/mapsync"
signing_key = "/etc/mapsync/signing.key"
[publisher.maps.tls_policy]
query = "SELECT domain, policy FROM tls_policy"
[publisher.channels.mx]
maps = ["recipients", "tls_policy"]
"""
    path = tmp_path / "mapsync.toml"
    path.write_text(publisher + _NODE)
    with pytest.raises(ConfigError, match=r"\[agent.channels.mx.files.sasl_passwords\]: unknown"):
        load(path)
    path.write_text(publisher + _NODE.split("[agent.channels.mx.files")[0])
    cfg = load(path)
    assert cfg.need_agent().channels["mx"].maps == ("recipients", "tls_policy")
    assert cfg.need_publisher().maps["tls_policy"] == MapConfig(
        "tls_policy", "SELECT domain, policy FROM tls_policy"
    )


@pytest.mark.parametrize(
    ("name", "custom", "error"),
    [
        ("tls_policy", CustomInfo(), None),
        ("tls_policy", None, "names map 'tls_policy', which mapsync does not know"),
        ("recipients", CustomInfo(), "map 'recipients' is a built-in map, not one of"),
    ],
)
def test_a_node_takes_a_map_it_does_not_know_only_as_the_publishers_own(
    tmp_path: Path, name: str, custom: CustomInfo | None, error: str | None
) -> None:
    key = Ed25519PrivateKey.generate()
    data = _manifest(MapEntry(name, 2, H1, 10, H2, None, custom=custom)).to_bytes()
    (tmp_path / MANIFEST).write_bytes(data)
    (tmp_path / SIGNATURE).write_bytes(sign(key, data))
    ch = AgentChannel("mx", "/srv/mapsync/mx", tmp_path / "live")
    keys = {key_id(key.public_key()): key.public_key()}
    if error is None:
        assert read_signed(tmp_path, ch, keys, "r").manifest.maps[name].custom == custom
        return
    with pytest.raises(VerificationError, match=error):
        read_signed(tmp_path, ch, keys, "r")
