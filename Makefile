# The two set-up commands of the README, and the helpers the service installation uses.
#
# Both commands run from a project virtual environment, `.venv/` (made on first use from $(PYTHON)), so they work
# on a stock system Python that refuses `pip install` (PEP 668: Debian 12, Ubuntu 23.04+, Fedora, Arch). Inside
# an active virtualenv (VIRTUAL_ENV set), that one is used instead. `make demo PYTHON=python3.12` picks the Python.
PYTHON ?= python3
PREFIX ?= /usr/local
VENV ?= .venv

ifneq ($(strip $(VIRTUAL_ENV)),)
BIN := $(VIRTUAL_ENV)/bin
else
BIN := $(VENV)/bin
endif
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test venv install-deps lint install-service

# The main job: install nightshift and run the daemon on a simulated night (embedded SQLite, nothing else).
demo: venv
	$(PIP) -e .
	$(BIN)/nightshift demo --out demo-night

# The test suite, with everything it needs (Debian: promtool, systemd-analyze, chromium).
test: venv install-deps
	$(PIP) -e '.[test]'
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

# The project's virtual environment. Debian and Ubuntu ship venv's pip bootstrap separately (python3-venv):
# as root it is installed, otherwise the message says what to install.
venv: $(BIN)/python

$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "$(PYTHON) -m venv needs Debian's python3-venv: installing it"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
	      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }; \
	    $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "nightshift: '$(PYTHON) -m venv' failed. On Debian/Ubuntu: sudo apt install python3-venv; then run make again." >&2; \
	    exit 1; \
	  fi; }
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip

install-deps:
	bash .ci/install-system-deps

lint: venv
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

# Install as a systemd service (see README, "Install as a service"). Run as root. nightshift goes into its own
# virtual environment, /opt/nightshift/venv, linked as $(PREFIX)/bin/nightshift (the path the units start).
install-service:
	$(PYTHON) -m venv /opt/nightshift/venv
	/opt/nightshift/venv/bin/python -m pip install --quiet --disable-pip-version-check .
	ln -sf /opt/nightshift/venv/bin/nightshift $(PREFIX)/bin/nightshift
	id -u nightshift >/dev/null 2>&1 || useradd --system --home-dir /var/lib/nightshift --shell /usr/sbin/nologin nightshift
	install -d -m 0755 /etc/nightshift
	test -f /etc/nightshift/nightshift.toml || $(PREFIX)/bin/nightshift config --print-default > /etc/nightshift/nightshift.toml
	$(PREFIX)/bin/nightshift config --unit nightshift.service > /etc/systemd/system/nightshift.service
	$(PREFIX)/bin/nightshift config --unit nightshift@.service > /etc/systemd/system/nightshift@.service
	systemd-analyze verify /etc/systemd/system/nightshift.service
	@echo "now: edit /etc/nightshift/nightshift.toml, then: systemctl daemon-reload && systemctl enable --now nightshift"
