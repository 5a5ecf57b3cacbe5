# mapsync for hosts without systemd (with systemd, enable mapsync-pull.timer or
# mapsync-publish.timer instead). Uncomment the line of this host's role.
#
# Node (agent, as root: it writes the mail daemons' maps and runs their reload):
# * * * * *  root     /usr/bin/mapsync --config /etc/mapsync/mapsync.toml --log-format json pull
#
# Publisher (as the mapsync user, writing only the repository):
# * * * * *  mapsync  /usr/bin/mapsync --config /etc/mapsync/mapsync.toml --log-format json publish
#
# Node metrics for node_exporter's textfile collector (any exit code: the file is written):
# * * * * *  root     /usr/bin/mapsync --config /etc/mapsync/mapsync.toml status --prometheus /var/lib/prometheus/node-exporter/mapsync.prom >/dev/null
