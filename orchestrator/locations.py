"""Where a sweep keeps its results (the MLflow store, Ray's checkpoints and Tune state), checked before
anything starts.

Defaults: `./runs` beside the command. Inside a Ray job the working directory is a copy that Ray keeps in
its session folder and deletes with the session, so there the default is a per-user folder
(`~/.attnlab/runs`, or `$ATTNLAB_HOME/runs`) unless the cluster says otherwise (MLFLOW_TRACKING_URI,
ATTNLAB_STORAGE), and the sweep says where it went."""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from attention.config import ConfigError

# Ray's job supervisor sets this in every job's driver (ray/dashboard/modules/job/job_supervisor.py)
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
REACH_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class Locations:
    tracking_uri: str
    storage: str                 # an absolute local path, or a URI (s3://...)
    artifact_root: str | None    # where a new sqlite store's experiments keep artifacts; None: the server's
    note: str | None = None      # said to the user when the results go somewhere they did not name

    @property
    def local_storage(self) -> Path | None:
        return None if "://" in self.storage else Path(self.storage)


def inside_ray_job() -> bool:
    return RAY_JOB_ENV in os.environ


def default_root() -> tuple[Path, str | None]:
    if inside_ray_job():
        home = Path(os.environ.get("ATTNLAB_HOME", "~/.attnlab")).expanduser()
        root = (home / "runs").resolve()
        return root, (f"inside a Ray job, whose working dir Ray deletes with its session: results go to {root} "
                      f"(set --tracking-uri/--storage, or MLFLOW_TRACKING_URI/ATTNLAB_STORAGE, to choose)")
    return Path("runs").resolve(), None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative paths resolved against the current folder)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]).resolve() if uri.startswith(prefix) else None


def resolve(tracking_uri: str | None, storage: str | None) -> Locations:
    root, note = default_root()
    if tracking_uri and storage:
        note = None
    storage = storage or str(root / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    tracking_uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    db = sqlite_path(tracking_uri)
    if db is not None:
        tracking_uri = f"sqlite:///{db}"
    # a sqlite store's artifacts live beside its database file, wherever that is
    artifact_root = (db.parent / "mlflow-artifacts").as_uri() if db is not None else None
    return Locations(tracking_uri, storage, artifact_root, note)


def check(locations: Locations) -> None:
    """Both places usable, before anything is written: ConfigError naming the option otherwise."""
    check_tracking_uri(locations.tracking_uri)
    check_storage(locations.storage)


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""


def check_tracking_uri(uri: str) -> None:
    scheme = _scheme(uri)
    if scheme == "file" or "://" not in uri:
        raise ConfigError(f"--tracking-uri: got {uri!r}; MLflow 3 no longer writes a file store by default: "
                          f"use sqlite:///PATH/mlflow.db (or an MLflow server, http://HOST:PORT)")
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"--tracking-uri: got {uri!r}; allowed schemes: {', '.join(TRACKING_SCHEMES)} "
                          f"(e.g. sqlite:///runs/mlflow.db, http://HOST:5000)")
    if scheme == "sqlite":
        _check_writable_folder("--tracking-uri", sqlite_path(uri).parent)
    elif scheme in ("http", "https"):
        _check_answers(uri)
    elif scheme in DB_PORTS:
        parsed = urllib.parse.urlsplit(uri)
        _check_connects("--tracking-uri", uri, parsed.hostname or "localhost", parsed.port or DB_PORTS[scheme])


def check_storage(storage: str) -> None:
    if "://" in storage:
        scheme = _scheme(storage)
        if scheme not in STORAGE_SCHEMES + ("file",):
            raise ConfigError(f"--storage: got {storage!r}; a local folder or a URI with one of the schemes "
                              f"{', '.join(STORAGE_SCHEMES)}")
        return
    _check_writable_folder("--storage", Path(storage))


def _check_writable_folder(option: str, folder: Path) -> None:
    """`folder` exists and takes a new entry, or can be created: tried with a scratch folder in its
    nearest existing ancestor, removed at once (nothing is left behind)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option}: {folder} cannot be created: {existing} is not a folder")
    try:
        scratch = tempfile.mkdtemp(prefix=".attnlab-check-", dir=existing)
    except OSError as e:
        raise ConfigError(f"{option}: {folder} is not writable ({e.strerror} in {existing})") from None
    os.rmdir(scratch)


def _check_answers(uri: str) -> None:
    """An MLflow server answers HTTP at `uri` (any HTTP status counts: only the connection is checked).
    MLflow's own client retries for minutes before it gives up."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"--tracking-uri: no MLflow server answers at {uri} ({reason}); start one "
                          f"(mlflow server --host 127.0.0.1 --port PORT) or choose another URI") from None


def _check_connects(option: str, uri: str, host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"{option}: nothing answers at {host}:{port} for {uri} ({e.strerror or e})") from None
