"""One resumable run folder: a rerun resumes only the same run, fields added later read as their
defaults, every session that wrote to the folder is recorded with the code it ran (never part of the
comparison), and records and whole files survive a kill."""

import json
import subprocess
import warnings

import pytest

from factedit import run_folder as run_folder_module
from factedit.cache_files import DamagedLines
from factedit.errors import InputError
from factedit.run_folder import UNRECORDED, RunFolder, Session, git_state, with_added_later

SETTINGS = {"method": "rome", "n": 10, "settings": {"layer": 5, "v_steps": 20}}
A_SESSION = Session(version="0.1.0", revision="abc", dirty=False, started="2026-01-01T00:00:00+00:00")


def saved(folder: RunFolder) -> dict:
    return json.loads(folder.settings_path.read_text())


def test_a_run_is_created_resumed_with_the_same_settings_and_refused_with_others(tmp_path):
    folder = RunFolder(tmp_path / "run", may_differ={"n"})
    assert folder.settings() is None and folder.sessions() == [] and not folder.path.exists()  # reads nothing
    folder.start(SETTINGS, A_SESSION)
    assert folder.settings() == SETTINGS
    folder.start({**SETTINGS, "n": 20}, A_SESSION)  # n may change; the file records the latest
    assert folder.settings()["n"] == 20
    with pytest.raises(InputError, match=r"run holds a run with other settings \(method: 'rome' -> 'memit'; "
                                         r"settings.v_steps: 20 -> 25\); use another --out"):
        folder.start({**SETTINGS, "method": "memit", "settings": {"layer": 5, "v_steps": 25}}, A_SESSION)
    with pytest.raises(InputError, match=r"other settings \(extra: None -> 1\)"):
        folder.start({**SETTINGS, "extra": 1}, A_SESSION)  # a field the saved run lacks, without a default
    assert folder.settings()["n"] == 20 and len(folder.sessions()) == 2  # a refused run writes nothing
    with pytest.raises(ValueError, match="not a setting"):
        folder.start({**SETTINGS, "sessions": []})


def test_fields_added_later_read_as_their_declared_defaults(tmp_path):
    added_later = {"start": 0, "measure_every": 1, "digest": UNRECORDED}
    old = tmp_path / "old"
    old.mkdir()
    (old / "settings.json").write_text(json.dumps(SETTINGS))  # written before start, measure_every, digest
    folder = RunFolder(old, added_later=added_later)
    folder.start({**SETTINGS, "start": 0, "digest": "d1"}, A_SESSION)  # measure_every: not this run's field
    assert saved(folder)["digest"] == "d1" and "measure_every" not in saved(folder)
    (old / "settings.json").write_text(json.dumps(SETTINGS))
    with pytest.raises(InputError, match=r"other settings \(start: 0 -> 3\)"):
        folder.start({**SETTINGS, "start": 3}, A_SESSION)
    with pytest.raises(InputError, match=r"other settings \(measure_every: 1 -> 2\)"):
        folder.start({**SETTINGS, "measure_every": 2}, A_SESSION)
    # read alone: the defaults, but not an unrecorded value; the sessions are not settings
    assert with_added_later({**SETTINGS, "sessions": []}, added_later) == {**SETTINGS, "start": 0, "measure_every": 1}
    assert with_added_later({"start": 4}, added_later, {"start": 0, "digest": "d"}) == {"start": 4, "digest": "d"}


def test_sessions_record_the_code_and_are_never_compared(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "run")
    folder.start(SETTINGS, A_SESSION)
    later = Session(version="0.2.0", revision="def", dirty=True, started="2026-02-01T00:00:00+00:00")
    folder.start(SETTINGS, later)  # another commit, a dirty tree: the same run resumes
    assert folder.sessions() == [A_SESSION, later]
    assert saved(folder)["sessions"][1] == {"version": "0.2.0", "revision": "def", "dirty": True,
                                            "started": "2026-02-01T00:00:00+00:00"}
    # By default the session is this process's: version, revision and dirty flag from git, UTC time.
    monkeypatch.setattr(run_folder_module, "git_state", lambda folder: ("0123abc", False))
    folder.start(SETTINGS)
    now = folder.sessions()[-1]
    assert (now.revision, now.dirty) == ("0123abc", False) and now.version and now.started.endswith("+00:00")


def test_a_folder_from_before_sessions_gains_them_and_says_the_earlier_ones_are_unknown(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps(SETTINGS))
    folder = RunFolder(tmp_path)
    assert folder.sessions() == []
    folder.start(SETTINGS, A_SESSION)
    assert folder.sessions() == [Session(None, None, None, None), A_SESSION]


def test_an_unreadable_settings_file_is_a_clear_error(tmp_path):
    (tmp_path / "settings.json").write_text('{"method": "ro')  # cut off (written by an older version)
    with pytest.raises(InputError, match="cannot be read as a run's settings"):
        RunFolder(tmp_path).start(SETTINGS, A_SESSION)
    (tmp_path / "settings.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a JSON object"):
        RunFolder(tmp_path).start(SETTINGS, A_SESSION)


def git(folder, *args):
    subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(folder), "PATH": "/usr/bin:/bin"})


@pytest.fixture()
def source_tree(tmp_path):
    """A git repository whose package folder holds an __init__.py, committed once."""
    repo = tmp_path / "repo"
    package = repo / "src" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    return repo, package


def test_the_revision_and_dirty_flag_of_the_package_folder(source_tree, tmp_path):
    repo, package = source_tree
    revision, dirty = git_state(package)
    assert len(revision) == 40 and dirty is False
    (repo / "notes.md").write_text("a change outside the package")  # not the code: still clean
    assert git_state(package) == (revision, False)
    (package / "new_module.py").write_text("")  # untracked code the run could import
    assert git_state(package) == (revision, True)
    (package / "new_module.py").unlink()
    (package / "__init__.py").write_text("x = 1\n")
    assert git_state(package) == (revision, True)
    outside = tmp_path / "installed"  # a wheel's copy: no work tree
    outside.mkdir()
    (outside / "__init__.py").write_text("")
    assert git_state(outside) == (None, None)
    ignored = repo / ".venv" / "pkg"  # installed inside the repository, in an ignored folder
    ignored.mkdir(parents=True)
    (ignored / "__init__.py").write_text("")
    (repo / ".gitignore").write_text(".venv/\n")
    assert git_state(ignored) == (None, None)


@pytest.mark.parametrize("failure", [FileNotFoundError("git"), subprocess.TimeoutExpired("git", 2.0)])
def test_no_git_or_a_slow_one_gives_no_revision(source_tree, monkeypatch, failure):
    def fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr(run_folder_module.subprocess, "run", fails)
    assert git_state(source_tree[1]) == (None, None)
    monkeypatch.setattr(run_folder_module, "source_folder", lambda: source_tree[1])
    session = run_folder_module.this_session()
    assert (session.revision, session.dirty) == (None, None) and session.started


def test_git_is_given_the_time_left(source_tree, monkeypatch):
    timeouts = []
    real = subprocess.run

    def records(*args, timeout, **kwargs):
        timeouts.append(timeout)
        return real(*args, timeout=timeout, **kwargs)

    monkeypatch.setattr(run_folder_module.subprocess, "run", records)
    git_state(source_tree[1], timeout=2.0)
    assert len(timeouts) == 3 and all(0 < t <= 2.0 for t in timeouts) and timeouts == sorted(timeouts, reverse=True)


def test_records_are_appended_and_read_back_past_a_cut_off_line(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.append("log.jsonl", {"id": 1})
    folder.append("log.jsonl", {"id": 2})
    with (folder.path / "log.jsonl").open("a") as f:
        f.write('{"id": 3, "scor')  # a kill mid-write
    with pytest.warns(DamagedLines, match="skipped unreadable line"):
        assert folder.records("log.jsonl") == [{"id": 1}, {"id": 2}]
    with pytest.warns(DamagedLines, match="dropped its last line"):
        folder.append("log.jsonl", {"id": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert folder.records("log.jsonl") == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert folder.records("absent.jsonl") == []


def test_whole_files_are_written_atomically(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "run")
    path = folder.write_json("cases/1.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert folder.write_json("summary.json", [1], indent=1).read_text() == "[\n 1\n]"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("factedit.cache_files.os.replace", killed)  # killed once the new file is written
        with pytest.raises(KeyboardInterrupt):
            folder.write_json("cases/1.json", {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and sorted(p.name for p in path.parent.iterdir()) == ["1.json"]
    assert folder.write_text("summary.md", "| a |\n").read_text() == "| a |\n"


def test_one_run_at_a_time_in_a_folder(tmp_path):
    from factedit.folder_lock import FolderBusyError

    first, second = RunFolder(tmp_path / "run"), RunFolder(tmp_path / "run")
    first.start(SETTINGS, A_SESSION)
    with pytest.raises(FolderBusyError, match="the run folder .*run is in use by another process"):
        second.start(SETTINGS, A_SESSION)
    assert len(first.sessions()) == 1  # the refused run wrote nothing
    first.release()
    with pytest.raises(InputError, match="other settings"):
        second.start({**SETTINGS, "method": "memit"}, A_SESSION)
    with RunFolder(tmp_path / "run") as third:  # a refused start let the folder go
        third.start(SETTINGS, A_SESSION)
    second.start(SETTINGS, A_SESSION)  # and so did the end of the `with` block
    assert len(second.sessions()) == 3


def test_a_field_added_later_to_a_nested_object_resumes_runs_saved_without_it(tmp_path):
    folder = RunFolder(tmp_path / "run", added_later={"settings.early_stop_steps": 2})
    folder.start(SETTINGS, A_SESSION)  # saved without the field
    folder.start(SETTINGS, A_SESSION)  # a method without the field (fine-tuning) resumes as before
    assert "early_stop_steps" not in folder.settings()["settings"]  # read alone: as saved
    with pytest.raises(InputError, match=r"settings.early_stop_steps: 2 -> 3"):
        folder.start({**SETTINGS, "settings": {**SETTINGS["settings"], "early_stop_steps": 3}}, A_SESSION)
    folder.start({**SETTINGS, "settings": {**SETTINGS["settings"], "early_stop_steps": 2}}, A_SESSION)
