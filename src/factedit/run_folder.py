"""One resumable run folder: the one way `eval`, `sequential` and `trace-avg` write their output.

A run folder holds its settings (settings.json) and what the run has done so far: whole JSON files
written atomically (case files, summaries) and append-only JSON-lines logs (facts.jsonl,
lifelong.jsonl). A rerun on the same folder resumes the run only when its settings are the same
ones; any other run is refused.

Settings added to a kind of run after some folders were written get one declared rule: a field
the saved settings lack counts as its declared default (`added_later`), the value every run had
before the field existed, or, where that value was never recorded (`UNRECORDED`), as the current
run's. Fields that a rerun may change (`may_differ`, e.g. how many cases) are recorded, not compared.

Provenance: settings.json also lists under "sessions" every session that wrote to the folder (the
factedit version, the git revision of the source tree the package was imported from, whether that
tree had changes not in the revision, and when the session started), so that a number computed from
the folder can be traced to the code that made it. Sessions are never part of the "same run?"
comparison: a run resumed after a commit resumes. The revision is None where the package is not
imported from a git work tree that tracks it (an installed wheel, a copy in an ignored folder), or
git is missing or too slow. "dirty" counts the package folder only (src/factedit: modified,
staged, deleted and untracked-not-ignored files), not the rest of the repository: a docs edit does not
make results dirty, a new module that the run imported does.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Collection, Mapping

from .cache_files import append_jsonl, read_jsonl, write_atomic
from .errors import InputError
from .folder_lock import FolderLock

SETTINGS_FILE = "settings.json"
LOCK_FILE = "run.lock"  # held by the process running in the folder (folder_lock)
SESSIONS = "sessions"  # the key of settings.json that lists the sessions; never a setting
GIT_TIMEOUT = 2.0  # seconds for all git calls together: provenance must never hold a run up


class _Unrecorded:
    """The default of a field added later whose value before it existed was never recorded."""

    def __repr__(self) -> str:
        return "UNRECORDED"


UNRECORDED = _Unrecorded()


def write_json(path: Path, value: Any, *, indent: int | None = None) -> None:
    """Atomically (cache_files.write_atomic): a kill never leaves half a file."""
    write_atomic(Path(path), lambda partial: partial.write_text(json.dumps(value, indent=indent)))


# ------------------------------------------------------------------------------------- provenance

@dataclass(frozen=True)
class Session:
    """One session that wrote to a run folder: the code it ran and when it started (UTC, ISO 8601).
    All None: the sessions of a folder from before provenance was recorded."""

    version: str | None
    revision: str | None
    dirty: bool | None
    started: str | None

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> Session:
        return cls(*(saved.get(name) for name in ("version", "revision", "dirty", "started")))


UNKNOWN_SESSIONS = Session(None, None, None, None)


def source_folder() -> Path:
    """The folder the factedit package was imported from."""
    return Path(__file__).resolve().parent


def factedit_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("factedit")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return None


def git_state(folder: Path, timeout: float = GIT_TIMEOUT) -> tuple[str | None, bool | None]:
    """(revision, dirty) of the git work tree that tracks `folder`, or (None, None): not tracked by
    one (an installed package, also one in an ignored virtualenv inside a repository), no git, or
    git slower than `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    # Without the caller's GIT_DIR and the like, which would point git at another repository.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            done = subprocess.run(["git", *args], cwd=folder, env=env, capture_output=True, text=True, check=False,
                                  timeout=left)
        except (OSError, subprocess.SubprocessError):  # no git (FileNotFoundError), too slow, no folder
            return None
        return done.stdout if done.returncode == 0 else None

    tracked = git("ls-files", "--error-unmatch", "--", "__init__.py")
    revision = git("rev-parse", "--verify", "HEAD") if tracked is not None else None
    changes = git("status", "--porcelain", "--", ".") if revision is not None else None
    if revision is None or changes is None:
        return None, None
    return revision.strip(), bool(changes.strip())


def this_session() -> Session:
    revision, dirty = git_state(source_folder())
    return Session(version=factedit_version(), revision=revision, dirty=dirty,
                   started=datetime.now(timezone.utc).isoformat(timespec="seconds"))


# ------------------------------------------------------------------------------------- settings

def with_added_later(saved: Mapping[str, Any], added_later: Mapping[str, Any],
                     current: Mapping[str, Any] | None = None) -> dict:
    """Saved settings (without the sessions) as the current code reads them: each field of
    `added_later` that they lack at its default. Compared with a `current` run's settings, only the
    fields that run has are filled (a sequential run's fields are not added to another run's), and
    an UNRECORDED one takes the current run's value; read alone, UNRECORDED fields stay absent. A
    dotted key names a field of a nested object ("settings.early_stop_steps"), filled only in a
    comparison (read alone, the saved object stays as it was: it may be another method's)."""
    settings = {k: v for k, v in saved.items() if k != SESSIONS}
    for key, default in added_later.items():
        if "." in key:  # a field of a nested object ("settings.early_stop_steps": a method's settings),
            # filled only for a comparison, where the current run's object has the field
            outer, inner = key.split(".", 1)
            nested_current = current.get(outer) if current is not None else None
            if isinstance(settings.get(outer), dict) and isinstance(nested_current, dict):
                settings[outer] = with_added_later(settings[outer], {inner: default}, nested_current)
            continue
        if key in settings or (current is not None and key not in current):
            continue
        if default is not UNRECORDED:
            settings[key] = default
        elif current is not None:
            settings[key] = current[key]
    return settings


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], may_differ: Collection[str] = ()) -> list[str]:
    """'key: old -> new' for each setting that changed (nested ones as 'settings.key: ...'), besides
    those in `may_differ` (top level only)."""
    differ = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if key in may_differ or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            differ += [f"{key}.{d}" for d in differences(old, new)]
        else:
            differ.append(f"{key}: {old!r} -> {new!r}")
    return differ


class RunFolder:
    """A run's output folder (see the module docstring). Constructing one reads and writes nothing:
    `start` creates or resumes the run and holds the folder's lock until `release` (or the end of a
    `with` block, or of the process): one run per folder at a time; the rest reads and writes its
    files."""

    def __init__(self, path: str | Path, *, added_later: Mapping[str, Any] | None = None,
                 may_differ: Collection[str] = ()):
        self.path = Path(path)
        self.added_later = MappingProxyType(dict(added_later or {}))
        self.may_differ = frozenset(may_differ)
        self._lock = FolderLock(self.path, LOCK_FILE, "run folder")

    def release(self) -> None:
        """Let another process run in the folder (a no-op where this one holds no lock)."""
        self._lock.release()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def settings_path(self) -> Path:
        return self.path / SETTINGS_FILE

    def start(self, settings: Mapping[str, Any], session: Session | None = None) -> None:
        """Create the folder for a run with `settings`, or resume the run it holds, which must have the
        same settings (InputError: "... holds a run with other settings (what differs) ..."); either
        way, record this session (default: this_session()) in its settings file. Takes the folder's
        lock first: FolderBusyError (naming the process) while another run is in it."""
        if SESSIONS in settings:
            raise ValueError(f"{SESSIONS!r} is the run folder's list of sessions, not a setting")
        # Before reading: two runs resuming one folder would both do its missing work and both append
        # it (FolderBusyError names the process that holds it).
        self._lock.acquire()
        try:
            saved = self._read_saved()
            sessions: list[dict] = []
            if saved is not None:
                differ = differences(with_added_later(saved, self.added_later, settings), settings, self.may_differ)
                if differ:
                    raise InputError(f"{self.path} holds a run with other settings ({'; '.join(differ)}); "
                                     "use another --out")
                sessions = saved.get(SESSIONS) or [asdict(UNKNOWN_SESSIONS)]  # written before sessions were
            sessions.append(asdict(session or this_session()))
            # Atomically: a settings file cut off by a kill would stop every resume of the run.
            write_json(self.settings_path, {**settings, SESSIONS: sessions}, indent=1)
        except BaseException:
            self._lock.release()  # a refused run leaves the folder to the next one
            raise

    def settings(self) -> dict | None:
        """The saved settings as the current code reads them (with_added_later), without the
        sessions; None where the folder holds no run."""
        saved = self._read_saved()
        return None if saved is None else with_added_later(saved, self.added_later)

    def sessions(self) -> list[Session]:
        """The sessions that wrote to the folder, oldest first (none where it holds no run or was
        written before sessions were recorded)."""
        saved = self._read_saved() or {}
        return [Session.from_dict(s) for s in saved.get(SESSIONS) or []]

    def _read_saved(self) -> dict | None:
        if not self.settings_path.is_file():
            return None
        try:
            saved = json.loads(self.settings_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{self.settings_path} cannot be read as a run's settings ({err}); "
                             "use another --out") from None
        if not isinstance(saved, dict):
            raise InputError(f"{self.settings_path} holds no run's settings (not a JSON object); use another --out")
        return saved

    def append(self, name: str, record: Any) -> None:
        """Append `record` to the JSON-lines log `name` (cache_files.append_jsonl)."""
        append_jsonl(self.path / name, record)

    def records(self, name: str) -> list[Any]:
        """The records of the log `name`, in order; a line cut off by a kill is skipped with a
        warning (cache_files.read_jsonl): its work is done again."""
        return read_jsonl(self.path / name)

    def write_json(self, name: str, value: Any, *, indent: int | None = None) -> Path:
        """Write the whole JSON file `name` (a path inside the folder) atomically."""
        path = self.path / name
        write_json(path, value, indent=indent)
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Write the whole text file `name` atomically."""
        return write_atomic(self.path / name, lambda partial: partial.write_text(text))
