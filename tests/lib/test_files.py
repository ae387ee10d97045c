"""Tests for stages/lib/files.py: the single-file writers (replacing, atomic_write_bytes), and
atomic_dir with real processes SIGKILLed at each step of a publish.

Each killed process runs PUBLISH (below) with one step of files.py wrapped to print a word and
hang there; the test kills it (SIGKILL: no cleanup code runs) and checks what is on disk, then
what the next run does. These are the direct-run cases (`python -m stages.<name>`): under
`dvc repro` DVC has deleted the output before the stage runs, so there is no previous one to keep.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.lib import files

ROOT = Path(__file__).resolve().parents[2]
OLD = {"a.txt": b"old a", "sub/b.txt": b"old b"}
NEW = {"a.txt": b"new a", "sub/b.txt": b"new b", "c.txt": b"new c"}

PUBLISH = """
import sys, time
from pathlib import Path
from stages.lib import files
out, hang_at = Path(sys.argv[1]), sys.argv[2]
def hang(word):
    print(word, flush=True)
    time.sleep(120)
if hang_at == "between-renames":  # the previous output moved aside, the new one not yet in place
    real_rename = files.os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if Path(dst).name.endswith(".old.tmp"):
            hang("moved aside")
    files.os.rename = rename
with files.atomic_dir(out) as tmp:
    (tmp / "sub").mkdir()
    for name, text in (("a.txt", "new a"), ("sub/b.txt", "new b"), ("c.txt", "new c")):
        (tmp / name).write_text(text)
    if hang_at == "building":
        hang("building")
    if hang_at == "until-go":
        print("building", flush=True)
        while not (out.parent / "go").exists():
            time.sleep(0.05)
print("done", flush=True)
"""


def write_tree(folder: Path, tree: dict[str, bytes]) -> None:
    for name, data in tree.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def start(out: Path, hang_at: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PUBLISH, str(out), hang_at], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_for(process: subprocess.Popen, word: str) -> None:
    line = process.stdout.readline().strip() if select.select([process.stdout], [], [], 60)[0] else "(nothing)"
    if line != word:
        process.kill()
        pytest.fail(f"expected {word!r}, got {line!r}; stderr: {process.communicate()[1][-2000:]}")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


# --------------------------------------------------------------------------------------------
# Single files: replacing() and atomic_write_bytes
# --------------------------------------------------------------------------------------------
def beside(path: Path) -> list[str]:
    """Every name in `path`'s folder but its own: temporary files left behind."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_atomic_write_bytes_writes_the_content_as_an_ordinary_file_and_nothing_else(tmp_path):
    path = tmp_path / "new" / "folder" / "decision.json"
    files.atomic_write_bytes(path, b'{"tta": "flips"}\n')
    assert path.read_bytes() == b'{"tta": "flips"}\n'
    assert (path.stat().st_mode & 0o777) == 0o644, "rw-r--r--, not mkstemp's owner-only 0600"
    assert beside(path) == []
    files.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second" and beside(path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_an_exception_inside_replacing_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"old, complete")
    with pytest.raises(type(error)), files.replacing(path) as (fd, tmp):
        os.write(fd, b"new, half")
        os.close(fd)
        assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".metrics.json.")
        raise error
    assert path.read_bytes() == b"old, complete"
    assert beside(path) == [], "the temporary file is deleted"


def test_a_disk_full_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "images.csv"
    path.write_bytes(b"image_id\nISIC_1\nISIC_2\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device"):
        files.atomic_write_bytes(path, b"image_id\nISIC_1\n")  # a shorter table: it must not land
    monkeypatch.undo()
    assert path.read_bytes() == b"image_id\nISIC_1\nISIC_2\n" and beside(path) == []


def test_a_reader_sees_the_old_or_the_new_file_never_a_part(tmp_path):
    """Killed (SIGKILL) halfway through writing: the file is still the old one, whole."""
    path = tmp_path / "train.csv"
    path.write_bytes(b"old\n" * 1000)
    script = ("import sys, time\nfrom pathlib import Path\nfrom stages.lib import files\n"
              "with files.replacing(Path(sys.argv[1])) as (fd, tmp):\n"
              "    import os\n    os.write(fd, b'new\\n' * 500)\n    print('half', flush=True)\n    time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_for(process, "half")
    kill(process)
    assert path.read_bytes() == b"old\n" * 1000


# --------------------------------------------------------------------------------------------
# Folders: atomic_dir
# --------------------------------------------------------------------------------------------
@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An output folder holding a complete previous version."""
    folder = tmp_path / "data" / "raw"
    write_tree(folder, OLD)
    return folder


def publish_in_process(out: Path, content: dict[str, bytes] = NEW) -> None:
    with files.atomic_dir(out) as tmp:
        write_tree(tmp, content)


def test_a_publish_replaces_the_output_and_leaves_nothing_beside_it(out):
    publish_in_process(out)
    assert tree(out) == NEW and leftovers(out) == []
    assert (out.stat().st_mode & 0o777) == 0o755


def test_an_error_while_building_keeps_the_previous_output(out):
    with pytest.raises(RuntimeError), files.atomic_dir(out) as tmp:
        write_tree(tmp, NEW)
        raise RuntimeError("boom")
    assert tree(out) == OLD and leftovers(out) == []


def test_a_first_publish_creates_the_output(tmp_path):
    publish_in_process(tmp_path / "new" / "out")
    assert tree(tmp_path / "new" / "out") == NEW


def test_a_failed_rename_onto_the_output_puts_the_previous_one_back(out, monkeypatch):
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst) == out and not Path(src).name.endswith(".old.tmp"):  # the new folder onto the output
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="Permission denied"):
        publish_in_process(out)
    monkeypatch.undo()
    assert tree(out) == OLD and leftovers(out) == []


def test_killed_while_building_keeps_the_previous_output_and_the_next_run_cleans_up(out):
    process = start(out, "building")
    wait_for(process, "building")
    kill(process)
    assert tree(out) == OLD
    (left,) = leftovers(out)
    assert left.startswith(f".raw.run{process.pid}.")

    publish_in_process(out)
    assert tree(out) == NEW and leftovers(out) == [], "the dead run's folder is deleted"


def test_killed_between_the_two_renames_leaves_no_output_and_the_next_run_publishes(out):
    """The one instant a direct run can leave no output: like a failed `dvc repro`, which deletes it first."""
    process = start(out, "between-renames")
    wait_for(process, "moved aside")
    kill(process)
    saved = out.parent / f".raw.run{process.pid}.old.tmp"
    assert tree(saved) == OLD and not out.exists()
    assert len(leftovers(out)) == 2, "the saved previous output and the new folder, both the dead run's"

    publish_in_process(out)
    assert tree(out) == NEW and leftovers(out) == [], "the dead run's folders are deleted"


def test_a_second_run_does_not_delete_a_live_runs_folder(out):
    process = start(out, "until-go")
    try:
        wait_for(process, "building")
        (mine,) = leftovers(out)
        publish_in_process(out, {"other.txt": b"second run"})
        assert tree(out) == {"other.txt": b"second run"}
        assert leftovers(out) == [mine] and tree(out.parent / mine) == NEW, "the live run's folder is intact"

        (out.parent / "go").touch()
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert tree(out) == NEW and leftovers(out) == [], "the first run published its complete output"


def test_a_leftover_of_a_dead_process_is_deleted_but_not_of_a_live_one(out):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    deadline = time.monotonic() + 5
    while files._alive(dead_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    dead_folder = out.parent / f".raw.run{dead_pid}.abc123.tmp"
    live_folder = out.parent / f".raw.run{os.getppid()}.def456.tmp"  # pytest's parent: alive
    unrelated = out.parent / ".raw.json.xyz.tmp"  # an atomic_write_bytes temporary of a sibling file
    for folder in (dead_folder, live_folder):
        write_tree(folder, {"x": b"x"})
    unrelated.write_bytes(b"x")

    publish_in_process(out)
    assert not dead_folder.exists() and live_folder.exists() and unrelated.exists()
