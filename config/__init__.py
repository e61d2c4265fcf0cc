"""The default configuration, the Grafana dashboard and the alert rules, shipped with nightshift as package data
(``nightshift config --print-default`` and friends read them from here)."""
