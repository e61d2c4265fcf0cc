"""nightshift's operations: configuration, watching, the work queue, the SQLite archive, metrics, logging, the
command line, signals and systemd notification. Calls ``service`` for all science."""
