"""How a source or push URL becomes what rsync is told: IPv6 literals keep their brackets,
a malformed URL is a ConfigError naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapsync import location
from mapsync.errors import ConfigError
from mapsync.transport.rsync import parse_source


@pytest.mark.parametrize(
    ("url", "base", "port"),
    [
        ("ssh://u@[2001:db8::10]/srv/mapsync/mx", "u@[2001:db8::10]:/srv/mapsync/mx", None),
        ("ssh://u@[2001:db8::10]:2222/inbox/", "u@[2001:db8::10]:/inbox", "2222"),
        ("ssh://[fe80::1%25eth0]/p", "[fe80::1%eth0]:/p", None),
        ("ssh://u@mx1.example.net/p", "u@mx1.example.net:/p", None),
        ("ssh://u@192.0.2.1:22/p", "u@192.0.2.1:/p", "22"),
    ],
)
def test_ssh_urls_keep_an_ipv6_literal_in_brackets(url: str, base: str, port: str | None) -> None:
    endpoint = parse_source(url, ("ssh",))
    assert endpoint.base == base
    assert endpoint.ssh == (("ssh", "-p", port) if port else ("ssh",))


def test_an_rsync_url_with_an_ipv6_literal_is_passed_on_whole() -> None:
    endpoint = parse_source("rsync://[::1]:873/mapsync/mx/")
    assert endpoint.base == "rsync://[::1]:873/mapsync/mx"
    assert endpoint.daemon


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ssh://u@[::1/p", "Invalid IPv6 URL"),
        ("rsync://[::1:873/m", "Invalid IPv6 URL"),
        ("ssh://u@h:99999/p", "Port out of range"),
        ("ssh://u@h:x/p", "Port could not be cast"),
    ],
)
def test_a_malformed_url_is_a_config_error_naming_it(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match="not a valid URL") as exc:
        parse_source(url)
    assert repr(url) in str(exc.value) and why in str(exc.value)


def test_one_place_however_it_is_spelled() -> None:
    assert (
        location.parse("ssh://a@H.example:22/x").place == location.parse("ssh://h.example/x").place
    )
    assert location.parse("rsync://h/m").place == ("rsync://h:873", "m")
    assert location.parse("rsync://h:874/m").place != location.parse("rsync://h/m").place


def test_what_is_local_and_what_does_not_parse() -> None:
    assert location.parse("/srv/mapsync/mx").local == Path("/srv/mapsync/mx")
    assert location.parse("file:///srv/mapsync/mx").local == Path("/srv/mapsync/mx")
    assert location.parse("rsync://h/m").local is None
    unclosed = location.parse("rsync://u@[::1/m")
    assert (unclosed.split, unclosed.username, unclosed.place) == (False, None, (unclosed.text, ""))
    assert "Invalid IPv6 URL" in (unclosed.invalid or "")
    bad_port = location.parse("rsync://u@h:x/m")
    assert (bad_port.split, bad_port.username, bad_port.place) == (
        True,
        "u",
        ("rsync://h:None", "m"),
    )


def test_a_location_is_split_once() -> None:
    assert location.parse("ssh://u@h/p") is location.parse("ssh://u@h/p")
