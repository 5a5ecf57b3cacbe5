"""The agent: fetch a channel, verify it, install it atomically, report freshness."""
