"""The sqlite_to_postgres migration engine: plain Python (no Ansible needed), used by the module of that name.

    from sqlite_pg import migrate, MigrationError
    result = migrate("app.db", {"host": "db1", "dbname": "app", "user": "migrator"}, jobs=2)

See docs/engine.md for the design.
"""

from .engine import DEFAULT_JOBS, migrate
from .errors import MigrationError
from .source import Source
from .target import STATE_TABLE

__all__ = ["DEFAULT_JOBS", "STATE_TABLE", "MigrationError", "Source", "migrate"]
