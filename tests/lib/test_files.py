"""Tests for stages/lib/files.py's atomic_dir: real processes SIGKILLed at each step of a publish.

Each killed process runs PUBLISH (below) with one step of files.py wrapped to print a word and
hang there; the test kills it (SIGKILL: no cleanup code runs) and checks what is on disk, then
what the next run does.
"""
from __future__ import annotations

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
if hang_at == "after-exchange":
    real_exchange = files._exchange
    def exchange(a, b):
        done = real_exchange(a, b)
        hang("exchanged")
    files._exchange = exchange
if hang_at == "between-renames":  # a filesystem without rename-exchange: two renames
    files._exchange = lambda a, b: False
    real_move, moves = files._move, []
    def move(src, dst):
        real_move(src, dst)
        moves.append(dst)
        if len(moves) == 1:
            hang("moved aside")
    files._move = move
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


def test_the_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_tree(a, {"x": b"a"})
    write_tree(b, {"y": b"b"})
    if not files._exchange(a, b):
        pytest.skip("no renameat2 RENAME_EXCHANGE here: the two-rename publish is tested instead")
    assert tree(a) == {"y": b"b"} and tree(b) == {"x": b"a"}


def test_killed_while_building_keeps_the_previous_output_and_the_next_run_cleans_up(out):
    process = start(out, "building")
    wait_for(process, "building")
    kill(process)
    assert tree(out) == OLD
    (left,) = leftovers(out)
    assert left.startswith(f".raw.run{process.pid}.")

    publish_in_process(out)
    assert tree(out) == NEW and leftovers(out) == [], "the dead run's folder is deleted"


def test_killed_right_after_the_exchange_the_output_is_the_new_one(out):
    if files._renameat2() is None:
        pytest.skip("no renameat2 here: the two-rename publish is tested instead")
    process = start(out, "after-exchange")
    wait_for(process, "exchanged")
    kill(process)
    assert tree(out) == NEW, "never absent, never the old copy once the exchange happened"
    (left,) = leftovers(out)
    assert tree(out.parent / left) == OLD, "the old copy waits under the dead run's name"

    with pytest.raises(RuntimeError), files.atomic_dir(out):
        raise RuntimeError("the next run fails")
    assert tree(out) == NEW and leftovers(out) == [], "the next run deleted the dead run's leftover"


def test_killed_between_the_two_renames_the_next_run_puts_the_old_copy_back(out):
    """Without rename-exchange a publish is two renames; a kill between them is rolled back."""
    process = start(out, "between-renames")
    wait_for(process, "moved aside")
    kill(process)
    saved = out.parent / f".raw.run{process.pid}.old.tmp"
    assert tree(saved) == OLD and not out.exists()

    with pytest.raises(RuntimeError), files.atomic_dir(out):
        raise RuntimeError("the next run fails before publishing")
    assert tree(out) == OLD, "the saved copy was put back, not deleted as stale"
    assert leftovers(out) == []

    publish_in_process(out)
    assert tree(out) == NEW and leftovers(out) == []


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
