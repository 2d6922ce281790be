"""Robustness suites: malformed inputs, hostile metadata, kills and concurrent writers."""
