"""The one exception the engine raises for problems an operator must fix."""


class MigrationError(Exception):
    """A problem with the input, the source or the target.

    Its message is one line that names what is wrong and where (table, column,
    rowid, value shortened); ``result`` carries whatever was learnt before the
    problem (the profile, per-table statuses) so callers can still report it.
    """

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


def shorten(value, limit=60):
    """A value as it should appear in a one-line message: quoted, cut, control characters visible."""
    if value is None:
        return "NULL"
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        text = "x'" + raw[: limit // 2].hex() + ("…'" if len(raw) > limit // 2 else "'")
        return text
    if isinstance(value, str):
        text = repr(value[:limit])
        return text + "…" if len(value) > limit else text
    return repr(value)


def internal_fault(module_name):
    """(one-line message, traceback text) for an exception nobody expected, to be called in its except block.

    The message says where the fault is (function, file, line) in words an operator can pass on;
    the traceback is for -vvv only (Ansible's ``exception`` result key).
    """
    import sys
    import traceback

    frame = traceback.extract_tb(sys.exc_info()[2])[-1]
    message = (f"{module_name} stopped on an internal fault in {frame.name} "
               f"({frame.filename.rsplit('/', 1)[-1]} line {frame.lineno}); -vvv shows the details")
    return message, traceback.format_exc()
