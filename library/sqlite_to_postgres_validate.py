#!/usr/bin/python
"""Ansible module: prove that PostgreSQL holds what the SQLite source holds."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.sqlite_pg.errors import MigrationError, internal_fault
from ansible.module_utils.sqlite_pg.validate import validate
from ansible_collections.community.postgresql.plugins.module_utils.postgres import (
    ensure_required_libs,
    get_conn_params,
    postgres_common_argument_spec,
)

APPLICATION_NAME = "sqlite_to_postgres_validate"

DOCUMENTATION = r"""
---
module: sqlite_to_postgres_validate
short_description: Validate a SQLite to PostgreSQL migration, table by table and row by row
description:
  - Compares every table of a SQLite file with the same table in PostgreSQL
    after a migration by the C(sqlite_to_postgres) module, and fails when
    anything differs.
  - Row counts, and a content checksum per table computed inside each
    database over normalised values (booleans, timestamps, JSON, UUIDs,
    floats, bytes compared as PostgreSQL's column types see them, the source
    values converted by the migration's own rules). Key ranges of every table
    are hashed in parallel on both sides.
  - When a table's checksums differ, the first differing primary keys are
    named, with the columns that differ and both values, shortened.
  - Every foreign key constraint of the compared tables must be validated; a
    foreign key the SQLite schema declares but PostgreSQL lacks is checked
    for orphan rows by query.
  - Every identity or serial column's sequence must give a next value past
    the column's largest value.
  - Runs the given O(queries) in a READ ONLY transaction and returns their rows.
  - Last, waits until at least O(expected_standbys) standbys are connected to
    the leader and every standby has replayed the leader's current WAL
    position (or O(lsn)), and returns each standby's lag in bytes.
  - Only reads. It runs fully in check mode and never reports C(changed).
  - The whole PostgreSQL side reads one snapshot, exported by the main
    connection; connect to the leader directly, not through a PgBouncer in
    transaction pooling mode.
options:
  src:
    description: The SQLite database file, normally the copy the migration read.
    type: path
    required: true
  login_db:
    description: Database the tables were migrated to.
    type: str
    required: true
    aliases: [db]
  schema:
    description: Schema that holds the migrated tables.
    type: str
    default: public
  tables:
    description: Tables to compare, by their SQLite names. Default is every table of O(src).
    type: list
    elements: str
  source_timezone:
    description:
      - Time zone of the naive timestamps of the source, as given to the migration.
    type: str
    default: UTC
  jobs:
    description:
      - Processes hashing the SQLite side, and connections hashing the PostgreSQL side, at the same time.
    type: int
    default: 2
  queries:
    description:
      - Read-only queries to run and return, as name to SQL text. Each runs in
        a READ ONLY transaction; a query that fails fails the validation.
    type: dict
    default: {}
  expected_standbys:
    description:
      - Number of streaming standbys that must be connected to the leader and
        caught up. V(0) (a single PostgreSQL server) skips the wait.
    type: int
    default: 0
  standby_timeout:
    description: Seconds to wait for the standbys to replay O(lsn).
    type: float
    default: 300
  lsn:
    description:
      - WAL position every standby must have replayed, for example the
        migration's last commit. Default is the leader's current position
        when validation ends.
    type: str
  max_differences:
    description: Differing rows to locate and report per table.
    type: int
    default: 10
  drift:
    description:
      - A validate-only run against the live source, for the nights before
        the cutover and the weeks after. Tables whose content differs give
        C(status=drift) and the task does not fail; anything else that is
        wrong (a table that cannot be compared, foreign keys, sequences,
        queries, standbys) still fails it.
    type: bool
    default: false
  reject_file:
    description:
      - The reject file of a migration run with C(on_invalid=reject). The
        source rows it names were left out on purpose; validation leaves them
        out of the SQLite side too and reports how many per table.
    type: path
  source_id:
    description:
      - The sha256 of O(src) (the migration's C(source_id)). Recorded in the
        result's C(baseline), so that a later validation can start from this
        one.
    type: str
  baseline:
    description:
      - The C(baseline) of an earlier validation that completed, with
        O(changed_keys). Tables whose changes since it are known are compared
        only on the changed keys and on the rows written to the target since
        (found by their row versions); their counts are compared in full, and
        unequal counts compare every row. The cutover validates in full while
        the application still runs and passes that result here, so the
        validation in the maintenance window reads what changed.
    type: dict
  changed_keys:
    description:
      - The migration's C(tables) result, whose entries' C(changed_keys)
        (C({since, keys})) name the source keys that may have changed since
        the snapshot C(since); only tables whose C(since) is the baseline's
        C(source_id) are narrowed. Without O(baseline) it is not used.
    type: dict
  progress_file:
    description:
      - While the task runs, this file is replaced about once a second with JSON progress, with C(updated_at);
        C(phase), the step (C(reading the catalog), C(hashing the tables), C(locating differences),
        C(checking foreign keys), C(checking sequences), C(running the queries), C(waiting for the standbys),
        C(done)); C(tables) with C(rows_done), C(rows_total) and C(status) (C(pending), C(hashing),
        C(completed)) per table; and overall C(rows_done), C(rows_total), C(rows_per_second) and
        C(eta_seconds) of the hashing. Not written in check mode.
      - A table's C(rows_done) are its rows hashed on the side that is behind (SQLite or PostgreSQL).
    type: path
attributes:
  check_mode:
    support: full
extends_documentation_fragment:
  - community.postgresql.postgres
notes:
  - The checksums and their canonical forms are described in docs/validation.md.
  - A server that falls silent (its host dies or leaves the network) fails the run within minutes (keepalive probes
    after 10 quiet seconds, 60 s for data it has not acknowledged, 10 s to connect); O(connect_params) overrides
    these (C(keepalives_idle), C(tcp_user_timeout), C(connect_timeout), ...). The server ends the sessions of a
    run whose host vanished by the same limits.
requirements:
  - psycopg2
author:
  - FileShareSystem operations
"""

EXAMPLES = r"""
- name: Validate the migrated FileShareSystem tables
  sqlite_to_postgres_validate:
    src: /var/backups/fileshare/fileshare.db
    login_host: 10.0.0.11
    login_port: 5432
    login_user: postgres
    login_password: "{{ vault_pg_login_password }}"
    login_db: fileshare
    jobs: 2
    queries:
      files_per_node: >-
        SELECT primary_node, COUNT(*) FROM files WHERE is_deleted = FALSE GROUP BY primary_node
      replication_logs_per_status: >-
        SELECT status, COUNT(*) FROM replication_logs GROUP BY status
    expected_standbys: 2
    standby_timeout: 300
  register: validation

- name: Show the placement of live files
  ansible.builtin.debug:
    var: validation.queries.files_per_node

- name: Validate in the background; poll the job and read the progress file while it runs
  sqlite_to_postgres_validate:
    src: /var/backups/fileshare/fileshare.db
    login_db: fileshare
    progress_file: /var/tmp/validation-progress.json
  async: 21600
  poll: 0
  register: validation_job
"""

RETURN = r"""
status:
  description:
    - V(completed) when everything matched; V(drift) when O(drift) is set and
      only table contents differ; else V(failed) (and the task fails).
  returned: when validation ran
  type: str
  sample: completed
msg:
  description: One line; on failure it names the tables, keys, constraints or standbys at fault.
  returned: always
  type: str
  sample: >-
    validation failed: table files: content checksums differ;
    id 7 values differ (filename: SQLite 'a.pdf', PostgreSQL 'b.pdf')
tables:
  description: Per table (SQLite name) the comparison.
  returned: when validation ran
  type: dict
  sample:
    files:
      sqlite_rows: 50
      postgres_rows: 50
      sqlite_checksum: 0000162d098fcf61d4581
      postgres_checksum: 0000162d098fcf61d4581
      match: true
      key: id
      seconds: 0.09
      differences: []
  contains:
    sqlite_rows:
      description: Rows in the SQLite table (rows named in O(reject_file) left out).
      type: int
    postgres_rows:
      description: Rows in the PostgreSQL table.
      type: int
    sqlite_checksum:
      description: Sum of the 60-bit row hashes of the SQLite side, in hex.
      type: str
    postgres_checksum:
      description: The same, computed by PostgreSQL.
      type: str
    match:
      description: Whether rows and checksums are equal.
      type: bool
    key:
      description: The integer primary key differences are located by, or null.
      type: str
    rejected_rows:
      description: Source rows left out because O(reject_file) names them.
      type: int
    seconds:
      description: Seconds from the start of validation until this table was compared.
      type: float
    problem:
      description: Only for a table that could not be compared (missing in PostgreSQL, a column missing, a
        column type validation cannot compare) - why.
      type: str
    differences:
      description:
        - The first differing rows (up to O(max_differences)), in key order,
          each with C(key), C(problem) (V(missing in PostgreSQL), V(not in SQLite)
          or V(values differ)) and, for the latter, C(columns) mapping each
          differing column to its C(sqlite) and C(postgres) values, shortened.
      type: list
      elements: dict
    differing_ranges:
      description: Inclusive key ranges [low, high] whose range checksums differ, adjacent ones merged.
      type: list
      elements: list
drift:
  description:
    - Per table (SQLite name) what a scheduler reads, C(status) (V(ok),
      V(drift) or V(not compared)), C(source_rows), C(target_rows),
      C(differing_ranges) (inclusive key ranges [low, high] whose range
      checksums differ, at most 100), C(differing_range_count),
      C(first_differing_keys) (each C(key) as {key column - value},
      C(problem), C(columns)) and C(problem).
  returned: when validation ran
  type: dict
  sample:
    files:
      status: drift
      source_rows: 51
      target_rows: 50
      differing_ranges: [[1, 1], [51, 51]]
      differing_range_count: 2
      first_differing_keys:
        - {key: {id: 1}, problem: values differ, columns: [filename]}
        - {key: {id: 51}, problem: missing in PostgreSQL, columns: []}
      problem: null
foreign_keys:
  description:
    - Per foreign key C(constraint) (null for one only SQLite declares),
      C(table), C(columns), C(references), C(validated), C(orphans) (null when
      the validated constraint makes them impossible), C(orphan_rows), C(ok)
      and C(problem).
  returned: when validation ran
  type: list
  elements: dict
sequences:
  description:
    - Per identity or serial column C(table), C(column), C(sequence),
      C(next_value), C(max_value), C(ok) and C(problem).
  returned: when validation ran
  type: list
  elements: dict
queries:
  description: Per name of O(queries) the rows it returned, as a list of dicts.
  returned: when validation ran
  type: dict
  sample:
    replication_logs_per_status: [{status: completed, count: 20}, {status: failed, count: 4}]
replication:
  description:
    - C(lsn) waited for, C(expected_standbys), C(standbys) (each with C(name),
      C(client_addr), C(state), C(replay_lsn), C(caught_up), C(lag_bytes)),
      C(seconds) waited, C(ok), C(message).
  returned: when validation ran
  type: dict
baseline:
  description:
    - C(source_id) and C(snapshot) (the server snapshot it read, as
      pg_current_snapshot() text) of a validation that completed with
      O(source_id) given; null otherwise. Pass it as O(baseline) to a later
      validation.
  returned: when validation ran
  type: dict
  sample: {source_id: 5f0c...e1, snapshot: "7421:7421:"}
seconds:
  description: Seconds the whole validation took.
  returned: when validation ran
  type: float
"""


def main():
    argument_spec = postgres_common_argument_spec()
    argument_spec.update(
        src=dict(type="path", required=True),
        login_db=dict(type="str", required=True, aliases=["db"]),
        schema=dict(type="str", default="public"),
        tables=dict(type="list", elements="str"),
        source_timezone=dict(type="str", default="UTC"),
        jobs=dict(type="int", default=2),
        queries=dict(type="dict", default={}),
        expected_standbys=dict(type="int", default=0),
        standby_timeout=dict(type="float", default=300),
        lsn=dict(type="str"),
        max_differences=dict(type="int", default=10),
        reject_file=dict(type="path"),
        drift=dict(type="bool", default=False),
        source_id=dict(type="str"),
        baseline=dict(type="dict"),
        changed_keys=dict(type="dict"),
        progress_file=dict(type="path"),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    params = module.params
    for name in ("jobs", "max_differences"):
        if params[name] < 1:
            module.fail_json(msg=f"{name} must be at least 1, got {params[name]}", changed=False)
    if params["expected_standbys"] < 0 or params["standby_timeout"] < 0:
        module.fail_json(msg="expected_standbys and standby_timeout cannot be negative", changed=False)

    ensure_required_libs(module)
    conninfo = get_conn_params(module, params, warn_db_default=False)
    conninfo.setdefault("application_name", APPLICATION_NAME)
    try:
        result = validate(
            params["src"], conninfo, schema=params["schema"], tables=params["tables"],
            source_timezone=params["source_timezone"], jobs=params["jobs"], queries=params["queries"],
            expected_standbys=params["expected_standbys"], standby_timeout=params["standby_timeout"],
            max_differences=params["max_differences"], lsn=params["lsn"], reject_file=params["reject_file"],
            drift=params["drift"], baseline=params["baseline"], changed_keys=params["changed_keys"],
            source_id=params["source_id"],
            progress_file=None if module.check_mode else params["progress_file"],
        )
    except MigrationError as error:
        module.fail_json(msg=_scrub(str(error), params), changed=False, status="failed")
    except Exception:  # a bug still ends as one line, never a traceback or a secret
        message, details = internal_fault("sqlite_to_postgres_validate")
        module.fail_json(msg=_scrub(message, params), exception=_scrub(details, params), changed=False,
                         status="failed")
    result["msg"] = _scrub(result["msg"], params)
    if result["status"] == "failed":
        module.fail_json(changed=False, **result)
    module.exit_json(changed=False, **result)


def _scrub(text, params):
    """The password never appears in a message, whatever a library put in it."""
    password = params.get("login_password")
    return text.replace(password, "********") if password else text


if __name__ == "__main__":
    main()
