#!/usr/bin/env bash
# Regenerate the initial migration from the models (only while no database has been deployed).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f gateway/migrations/versions/0001_initial_schema.py /tmp/sg-regen.db
.venv/bin/python - <<'PY'
from alembic import command
from gateway.db import _alembic_config
command.revision(_alembic_config("sqlite+aiosqlite:////tmp/sg-regen.db"), message="initial schema",
                 autogenerate=True, rev_id="0001")
PY
f=gateway/migrations/versions/0001_initial_schema.py
sed -i 's/gateway\.models\.UTCDateTime(timezone=True)/sa.DateTime(timezone=True)/g; /# ### .*Alembic/d' "$f"
.venv/bin/ruff format -q "$f"; .venv/bin/ruff check --fix --unsafe-fixes -q "$f"
rm -f /tmp/sg-regen.db
