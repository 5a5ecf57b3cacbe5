"""The publisher: snapshot → validate → render per channel → plan and guards → signed release."""
