VENV := .venv
PYTHON := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run manage test lint clean

$(VENV)/installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/installed-dev: $(VENV)/installed requirements-dev.txt
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Local development defaults: debug on, loopback only, no gateway keys.
# Variables set in the environment win, e.g. `GATEWAY_AUTH=required make run`.
run manage: export DJANGO_DEBUG ?= true
run manage: export GATEWAY_AUTH ?= off

run: $(VENV)/installed
	$(PYTHON) manage.py migrate --noinput
	$(PYTHON) manage.py sync_prompts
	@echo "To use the admin, create a user: make manage ARGS=createsuperuser"
	@echo "Serving on http://$(HOST):$(PORT) (HTTP and websockets)"
	$(VENV)/bin/daphne -b $(HOST) -p $(PORT) gateway_project.asgi:application

# Any management command with the same local defaults as `make run`, e.g.
# make manage ARGS="create_api_key my-app --rpm 60"
manage: $(VENV)/installed
	$(PYTHON) manage.py $(ARGS)

test: $(VENV)/installed-dev
	$(VENV)/bin/pytest

lint: $(VENV)/installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
