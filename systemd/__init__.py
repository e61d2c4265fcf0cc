"""The systemd unit files, shipped with nightshift as package data (``nightshift config --unit``)."""
