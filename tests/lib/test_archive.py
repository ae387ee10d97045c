"""stages/lib/archive.py: which files a folder or list gives (by extension, sorted, recursive),
JSON lines written per batch, resuming a file a killed run left (a cut last line rewritten), and
which patient metadata each image gets (flags, or a CSV row matched by file stem)."""
from __future__ import annotations

import io
import json
import os

import pytest

from stages.lib import archive
from stages.lib.metadata import NONE, Metadata
from stages.lib.prediction import Refused, UsageError


@pytest.fixture
def tree(tmp_path):
    """A folder as people keep them: any case of extension, subfolders, hidden and other files."""
    names = ["b.jpeg", "a.JPG", "c.png", "fake.png", "notes.txt", "scan.tiff", ".hidden.png", "sub/d.png",
             "sub/deeper/e.Jpg", ".cache/f.jpg", "sub/readme.md", "empty/"]
    for name in names:
        path = tmp_path / "photos" / name
        if name.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not decoded here")
    return tmp_path / "photos"


def test_a_folder_gives_its_jpeg_and_png_files_by_extension_sorted_and_recursively(tree):
    found = list(archive.image_paths([str(tree)]))
    assert found == [str(tree / n) for n in ("a.JPG", "b.jpeg", "c.png", "fake.png", "sub/d.png", "sub/deeper/e.Jpg")]
    assert "empty" not in str(found), "an empty subfolder of a folder with images is no error"


def test_a_folder_without_images_is_refused_with_why(tree):
    [refused] = archive.image_paths([str(tree / "empty")])
    assert refused == Refused(str(tree / "empty"), "no .jpg, .jpeg, .png file in this folder or below it")


def test_the_list_file_follows_the_arguments_one_path_per_line(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"photos/c.png\n\nphotos/sub\r\n" + os.fsencode(str(tree / "caf\udce9.jpg")) + b"\n")
    found = list(archive.image_paths(["photos/a.JPG"], listing))
    assert found == ["photos/a.JPG", "photos/c.png", "photos/sub/d.png", "photos/sub/deeper/e.Jpg",
                     str(tree / "caf\udce9.jpg")], "relative to the working folder; a listed folder is walked"


def test_a_missing_list_file_is_a_usage_error_at_once(tmp_path):
    with pytest.raises(UsageError, match=r"^list file .*nope.txt: cannot read \(No such file or directory\)$"):
        archive.image_paths([], tmp_path / "nope.txt")
    with pytest.raises(UsageError, match=r"cannot read \(Is a directory\)$"):
        archive.image_paths([], tmp_path)


def answer(name: str) -> dict:
    return {"image": name, "top": [], "warnings": []}


def test_lines_are_written_and_flushed_batch_by_batch(tmp_path):
    """Each batch reaches the file before the next one is even asked for."""
    path = tmp_path / "out.jsonl"
    out, done = archive.open_output(path, resume=False)
    seen = []

    def batches():
        for k in range(3):
            seen.append(path.read_text().count("\n"))  # what another process sees now
            yield [answer(f"{k}a.jpg"), {"image": f"{k}b.jpg", "error": "empty file (0 bytes)"}]

    assert archive.write_lines(batches(), out) == (6, 3)
    out.close()
    assert seen == [0, 2, 4] and done == set()
    assert [json.loads(line)["image"] for line in path.read_text().splitlines()] == [
        "0a.jpg", "0b.jpg", "1a.jpg", "1b.jpg", "2a.jpg", "2b.jpg"]


def test_an_existing_output_is_refused_without_resume(tmp_path):
    (tmp_path / "out.jsonl").write_text("")
    with pytest.raises(UsageError, match=r"out.jsonl exists: add --resume to continue it, or choose another file$"):
        archive.open_output(tmp_path / "out.jsonl", resume=False)


def test_resume_reads_whole_lines_and_cuts_off_a_line_killed_mid_write(tmp_path):
    path = tmp_path / "out.jsonl"
    whole = "".join(json.dumps(answer(n)) + "\n" for n in ("a.jpg", "b.jpg"))
    path.write_text(whole + json.dumps(answer("c.jpg"))[:20])  # the kill came mid-line
    out, done = archive.open_output(path, resume=True)
    assert done == {"a.jpg", "b.jpg"} and path.read_text() == whole, "the cut line is gone, to be rewritten"
    archive.write_lines([[answer("c.jpg")]], out)
    out.close()
    assert [json.loads(line)["image"] for line in path.read_text().splitlines()] == ["a.jpg", "b.jpg", "c.jpg"]
    path.write_text(whole + json.dumps(answer("c.jpg")))  # complete but for its newline: still not whole
    out, done = archive.open_output(path, resume=True)
    out.close()
    assert done == {"a.jpg", "b.jpg"} and path.read_text() == whole


def test_resume_starts_a_missing_file_and_refuses_one_that_is_not_predicts(tmp_path):
    out, done = archive.open_output(tmp_path / "new.jsonl", resume=True)
    out.close()
    assert done == set() and (tmp_path / "new.jsonl").read_text() == ""
    for line in ('{"top": []}\n', "not json\n", '["a.jpg"]\n'):
        (tmp_path / "other.jsonl").write_text(json.dumps(answer("a.jpg")) + "\n" + line)
        with pytest.raises(UsageError, match=r"other.jsonl: line 2 is not one of predict's JSON lines"):
            archive.open_output(tmp_path / "other.jsonl", resume=True)


def test_pending_skips_the_names_already_answered():
    paths = ["a.jpg", "caf\udce9.jpg", Refused("empty", "no file"), "d.png"]
    assert list(archive.pending(iter(paths), {"a.jpg", "caf\\xe9.jpg", "empty"})) == ["d.png"]


def test_write_lines_are_ascii_json_whatever_the_name():
    out = io.StringIO()
    archive.write_lines([[answer("red\x1b[31m\u202e.jpg")]], out)
    assert out.getvalue().isascii() and json.loads(out.getvalue())["image"] == "red\x1b[31m\u202e.jpg"


def test_metadata_comes_from_the_flags_or_from_the_csv_row_named_by_the_file_stem(tmp_path):
    assert archive.metadata_source() is None
    flags = archive.metadata_source(age="70", site="Upper_Extremity")
    assert flags("a.jpg") == flags("b/c.png") == Metadata(70.0, None, "upper extremity")
    (tmp_path / "meta.csv").write_text("Image_ID , Age,notes\n ISIC_0024306 ,35,x\nISIC_0024307,,y\nISIC_9,150,z\n")
    rows = archive.metadata_source(csv=tmp_path / "meta.csv")
    assert rows("photos/2019/ISIC_0024306.JPG") == Metadata(35.0, None, None)
    assert rows("ISIC_0024307.png") == NONE, "a missing value is not known"
    assert rows("ISIC_0024308.jpg") == NONE, "no row: nothing known"
    assert rows("ISIC_9.jpg") == f"{tmp_path / 'meta.csv'}, line 4: age '150': not a number of years from 0 to 120"
    assert rows("ISIC_0024306.jpg.png") == NONE, "the stem drops the last extension only"
