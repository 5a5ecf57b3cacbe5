"""``mapsync demo``: a publisher and an MX node on one machine, built in one directory.

Everything is real: a SQLite file seeded with sample data, an ed25519 key, a signed release
in a repository, an agent that pulls it with rsync, verifies it and swaps it in, and the
status a node's monitoring would see. Running it again on the same directory re-publishes
(nothing changed → no release) and re-pulls.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from mapsync import config
from mapsync.errors import EXIT_OK

CONFIG = """\
# Written by `mapsync demo`: a publisher and one MX node in one file.
[publisher]
database = "sqlite:///{dir}/central.db"
repository = "repo"
signing_key = "keys/signing.key"
expires = "7d"

[publisher.channels.mx]
maps = ["domains", "recipients", "virtual", "transport"]

[agent]
state = "nodes/mx/state"
trusted_keys = ["keys/signing.pub"]

[agent.channels.mx]
source = "repo/mx"
target = "nodes/mx/postfix"
warn_after = "15m"
critical_after = "2h"
"""


def run_demo(directory: Path | None) -> int:
    from mapsync.agent.pull import pull
    from mapsync.agent.status import channel_status
    from mapsync.cli.commands import print_plan
    from mapsync.publish.publisher import Publisher
    from mapsync.signing import keygen
    from mapsync.sources import open_source
    from mapsync.sources.seed import SeedCounts, seed

    d = (directory or Path(tempfile.mkdtemp(prefix="mapsync-demo-"))).resolve()
    d.mkdir(parents=True, exist_ok=True)
    cfg_path = d / "mapsync.toml"
    fresh = not cfg_path.exists()
    print(f"== mapsync demo in {d}")
    if fresh:
        cfg_path.write_text(CONFIG.format(dir=d))
        keygen(d / "keys" / "signing.key")
        print("   wrote mapsync.toml and an ed25519 key pair in keys/")
    cfg = config.load(cfg_path)
    pub = cfg.need_publisher()
    agent = cfg.need_agent()
    if fresh:
        made = seed(
            pub.database, SeedCounts(accounts=200, domains=10, aliases=60, mailstores=2), seed=1
        )
        print(
            "== central database (SQLite): seeded " + ", ".join(f"{n} {t}" for t, n in made.items())
        )

    print("== publisher: mapsync publish")
    result = Publisher(pub, lambda: open_source(pub.database, pub.schema)).run()
    print_plan(result)

    for ch in agent.channels.values():
        print(f"== node {ch.name}: mapsync pull (rsync from {ch.source})")
        r = pull(agent, ch)
        print(f"   {r.action} serial {r.serial}; live maps in {ch.target}")

    print("== mapsync status")
    for ch in agent.channels.values():
        s = channel_status(agent, ch)
        print(f"   node {ch.name}: {s.level} {s.message}")

    mx = agent.channels["mx"].target
    print("== try a lookup the way Postfix does it:")
    for key, table in (("postmaster@example-1.org", "recipients"), ("example-1.org", "transport")):
        cmd = ["postmap", "-q", key, f"cdb:{mx / table}"]
        print("   $ " + " ".join(cmd))
        if shutil.which("postmap"):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            print("   " + (out.stdout.strip() or f"(not found, exit {out.returncode})"))
    print(
        f"   (rerun with: mapsync demo --dir {d}; config for other commands: --config {cfg_path})"
    )
    return EXIT_OK
