"""mhc-daemon: captures a Chaturbate broadcaster's room into PostgreSQL, exactly once."""

__version__ = "0.1.0"
