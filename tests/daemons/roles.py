"""The node roles of ``agents/`` as the daemon tests use them: each role's ``agent.toml`` (its
channel, its production target) and its daemon snippet, with only the paths changed.

A role's publisher channel is read from the ``# Publisher channel: maps = [...]`` line of its
``agent.toml``, so the folder an operator copies is the one the tests run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mapsync import config
from mapsync.signing import keygen
from mapsync.sources.seed import SeedCounts, seed
from tests.conftest import Cluster

AGENTS = Path(__file__).resolve().parents[2] / "agents"
ROLES = ("postfix-mx", "exim-mx", "scanner", "dovecot-proxy", "dovecot-store", "submission")
PASSWORD = "correct horse battery staple"
# Debian's Exim, unpacked by scripts/install --test (the machine's own MTA is Postfix).
EXIM = Path(os.environ.get("MAPSYNC_TEST_EXIM", "/var/cache/mapsync-test/exim/root/usr/sbin/exim4"))
_PUBLISHER_LINE = re.compile(
    r"^# Publisher channel: maps = (\[[^\]]*\])(?:, mailstore = (\"[^\"]+\"))?"
    r"(?:, customer_field = (\"[^\"]+\"))?$",
    re.M,
)


@dataclass(frozen=True)
class Role:
    """One folder of ``agents/``: the agent's channel and what the publisher must send it."""

    name: str
    channel: str
    target: Path  # where the operator's agent.toml installs the maps
    maps: tuple[str, ...]
    mailstore: str | None
    customer_field: str | None
    files: dict[str, config.FileMode]  # the agent.toml's [files] tables, carried into the tests

    def file(self, filename: str) -> str:
        return (AGENTS / self.name / filename).read_text()

    def snippet(self, filename: str, target: Path) -> str:
        """The daemon snippet with the production target replaced by ``target``."""
        text = self.file(filename)
        assert str(self.target) in text, f"{self.name}/{filename} does not read {self.target}"
        return text.replace(str(self.target), str(target))


def role(name: str) -> Role:
    path = AGENTS / name / "agent.toml"
    agent = config.load(path).need_agent()
    ((channel, ch),) = agent.channels.items()
    m = _PUBLISHER_LINE.search(path.read_text())
    assert m, f"{path}: no '# Publisher channel: maps = [...]' line"
    return Role(
        name=name,
        channel=channel,
        target=ch.target,
        maps=tuple(json.loads(m.group(1))),
        mailstore=json.loads(m.group(2)) if m.group(2) else None,
        customer_field=json.loads(m.group(3)) if m.group(3) else None,
        files=ch.files,
    )


@dataclass
class Nodes:
    """A seeded publisher and one agent per role, sharing one config file (as the demo does)."""

    cluster: Cluster
    roles: dict[str, Role]

    def target(self, name: str) -> Path:
        return self.cluster.root / "nodes" / name

    def publish_and_pull(self) -> None:
        self.cluster.publish()
        self.cluster.pull()


def make_nodes(
    root: Path, names: tuple[str, ...], accounts: int = 300, domains: int = 25, aliases: int = 60
) -> Nodes:
    """Seed a SQLite database (every account's password is ``PASSWORD``), publish the channels
    the roles ask for, and configure one agent channel per role into ``root/nodes/<role>``."""
    root.mkdir(parents=True, exist_ok=True)
    keygen(root / "keys" / "signing.key")
    db_url = f"sqlite:///{root / 'central.db'}"
    seed(
        db_url,
        SeedCounts(accounts=accounts, domains=domains, aliases=aliases, mailstores=2),
        seed=7,
        password=PASSWORD,
    )
    roles = {n: role(n) for n in names}
    publisher = agent = ""
    for r in roles.values():
        publisher += f"[publisher.channels.{r.channel}]\nmaps = {json.dumps(list(r.maps))}\n"
        if r.mailstore:
            publisher += f"mailstore = {json.dumps(r.mailstore)}\n"
        if r.customer_field:
            publisher += f"customer_field = {json.dumps(r.customer_field)}\n"
        agent += (
            f"[agent.channels.{r.channel}]\n"
            f'source = "{root / "repo" / r.channel}"\n'
            f'target = "{root / "nodes" / r.name}"\n'
            'timeout = "30s"\n'
        )
        for map_name, fm in r.files.items():
            agent += f"[agent.channels.{r.channel}.files.{map_name}]\n"
            if fm.mode is not None:
                agent += f'mode = "{fm.mode:04o}"\n'
            for key in ("owner", "group"):
                if getattr(fm, key) is not None:
                    agent += f'{key} = "{getattr(fm, key)}"\n'

    cluster = Cluster(root, db_url)
    cluster.config_path.write_text(
        f'[publisher]\ndatabase = "{db_url}"\nrepository = "{root / "repo"}"\n'
        f'signing_key = "{root / "keys" / "signing.key"}"\n{publisher}\n'
        f'[agent]\nstate = "{root / "nodes" / "state"}"\n'
        f'trusted_keys = ["{root / "keys" / "signing.pub"}"]\n{agent}'
    )
    nodes = Nodes(cluster, roles)
    nodes.publish_and_pull()
    return nodes


def entries(path: Path, sep: str = " ") -> dict[str, str]:
    """A text map's ``key → value`` (header comments skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(sep)
            out[key] = value
    return out
