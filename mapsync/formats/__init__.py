"""Output formats: sorted Postfix-style text (the wire format) and cdb (built from it)."""
