"""User-facing errors: one line that names the thing and the fix, exit status 2."""

import errno
import functools
import sys


# How a full disk shows in OS, tensorstore (orbax) and SQLite messages.
DISK_FULL = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def disk_full(message: str) -> str | None:
    """The disk-full phrase in ``message``, or None."""
    return next((text for text in DISK_FULL if text in message), None)


class UserError(Exception):
    """A problem with the user's input (config, data, storage): reported as one line, exit 2."""


def cli(main):
    """Wrap a CLI `main(argv)`: a UserError or a full disk prints one line and exits 2 (traceback only
    with --debug); Ctrl-C prints one line and exits 130."""

    @functools.wraps(main)
    def wrapper(argv=None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv
        if debug:
            argv.remove("--debug")
        try:
            return main(argv)
        except UserError as e:
            if debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            if debug:
                raise
            print("interrupted", file=sys.stderr)
            raise SystemExit(130)
        except Exception as e:  # a full disk, however the library that hit it words it
            full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or disk_full(str(e))
            if debug or not full:
                raise
            where = getattr(e, "filename", None) or "a file"
            print(f"error: disk full writing {where} ({disk_full(str(e)) or e.strerror}); free space or write "
                  "elsewhere, then run the same command again (training: add --resume)", file=sys.stderr)
            raise SystemExit(2)

    return wrapper
