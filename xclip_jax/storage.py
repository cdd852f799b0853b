"""Opening an Optuna storage: one way for every command (driver, trial processes, report), with one-line
errors that never show a password, ``${NAME}`` expanded from the environment, and settings that let
many processes share one SQLite file or one PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
import warnings
from pathlib import Path

import optuna

from xclip_jax.errors import UserError, exception_line, install_hint, mask_secrets

_ENV_REF = re.compile(r"\$\{(\w+)\}")


def expand_url(url: str) -> str:
    """A storage URL with each ``${NAME}`` replaced by that environment variable, so that a config
    can say ``postgresql+psycopg://alice:${PGPASSWORD}@host/db`` and hold no secret itself (libpq's own
    PGPASSWORD and ~/.pgpass work too, with no password in the URL)."""

    def value(match):
        if match.group(1) not in os.environ:
            raise UserError(f"storage {mask_secrets(url)}: environment variable {match.group(1)} is not set; "
                            "export it or write the URL without it")
        return os.environ[match.group(1)]

    return _ENV_REF.sub(value, url)


def make_storage(url: str, *, heartbeat: tuple[float, float] | None = None, must_exist: bool = False):
    """An Optuna storage for ``url`` (``${NAME}`` expanded); bad, unreachable or driverless URLs raise a
    one-line UserError that never shows the password.

    SQLite gets a long busy timeout so that many trial processes can report at once; PostgreSQL
    (and other servers) a pre-pinged, small connection pool. With ``heartbeat`` = (interval, grace
    period) in seconds the driver's storage records heartbeats, so that drivers can tell the trials
    of a dead driver (stale ones).
    With ``must_exist`` a SQLite file that is not there is an error (SQLAlchemy would silently
    create an empty database at a mistyped path).
    """
    from optuna.storages import RDBStorage

    shown = mask_secrets(url)
    if "://" not in url:
        hint = f"; for a SQLite file use sqlite:///{url}" if Path(url).exists() else ""
        raise UserError(f"storage {shown!r} is not a database URL (e.g. sqlite:///optuna.db or "
                        f"postgresql+psycopg://user@host/db){hint}")
    full = expand_url(url)
    db = sqlite_file(full)
    if db is not None:
        if must_exist and str(db) not in ("", ":memory:") and not db.is_file():
            raise UserError(f"storage {shown!r}: SQLite file {str(db)!r} does not exist; pass the database the "
                            "tuner wrote (its --storage)")
        if db.parent and not db.parent.exists():
            raise UserError(f"storage {shown}: folder {db.parent} does not exist; create it or change storage")
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2}
    kwargs = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=heartbeat[0], grace_period=heartbeat[1])

    def open_it():
        with quiet_optuna():
            return RDBStorage(full, engine_kwargs=engine_kwargs, **kwargs)

    try:
        return retry_races(open_it)
    except ImportError:  # Optuna's own check, or SQLAlchemy's import of the driver
        raise UserError(f"storage {shown}: its database driver is not installed; for PostgreSQL "
                        f"{install_hint('postgres')} (psycopg 3) and use postgresql+psycopg://…") from None
    except Exception as e:  # sqlalchemy raises many kinds
        if type(e).__name__ == "NoSuchModuleError":  # SQLAlchemy knows no database of that name
            raise UserError(unknown_scheme(url)) from None
        if is_race(e):
            raise UserError(f"storage {shown}: creating its tables kept colliding with other drivers doing the same "
                            f"({mask_secrets(exception_line(e))}); rerun the command") from None
        raise UserError(f"storage {shown} is unreachable ({mask_secrets(exception_line(e))}); check the URL and "
                        "that the server runs") from None


# The URL schemes of the databases Optuna's storage is used with (SQLAlchemy's dialect[+driver]).
SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2", "mysql", "mysql+pymysql")


def unknown_scheme(url: str) -> str:
    """The one line for a URL whose scheme names no database SQLAlchemy knows (``sqllite:///…``)."""
    import difflib

    scheme = url.split("://", 1)[0]
    close = difflib.get_close_matches(scheme, SCHEMES, n=1, cutoff=0.6)
    fix = (f"did you mean {mask_secrets(close[0] + url[len(scheme):])}?" if close else
           "use sqlite:///FILE or postgresql+psycopg://user@host/db")
    return f"storage {mask_secrets(url)}: unknown database scheme {scheme!r}; {fix}"


def sqlite_file(url: str) -> Path | None:
    """The file a ``sqlite:///`` URL names (``${NAME}`` expanded; ``Path("")`` or ``:memory:`` for an
    in-memory database), or None for any other storage."""
    full = expand_url(url) if "://" in url else url
    if not full.startswith("sqlite:///"):
        return None
    return Path(full[len("sqlite:///"):].split("?", 1)[0])


RACE_ATTEMPTS = 8


def is_race(e: BaseException) -> bool:
    """Whether ``e`` is what a lost race to create the same rows or tables raises (another driver
    created them first), as opposed to a storage that is unreachable or refuses us."""
    try:
        from sqlalchemy import exc
    except ImportError:
        return False
    if isinstance(e, exc.IntegrityError):
        return True
    text = str(e).lower()
    return isinstance(e, (exc.ProgrammingError, exc.OperationalError)) and any(
        words in text for words in ("already exists", "database is locked", "deadlock detected"))


def retry_races(create, attempts: int = RACE_ATTEMPTS):
    """``create()``, again after a short random wait while it loses a race (``is_race``): drivers
    started at the same moment on a new storage all create its schema and study; one wins each row,
    the others then find it there."""
    for attempt in range(attempts):
        try:
            return create()
        except Exception as e:
            if not is_race(e) or attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))


@contextlib.contextmanager
def quiet_optuna():
    """Silence Optuna's experimental/deprecation notes about the heartbeat API we rely on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        yield


def new_sqlite_file(url: str) -> bool:
    """Whether ``url`` names a SQLite file that is not there yet, in a folder that is: opening the
    storage would create it, so it is opened after every other check (a config that fails them leaves
    no empty database behind). Anything else is opened at once (and says there what is wrong with it)."""
    db = sqlite_file(url)
    return db is not None and str(db) not in ("", ".", ":memory:") and not db.exists() and db.parent.is_dir()
