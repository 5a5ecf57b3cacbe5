"""The command-line interface: parse, call the core, print, return an exit code."""
