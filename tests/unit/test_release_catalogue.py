"""The release contract's map catalogue (mapsync.release): plain data both halves agree on.

Loading a config needs no renderer, the renderers state exactly the catalogue's facts, and a
map of the operator's own tells a node the same facts through its manifest entry as through
the publisher's config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mapsync.config import MapConfig
from mapsync.maps import CATALOGUE
from mapsync.maps.custom import CustomMap
from mapsync.release import (
    BUILTIN_MAPS,
    SECRET_MAPS,
    CdbInfo,
    CustomInfo,
    MapEntry,
    is_secret,
    map_spec,
    separator,
)

GOOD = Path(__file__).parents[1] / "fixtures" / "config" / "good.toml"
H = "1" * 64

_LOADED = """
import json, pathlib, sys
import mapsync.config
bare = sorted(m for m in sys.modules if m.startswith("mapsync"))
mapsync.config.load(pathlib.Path(sys.argv[1]))
loaded = sorted(m for m in sys.modules if m.startswith("mapsync"))
print(json.dumps({"bare": bare, "loaded": loaded}))
"""


def test_loading_a_config_imports_no_renderer_and_no_validation() -> None:
    # `mapsync status` loads the config: it must not pull in every map renderer and validate.
    out = subprocess.run(
        [sys.executable, "-c", _LOADED, str(GOOD)], capture_output=True, text=True, check=True
    )
    modules = json.loads(out.stdout)
    for when in ("bare", "loaded"):
        assert "mapsync.config" in modules[when]
        heavy = [
            m
            for m in modules[when]
            if m == "mapsync.maps" or m.startswith("mapsync.maps.") or m == "mapsync.validate"
        ]
        assert heavy == [], when
    assert "mapsync.release.catalogue" in modules["loaded"]


def test_every_renderer_states_its_catalogue_entry() -> None:
    assert list(CATALOGUE) == list(BUILTIN_MAPS)
    for name, renderer in CATALOGUE.items():
        spec = BUILTIN_MAPS[name]
        got = (renderer.name, renderer.cdb, renderer.secrets, renderer.separator)
        assert got == (spec.name, spec.cdb, spec.secret, spec.separator), name
        assert renderer.exceptions == spec.exceptions, name


def test_the_catalogue_says_which_maps_are_text_only_secret_or_exceptions() -> None:
    passwd_files = {"dovecot_users", "dovecot_proxy", "dovecot_deny", "dovecot_submission"}
    assert {n for n, s in BUILTIN_MAPS.items() if not s.cdb} == passwd_files
    assert {n for n, s in BUILTIN_MAPS.items() if s.separator == ":"} == passwd_files
    assert {"dovecot_users", "dovecot_submission"} == SECRET_MAPS
    assert {n for n, s in BUILTIN_MAPS.items() if s.exceptions} == {"dovecot_deny"}


def _entry(name: str, config: MapConfig) -> MapEntry:
    """The manifest entry the publisher writes for map ``config`` (see Publisher._map)."""
    cdb = CdbInfo(f"{name}.cdb", H, 10) if config.cdb else None
    return MapEntry(name, 1, H, 10, H, cdb, custom=CustomInfo(config.separator, config.secret))


def test_a_map_of_your_own_gives_a_node_the_facts_of_the_publishers_config() -> None:
    for config in (
        MapConfig("access", "q"),
        MapConfig("sasl_passwords", "q", separator="\t", secret=True),
        MapConfig("otrs", "q", separator=":", cdb=False),
    ):
        entry = _entry(config.name, config)
        assert map_spec(config.name, entry) == config.spec == CustomMap(config).spec
        assert separator(config.name, entry) == config.separator
        assert is_secret(config.name, entry) == config.secret


def test_a_built_in_map_is_known_by_name_and_an_unknown_one_not_at_all() -> None:
    plain = MapEntry("dovecot_users", 1, H, 10, H)
    assert map_spec("dovecot_users", plain) == BUILTIN_MAPS["dovecot_users"]
    assert separator("dovecot_users") == ":" and separator("virtual") == " "
    assert is_secret("dovecot_users", None) and not is_secret("virtual", None)
    assert map_spec("access") is None and map_spec("access", plain) is None
    assert separator("access") == " "  # a text line of an unknown map splits at a space
