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
# Two test files at a time, each whole on one worker (a file's lab and fixtures
# are its own, on ports of its own): most of a lab test's time is one
# ansible-playbook process, which keeps one core busy: two at a time took 2,246 s
# here against 3,720 s one at a time.
echo "== pytest"; pytest --numprocesses 2 --dist loadfile
for scenario in default rollback failover; do
  echo "== molecule test -s $scenario"
  molecule test --scenario-name "$scenario"
done
