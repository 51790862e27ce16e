"""blockrep: COLO-style block replication in Python."""

__version__ = "0.1.0"
