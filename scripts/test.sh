#!/usr/bin/env bash
# The project's test command: linters, unit and integration tests against a
# real PostgreSQL, and the Molecule scenarios on the real lab cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# shellcheck disable=SC1091
source .venv/bin/activate

echo "== yamllint"; yamllint --strict .
echo "== ansible-lint"; ansible-lint
echo "== ruff"; ruff check .
echo "== pytest"; pytest
for scenario in default rollback failover; do
  echo "== molecule test -s $scenario"
  molecule test --scenario-name "$scenario"
done
