"""User-facing errors: one line that names the thing and the fix, exit status 2."""

import errno
import functools
import sys


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
        except OSError as e:
            if debug or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(f"error: disk full writing {e.filename or 'a file'} ({e.strerror}); free space or write elsewhere, "
                  "then run the same command again (training: add --resume)", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            if debug:
                raise
            print("interrupted", file=sys.stderr)
            raise SystemExit(130)

    return wrapper
