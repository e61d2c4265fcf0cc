# The two set-up commands of the README, and the helpers the service installation uses.
PYTHON ?= python3
PREFIX ?= /usr/local

.PHONY: demo test install-deps lint install-service

# The main job: install nightshift and run the daemon on a simulated night (embedded SQLite, nothing else).
demo:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e .
	nightshift demo --out demo-night

# The test suite, with everything it needs (Debian: promtool, systemd-analyze, chromium).
test: install-deps
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

install-deps:
	bash .ci/install-system-deps

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Install as a systemd service (see README, "Install as a service"). Run as root.
install-service:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check .
	id -u nightshift >/dev/null 2>&1 || useradd --system --home-dir /var/lib/nightshift --shell /usr/sbin/nologin nightshift
	install -d -m 0755 /etc/nightshift
	test -f /etc/nightshift/nightshift.toml || install -m 0644 config/nightshift.toml /etc/nightshift/nightshift.toml
	install -m 0644 systemd/nightshift.service systemd/nightshift@.service /etc/systemd/system/
	ln -sf "$$(command -v nightshift)" $(PREFIX)/bin/nightshift 2>/dev/null || true
	systemd-analyze verify /etc/systemd/system/nightshift.service
	@echo "now: edit /etc/nightshift/nightshift.toml, then: systemctl daemon-reload && systemctl enable --now nightshift"
