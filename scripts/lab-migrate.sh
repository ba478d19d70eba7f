#!/usr/bin/env bash
# The main job on the bundled lab: install, bring up the three-member
# Patroni cluster with etcd and PgBouncer on loopback, write the sample
# FileShareSystem database, and run the migration runbook against them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate

ansible-playbook playbooks/lab.yml
[[ -f fileshare.db ]] || python scripts/make_sample_db.py --out fileshare.db
ansible-playbook migrate.yml "$@"
