"""docs/configuration.md documents exactly the keys mapsync/config.py accepts, with its defaults.

The accepted keys are taken from the code as it runs: every section is validated by
``Section.allow(*keys)``, so loading a config that has every section while recording those
calls yields ``{section: keys}``. A check on config.py's syntax tree makes sure every
``allow`` call site was reached, so a new section cannot slip past unrecorded. The documented
keys are the first cells of the table under each ``[section]`` heading, plus the sub-tables
that have headings of their own (``[publisher.channels.NAME]`` documents ``channels``).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mapsync import config
from mapsync.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"

# Only the required keys, and one of every section (empty tables are enough for the rest).
MINIMAL = """\
[publisher]
database = "sqlite:///central.db"
repository = "repo"
signing_key = "signing.key"

[publisher.guards.recipients]

[publisher.channels.mx]
maps = ["recipients"]

[publisher.postfixadmin.mailstores.store]
lmtp_host = "10.0.1.11"

[publisher.maps.access]
query = "SELECT address, action FROM access"

[agent]
state = "state"
trusted_keys = ["signing.pub"]

[agent.channels.mx]
source = "repo/mx"
target = "live/mx"

[agent.channels.mx.files.recipients]
"""

# A channel or map name in a section name becomes the docs' placeholder.
_PLACEHOLDERS = [
    (re.compile(r"^(publisher|agent)\.channels\.[^.]+"), r"\1.channels.NAME"),
    (re.compile(r"^publisher\.guards\.[^.]+$"), "publisher.guards.MAP"),
    (
        re.compile(r"^publisher\.postfixadmin\.mailstores\.[^.]+$"),
        "publisher.postfixadmin.mailstores.NAME",
    ),
    (re.compile(r"\.files\.[^.]+$"), ".files.MAP"),
    (re.compile(r"^publisher\.maps\.[^.]+$"), "publisher.maps.NAME"),
]


def generic(section: str) -> str:
    for pattern, repl in _PLACEHOLDERS:
        section = pattern.sub(repl, section)
    return section


@dataclass
class Recorded:
    keys: dict[str, set[str]]  # generic section name → accepted keys
    lines: set[int]  # config.py lines that called allow()


def load_recording(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[config.Config, Recorded]:
    """Load ``path`` while recording every ``Section.allow`` call."""
    recorded = Recorded({}, set())
    original = config.Section.allow

    def allow(section: config.Section, *keys: str) -> None:
        caller = sys._getframe(1)
        if caller.f_code.co_filename == config.__file__:
            recorded.lines.add(caller.f_lineno)
        recorded.keys.setdefault(generic(section.name), set()).update(keys)
        original(section, *keys)

    monkeypatch.setattr(config.Section, "allow", allow)
    return config.load(path), recorded


def allow_call_sites() -> list[tuple[str, int, int]]:
    """(function, first line, last line) of every ``<x>.allow(...)`` call in config.py."""
    tree = ast.parse(Path(config.__file__).read_text())
    sites = []
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef) and func.name != "allow":
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "allow"
                ):
                    sites.append((func.name, node.lineno, node.end_lineno or node.lineno))
    return sites


@dataclass
class Row:
    keys: list[str]
    default: str  # the default cell as written


def documented() -> dict[str, list[Row]]:
    """``{section: rows}`` from docs/configuration.md: each heading naming ``[sections]``
    owns the first table below it; one heading may name several sections."""
    sections: dict[str, list[Row]] = {}
    current: list[str] = []
    in_table = in_code = False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        if line.startswith("#"):
            current = re.findall(r"\[([a-zA-Z0-9_.]+)\]", line)
            for name in current:
                sections.setdefault(name, [])
            in_table = False
            continue
        if not current:
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            keys = re.findall(r"`([a-z_]+)`", cells[0])
            if cells[0] == "key" or set(cells[0]) <= set("-: "):
                in_table = True
                continue
            if in_table and keys:
                for name in current:
                    sections[name].append(Row(keys, cells[1]))
        elif in_table:
            current, in_table = [], False  # only the first table under a heading
    return sections


def documented_keys(docs: dict[str, list[Row]]) -> dict[str, set[str]]:
    """Table keys, plus ``guards``/``channels``/``files``: sub-tables documented by a heading."""
    keys = {name: {k for row in rows for k in row.keys} for name, rows in docs.items()}
    for name in docs:
        parts = name.split(".")
        while parts and parts[-1] in ("NAME", "MAP"):
            parts.pop()
        if len(parts) > 1:
            keys.setdefault(".".join(parts[:-1]), set()).add(parts[-1])
    return keys


@pytest.fixture
def minimal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[config.Config, Recorded]:
    path = tmp_path / "mapsync.toml"
    path.write_text(MINIMAL)
    return load_recording(path, monkeypatch)


def test_every_allow_call_in_config_py_is_exercised(
    minimal: tuple[config.Config, Recorded],
) -> None:
    _, recorded = minimal
    sites = allow_call_sites()
    assert len(sites) >= 6, sites
    missed = [
        (func, first)
        for func, first, last in sites
        if not any(first <= line <= last for line in recorded.lines)
    ]
    assert not missed, f"config.py calls allow() where this test's config does not reach: {missed}"


def test_the_docs_document_exactly_the_accepted_keys(
    minimal: tuple[config.Config, Recorded],
) -> None:
    _, recorded = minimal
    docs = documented_keys(documented())
    assert set(recorded.keys) == {
        "publisher",
        "publisher.guards",
        "publisher.guards.MAP",
        "publisher.channels.NAME",
        "publisher.postfixadmin",
        "publisher.postfixadmin.mailstores.NAME",
        "publisher.sql",
        "publisher.maps.NAME",
        "agent",
        "agent.channels.NAME",
        "agent.channels.NAME.files.MAP",
    }
    problems = []
    for section in sorted(set(recorded.keys) | set(docs)):
        accepted, written = recorded.keys.get(section), docs.get(section)
        if accepted is None:
            problems.append(f"[{section}] is documented but config.py has no such section")
        elif written is None:
            problems.append(f"[{section}] is not documented (keys: {sorted(accepted)})")
        else:
            if accepted - written:
                problems.append(f"[{section}] keys not documented: {sorted(accepted - written)}")
            if written - accepted:
                problems.append(
                    f"[{section}] documented keys config.py does not accept: {sorted(written - accepted)}"
                )
    assert not problems, "docs/configuration.md and mapsync/config.py disagree:\n" + "\n".join(
        problems
    )


def _objects(cfg: config.Config) -> dict[str, Any]:
    """The parsed object of each section in MINIMAL, where the defaults can be read."""
    p, a = cfg.need_publisher(), cfg.need_agent()
    return {
        "publisher": p,
        "publisher.guards": p.guards,
        "publisher.guards.MAP": p.map_guards["recipients"],
        "publisher.channels.NAME": p.channels["mx"],
        "publisher.postfixadmin": p.postfixadmin,
        "publisher.postfixadmin.mailstores.NAME": p.postfixadmin.mailstores["store"],
        "publisher.maps.NAME": p.maps["access"],
        "agent": a,
        "agent.channels.NAME": a.channels["mx"],
        "agent.channels.NAME.files.MAP": a.channels["mx"].files["recipients"],
    }


def _expected(literal: str, actual: Any) -> Any:
    """A documented TOML literal, read the way config.py reads the same value."""
    value = tomllib.loads(f"v = {literal}")["v"]
    if isinstance(value, list):
        return tuple(value)  # argv and map lists are tuples in the frozen dataclasses
    if isinstance(value, str) and isinstance(actual, int) and not isinstance(actual, bool):
        return config.parse_duration(value)  # "15m" → 900
    if isinstance(value, str) and isinstance(actual, float):
        return config.parse_percent(value)  # "10%" → 0.10
    return value


def defaults() -> Iterator[tuple[str, str, str]]:
    for section, rows in documented().items():
        for row in rows:
            for key in row.keys:
                yield section, key, row.default


def test_documented_defaults_are_the_defaults_of_config_py(
    minimal: tuple[config.Config, Recorded],
) -> None:
    cfg, _ = minimal
    objects = _objects(cfg)
    required = _required()
    problems, checked = [], 0
    for section, key, default in defaults():
        if section not in objects:
            continue  # reported by the keys test
        literal = re.match(r"^`([^`]+)`", default)
        if default == "required":
            if key not in required.get(section, set()):
                problems.append(
                    f"[{section}] {key}: documented as required, but config.py has a default"
                )
        elif key in required.get(section, set()):
            problems.append(
                f"[{section}] {key}: required by config.py, documented default {default!r}"
            )
        elif default == "none":
            actual = getattr(objects[section], key)
            if actual is not None:
                problems.append(f"[{section}] {key}: documented none, config.py {actual!r}")
        elif literal:
            actual = getattr(objects[section], key)
            expected = _expected(literal.group(1), actual)
            checked += 1
            if expected != actual:
                problems.append(
                    f"[{section}] {key}: documented default {literal.group(1)} "
                    f"({expected!r}), config.py {actual!r}"
                )
    assert checked >= 20, checked
    assert not problems, "documented defaults disagree with config.py:\n" + "\n".join(problems)


def _required() -> dict[str, set[str]]:
    """The keys MINIMAL sets (not its sub-tables), by generic section name."""
    required: dict[str, set[str]] = {}

    def walk(prefix: str, table: dict[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(f"{prefix}.{key}", value)
            else:
                required.setdefault(generic(prefix), set()).add(key)

    for top, table in tomllib.loads(MINIMAL).items():
        walk(top, table)
    return required


@pytest.mark.parametrize(
    "section,key", [(section, key) for section, keys in _required().items() for key in sorted(keys)]
)
def test_required_keys_are_refused_when_missing(tmp_path: Path, section: str, key: str) -> None:
    """Each key MINIMAL sets is one config.py requires (so the defaults test reads defaults)."""
    text, n = re.subn(rf"(?m)^{key} = .*\n", "", MINIMAL)
    assert n == 1
    path = tmp_path / "mapsync.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"\] {key}: missing \(required\)"):
        config.load(path)
