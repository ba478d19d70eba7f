"""Fixtures of the fault suite. Its cases are marked ``fault(done=..., checked=...)``: tests/conftest.py writes
their results to docs/RELIABILITY.md."""

import sqlite3
import subprocess
import sys
import warnings

import pytest

from faults.lab import MIGRATION_TABLES, ROOT, SAMPLE_FILES, Lab


@pytest.fixture(scope="session")
def fault_lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("faults"))
    try:
        lab.up()
        lab.wait_healthy()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="session")
def big_source(tmp_path_factory):
    """A FileShareSystem database large enough that a fault lands in the middle of a COPY."""
    path = tmp_path_factory.mktemp("source") / "fileshare.db"
    subprocess.run([sys.executable, str(ROOT / "scripts/make_sample_db.py"), "--out", str(path),
                    "--files", str(SAMPLE_FILES), "--quiet"], check=True)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        counts = {t: connection.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608
                  for t in MIGRATION_TABLES[:-1]}
    return path, counts


@pytest.fixture
def lab(fault_lab):
    """The fault lab, healthy, with an empty target, before each case; after it, nothing of its runs running."""
    fault_lab.wait_healthy()
    fault_lab.reset()
    yield fault_lab
    killed = fault_lab.end_leftover_runs()
    if killed:
        warnings.warn(f"the case left {len(killed)} processes of its runs running, killed: {killed}", stacklevel=1)
