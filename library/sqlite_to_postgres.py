#!/usr/bin/python
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module sqlite_to_postgres: a thin wrapper; the engine is module_utils/sqlite_pg."""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.sqlite_pg import DEFAULT_JOBS, MigrationError, migrate
from ansible.module_utils.sqlite_pg.errors import internal_fault
from ansible_collections.community.postgresql.plugins.module_utils.postgres import (
    ensure_required_libs,
    get_conn_params,
    postgres_common_argument_spec,
)

DOCUMENTATION = r'''
---
module: sqlite_to_postgres
short_description: Migrate a SQLite database into PostgreSQL with streaming COPY
description:
- Copies the tables of a SQLite database file into a PostgreSQL schema, one
  transaction per table, from one consistent snapshot of the source.
- Reads each table once, by its load, which checks every value as it streams (values the
  target types would refuse, invalid UTF-8, NUL characters, foreign keys, C(PRAGMA quick_check)
  beside the load). Any problem fails the task, and everything the run wrote is put back first, so
  the target is as it was before the run. Check mode, O(on_invalid=reject) and O(preflight=true)
  profile the whole source before anything is written instead.
- Each table is created when missing (types chosen from the SQLite declaration
  and the values), or loaded as it is when it exists; values are converted by
  the target column's type (booleans, timestamps and unix epochs, JSON into
  jsonb, text UUIDs, blobs into bytea, doubles kept exactly).
- Every loaded table is recorded in the state table
  C(<schema>.sqlite_to_postgres_state) in the same transaction as its rows (for a table
  loaded in rowid ranges, in the transaction that decides to commit them), keyed
  by the sha256 of the source snapshot. A rerun after a crash loads only what is
  missing; a rerun after success writes nothing and reports C(changed=false).
- A target table that holds an earlier snapshot of the same source file (its state row names this
  path and another sha256) is synced instead. Rows the source inserted, updated and deleted since
  become inserted, updated and deleted rows of the target, found from checksums of SQLite's pages
  and of their cells kept in the state table, all in one transaction (a sync that fails or is killed
  leaves the target as it was, and the next one does it all). Changes are applied so that every
  constraint holds at the commit whatever order the source made them in (a row replaced by
  C(INSERT OR REPLACE), a unique value moved to another row, keys renumbered, a child moved under a new
  parent); the foreign keys of a table whose unique values moved between rows are checked at the end of
  the transaction, which needs the tables' ownership and holds them alone until the commit. An empty
  target table tied by a foreign key to a synced table is loaded inside the sync, and tables the run
  creates get their foreign keys after it.
- Tables migrated from this source that it no longer has are refused before anything is written, naming
  them, unless O(keep_dropped_tables=true).
- After the load it builds primary keys, unique and secondary indexes, foreign
  keys and sets identity/serial sequences past C(max(id)), skipping whatever
  already exists.
- The source is opened read-only and never modified, in WAL mode too (rows
  still in the C(-wal) file are read; no C(-wal) or C(-shm) file is created or changed).
options:
  src:
    description:
    - Path of the SQLite database file on the managed host.
    type: path
    required: true
  source_name:
    description:
    - The path the state table records for the source. When O(src) is a copy of the live database (the
      runbook loads a copy made with SQLite's backup API), give the live database's path, so that a later
      run from a later copy of it syncs the tables an earlier copy loaded instead of refusing them.
    - Defaults to O(src).
    type: path
  login_db:
    description:
    - Name of the database to load into.
    type: str
    aliases: [ db ]
  schema:
    description:
    - Target schema. Created when missing and O(create_tables=true).
    type: str
    default: public
  tables:
    description:
    - Source tables to migrate. Default every ordinary table (C(sqlite_*) and virtual tables excluded).
    - A name that does not exist in the source fails the task.
    type: list
    elements: str
  create_tables:
    description:
    - Create missing target tables from the SQLite definitions. An existing table is used
      as it is, source columns matched to its columns by name.
    type: bool
    default: true
  jobs:
    description:
    - How many tables are profiled and loaded at once, each by its own process and connection.
    - A table of at least 100,000 rowids that exists in the target is loaded in O(jobs) rowid ranges at once,
      one session each, committed together by two-phase commit; this needs the server's
      C(max_prepared_transactions) to be at least O(jobs), else the table loads in one session and the
      result's notes say why.
    type: int
    default: 2
  on_invalid:
    description:
    - V(fail) fails the task before anything is written when any value would not convert.
    - V(reject) writes rows with such values to O(reject_file) and loads the rest; the task
      still fails, before writing, when there are more than O(max_rejects) of them.
    type: str
    choices: [ fail, reject ]
    default: fail
  max_rejects:
    description:
    - Most rows O(on_invalid=reject) may leave out.
    type: int
    default: 0
  reject_file:
    description:
    - Where rejected rows go, as JSON lines (table, rowid, column, reason, value). Required with O(on_invalid=reject).
    type: path
  source_timezone:
    description:
    - Time zone of the source's timestamps that carry no zone (IANA name).
    type: str
    default: UTC
  datetime_formats:
    description:
    - How the numbers of date and timestamp columns are read, per column as C(table.column). SQLite keeps a
      date as ISO 8601 text, a Julian day number or Unix time (U(https://sqlite.org/lang_datefunc.html)).
    - V(auto) (every column not named here) reads a number as SQLite's C(auto) modifier does, a number from
      0 to below 5373484.5 is a Julian day number, another one Unix time, in milliseconds when its absolute
      value is 100000000000 or more. A column holding both Julian day numbers and Unix times fails the task,
      naming the column, since some of its dates would move by decades.
    - V(julian) Julian day numbers only; V(unixepoch) Unix time in seconds only (small numbers too, such as 0);
      V(unixepoch_ms) Unix time in milliseconds only; V(iso) text only. A number that does not fit the
      declared representation is an invalid value. Text dates are read the same way whatever is declared.
    - A name that is no column of the source fails the task before anything is written.
    type: dict
    default: {}
  progress_file:
    description:
    - While the task runs, this file is replaced about once a second with JSON progress
      (C(updated_at), C(phase), C(tables) with C(rows_done), C(rows_total), C(rows_per_second),
      C(eta_seconds), C(status) per table, and overall C(rows_done)/C(rows_total)). Not written in check mode.
    - A table handed to the workers but not yet taken by one is C(queued); its rate and ETA count from when a
      worker takes it.
    type: path
  post_data:
    description:
    - Build primary keys, indexes and foreign keys and set sequences after the load.
      Objects that already exist (same name, or the same columns) are skipped.
    type: bool
    default: true
  integrity_check:
    description:
    - V(quick) runs C(PRAGMA quick_check), which checks every page and record of the file; V(full)
      runs C(PRAGMA integrity_check), which also checks that every index holds exactly its table's
      rows (about 8 times slower). A broken source index cannot change the data the load reads,
      which reads tables, not indexes.
    type: str
    choices: [ full, quick ]
    default: quick
  preflight:
    description:
    - Profile every value of the source before the first write (as check mode does), so that a bad
      value fails the task before anything is written. Without it each table is read once, by its
      load; a bad value then fails the task after the load began, and the run puts back what it wrote.
    type: bool
    default: false
  lease_key:
    description:
    - Key of a session advisory lock the calling run holds on the same database (the runbook's
      run lock). With O(lease_backend_pid), the load goes on only while that backend holds it;
      about once a second the module checks, and when the lock is gone (the controller was
      killed or interrupted, the leader restarted or failed over) it ends every session of the
      load, so the table being streamed is rolled back, starts nothing more and fails.
    - Needed because a task run with C(async) is detached from ansible-playbook and would
      otherwise outlive it.
    type: int
  lease_backend_pid:
    description:
    - Backend process id of the session that holds O(lease_key) (returned by pg_session_lock).
    type: int
  keep_dropped_tables:
    description:
    - Tables migrated from this source before that the source no longer has (dropped by the application)
      stay in the target as they are, no longer synced; RV(dropped_tables) and RV(sync_notes) name them.
    - Without it, such a table fails the task before anything is written, naming it; drop it in the target
      (C(DROP TABLE)) or set this option. A kept table whose foreign keys refer to rows the source deleted
      fails the sync, with nothing written.
    type: bool
    default: false
  target_ddl:
    description:
    - SQL that creates the target tables, the way the load will find them (for example the tables a schema
      stage creates before the load). Its statements run unqualified, with O(schema) as C(search_path).
    - Used in check mode only, when target tables do not exist yet, so that the profile checks the values
      against the types those tables will have (a UUID column refuses a value that is not a UUID) instead of
      the types this module would choose. The SQL runs on the target in one transaction that is always rolled
      back (read-write for that transaction only, statement timeout 30 s, lock timeout 5 s); a COMMIT or
      ROLLBACK in it fails instead of ending the transaction. Nothing of it remains; give it tables only,
      since effects PostgreSQL does not roll back (C(setval) on an existing sequence) would stay.
    type: str
seealso:
- module: community.postgresql.postgresql_query
attributes:
  check_mode:
    support: full
    details:
    - Profiles the source and reads the target's state in a read-only session; writes nothing.
    - With O(target_ddl) and missing target tables, that SQL runs in one transaction that is rolled back.
author:
- FileShareSystem migration team
extends_documentation_fragment:
- community.postgresql.postgres
notes:
- Without O(login_password), libpq's password file (C(PGPASSFILE), default C(~/.pgpass)) is used.
- Connect to the primary directly, not through PgBouncer in transaction mode (the run holds a session advisory lock).
- A server that falls silent (its host dies or leaves the network) fails the run within minutes (keepalive probes after
  10 quiet seconds, 60 s for data it has not acknowledged, 10 s to connect); O(connect_params) overrides these
  (C(keepalives_idle), C(tcp_user_timeout), C(connect_timeout), ...). The server ends the sessions of a run whose host
  vanished, and lets their locks go, by the same limits.
'''

EXAMPLES = r'''
- name: Migrate the FileShareSystem database
  sqlite_to_postgres:
    src: /srv/fileshare/fileshare.db
    login_host: 10.0.0.11
    login_port: 5432
    login_user: migrator
    login_db: fileshare
    jobs: 2
    progress_file: /var/tmp/migration-progress.json
  register: migration

- name: Load into tables the runbook created, keep up to 10 bad rows aside
  sqlite_to_postgres:
    src: /srv/fileshare/fileshare.db
    login_db: fileshare
    tables: [files, storage_nodes, tasks, replication_logs]
    create_tables: false
    post_data: false
    on_invalid: reject
    max_rejects: 10
    reject_file: /var/tmp/fileshare.rej.jsonl
    source_timezone: Europe/Berlin
    datetime_formats:
      tasks.started_at: julian
'''

RETURN = r'''
status:
  description: V(completed) or V(failed).
  returned: always
  type: str
  sample: completed
msg:
  description: One line saying what happened, or what is wrong and where.
  returned: always
  type: str
  sample: loaded 4 of 4 tables (125 rows); built 26 keys, indexes and sequences
total_tables:
  description: Tables whose rows are all in the target (loaded now or by an earlier run from this source).
  returned: always
  type: int
  sample: 4
total_rows:
  description: Rows of those tables in the target.
  returned: always
  type: int
  sample: 125
tables:
  description:
  - Per source table. C(total_rows) rows in the source snapshot; C(migrated) rows from it now in the target
    (also on a rerun that skips the table); C(rejected) rows left out; C(status) V(completed), V(pending)
    (check mode), V(loading) or V(failed); C(action) V(loaded), V(skipped) (already loaded from this
    source), V(synced) (brought up to date from an earlier snapshot; then C(inserted), C(updated) and
    C(deleted) count the rows the sync wrote, C(migrated) and C(total_rows) the rows now in the target),
    V(load) or V(sync) (check mode); C(seconds) and C(rows_per_second) of
    this run's load; for a skipped table C(validated), whether a validation was recorded for it since it
    was loaded. A synced or skipped table has C(changed_keys), C({since, keys}), the source keys that may
    differ from the snapshot C(since) (the sha256 it held before), as one string of inclusive intervals,
    C(3,7:12,40) for keys 3, 7 to 12 and 40 (null for all of them; one string, not a list, so that a large
    sync's result stays small in the controller); the validation after the sync compares only these when
    it starts from a validation of C(since).
  returned: always
  type: dict
  sample: {"files": {"total_rows": 50, "migrated": 50, "rejected": 0, "status": "completed",
           "action": "loaded", "seconds": 0.03, "rows_per_second": 1800.5}}
profile:
  description:
  - What the profile found. C(source) (path, bytes, sha256, journal, integrity check result) and per
    table C(rows), C(invalid_rows), C(problems), C(notes) and per column C(declared), C(target),
    C(storage) (SQLite storage classes found), C(invalid) and C(conversion) (V(sql) or V(python)); for a
    date or timestamp column C(dates), its values per representation (C(iso) text, C(julian), C(unixepoch),
    C(unixepoch_ms)) and its C(datetime_format).
  - On failure RV(findings) says what the profile found instead.
  returned: success
  type: dict
post_data:
  description: Keys, indexes, foreign keys and sequences built (in check mode, those that would be).
  returned: always
  type: list
  elements: dict
  sample: [{"table": "files", "kind": "primary key", "name": "files_pkey"}]
source_id:
  description: sha256 of the source snapshot, the key of the state table's rows.
  returned: when the source could be read
  type: str
sync_notes:
  description:
  - What the sync could not follow row by row, or what may not be the change meant, one line each with what
    it did about it. A table without a primary key compared by its content, the source's page size,
    application id or text encoding changed since the last sync, nearly no row of the last sync left
    unchanged (another database put at the same path?), a table dropped from the source and kept.
  returned: always
  type: list
  elements: str
  sample: ["the source's page size changed from 4096 to 1024 bytes since the last sync (the file was rebuilt, or
           another database put at its path): no page matched, every row was compared by its cell digest and only
           differing rows were written"]
dropped_tables:
  description: Target tables migrated from this source that it no longer has, kept as they are (O(keep_dropped_tables)).
  returned: always
  type: list
  elements: str
findings:
  description:
  - When the profile fails, its first findings (at most 5), one line each naming table, column, row and value;
    the total is in RV(msg).
  returned: always
  type: list
  elements: str
  sample: ["table files, column file_uuid, rowid 7: value 'not-a-uuid' is not a UUID"]
changed:
  description: Whether anything was written (in check mode, whether anything would be).
  returned: always
  type: bool
'''


def main():
    argument_spec = postgres_common_argument_spec()
    argument_spec.update(
        src=dict(type='path', required=True),
        login_db=dict(type='str', aliases=['db'], deprecated_aliases=[
            {'name': 'db', 'version': '5.0.0', 'collection_name': 'community.postgresql'}]),
        schema=dict(type='str', default='public'),
        tables=dict(type='list', elements='str'),
        create_tables=dict(type='bool', default=True),
        jobs=dict(type='int', default=DEFAULT_JOBS),
        on_invalid=dict(type='str', default='fail', choices=['fail', 'reject']),
        max_rejects=dict(type='int', default=0),
        reject_file=dict(type='path'),
        source_timezone=dict(type='str', default='UTC'),
        datetime_formats=dict(type='dict', default={}),
        source_name=dict(type='path'),
        progress_file=dict(type='path'),
        post_data=dict(type='bool', default=True),
        integrity_check=dict(type='str', default='quick', choices=['full', 'quick']),
        preflight=dict(type='bool', default=False),
        lease_key=dict(type='int', no_log=False),
        lease_backend_pid=dict(type='int'),
        target_ddl=dict(type='str'),
        keep_dropped_tables=dict(type='bool', default=False),
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        required_if=[('on_invalid', 'reject', ['reject_file'])],
        required_together=[('lease_key', 'lease_backend_pid')],
    )
    ensure_required_libs(module)
    params = module.params
    conninfo = get_conn_params(module, params, warn_db_default=False)
    failure = details = None
    try:
        result = migrate(
            params['src'], conninfo, schema=params['schema'], tables=params['tables'],
            create_tables=params['create_tables'], jobs=params['jobs'], on_invalid=params['on_invalid'],
            max_rejects=params['max_rejects'], reject_file=params['reject_file'],
            source_timezone=params['source_timezone'], progress_file=params['progress_file'],
            post_data=params['post_data'], integrity=params['integrity_check'], check_mode=module.check_mode,
            preflight=params['preflight'],
            lease=({'key': params['lease_key'], 'backend_pid': params['lease_backend_pid']}
                   if params['lease_key'] is not None else None),
            target_ddl=params['target_ddl'], datetime_formats=params['datetime_formats'],
            source_name=params['source_name'], keep_dropped_tables=params['keep_dropped_tables'],
        )
    except MigrationError as error:
        result = dict(error.result or {}, status='failed')
        failure = str(error)
    except Exception:  # a bug must still end as one line, never a traceback or a secret
        result = {'status': 'failed', 'changed': False}
        failure, details = internal_fault('sqlite_to_postgres')
    if failure is not None:
        # Outside the except blocks: a user error is a message, not a captured exception.
        result.pop('msg', None)
        # Ansible prints a failed task's whole result: the profile's hundreds of lines would bury the
        # message; findings holds what it found.
        result.pop('profile', None)
        if details:
            result['exception'] = _scrub(details, params)
        module.fail_json(msg=_scrub(failure, params), **result)
    module.exit_json(**result)


def _scrub(text, params):
    """The password never appears in a message, whatever a library put in it."""
    password = params.get('login_password')
    return text.replace(password, '********') if password else text


if __name__ == '__main__':
    main()
