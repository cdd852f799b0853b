"""User-facing errors: one line that names the thing and the fix, exit status 2."""

import errno
import functools
import re
import shlex
import sys
import warnings

# How a full disk shows in OS, tensorstore (orbax) and SQLite messages.
DISK_FULL = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def disk_full(message: str) -> str | None:
    """The disk-full phrase in ``message``, or None."""
    return next((text for text in DISK_FULL if text in message), None)


# scheme://user:password@host: everything between the user's colon and the @ is the secret.
_URL_PASSWORD = re.compile(r"([A-Za-z][\w+.-]*://[^:/@\s]*:)([^@\s]+)(@)")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1***\3", text)


def exception_line(error: BaseException) -> str:
    """``Type: first line of the message``: what an exception says, in one line (secrets masked)."""
    text = str(error).strip()
    first = mask_secrets(text.splitlines()[0]) if text else ""
    return f"{type(error).__name__}: {first}"[:300] if first else type(error).__name__


# PyTorch's wheels on PyPI bring the CUDA libraries (gigabytes) on Linux; its own index has CPU builds.
TORCH_CPU = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def install_hint(extra: str) -> str:
    """The command that installs what the package's optional ``extra`` adds, from any folder (the
    packages it names, read from the installed package's metadata; ``'.[extra]'`` works only in the
    repository's root), e.g. ``pip install 'psycopg[binary]>=3.1'``."""
    from importlib import metadata

    try:
        requires = metadata.requires("xclip_jax") or []
    except metadata.PackageNotFoundError:
        requires = []
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    wanted = [r.split(";")[0].replace(" ", "") for r in requires if marker.search(r)]
    command = "pip install " + (" ".join(map(shlex.quote, wanted)) if wanted else shlex.quote(f"xclip_jax[{extra}]"))
    if any(re.match(r"torch\b", w) for w in wanted):
        command += f" (without a GPU: {TORCH_CPU}, which skips the CUDA libraries)"
    return command


class UserError(Exception):
    """A problem with the user's input (config, data, storage): reported as one line, exit 2."""


class XclipWarning(UserWarning):
    """Something the user should know that does not stop the run: one ``warning: …`` line in a CLI."""


def warn(message: str) -> None:
    """Issue an XclipWarning (a CLI prints it as one line, without Python's source line)."""
    warnings.warn(message, XclipWarning, stacklevel=2)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    if issubclass(category, XclipWarning):
        print(f"warning: {mask_secrets(str(message))}", file=file or sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def cli(main, interrupted: str = "interrupted"):
    """Wrap a CLI `main(argv)`: a UserError or a full disk prints one line and exits 2 (traceback only
    with --debug); Ctrl-C prints ``interrupted`` (one line) and exits 130."""

    @functools.wraps(main)
    def wrapper(argv=None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv
        if debug:
            argv.remove("--debug")
        warnings.showwarning = _show_warning
        try:
            return main(argv)
        except UserError as e:
            if debug:
                raise
            print(f"error: {mask_secrets(str(e))}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            if debug:
                raise
            print(interrupted, file=sys.stderr)
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
