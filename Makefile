# The two commands a new user needs:
#   make serve   set up a virtualenv and run the gateway on the embedded default
#                (SQLite, SMTP on 127.0.0.1:2525, outbound mail to a Maildir under var/)
#   make test    set up and run every check: ruff, mypy --strict, pytest
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCAL := local

.PHONY: serve test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev,postgres]'
	touch $(STAMP)

serve: $(STAMP)
	@mkdir -p $(LOCAL)
	@test -f $(LOCAL)/supportgate.toml || $(BIN)/supportgate init $(LOCAL)
	@test -f $(LOCAL)/.secret || (umask 077 && $(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))' > $(LOCAL)/.secret)
	SUPPORTGATE_SECRET=$$(cat $(LOCAL)/.secret) $(BIN)/supportgate --config $(LOCAL)/supportgate.toml db upgrade
	SUPPORTGATE_SECRET=$$(cat $(LOCAL)/.secret) exec $(BIN)/supportgate --config $(LOCAL)/supportgate.toml serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict gateway parsing responders

test: lint
	$(BIN)/pytest -q -rs

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/outbound.py

clean:
	rm -rf $(VENV) $(LOCAL) .mypy_cache .pytest_cache .ruff_cache
