"""The one exception type users see: a one-line message naming the file or key and what to do."""


class ProganError(Exception):
    """A user-facing error. The CLI prints `str(err)` on one line and exits 1 (traceback only with --debug)."""
