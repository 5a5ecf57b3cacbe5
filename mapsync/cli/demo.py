"""``mapsync demo``: a whole mail cluster on one machine, built in one directory.

Everything is real: a SQLite file seeded with sample data, an ed25519 key, signed releases
in a repository, and one agent per node role (Postfix MX, Exim MX, scanner, IMAP proxy, two
mailstores, submission relay) that pulls its channel with rsync, verifies it and swaps it in, and the status
each node's monitoring would see. Running it again on the same directory re-publishes
(nothing changed → no release) and re-pulls.

Layout: ``DIR/mapsync.toml`` holds the publisher and the ``mx`` node's agent (one file with
both parts, as DESIGN.md describes); every other node's agent config is
``DIR/nodes/<node>/mapsync.toml``; each node's state and live maps are under ``DIR/nodes/<node>/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import structlog

from mapsync import config, log
from mapsync.cli.output import print_plan
from mapsync.errors import EXIT_OK, ConfigError

PASSWORD = "demo-password"

PUBLISHER = """\
# Written by `mapsync demo`: the publisher, and the Postfix MX node's agent.
[publisher]
database = {database}
repository = "repo"
signing_key = "keys/signing.key"
expires = "7d"
{schema}
[publisher.channels.mx]
maps = ["domains", "recipients", "virtual", "transport", "senders"]

[publisher.channels.exim]
maps = ["domains", "recipients", "virtual", "exim_routes"]

[publisher.channels.scanner]
maps = ["domains", "transport"]

[publisher.channels.imap]
maps = ["dovecot_proxy", "dovecot_deny"]

[publisher.channels.store-1]
maps = ["dovecot_users", "dovecot_deny"]
mailstore = "store-1"
customer_field = "customer_id"

[publisher.channels.store-2]
maps = ["dovecot_users", "dovecot_deny"]
mailstore = "store-2"
customer_field = "customer_id"

[publisher.channels.submission]
maps = ["dovecot_submission", "senders"]

{agent}"""

# With --schema postfixadmin: PostfixAdmin's tables, and what PostfixAdmin does not know.
POSTFIXADMIN = """\
schema = "postfixadmin"

[publisher.postfixadmin]
mail_base = "/var/vmail"
vacation_domain = "{vacation}"
vacation_nexthop = "[10.0.1.20]:25"

[publisher.postfixadmin.mailstores.store-1]
lmtp_host = "10.0.1.11"

[publisher.postfixadmin.mailstores.store-2]
lmtp_host = "10.0.1.12"
domains = ["example-2.org", "example-4.org"]
"""

AGENT = """\
[agent]
state = {state}
trusted_keys = [{key}]

[agent.channels.{channel}]
source = {source}
target = {target}
warn_after = "15m"
critical_after = "2h"
"""

# node name → (channel, directory its daemon reads)
NODES = {
    "mx": ("mx", "postfix"),
    "exim-mx": ("exim", "exim4"),
    "scanner": ("scanner", "postfix"),
    "imap-proxy": ("imap", "dovecot"),
    "store-1": ("store-1", "dovecot"),
    "store-2": ("store-2", "dovecot"),
    "submission": ("submission", "postfix"),
}


def _q(value: object) -> str:
    """A TOML string: JSON's escapes are TOML's, so a directory named ``a"b`` stays one value."""
    return json.dumps(str(value))


def _agent_block(d: Path, node: str) -> str:
    channel, daemon = NODES[node]
    home = d / "nodes" / node
    return AGENT.format(
        channel=channel,
        state=_q(home / "state"),
        key=_q(d / "keys" / "signing.pub"),
        source=_q(d / "repo" / channel),
        target=_q(home / daemon),
    )


def node_config(d: Path, node: str) -> Path:
    """Where the demo writes ``node``'s config: the ``mx`` node shares the publisher's file."""
    return d / "mapsync.toml" if node == "mx" else d / "nodes" / node / "mapsync.toml"


def _quiet_info_logs() -> None:
    """The demo prints its own report of each step; the same steps' INFO log lines on stderr
    would interleave with it. Warnings and errors still show, and ``-v`` shows everything."""
    log.ensure()  # the level main() asked for, applied before it is read here
    if structlog.get_config()["wrapper_class"] is structlog.make_filtering_bound_logger(
        logging.INFO
    ):
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def run_demo(directory: Path | None, schema: str = "mapsync") -> int:
    """Build (or, on an existing ``directory``, re-run) the demo; ``schema`` "postfixadmin"
    starts from a PostfixAdmin-shaped database instead of mapsync's own."""
    from mapsync.agent.pull import pull
    from mapsync.agent.status import channel_status
    from mapsync.publish.publisher import Publisher
    from mapsync.signing import keygen
    from mapsync.sources import open_source
    from mapsync.sources.postfixadmin_seed import VACATION_DOMAIN, seed_postfixadmin
    from mapsync.sources.seed import SeedCounts, seed

    d = (directory or Path(tempfile.mkdtemp(prefix="mapsync-demo-"))).resolve()
    shown = config.non_utf8(d)
    if shown is not None:
        raise ConfigError(
            f"demo --dir {shown}: not valid UTF-8; the demo writes this path into its configs "
            "and hands it to rsync (choose a directory whose name is UTF-8)"
        )
    _quiet_info_logs()
    d.mkdir(parents=True, exist_ok=True)
    cfg_path = node_config(d, "mx")
    fresh = not (d / "central.db").exists()
    print(f"== mapsync demo in {d}")
    if fresh:
        database = _q(f"sqlite:///{d / 'central.db'}")
        extra = POSTFIXADMIN.format(vacation=VACATION_DOMAIN) if schema == "postfixadmin" else ""
        cfg_path.write_text(
            PUBLISHER.format(database=database, schema=extra, agent=_agent_block(d, "mx"))
        )
        for node in NODES:
            if node != "mx":
                node_config(d, node).parent.mkdir(parents=True, exist_ok=True)
                node_config(d, node).write_text(_agent_block(d, node))
        if not (d / "keys" / "signing.key").exists():
            keygen(d / "keys" / "signing.key")
        print(
            "   wrote mapsync.toml (the publisher and node mx's agent), "
            "nodes/<node>/mapsync.toml (the other nodes' agents), keys/"
        )
    cfg = config.load(cfg_path)
    pub = cfg.need_publisher()
    if fresh and pub.schema == "postfixadmin":
        made = seed_postfixadmin(pub.database, PASSWORD)
        print(
            "== PostfixAdmin database (SQLite), as PostfixAdmin fills it: "
            + ", ".join(f"{n} {t}" for t, n in made.items())
        )
    elif fresh:
        made = seed(
            pub.database,
            SeedCounts(accounts=200, domains=10, aliases=60, mailstores=2),
            seed=1,
            password=PASSWORD,
        )
        print(
            "== central database (SQLite): seeded " + ", ".join(f"{n} {t}" for t, n in made.items())
        )

    print("== publisher: mapsync publish")
    result = Publisher(
        pub,
        lambda: open_source(pub.database, pub.schema, postfixadmin=pub.postfixadmin, sql=pub.sql),
    ).run()
    print_plan(result)

    node_cfgs = {"mx": cfg.need_agent()}
    for node in NODES:
        if node != "mx":
            node_cfgs[node] = config.load(node_config(d, node)).need_agent()
    width = max(len(name) for agent in node_cfgs.values() for name in agent.channels)
    for node, agent in node_cfgs.items():
        for ch in agent.channels.values():
            r = pull(agent, ch)
            print(
                f"== node {node:<10} pull {ch.name:<{width}} {r.action} serial {r.serial}"
                f" → {ch.target}"
            )

    print("== mapsync status, per node")
    for node, agent in node_cfgs.items():
        for ch in agent.channels.values():
            s = channel_status(agent, ch)
            print(f"   {node:<10} {ch.name:<{width}} {s.level} {s.message}")

    mx = node_cfgs["mx"].channels["mx"].target
    print("== try lookups the way the daemons do them:")
    for key, table in (("postmaster@example-1.org", "recipients"), ("example-1.org", "transport")):
        cmd = ["postmap", "-q", key, f"cdb:{mx / table}"]
        print("   $ " + " ".join(cmd))
        if shutil.which("postmap"):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            print("   " + (out.stdout.strip() or f"(not found, exit {out.returncode})"))
    store = node_cfgs["store-1"].channels["store-1"].target / "dovecot_users"
    proxy = node_cfgs["imap-proxy"].channels["imap"].target / "dovecot_proxy"
    print(f"   Dovecot on store-1 reads passwd-file {store} (every account's password: {PASSWORD})")
    print(f"   the IMAP proxy reads {proxy}: no password hashes there")
    deny = store.parent / "dovecot_deny"
    denied = [line for line in deny.read_text().splitlines() if not line.startswith("#")]
    print(
        f"   both refuse the services an account may not use, from {deny.name} "
        f"({len(denied)} lines on store-1{', e.g. ' + denied[0] if denied else ''})"
    )
    relay = node_cfgs["submission"].channels["submission"].target
    print(
        f"   the submission relay's Dovecot SASL reads {relay / 'dovecot_submission'} "
        f"(accounts that may send), Postfix {relay / 'senders'}"
    )
    print("== configs (try e.g. mapsync --config FILE status):")
    print(f"   publisher and node mx: {cfg_path}")
    for node in NODES:
        if node != "mx":
            print(f"   node {node}: {node_config(d, node)}")
    print(f"   (rerun with: mapsync demo --dir {d})")
    return EXIT_OK
