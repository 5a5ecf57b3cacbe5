"""Write mapsync(1) from the CLI's own argparse help, so the man page cannot drift from it.

Run with the interpreter that has mapsync installed:
    python packaging/deb/manpage.py VERSION DATE > mapsync.1
Every section is argparse's own text (the top-level help, then each command's), set verbatim
in roff; nothing is written here by hand but the section headings.
"""

from __future__ import annotations

import argparse
import os
import sys

from mapsync.cli.main import build_parser

# argparse wraps at the terminal width (read when formatting): the same page on every build.
os.environ["COLUMNS"] = "80"


def _roff(text: str) -> str:
    """Verbatim text for a .nf block: backslashes escaped, no line read as a request."""
    out = []
    for line in text.rstrip("\n").splitlines():
        line = line.replace("\\", "\\e")
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def _block(text: str) -> str:
    return ".nf\n" + _roff(text) + "\n.fi\n"


def manpage(version: str, date: str) -> str:
    """The whole page, from the parser ``mapsync`` itself uses."""
    parser = build_parser()
    commands: dict[str, argparse.ArgumentParser] = {}
    summaries: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands = dict(action.choices)
            summaries = {a.dest: a.help or "" for a in action._choices_actions}
    page = [
        f'.TH MAPSYNC 1 "{date}" "mapsync {version}" "User Commands"\n',
        ".SH NAME\n",
        f"mapsync \\- {_roff(parser.description or '')}\n",
        ".SH SYNOPSIS\n",
        _block(parser.format_usage().removeprefix("usage: ")),
        ".SH DESCRIPTION\n",
        "This page is generated from \\fBmapsync \\-\\-help\\fR and the help of each command.\n",
        _block(parser.format_help()),
        ".SH COMMANDS\n",
    ]
    for name, sub in commands.items():
        page.append(f".SS {name}\n")
        if summaries.get(name):
            page.append(_roff(summaries[name]) + "\n")
        page.append(_block(sub.format_help()))
    page += [
        ".SH FILES\n",
        ".TP\n/etc/mapsync/mapsync.toml\nthe configuration file read by default\n",
        ".TP\n/var/lib/mapsync\nthe agent's state and push inboxes\n",
        ".SH SEE ALSO\n",
        "/usr/share/doc/mapsync/operator-guide.md, /usr/share/doc/mapsync/install.md\n",
    ]
    return "".join(page)


if __name__ == "__main__":
    sys.stdout.write(manpage(sys.argv[1], sys.argv[2]))
