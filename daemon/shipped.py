"""The files shipped inside the installed package: the documented default configuration, the alert rules and
their tests, the Grafana dashboard, and the systemd units. Found from the package, so an installed wheel (not only
a checkout) can print them: ``nightshift config --print-default`` and friends."""

from __future__ import annotations

from importlib.resources import files

__all__ = ["SHIPPED", "shipped_text"]

#: What ``nightshift config`` can print: name -> (package, file name).
SHIPPED = {
    "default": ("nightshift.config", "nightshift.toml"),
    "alerts": ("nightshift.config", "alerts.yml"),
    "alerts-test": ("nightshift.config", "alerts.test.yml"),
    "dashboard": ("nightshift.config", "grafana-dashboard.json"),
    "nightshift.service": ("nightshift.systemd", "nightshift.service"),
    "nightshift@.service": ("nightshift.systemd", "nightshift@.service"),
}


def shipped_text(name: str) -> str:
    """The text of a shipped file by its name in :data:`SHIPPED`."""
    package, filename = SHIPPED[name]
    return (files(package) / filename).read_text(encoding="utf-8")
