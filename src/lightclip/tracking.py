"""The one module that talks to MLflow runs, and keeps them honest when things go wrong.

Every stage run is an MLflow run in the pipeline's experiment, nested under the pipeline's parent
run when one is open (``LIGHTCLIP_PARENT_RUN_ID``, exported by :func:`pipeline_run` to the
processes it starts, e.g. ``dvc repro``), and tagged with its lineage: git commit and dirty flag,
the DVC hash of the tracked data, the stage name, ``DVC_EXP_NAME`` and its params, and the host
and process that run it.

The default store is the project's ``mlflow/mlflow.db`` (SQLite, as an absolute URI, so that
``dvc exp run --temp`` copies under ``.dvc/tmp/exps`` log into the same database) with artifacts
beside it; ``MLFLOW_TRACKING_URI`` overrides it (a shared server).

A store that does not answer fails the stage within seconds, with one line naming the URI
(:class:`TrackingUnavailable`): a server is probed with one bounded request (then retried
``tracking.retries`` times) before anything runs, and MLflow's own HTTP timeout and retries are
set from ``params.yaml`` (``tracking.timeout_seconds``, ``tracking.retries``) instead of its
defaults (7 retries, 2 min per request: about 4 minutes of silence). A server that goes away in
the middle of a stage and comes back within the retry window (:func:`outage_window_seconds`: 2 s
for ``retries`` 2, 14 s for 4, 30 s for 5; a restart takes about 6 s) is ridden out, every write
retried; gone longer, the write fails naming the URI and the window. A SQLite store whose write
lock another process holds is refused the same way, before the stage writes any output.

A run is never left RUNNING: it ends FAILED when the stage raises and KILLED on SIGINT or
SIGTERM (handlers installed around the stage and restored after it). A process killed by SIGKILL
cannot end its run, so every stage start closes, as KILLED, the runs of its experiment that are
RUNNING on this host under a process that no longer exists (it says so on stderr).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, Callable, Iterator, Mapping, TypeVar

import yaml

from lightclip.config import TrackingConfig
from lightclip.errors import LightclipError

PARENT_RUN_ENV = "LIGHTCLIP_PARENT_RUN_ID"
TAG_PREFIX = "lightclip."
DATA_DVC_FILE = "data.dvc"

# Who runs a run: what the stale-run sweep compares with the processes alive on this host.
TAG_HOST = f"{TAG_PREFIX}host"
TAG_PID = f"{TAG_PREFIX}pid"
TAG_PID_START = f"{TAG_PREFIX}pid_start"  # the process's start time (clock ticks after boot): a reused pid differs
TAG_BOOT_ID = f"{TAG_PREFIX}boot_id"  # after a reboot no process of the last boot is alive
TAG_CLOSED_STALE = f"{TAG_PREFIX}closed_as_stale"
TAG_STALE_CLOSED_COUNT = f"{TAG_PREFIX}stale_runs_closed"

#: MLflow's HTTP client settings (mlflow/environment_variables.py), set from ``tracking`` params.
HTTP_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
HTTP_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
HTTP_BACKOFF_ENV = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
HTTP_BACKOFF_FACTOR = 1  # seconds: MLflow's retries (urllib3 2) wait 0, 2, 4, 8, ... s (MLflow's default factor is 2)

#: Signals that end a stage's run as KILLED; the previous handlers come back after the stage.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
#: How many RUNNING runs one sweep looks at (bounded: a store with more is swept over several starts).
STALE_SCAN_LIMIT = 1000
#: Default TCP ports of the database stores MLflow accepts, for the reachability probe.
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}

T = TypeVar("T")


class TrackingUnavailable(LightclipError, RuntimeError):
    """The tracking store does not answer, or is locked; the message names the URI and the limit."""


class StageInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a stage ran; its run was ended KILLED.

    A ``KeyboardInterrupt``, so ``except Exception`` in a stage does not swallow it and ``finally``
    blocks still run.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(self.signal_name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


def project_root(start: Path | str | None = None) -> Path:
    """The project directory: the nearest parent holding ``params.yaml`` and ``dvc.yaml``.

    A DVC temporary experiment workspace (``<repo>/.dvc/tmp/exps/...``) maps back to the repo, so
    all experiments share one tracking store.
    """
    path = Path(start or Path.cwd()).resolve()
    parts = path.parts
    if ".dvc" in parts:
        index = parts.index(".dvc")
        if parts[index + 1 : index + 3] == ("tmp", "exps"):
            return Path(*parts[:index])
    for candidate in (path, *path.parents):
        if (candidate / "params.yaml").is_file() and (candidate / "dvc.yaml").is_file():
            return candidate
    return path


def default_tracking_uri(project_dir: Path) -> str:
    return f"sqlite:///{(Path(project_dir).resolve() / 'mlflow' / 'mlflow.db').as_posix()}"


def default_artifact_location(project_dir: Path) -> str:
    return (Path(project_dir).resolve() / "mlflow" / "artifacts").as_uri()


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: tracking URI, experiment name and the default artifact root."""

    uri: str
    experiment: str
    artifact_location: str | None

    @classmethod
    def for_project(cls, project_dir: Path, experiment: str) -> "TrackingTarget":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(project_dir)
        local = uri.startswith("sqlite:") or uri.startswith("file:")
        return cls(uri=uri, experiment=experiment, artifact_location=default_artifact_location(project_dir) if local else None)


def _git(project_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def data_version(project_dir: Path) -> str:
    """The DVC hash of the tracked raw catalogue (``data.dvc``), or ``untracked``."""
    path = Path(project_dir) / DATA_DVC_FILE
    if not path.is_file():
        return "untracked"
    outs = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def lineage_tags(project_dir: Path, stage: str) -> dict[str, str]:
    """Tags that say which code, data and experiment produced a run."""
    commit = _git(project_dir, "rev-parse", "HEAD") or "unknown"
    status = _git(project_dir, "status", "--porcelain", "--untracked-files=no")
    tags = {
        f"{TAG_PREFIX}stage": stage,
        f"{TAG_PREFIX}git_commit": commit,
        f"{TAG_PREFIX}git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        f"{TAG_PREFIX}data_hash": data_version(project_dir),
        "mlflow.source.git.commit": commit,
    }
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags[f"{TAG_PREFIX}dvc_exp_name"] = exp_name
    return tags


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            text = str(value)
            flat[name] = text if len(text) <= 6000 else text[:5997] + "..."
    return flat


def mlflow_metric_name(name: str) -> str:
    """MLflow allows ``[A-Za-z0-9_-. :/]`` only: our ``test/i2t_R@1`` is logged as ``test/i2t_R_at_1``."""
    return name.replace("@", "_at_")


def _mlflow() -> ModuleType:
    """MLflow, imported on first use: it costs 1.1 s, and every CLI command (``--help`` too)
    imports this module for :func:`project_root`."""
    import mlflow

    return mlflow


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Reachability: fail in seconds, with the URI named
# ----------------------------------------------------------------------------------------------


def outage_window_seconds(settings: TrackingConfig) -> float:
    """How long a server may be gone (refusing connections) before a write fails: the sum of
    MLflow's waits between its ``1 + retries`` attempts (urllib3 2: 0, 2, 4, ... s with our factor
    1, each plus up to 1 s of jitter not counted here). A restart shorter than this is ridden out:
    retries 2 -> 2 s, 4 -> 14 s, 5 -> 30 s."""
    return float(sum(HTTP_BACKOFF_FACTOR * 2 ** (attempt - 1) for attempt in range(2, settings.retries + 1)))


def apply_http_limits(settings: TrackingConfig) -> dict[str, str]:
    """Bound MLflow's HTTP client by ``settings`` for this process and the ones it starts."""
    values = {HTTP_TIMEOUT_ENV: str(settings.timeout_seconds), HTTP_RETRIES_ENV: str(settings.retries),
              HTTP_BACKOFF_ENV: str(HTTP_BACKOFF_FACTOR)}
    os.environ.update(values)
    return values


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory ones)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def sqlite_write_lock_free(path: Path, timeout: float) -> bool:
    """Whether a write transaction on ``path`` can start within ``timeout`` s (no other writer holds it).

    ``BEGIN IMMEDIATE`` takes SQLite's write lock and waits for it at most ``timeout``; it is rolled
    back at once. A missing file holds no lock (MLflow creates it). Other failures (not a
    database, read-only) are errors naming the file.
    """
    try:
        connection = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
    except sqlite3.OperationalError:
        return True
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return False
        raise TrackingUnavailable(f"tracking store sqlite:///{path}: cannot write to it: {_one_line(exc)}") from None
    except sqlite3.DatabaseError as exc:
        raise TrackingUnavailable(f"tracking store sqlite:///{path}: not a usable SQLite database: {_one_line(exc)}") from None
    finally:
        connection.close()


def _locked_message(uri: str, settings: TrackingConfig, doing: str) -> str:
    return (f"tracking store {uri} is locked: another process held its write lock for {settings.timeout_seconds} s "
            f"(tracking.timeout_seconds) while {doing} (a long transaction, an open sqlite3 shell?); "
            "concurrent writers should log to one `mlflow server` instead")


def _http_probe_url(uri: str, experiment: str) -> str:
    query = urllib.parse.urlencode({"experiment_name": experiment})
    return f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"


def check_store(uri: str, settings: TrackingConfig, experiment: str = "lightclip") -> None:
    """Raise :class:`TrackingUnavailable` unless the store at ``uri`` answers within the limits.

    HTTP(S): one GET of the REST API per attempt, ``1 + retries`` attempts of at most
    ``timeout_seconds`` each, 1, 2, ... s apart; any answer below HTTP 500 counts (even an
    authentication error: the store is there). SQLite: its write lock must come free within
    ``timeout_seconds``. Database servers: a TCP connection to their port. Cheap: one request.
    """
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is not None and not sqlite_write_lock_free(path, settings.timeout_seconds):
            raise TrackingUnavailable(_locked_message(uri, settings, "the stage started"))
        return
    if scheme in ("http", "https"):
        probe: Callable[[], str | None] = lambda: _http_attempt(_http_probe_url(uri, experiment), settings.timeout_seconds)
    elif scheme.split("+")[0] in DB_PORTS:
        parts = urllib.parse.urlsplit(uri)
        address = (parts.hostname or "127.0.0.1", parts.port or DB_PORTS[scheme.split("+")[0]])
        probe = lambda: _tcp_attempt(address, settings.timeout_seconds)
    else:
        return  # file stores, databricks, ...: nothing cheap to ask
    attempts = settings.retries + 1
    reason = None
    for attempt in range(attempts):
        reason = probe()
        if reason is None:
            return
        if attempt + 1 < attempts:
            time.sleep(HTTP_BACKOFF_FACTOR * 2**attempt)
    raise TrackingUnavailable(f"tracking store {uri} does not answer: {reason} ({attempts} attempt(s), {settings.timeout_seconds} s "
                              "timeout each: tracking.timeout_seconds, tracking.retries); start the server or point "
                              "MLFLOW_TRACKING_URI at one that runs")


def _http_attempt(url: str, timeout: float) -> str | None:
    """None when the server answered, else why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        return _one_line(exc.reason)
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        return _one_line(exc) if not isinstance(exc, TimeoutError) else f"no answer within {timeout:g} s"


def _tcp_attempt(address: tuple[str, int], timeout: float) -> str | None:
    try:
        with socket.create_connection(address, timeout=timeout):
            return None
    except OSError as exc:
        return f"{address[0]}:{address[1]}: {_one_line(exc)}"


def _is_store_outage(exc: BaseException) -> bool:
    """Errors that say the store did not answer (or was locked), as opposed to a bad request."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import ConnectionError as RequestsConnectionError, Timeout as RequestsTimeout

    if isinstance(exc, MlflowException):
        return exc.error_code == "TEMPORARILY_UNAVAILABLE" or str(exc.message).startswith("API request to")
    # artifact uploads to a server (proxied artifacts) raise the HTTP library's own errors
    return isinstance(exc, (ConnectionError, TimeoutError, sqlite3.OperationalError, RequestsConnectionError, RequestsTimeout))


def _reply_cut_short(exc: BaseException) -> bool:
    """A reply that broke off mid-body (``IncompleteRead``): the server died while answering."""
    from requests.exceptions import ChunkedEncodingError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ChunkedEncodingError, http.client.IncompleteRead)) or "IncompleteRead" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ----------------------------------------------------------------------------------------------
# Who runs a run, and the sweep of runs whose process is gone
# ----------------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id") or "unknown"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    text = _read(f"/proc/{pid}/stat")
    if text is None or ")" not in text:
        return None
    return text.rsplit(")", 1)[1].split()


def process_start(pid: int) -> str:
    """When ``pid`` started (clock ticks after boot), ``unknown`` where ``/proc`` is missing."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else "unknown"


def process_tags() -> dict[str, str]:
    """Host, pid, process start and boot id of this process, as run tags."""
    pid = os.getpid()
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(pid), TAG_PID_START: process_start(pid), TAG_BOOT_ID: boot_id()}


def process_alive(pid: int, start: str | None = None, boot: str | None = None) -> bool:
    """Whether the process that tagged a run still runs here: same boot, pid alive (not a zombie),
    same start time (so a pid reused by another program does not count)."""
    if boot and boot != "unknown" and boot_id() not in ("unknown", boot):
        return False
    if Path("/proc/self/stat").is_file():
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return not start or start == "unknown" or process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_stale_runs(client: Any, experiment_id: str, *, host: str | None = None) -> list[Any]:
    """End as KILLED the runs of ``experiment_id`` that are RUNNING on ``host`` (default: this one)
    under a process that no longer exists; returns them. Runs of other hosts are left alone."""
    host = host or socket.gethostname()
    filter_string = f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{host}'"
    runs = client.search_runs([experiment_id], filter_string=filter_string, max_results=STALE_SCAN_LIMIT)
    closed = []
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags.get(TAG_PID, ""))
        except ValueError:
            continue
        if pid == os.getpid() or process_alive(pid, tags.get(TAG_PID_START), tags.get(TAG_BOOT_ID)):
            continue
        note = (f"process {pid} on {host} no longer runs (killed, e.g. by SIGKILL or the OOM killer); closed by pid {os.getpid()} "
                f"at {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
        client.set_tag(run.info.run_id, TAG_CLOSED_STALE, note)
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run)
    return closed


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------


class _Interrupts:
    """Turns the first stop signal into :class:`StageInterrupted`; later ones (during cleanup) are
    remembered, not raised, so the run can still be ended.

    A handler installed before (a flow runner's cancellation, say) is called first, so whoever
    set it still hears of the signal; if it raises, its exception stops the stage instead.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed = True
        self.previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if not self.armed:
            return
        self.armed = False
        chained = self.previous.get(signum)
        if callable(chained) and chained is not signal.default_int_handler:
            chained(signum, frame)
        raise StageInterrupted(signum)


@contextmanager
def stop_signals_raise() -> Iterator[_Interrupts]:
    """SIGINT/SIGTERM raise :class:`StageInterrupted` inside the block; the previous handlers
    come back after it. A signal that was ignored (SIG_IGN) stays ignored. Only the main thread
    can handle signals: elsewhere nothing changes."""
    interrupts = _Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    interrupts.previous = {int(sig): handler for sig, handler in previous.items()}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, interrupts)
    try:
        yield interrupts
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def _activate(target: TrackingTarget) -> str:
    """Point MLflow at ``target`` and return the experiment id (created on first use)."""
    mlflow = _mlflow()
    # MLflow also exports the URI as MLFLOW_TRACKING_URI; left there, a later run in this process
    # for another project would read it as the user's choice and log into this project's store
    users_choice = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(target.uri)
    if users_choice is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = users_choice
    experiment = mlflow.get_experiment_by_name(target.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(target.experiment, artifact_location=target.artifact_location)
    except Exception:  # created concurrently by another stage process
        experiment = mlflow.get_experiment_by_name(target.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


class StageRun:
    """A thin handle on the active run, so stages never call ``mlflow.*`` themselves.

    Every write first waits (at most ``tracking.timeout_seconds``) for a SQLite store's write lock,
    and a store that fails is a :class:`TrackingUnavailable` naming the URI and what was logged.
    """

    def __init__(self, run: Any, uri: str | None = None, settings: TrackingConfig | None = None) -> None:
        self._run = run
        self.uri = uri or _mlflow().get_tracking_uri()
        self.settings = settings or TrackingConfig()

    @property
    def run_id(self) -> str:
        return self._run.info.run_id

    def _write(self, what: str, call: Callable[[], T]) -> T:
        """``call`` (an idempotent write), sent again once when the server's reply was cut short.

        MLflow's retries cover a refused or reset connection, not a reply that breaks off mid-body
        (a server killed while answering): the write may or may not have landed, so it is sent
        again. Every write here is idempotent: params and tags set the same values, artifacts
        overwrite, and metrics carry a fixed timestamp, which the store deduplicates.
        """
        path = sqlite_path(self.uri)
        if path is not None and not sqlite_write_lock_free(path, self.settings.timeout_seconds):
            raise TrackingUnavailable(_locked_message(self.uri, self.settings, f"run {self.run_id} was {what}"))
        try:
            try:
                return call()
            except Exception as exc:
                if not _reply_cut_short(exc):
                    raise
                print(f"lightclip: tracking store {self.uri} cut its reply short while run {self.run_id} was {what}; "
                      "sending it again", file=sys.stderr)
                return call()
        except Exception as exc:
            if _is_store_outage(exc):
                window = (f" (gone longer than the ~{outage_window_seconds(self.settings):g} s that tracking.retries "
                          f"{self.settings.retries} rides out)") if self.uri.startswith(("http:", "https:")) else ""
                raise TrackingUnavailable(f"tracking store {self.uri} failed while run {self.run_id} was {what}{window}: "
                                          f"{_one_line(exc)}") from exc
            raise

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric values; names are made MLflow-safe (``R@1`` -> ``R_at_1``), others skipped."""
        clean = {mlflow_metric_name(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if clean:
            timestamp = int(time.time() * 1000)  # fixed, so that a write sent twice is stored once
            self._write("logging metrics", lambda: _mlflow().log_metrics(clean, step=step, timestamp=timestamp))

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten(params)
        self._write("logging params", lambda: _mlflow().log_params(flat))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        text = {k: str(v) for k, v in tags.items()}
        self._write("setting tags", lambda: _mlflow().set_tags(text))

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._write(f"logging artifacts {path}", lambda: _mlflow().log_artifacts(str(path), artifact_path=artifact_path))
        elif path.is_file():
            self._write(f"logging artifact {path}", lambda: _mlflow().log_artifact(str(path), artifact_path=artifact_path))


def _forget_active_run(run_id: str) -> None:
    """Drop ``run_id`` from MLflow's stack of active runs without writing to the store (which
    failed), so the next run of this process can start."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack and stack[-1].info.run_id == run_id:
        stack.pop()
        os.environ.pop("MLFLOW_RUN_ID", None)


def end_run(run: StageRun, status: str) -> str | None:
    """End ``run`` with ``status`` within ``tracking.timeout_seconds``; None, or why it could not.

    A SQLite store is written only once its lock is free (MLflow itself would wait 20 s a try).
    """
    mlflow = _mlflow()
    deadline = time.monotonic() + run.settings.timeout_seconds
    path = sqlite_path(run.uri)
    error = "unknown"
    first = True
    while first or time.monotonic() < deadline:
        remaining = max(deadline - time.monotonic(), 0.1)
        try:
            if path is not None and not sqlite_write_lock_free(path, remaining):
                error = f"the store stayed locked for {run.settings.timeout_seconds} s"
                break
            if first:
                first = False
                mlflow.end_run(status)  # pops the active run first, then writes
            else:
                mlflow.MlflowClient(tracking_uri=run.uri).set_terminated(run.run_id, status)
            return None
        except Exception as exc:  # noqa: BLE001 -- reported below, never masks the stage's own error
            first = False
            error = _one_line(exc)
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    _forget_active_run(run.run_id)
    return error


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    *,
    project_dir: Path,
    experiment: str,
    run_name: str | None = None,
    settings: TrackingConfig | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage; nested under the pipeline run when one is open.

    Before the run: the store must answer (:func:`check_store`), and runs of this experiment left
    RUNNING on this host by a process that no longer exists are closed as KILLED. The run ends
    FINISHED, FAILED when the stage raises, KILLED on SIGINT/SIGTERM (:class:`StageInterrupted` is
    raised to the caller). ``settings`` are the ``tracking`` params (default: their defaults).
    """
    settings = settings or TrackingConfig()
    target = TrackingTarget.for_project(project_dir, experiment)
    apply_http_limits(settings)
    check_store(target.uri, settings, experiment)
    mlflow = _mlflow()
    try:
        experiment_id = _activate(target)
        closed = close_stale_runs(mlflow.MlflowClient(tracking_uri=target.uri), experiment_id)
    except Exception as exc:
        if _is_store_outage(exc):
            raise TrackingUnavailable(f"tracking store {target.uri} failed while opening experiment {experiment!r}: {_one_line(exc)}") from exc
        raise
    if closed:
        listed = ", ".join(f"{r.info.run_id} ({r.data.tags.get(f'{TAG_PREFIX}stage', '?')}, pid {r.data.tags.get(TAG_PID)})" for r in closed)
        print(f"lightclip: closed {len(closed)} stale run(s) of experiment {experiment!r} as KILLED (their process on this host "
              f"is gone): {listed}", file=sys.stderr, flush=True)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {**lineage_tags(project_dir, stage), **process_tags()}
    if closed:
        tags[TAG_STALE_CLOSED_COUNT] = str(len(closed))
    with stop_signals_raise() as interrupts:
        try:
            active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name or stage, parent_run_id=parent,
                                      nested=parent is not None, tags=tags)
        except Exception as exc:
            if _is_store_outage(exc):
                raise TrackingUnavailable(f"tracking store {target.uri} failed while starting the {stage} run: {_one_line(exc)}") from exc
            raise
        handle = StageRun(active, target.uri, settings)
        status, failure = "FINISHED", None
        try:
            handle.log_params(params)
            yield handle
        except KeyboardInterrupt:  # StageInterrupted (SIGINT/SIGTERM) or a plain Ctrl-C
            status = "KILLED"
            raise
        except BaseException as exc:  # after a signal, whatever a chained handler raised means KILLED
            status, failure = ("KILLED" if interrupts.received is not None else "FAILED"), exc
            raise
        finally:
            interrupts.armed = False  # a second signal must not cut the end of the run short
            problem = end_run(handle, status)
            if problem is not None:
                message = (f"tracking store {target.uri}: run {handle.run_id} could not be ended {status} ({problem}); "
                           "the next stage start on this host closes it as KILLED")
                if status == "FINISHED" and failure is None:
                    raise TrackingUnavailable(message)
                print(f"lightclip: {message}", file=sys.stderr, flush=True)
            if failure is not None and not isinstance(failure, TrackingUnavailable) and _is_store_outage(failure):
                raise TrackingUnavailable(f"tracking store {target.uri} failed during the {stage} run: {_one_line(failure)}") from failure
    if interrupts.received is not None:  # a signal that came while the run was being ended
        raise StageInterrupted(interrupts.received)


@contextmanager
def pipeline_run(
    name: str,
    params: Mapping[str, Any],
    *,
    project_dir: Path,
    experiment: str,
    tags: Mapping[str, str] | None = None,
    settings: TrackingConfig | None = None,
) -> Iterator[StageRun]:
    """Open the parent run of a whole pipeline and export its id to child processes."""
    previous = os.environ.get(PARENT_RUN_ENV)
    with stage_run("pipeline", params, project_dir=project_dir, experiment=experiment, run_name=name, settings=settings) as run:
        if tags:
            run.set_tags(tags)
        os.environ[PARENT_RUN_ENV] = run.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous
