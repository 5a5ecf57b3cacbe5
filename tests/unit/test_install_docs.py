"""docs/install.md and its Ansible example name only files the package and agents/ provide."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[2]
PLAYBOOK = ROOT / "docs" / "examples" / "ansible-node.yml"
DOC_EXAMPLES = "/usr/share/doc/mapsync/examples/"


def _render(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: variables[m.group(1)], value)


def _plays() -> list[dict[str, Any]]:
    plays = yaml.safe_load(PLAYBOOK.read_text())
    assert isinstance(plays, list) and plays, "a playbook is a list of plays"
    return plays


def test_the_ansible_playbook_parses_and_every_task_runs_one_module() -> None:
    for play in _plays():
        assert {"hosts", "tasks"} <= play.keys()
        for task in play["tasks"]:
            modules = [k for k in task if k.startswith("ansible.builtin.")]
            assert "name" in task and len(modules) == 1, task


def test_the_ansible_playbook_places_what_the_package_and_the_role_provide() -> None:
    (play,) = _plays()
    variables = {k: str(v) for k, v in play["vars"].items()}
    role = ROOT / "agents" / variables["mapsync_role"] / "agent.toml"
    agent = tomllib.loads(role.read_text())["agent"]
    # The channel and its password file are the role's own (agents/*/agent.toml).
    channel = agent["channels"][variables["mapsync_channel"]]
    placed = {}
    for task in play["tasks"]:
        (module,) = [k for k in task if k.startswith("ansible.builtin.")]
        args = {k: _render(str(v), variables) for k, v in task[module].items()}
        if module == "ansible.builtin.copy":
            placed[args["dest"]] = args
            if args.get("remote_src") == "True":
                # Shipped by scripts/build-deb: agents/ → /usr/share/doc/mapsync/examples/agents/
                assert args["src"].startswith(DOC_EXAMPLES), args
                assert (ROOT / args["src"].removeprefix(DOC_EXAMPLES)).is_file(), args
        if module == "ansible.builtin.systemd_service":
            assert (ROOT / "systemd" / args["name"]).is_file(), args
    assert placed["/etc/mapsync/mapsync.toml"]["force"] == "False"
    assert placed[channel["password_file"]]["mode"] == "0600"
    (trusted,) = agent["trusted_keys"]
    assert placed[trusted]["mode"] == "0644"


def test_install_doc_names_the_build_command_and_the_shipped_examples() -> None:
    text = (ROOT / "docs" / "install.md").read_text()
    assert "scripts/build-deb" in text and (ROOT / "scripts" / "build-deb").is_file()
    for path in re.findall(r"/usr/share/doc/mapsync/examples/(agents/[\w-]+/agent\.toml)", text):
        assert (ROOT / path).is_file(), path
    for unit in re.findall(r"(mapsync-[a-z]+\.(?:service|timer))", text):
        assert (ROOT / "systemd" / unit).is_file(), unit
