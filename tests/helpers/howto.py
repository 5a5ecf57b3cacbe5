"""docs/howto.md, run: its SQL tasks (```sql blocks starting ``-- task: NAME``) against a
database `mapsync init-db` and `seed` made, each followed by a publish, and what each one
changed in which maps (``mapsync diff --keys`` of every channel that got a new release) set
against the page's ``# after "NAME"`` blocks."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
from pathlib import Path

import structlog
from sqlalchemy import create_engine

from mapsync.cli.main import main
from mapsync.signing import keygen

ROOT = Path(__file__).resolve().parents[2]
HOWTO = ROOT / "docs" / "howto.md"
CHANNELS = {  # as docs/howto.md describes the publisher
    "mx": '["domains", "recipients", "virtual", "transport", "senders"]',
    "store-1": '["dovecot_users"]',
    "store-2": '["dovecot_users"]',
    "imap-proxy": '["dovecot_proxy"]',
}
SEED = ["--accounts", "12", "--domains", "2", "--aliases", "4", "--mailstores", "2"]

_BLOCK = re.compile(r"^```([a-z]*)\n(.*?)^```", re.S | re.M)


def tasks(path: Path = HOWTO) -> list[tuple[str, str]]:
    """(name, SQL) of every task, in page order."""
    out = []
    for m in _BLOCK.finditer(path.read_text()):
        first, _, rest = m.group(2).partition("\n")
        if m.group(1) == "sql" and first.startswith("-- task: "):
            out.append((first.removeprefix("-- task: ").strip(), rest))
    return out


def changes(path: Path = HOWTO) -> dict[str, str]:
    """What the page says each task changes, by task name."""
    out = {}
    for m in _BLOCK.finditer(path.read_text()):
        first, _, rest = m.group(2).partition("\n")
        found = re.fullmatch(r'# after "(.+)"', first.strip())
        if found:
            out[found.group(1)] = rest
    return out


def statements(sql: str) -> list[str]:
    """The statements of a block: split at a ';' that ends a line; '--' comment lines dropped."""
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*$", body, flags=re.M) if s.strip()]


def run_sql(url: str, sql: str) -> None:
    """Run a task's statements in one transaction, as a panel would (DB-API, no parameters)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements(sql):
                conn.exec_driver_sql(statement.replace("%", "%%") if "mysql" in url else statement)
    finally:
        engine.dispose()


class Publisher:
    """A publisher of mapsync's own schema at ``url``, with the page's channels."""

    def __init__(self, root: Path, url: str, full_check: str = "0s") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        keygen(root / "signing.key")
        channels = "".join(
            f"\n[publisher.channels.{name}]\nmaps = {maps}\n"
            + (f'mailstore = "{name}"\n' if name.startswith("store-") else "")
            for name, maps in CHANNELS.items()
        )
        self.config = root / "mapsync.toml"
        self.config.write_text(
            f'[publisher]\ndatabase = "{url}"\nrepository = "{root / "repo"}"\n'
            f'signing_key = "{root / "signing.key"}"\nfull_check = "{full_check}"\n{channels}'
        )

    def cli(self, *args: str) -> str:
        """``mapsync ARGS`` in this process (a dozen runs per test: no interpreter start each)."""
        out = io.StringIO()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            with contextlib.redirect_stdout(out):
                code = main(["-q", "--config", str(self.config), *args])
        finally:  # main() set these for a process of its own: give them back
            structlog.reset_defaults()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        assert code == 0, f"mapsync {' '.join(args)} exited {code}: {out.getvalue()}"
        return out.getvalue()

    def serials(self) -> dict[str, int]:
        out = {}
        for name in CHANNELS:
            latest = self.root / "repo" / name / "LATEST"
            out[name] = int(json.loads(latest.read_text())["serial"])
        return out

    def publish_and_diff(self) -> str:
        """Publish; for each channel that got a new release, ``channel NAME:`` and its
        ``diff --keys`` lines of the maps that changed."""
        before = self.serials()
        self.cli("publish")
        after = self.serials()
        out = []
        for name in CHANNELS:
            if after[name] == before[name]:
                continue
            diff = self.cli(
                "diff", "--keys", "--channel", name, str(before[name]), str(after[name])
            )
            kept = []
            skipping = False
            for line in diff.splitlines():
                if not line.startswith(" "):
                    skipping = line.endswith(": +0 -0 ~0")
                if not skipping:
                    kept.append(line)
            out += [f"channel {name}:", *kept]
        return "\n".join(out) + "\n"
