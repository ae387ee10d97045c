"""Tests for stages/download.py: sources, HTTP failures, checksums and hostile archives.

Every test runs in its own temporary working directory, talks only to 127.0.0.1, and for each
failure checks the message and that the previous good data/raw/ is still there.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from PIL import Image

import stages.download as download
from stages.lib.cli import ParamError, StageError, run_stage
from tests.http_fixtures import FileServer

P1, P2, META = "HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip", "HAM10000_metadata.csv"
DOI = "doi:10.7910/DVN/DBW86T"
LISTING = "api/datasets/:persistentId/versions/:latest-published/files"
CSV = (b"lesion_id,image_id,dx,dx_type,age,sex,localization\n"
       + b"".join(b"HAM_000000%d,ISIC_000000%d,nv,histo,50.0,male,back\n" % (i, i) for i in range(1, 6)))
PARAMS = {
    "dataverse_url": "https://dataverse.harvard.edu",
    "dataset_doi": DOI,
    "files": [P1, P2, META],
    "sha256": {},
    "local_dir": None,
    "retries": 3,
    "timeout_s": 5,
    "max_entry_bytes": 50_000_000,
    "max_total_bytes": 20_000_000_000,
    "max_compression_ratio": 100,
}
RAW = Path("data/raw")
CACHE = Path("data/downloads")
ROOT = Path(__file__).resolve().parents[2]


# ---- fixtures and builders -----------------------------------------------------------------
@lru_cache
def jpeg(seed: int) -> bytes:
    """A tiny real JPEG, different for each seed."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes] | list[tuple[str | zipfile.ZipInfo, bytes]],
             compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of `entries`, the same bytes on every call: a name gets a fixed date, not the clock's
    (two calls a second apart would otherwise differ, and so would their SHA256SUMS)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compression) as zf:
        warnings.simplefilter("ignore")  # duplicate names are made on purpose
        for name, data in (entries.items() if isinstance(entries, dict) else entries):
            if not isinstance(name, zipfile.ZipInfo):
                name = zipfile.ZipInfo(name, date_time=(2018, 6, 1, 0, 0, 0))
                name.compress_type, name.external_attr = compression, 0o600 << 16  # as writestr(str) sets them
            zf.writestr(name, data)
    return buf.getvalue()


def release() -> dict[str, bytes]:
    """A fake release: 3 + 2 images, a non-image entry, the metadata."""
    return {
        P1: make_zip({f"ISIC_000000{i}.jpg": jpeg(i) for i in (1, 2, 3)}),
        P2: make_zip({"ISIC_0000004.jpg": jpeg(4), "sub/ISIC_0000005.jpg": jpeg(5), "LICENSE.txt": b"CC"}),
        META: CSV,
    }


def sha256sums(files: dict[str, bytes]) -> bytes:
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items()).encode()


def mirror_files(**changes: bytes) -> dict[str, bytes]:
    """The fake release with its SHA256SUMS, as a mirror serves it."""
    files = release()
    return {**files, "SHA256SUMS": sha256sums(files), **changes}


def with_declared_size(data: bytes, size: int) -> bytes:
    """The same one-entry zip, its headers lying about the entry's uncompressed size."""
    buf = bytearray(data)
    central_directory = struct.unpack("<I", buf[-6:-2])[0]  # from the end record (no comment)
    struct.pack_into("<I", buf, central_directory + 24, size)
    struct.pack_into("<I", buf, 22, size)  # the first local header
    return bytes(buf)


def local_header(name: bytes, crc: int, packed: int, size: int, method: int) -> bytes:
    return struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0x4CC1, crc, packed, size, len(name), 0) + name


def raw_zip(entries: list[tuple[bytes, int, int, int, int, int]], body: bytes) -> bytes:
    """`body` (local headers and data laid out by the caller), then a central directory listing
    `entries` as (name, crc, compressed size, size, method, local header offset) and the end record."""
    central = b"".join(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0x4CC1, crc, packed, size,
                                   len(name), 0, 0, 0, 0, 0o600 << 16, offset) + name
                       for name, crc, packed, size, method, offset in entries)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(body), 0)
    return body + central + end


def stored_block(data: bytes) -> bytes:
    """A non-final deflate block holding `data` as it is (the 'quote' of an overlapping zip bomb)."""
    return b"\x00" + struct.pack("<HH", len(data), len(data) ^ 0xFFFF) + data


def overlap_bomb(entries: int = 60, kernel_bytes: int = 1_000_000, padding: int = 14_000) -> bytes:
    """Entries sharing one deflate stream (the overlapping zip bomb): entry i's data quotes the local
    header of entry i + 1 in a stored block and goes on as entry i + 1's data, down to one shared
    kernel; ~20 KB declare `entries` x ~1 MB, each entry's own ratio well under 100."""
    noise = random.Random(0).randbytes(padding)  # keeps each entry's own ratio under the limit
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = stored_block(noise) + compressor.compress(bytes(kernel_bytes)) + compressor.flush()
    content = noise + bytes(kernel_bytes)
    headers, listed = [], []
    for i in reversed(range(entries)):  # entry i's data and content, from the last entry's (the kernel)
        name = f"ISIC_{i:07d}.jpg".encode()
        header = local_header(name, zlib.crc32(content), len(data), len(content), zipfile.ZIP_DEFLATED)
        headers.insert(0, header)
        listed.insert(0, (name, zlib.crc32(content), len(data), len(content), zipfile.ZIP_DEFLATED))
        if i:
            data, content = stored_block(header) + data, header + content
    offsets = [0]
    for header in headers[:-1]:
        offsets.append(offsets[-1] + len(header) + 5)  # the next header sits inside a 5-byte quote
    return raw_zip([(*entry, offset) for entry, offset in zip(listed, offsets)], headers[0] + data)


def write_params(**download_params: object) -> None:
    other_section = {"split": {"seed": 1}}
    Path("params.yaml").write_text(yaml.safe_dump({"download": {**PARAMS, **download_params}, **other_section}))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    write_params()
    return tmp_path


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Back-off delays asked for, instead of sleeping them."""
    delays: list[float] = []
    monkeypatch.setattr(download, "sleep", delays.append)
    return delays


@pytest.fixture
def previous_raw(workdir: Path) -> dict[str, bytes]:
    """A complete earlier output that a failed run must leave untouched."""
    (RAW / "images").mkdir(parents=True)
    files = {"images/ISIC_9999999.jpg": jpeg(9), META: CSV}
    for name, data in files.items():
        (RAW / name).write_bytes(data)
    return files


def raw_files() -> dict[str, bytes]:
    """data/raw's data files (source.json, each file's size and sha256, is checked by source())."""
    return {p.relative_to(RAW).as_posix(): p.read_bytes() for p in RAW.rglob("*")
            if p.is_file() and p.name != download.SOURCE_FILE}


def source() -> dict:
    """data/raw/source.json: each file's size and sha256, nothing about where it came from."""
    return json.loads((RAW / download.SOURCE_FILE).read_text(encoding="utf-8"))


def origin() -> dict:
    """data/downloads/source.json (untracked): where the files came from."""
    return json.loads((CACHE / download.SOURCE_FILE).read_text(encoding="utf-8"))


def facts_of(files: dict[str, bytes]) -> dict:
    return {"files": {name: {"bytes": len(files[name]), "sha256": hashlib.sha256(files[name]).hexdigest()}
                      for name in (P1, P2, META)}}


def assert_unharmed(previous: dict[str, bytes]) -> None:
    assert raw_files() == previous
    assert not list(Path("data").glob(".raw.*")), "temporary output left behind"


def expected_raw() -> dict[str, bytes]:
    return {**{f"images/ISIC_000000{i}.jpg": jpeg(i) for i in range(1, 6)}, META: CSV}


def use_mirror(monkeypatch: pytest.MonkeyPatch, server: FileServer) -> None:
    monkeypatch.setenv(download.MIRROR_ENV, server.url)


# ---- the mirror ----------------------------------------------------------------------------
def test_mirror_download_extracts_images_and_caches(workdir, monkeypatch, sleeps):
    with FileServer(mirror_files()) as server:
        use_mirror(monkeypatch, server)
        download.main()
        assert raw_files() == expected_raw()
        assert source() == facts_of(mirror_files())
        assert origin() == {"source": "mirror", "url": server.url, "doi": None, "local_dir": None,
                            **facts_of(mirror_files())}
        assert sorted(p.name for p in CACHE.iterdir()) == sorted([P1, P2, META, download.SOURCE_FILE])
        assert all(r.user_agent == download.USER_AGENT for r in server.requests)

        download.main()  # a second run uses the verified cache
        assert [server.count(name) for name in (P1, P2, META)] == [1, 1, 1]
    assert raw_files() == expected_raw() and sleeps == []


def test_a_proxy_named_in_the_environment_carries_every_request(workdir, monkeypatch, sleeps):
    """Behind a proxy (http_proxy, as pip and curl read it), the mirror's host need not resolve here:
    the server below stands in for the proxy and gets each request in absolute form."""
    with FileServer(mirror_files()) as proxy:
        monkeypatch.setenv(download.MIRROR_ENV, "http://mirror.invalid/")
        for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("http_proxy", proxy.url)
        download.main()
        assert raw_files() == expected_raw()
        assert [proxy.count(name) for name in (P1, P2, META)] == [1, 1, 1]
        assert proxy.requests and all(r.path in (P1, P2, META, download.SUMS_FILE) for r in proxy.requests)
    monkeypatch.setenv("no_proxy", "mirror.invalid")  # bypassed: the host is looked up, and does not resolve
    (CACHE / P1).unlink()
    with pytest.raises(StageError, match="cannot resolve host mirror.invalid"):
        download.main()


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_same_files_from_two_servers_or_a_folder_give_byte_identical_data_raw(workdir, monkeypatch, sleeps):
    """data/raw (and so dvc.lock) holds no URL or port: a mirror elsewhere changes nothing."""
    raws = []
    with FileServer(mirror_files()) as first, FileServer(mirror_files()) as second:
        assert first.url != second.url
        for i, server in enumerate((first, second)):
            use_mirror(monkeypatch, server)
            download.main(out_dir=Path(f"run{i}/raw"), cache_dir=Path(f"run{i}/downloads"))
            raws.append(tree(Path(f"run{i}/raw")))
            assert json.loads(Path(f"run{i}/downloads/source.json").read_text())["url"] == server.url
    local = Path("local")
    local.mkdir()
    for name, data in release().items():
        (local / name).write_bytes(data)
    monkeypatch.delenv(download.MIRROR_ENV)
    write_params(local_dir=str(local))
    download.main(out_dir=Path("run2/raw"), cache_dir=Path("run2/downloads"))
    raws.append(tree(Path("run2/raw")))
    assert raws[0] == raws[1] == raws[2] and download.SOURCE_FILE in raws[0]
    assert json.loads(raws[0][download.SOURCE_FILE]) == facts_of(release())


def test_download_progress_is_logged_through_the_shared_progress(workdir, monkeypatch, sleeps, caplog):
    monkeypatch.setenv("STAGES_PROGRESS", "log")
    files = mirror_files()
    with FileServer(files) as server, caplog.at_level("INFO", logger="stages.download"):
        use_mirror(monkeypatch, server)
        download.main()
    size = len(files[P1])
    assert f"download {P1}: {size}/{size} bytes (100%)" in caplog.text


@pytest.mark.parametrize("ranges", [True, False], ids=["206", "range-ignored"])
def test_dropped_connection_resumes(workdir, monkeypatch, sleeps, ranges):
    files = mirror_files()
    half = len(files[P1]) // 2
    with FileServer(files, ranges=ranges) as server:
        server.drop(P1, after_bytes=half)
        use_mirror(monkeypatch, server)
        download.main()
        first, second = [r for r in server.requests if r.path == P1]
    assert first.range is None and second.range == f"bytes={half}-"
    assert second.status == (206 if ranges else 200)
    assert (CACHE / P1).read_bytes() == files[P1]  # and it matched SHA256SUMS
    assert raw_files() == expected_raw() and len(sleeps) == 1


def test_stale_part_longer_than_file_starts_over(workdir, monkeypatch, sleeps):
    files = mirror_files()
    CACHE.mkdir(parents=True)
    (CACHE / f"{P1}.part").write_bytes(files[P1] + b"junk")
    with FileServer(files) as server:
        use_mirror(monkeypatch, server)
        download.main()
        assert [r.status for r in server.requests if r.path == P1] == [416, 200]
    assert raw_files() == expected_raw()


def test_404_fails_at_once_naming_url_and_status(previous_raw, monkeypatch, sleeps):
    files = mirror_files()
    del files[P2]
    with FileServer(files) as server:
        use_mirror(monkeypatch, server)
        with pytest.raises(StageError, match=f"{server.url}{P2}: HTTP 404"):
            download.main()
        assert server.count(P2) == 1
    assert sleeps == [] and not list(CACHE.glob(f"{P2}*"))
    assert_unharmed(previous_raw)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_status_is_retried_with_backoff(workdir, monkeypatch, sleeps, status):
    with FileServer(mirror_files()) as server:
        server.fail(P1, status, times=2)
        use_mirror(monkeypatch, server)
        download.main()
        assert server.count(P1) == 3
    assert sleeps == [0, 2.0]  # urllib3's back-off: 0 after the first failure, then 2 ** (n - 1) s
    assert raw_files() == expected_raw()


def test_transient_status_forever_gives_up_after_retries(previous_raw, monkeypatch, sleeps):
    with FileServer(mirror_files()) as server:
        server.fail(P1, 500, times=None)
        use_mirror(monkeypatch, server)
        with pytest.raises(StageError, match=rf"{server.url}{P1}: HTTP 500 .*gave up after 3 retries"):
            download.main()
        assert server.count(P1) == 4
    assert sleeps == [0, 2.0, 4.0]
    assert not list(CACHE.glob(f"{P1}*")), "no half file where the verified one belongs"
    assert_unharmed(previous_raw)


def test_refused_connection_is_retried_then_named(previous_raw, monkeypatch, sleeps):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setenv(download.MIRROR_ENV, url)
    with pytest.raises(StageError, match=rf"{url}SHA256SUMS: cannot connect .*gave up after 3 retries"):
        download.main()
    assert len(sleeps) == 3
    assert_unharmed(previous_raw)


def test_html_page_instead_of_zip_leaves_nothing_in_cache(previous_raw, monkeypatch, sleeps):
    with FileServer(mirror_files()) as server:
        server.serve_html(P1)
        use_mirror(monkeypatch, server)
        with pytest.raises(StageError, match=f"{server.url}{P1}: server answered an HTML page"):
            download.main()
    assert not (CACHE / P1).exists() and not (CACHE / f"{P1}.part").exists()
    assert_unharmed(previous_raw)


def test_non_zip_body_where_zip_expected(previous_raw, monkeypatch, sleeps):
    files = mirror_files()
    files[P1] = b"<html>not found</html>"  # served as application/zip, no checksum for it
    del files["SHA256SUMS"]
    with FileServer(files) as server:
        use_mirror(monkeypatch, server)
        with pytest.raises(StageError, match=f"{server.url}{P1}: not a zip archive"):
            download.main()
    assert not list(CACHE.glob(f"{P1}*"))
    assert_unharmed(previous_raw)


@pytest.mark.parametrize("where", ["SHA256SUMS", "params pin"])
def test_checksum_mismatch_deletes_the_file(previous_raw, monkeypatch, sleeps, where):
    files = mirror_files()
    wrong = "0" * 64
    actual = hashlib.sha256(files[P1]).hexdigest()
    if where == "SHA256SUMS":
        files["SHA256SUMS"] = files["SHA256SUMS"].replace(actual.encode(), wrong.encode())
    else:
        write_params(sha256={P1: wrong})
    with FileServer(files) as server:
        use_mirror(monkeypatch, server)
        with pytest.raises(StageError, match=f"sha256 mismatch: expected {wrong} .*got {actual}"):
            download.main()
    assert not list(CACHE.glob(f"{P1}*"))
    assert_unharmed(previous_raw)


def test_corrupt_cached_zip_is_removed_and_fetched_again(previous_raw, monkeypatch, sleeps):
    files = release()  # no SHA256SUMS: the cached copy cannot be checked before extraction
    corrupt = bytearray(files[P1])
    corrupt[100:110] = b"X" * 10  # inside the first image: CRC error
    CACHE.mkdir(parents=True)
    (CACHE / P1).write_bytes(bytes(corrupt))
    with FileServer(files) as server:
        use_mirror(monkeypatch, server)
        with pytest.raises(StageError, match=rf"{CACHE / P1}: .*corrupt.*removed from data/downloads"):
            download.main()
        assert not (CACHE / P1).exists()
        assert_unharmed(previous_raw)
        download.main()
    assert raw_files() == expected_raw()


# ---- the official source: Dataverse's native API ---------------------------------------------
def dataverse_files(md5_of_csv: str | None = None) -> dict[str, bytes]:
    """A fake Dataverse: the listing JSON and the access API, the CSV ingested as .tab."""
    files = release()
    listing = {"status": "OK", "data": [
        {"label": P1, "dataFile": {"id": 11, "filename": P1, "checksum": {"type": "SHA-256",
                                   "value": hashlib.sha256(files[P1]).hexdigest()}}},
        {"label": P2, "dataFile": {"id": 12, "filename": P2, "md5": hashlib.md5(files[P2]).hexdigest()}},
        {"label": "HAM10000_metadata.tab", "dataFile": {
            "id": 13, "filename": "HAM10000_metadata.tab", "originalFileName": META,
            "originalFileFormat": "text/csv",
            "checksum": {"type": "MD5", "value": md5_of_csv or hashlib.md5(CSV).hexdigest()}}},
        {"label": "ISIC2018_Task3_Test_Images.zip",
         "dataFile": {"id": 14, "filename": "ISIC2018_Task3_Test_Images.zip"}},
    ]}
    return {
        LISTING: json.dumps(listing).encode(),
        "api/access/datafile/11": files[P1],
        "api/access/datafile/12": files[P2],
        "api/access/datafile/13": CSV.replace(b",", b"\t"),  # the ingested archival copy
        "api/access/datafile/13?format=original": CSV,
    }


def test_dataverse_resolves_names_and_fetches_originals(workdir, sleeps):
    with FileServer(dataverse_files()) as server:
        write_params(dataverse_url=server.url)
        download.main()
        listing = next(r for r in server.requests if r.path == LISTING)
        fetched = [(r.path, r.query) for r in server.requests if r.path != LISTING]
    assert listing.query == "persistentId=doi%3A10.7910%2FDVN%2FDBW86T"
    assert sorted(fetched) == [("api/access/datafile/11", ""), ("api/access/datafile/12", ""),
                               ("api/access/datafile/13", "format=original")]
    assert raw_files() == expected_raw()
    assert source() == facts_of(release())
    assert origin() == {"source": "official", "url": server.url, "doi": PARAMS["dataset_doi"], "local_dir": None,
                        **facts_of(release())}


def test_dataverse_checksum_mismatch_names_expected_and_actual(previous_raw, sleeps):
    with FileServer(dataverse_files(md5_of_csv="f" * 32)) as server:
        write_params(dataverse_url=server.url)
        actual = hashlib.md5(CSV).hexdigest()
        with pytest.raises(StageError, match=f"md5 mismatch: expected {'f' * 32} .*got {actual}"):
            download.main()
    assert not list(CACHE.glob(f"{META}*"))
    assert_unharmed(previous_raw)


def test_dataverse_missing_file_lists_what_is_there(previous_raw, sleeps):
    with FileServer(dataverse_files()) as server:
        write_params(dataverse_url=server.url, files=[P1, "HAM10000_images_part_3.zip", META])
        with pytest.raises(StageError, match="no file HAM10000_images_part_3.zip .*lists: .*metadata.csv"):
            download.main()
    assert_unharmed(previous_raw)


@pytest.mark.parametrize("answer", [
    b"<p>not JSON</p>", b'{"status": "ERROR", "message": "no such dataset"}', b'["a", "list"]',
    json.dumps({"status": "OK", "data": [{"dataFile": {"filename": P1}}]}).encode(),
], ids=["not-json", "error-status", "not-a-listing", "file-without-id"])
def test_an_answer_that_is_no_dataverse_listing_is_named(previous_raw, sleeps, answer):
    with FileServer({LISTING: answer}) as server:
        write_params(dataverse_url=server.url)
        with pytest.raises(StageError, match=rf"^{re.escape(server.url + LISTING)}\?persistentId=doi%3A10.7910"
                                             r"%2FDVN%2FDBW86T: answer is not a Dataverse file listing$"):
            download.main()
    assert_unharmed(previous_raw)


def test_a_cached_file_that_fails_its_check_is_fetched_again(workdir, monkeypatch, sleeps):
    CACHE.mkdir(parents=True)
    (CACHE / META).write_bytes(b"an older metadata file\n")  # SHA256SUMS lists another sha256
    with FileServer(mirror_files()) as server:
        use_mirror(monkeypatch, server)
        download.main()
        assert [server.count(name) for name in (P1, P2, META)] == [1, 1, 1]
    assert (CACHE / META).read_bytes() == CSV and raw_files() == expected_raw()


# ---- local_dir -----------------------------------------------------------------------------
def test_local_dir_with_the_release_files(workdir, sleeps):
    local = workdir / "release"
    local.mkdir()
    for name, data in release().items():
        (local / name).write_bytes(data)
    write_params(local_dir=str(local))
    download.main()
    assert raw_files() == expected_raw()
    assert source() == facts_of(release())
    assert origin() == {"source": "local", "url": None, "doi": None, "local_dir": str(local), **facts_of(release())}
    assert [p.name for p in CACHE.iterdir()] == [download.SOURCE_FILE], "nothing downloaded"


def test_local_dir_with_kaggle_folders(workdir, sleeps):
    local = workdir / "kaggle"
    for name, ids in ((P1, (1, 2, 3)), (P2, (4, 5))):
        folder = local / name.removesuffix(".zip")
        folder.mkdir(parents=True)
        for i in ids:
            (folder / f"ISIC_000000{i}.jpg").write_bytes(jpeg(i))
    (local / META).write_bytes(CSV)
    write_params(local_dir=str(local))
    download.main()
    assert raw_files() == expected_raw()
    assert source()["files"] == {P1: {"images": 3, "bytes": sum(len(jpeg(i)) for i in (1, 2, 3))},
                                 P2: {"images": 2, "bytes": len(jpeg(4)) + len(jpeg(5))},
                                 META: facts_of(release())["files"][META]}  # a folder: its images


def test_other_jpeg_suffixes_become_jpg_as_later_stages_read_them(workdir, sleeps):
    local = workdir / "local"
    local.mkdir()
    suffixes = {1: "JPG", 2: "jpeg", 3: "JPEG", 4: "jpg", 5: "Jpg"}
    parts = {P1: make_zip({f"ISIC_000000{i}.{suffixes[i]}": jpeg(i) for i in (1, 2, 3)}),
             P2: make_zip({f"sub/ISIC_000000{i}.{suffixes[i]}": jpeg(i) for i in (4, 5)}), META: CSV}
    for name, data in parts.items():
        (local / name).write_bytes(data)
    write_params(local_dir=str(local))
    download.main()
    assert raw_files() == expected_raw()


def test_local_dir_missing_a_file_names_it(previous_raw):
    Path("empty").mkdir()
    write_params(local_dir="empty")
    with pytest.raises(StageError, match=f"holds neither {P1} nor HAM10000_images_part_1/"):
        download.main()
    assert_unharmed(previous_raw)


def local_release(**changes: bytes) -> Path:
    """The fake release in the folder `local`, with `changes` (name: bytes), as download.local_dir."""
    local = Path("local")
    local.mkdir()
    for name, data in {**release(), **changes}.items():
        (local / name).write_bytes(data)
    write_params(local_dir=str(local))
    return local


def test_a_local_file_that_fails_its_pin_is_named_and_left_as_it_is(previous_raw):
    local = local_release()
    write_params(local_dir=str(local), sha256={META: "0" * 64})
    with pytest.raises(StageError, match=rf"^local/{META}: sha256 mismatch: expected 0{{64}} .*, got "
                                         rf"{hashlib.sha256(CSV).hexdigest()} \(download.local_dir; the file was "
                                         r"left as it is\)$"):
        download.main()
    assert (local / META).read_bytes() == CSV
    assert_unharmed(previous_raw)


def test_a_release_without_images_is_refused(previous_raw):
    local_release(**{P1: make_zip({"LICENSE.txt": b"CC"}), P2: make_zip({"README.txt": b"x"})})
    with pytest.raises(StageError, match=f"^no images found in local/{P1}, local/{P2}, local/{META}$"):
        download.main()
    assert_unharmed(previous_raw)


# ---- hostile archives ----------------------------------------------------------------------
def symlink_zip() -> bytes:
    info = zipfile.ZipInfo("ISIC_link.jpg")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return make_zip([(info, b"/etc/passwd")])


def overlapping_pair() -> bytes:
    """Two stored entries whose data overlap: the first entry's data is the second entry, header and all."""
    inner, name_a, name_b = jpeg(2), b"ISIC_0000001.jpg", b"ISIC_0000002.jpg"
    header_b = local_header(name_b, zlib.crc32(inner), len(inner), len(inner), zipfile.ZIP_STORED)
    outer = header_b + inner
    header_a = local_header(name_a, zlib.crc32(outer), len(outer), len(outer), zipfile.ZIP_STORED)
    return raw_zip([(name_a, zlib.crc32(outer), len(outer), len(outer), zipfile.ZIP_STORED, 0),
                    (name_b, zlib.crc32(inner), len(inner), len(inner), zipfile.ZIP_STORED, len(header_a))],
                   header_a + outer)


def runs_into_central_directory() -> bytes:
    """One stored entry whose headers declare 20 bytes more data than it holds: the central directory's."""
    data, name = jpeg(1), b"ISIC_0000001.jpg"
    crc, size = zlib.crc32(data), len(data) + 20
    return raw_zip([(name, crc, size, size, zipfile.ZIP_STORED, 0)],
                   local_header(name, crc, size, size, zipfile.ZIP_STORED) + data)


def with_local_header(data: bytes, offset: int, value: bytes) -> bytes:
    """The same zip, its first local header changed at `offset` (the central directory unchanged)."""
    return data[:offset] + value + data[offset + len(value):]


ONE = make_zip({"ISIC_0000001.jpg": jpeg(1)})
HOSTILE = {
    "dot-dot": (make_zip({"../evil.jpg": jpeg(1)}), {}, "'../evil.jpg' refused: '..' path component"),
    "absolute": (make_zip({"/abs.jpg": jpeg(1)}), {}, "'/abs.jpg' refused: absolute path"),
    "drive": (make_zip({"C:\\evil.jpg": jpeg(1)}), {}, r"refused: absolute path, drive letter or backslash"),
    "symlink": (symlink_zip(), {}, "'ISIC_link.jpg' refused: symbolic link"),
    "declared-size-bomb": (with_declared_size(make_zip({"ISIC_big.jpg": jpeg(1)}), 4_000_000_000), {},
                           "'ISIC_big.jpg' refused: declares 4,000,000,000 bytes, over max_entry_bytes"),
    "total-bomb": (make_zip({f"ISIC_{i}.jpg": jpeg(i) for i in range(5)}), {"max_total_bytes": 1000},
                   "declares .* bytes of images in all, over max_total_bytes 1,000"),
    "ratio-bomb": (make_zip({"ISIC_zeros.jpg": bytes(1_000_000)}, zipfile.ZIP_DEFLATED), {},
                   "'ISIC_zeros.jpg' refused: compression ratio .* over max_compression_ratio 100"),
    "duplicate": (make_zip([("ISIC_1.jpg", jpeg(1)), ("ISIC_1.jpg", jpeg(2))]), {},
                  "ISIC_1.jpg would overwrite the one from HAM10000_images_part_1.zip:ISIC_1.jpg"),
    "lying-header": (with_declared_size(make_zip({"ISIC_lie.jpg": jpeg(1)}), 10), {},
                     r"corrupt zip archive \(Bad CRC-32 for file 'ISIC_lie.jpg'\)"),
    "overlap-bomb": (overlap_bomb(), {},
                     r"declares 60,921,420 bytes of images in an archive of 2\d,\d{3} bytes, ratio \d+ over "
                     "max_compression_ratio 100 .a zip bomb"),
    "overlap-bomb-under-a-loose-ratio": (overlap_bomb(), {"max_compression_ratio": 1_000_000},
                                         "refused: entries 'ISIC_0000000.jpg' and 'ISIC_0000001.jpg' overlap"),
    "overlapping-entries": (overlapping_pair(), {},
                            "refused: entries 'ISIC_0000001.jpg' and 'ISIC_0000002.jpg' overlap"),
    "local-header-name": (with_local_header(ONE, 30, b"ISIC_0000009"), {},  # zipfile compares the names
                          "corrupt zip archive .File name in directory 'ISIC_0000001.jpg' and header "
                          "b'ISIC_0000009.jpg' differ"),
    "local-header-method": (with_local_header(ONE, 8, struct.pack("<H", zipfile.ZIP_DEFLATED)), {},
                            "entry 'ISIC_0000001.jpg': local header's compression method 8 differs from the "
                            "central directory's 0"),
    "local-header-size": (with_local_header(ONE, 18, struct.pack("<I", 10)), {},
                          "entry 'ISIC_0000001.jpg': local header's compressed size 10 differs"),
    "local-header-crc": (with_local_header(ONE, 14, struct.pack("<I", 7)), {},
                         "entry 'ISIC_0000001.jpg': local header's CRC 7 differs"),
    "no-local-header": (with_local_header(ONE, 0, b"XX"), {},
                        "refused: entry 'ISIC_0000001.jpg': no local header at offset 0$"),
    "data-runs-into-central-directory": (runs_into_central_directory(), {},
                                         "refused: entry 'ISIC_0000001.jpg': its data runs into the central "
                                         "directory$"),
    "same-image-in-both-parts": (make_zip({"ISIC_0000004.jpg": jpeg(4)}), {},
                                 "ISIC_0000004.jpg would overwrite"),
    "same-image-as-jpg-and-jpeg": (make_zip({"ISIC_0000001.jpg": jpeg(1), "ISIC_0000001.jpeg": jpeg(2)}), {},
                                   "ISIC_0000001.jpg would overwrite"),
}


@pytest.mark.parametrize("archive, params, message", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_archive_is_refused(previous_raw, archive, params, message):
    local = Path("local")
    local.mkdir()
    for name, data in {**release(), P1: archive}.items():
        (local / name).write_bytes(data)
    write_params(local_dir=str(local), **params)
    with pytest.raises(StageError, match=message) as refused:
        download.main()
    assert P1 in str(refused.value)
    assert_unharmed(previous_raw)
    assert (local / P1).read_bytes() == archive, "a file in local_dir is never deleted"
    assert not [p for p in Path.cwd().parent.rglob("*") if p.name in ("evil.jpg", "abs.jpg")]
    assert not Path("/abs.jpg").exists()


def test_a_refused_download_names_its_path_in_the_cache_and_stays_there(previous_raw, monkeypatch, sleeps):
    files = {**release(), P1: overlapping_pair()}
    with FileServer({**files, "SHA256SUMS": sha256sums(files)}) as server:
        use_mirror(monkeypatch, server)
        with pytest.raises(StageError, match=rf"^{CACHE / P1}: refused: entries .* overlap"):
            download.main()
    assert (CACHE / P1).read_bytes() == overlapping_pair(), "kept where the message says, to be inspected"
    assert_unharmed(previous_raw)


def test_the_official_archives_pass_the_default_limits():
    """An archive like the official ones (JPEGs stored, ~1:1) passes the limits params.yaml sets:
    600x450 JPEGs at most 0.3 MB, ~1.4 GB per archive, are well inside them."""
    limits = download.load_params("download", download.DownloadParams, ROOT / "params.yaml")
    official = [zipfile.ZipInfo(f"HAM10000_images_part_1/ISIC_{i:07d}.jpg") for i in range(5000)]
    for info in official:
        info.file_size, info.compress_size = 290_000, 289_000  # the largest images, all of them
    archive_bytes = 5000 * (289_000 + 100)
    assert len(download.plan_archive(official, Path(P1), limits, archive_bytes)) == 5000
    assert limits.max_entry_bytes >= 10 * 300_000 and limits.max_total_bytes >= 2 * 1_500_000_000
    assert limits.max_total_bytes <= 5_000_000_000 and limits.max_compression_ratio <= 20, "sized to the data"


def test_an_entry_holding_more_than_it_declares_is_cut_at_the_declared_size(previous_raw, monkeypatch):
    """1 MB of zeros (1 KB deflated) declaring 1,000 bytes: at most 1,000 bytes reach the disk."""
    packed = make_zip({"ISIC_0000001.jpg": bytes(1_000_000)}, zipfile.ZIP_DEFLATED)
    local = Path("local")
    local.mkdir()
    for name, data in {**release(), P1: with_declared_size(packed, 1000)}.items():
        (local / name).write_bytes(data)
    write_params(local_dir=str(local))
    real_extract, written = download.extract_entry, []

    def extract_and_measure(zf, info, target):
        try:
            real_extract(zf, info, target)
        finally:
            written.append(target.stat().st_size)

    monkeypatch.setattr(download, "extract_entry", extract_and_measure)
    with pytest.raises(StageError, match=r"corrupt zip archive \(Bad CRC-32 for file 'ISIC_0000001.jpg'\)"):
        download.main()
    assert len(written) == 1 and written[0] <= 1000, "reading stopped at the declared size"
    assert_unharmed(previous_raw)


# ---- interruptions -------------------------------------------------------------------------
def test_interrupted_extraction_keeps_previous_output(previous_raw, monkeypatch, sleeps):
    local = Path("local")
    local.mkdir()
    for name, data in release().items():
        (local / name).write_bytes(data)
    write_params(local_dir=str(local))
    real_extract, calls = download.extract_entry, []

    def extract_then_interrupt(zf, info, target):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_extract(zf, info, target)

    monkeypatch.setattr(download, "extract_entry", extract_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        download.main()
    assert_unharmed(previous_raw)

    monkeypatch.setattr(download, "extract_entry", real_extract)
    killed = Path(f"data/.raw.run{dead_pid()}.x1y2z3.tmp")  # what a SIGKILL mid-extraction leaves behind
    (killed / "images").mkdir(parents=True)
    download.main()
    assert raw_files() == expected_raw()
    assert not killed.exists() and not list(Path("data").glob(".raw.*"))


# ---- params ------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"mirrors": ["x"]}, "unknown key download.mirrors"),
    ({"retries": "five"}, "download.retries must be int, got 'five'"),
    ({"timeout_s": None}, "download.timeout_s must be float"),
    ({"retries": -1}, "retries must be >= 0"),
    ({"sha256": {P1: "abc"}}, f"sha256.{P1} must be 64 lowercase hex digits"),
    ({"sha256": {"HAM10000_images_part_3.zip": "0" * 64}}, "sha256.HAM10000_images_part_3.zip pins a file that "
                                                           "is not in files"),
    ({"files": [P1, "../x.zip", META]}, "files: '../x.zip' must be a plain file name"),
    ({"dataverse_url": "ftp://x"}, "dataverse_url must start with https://"),
], ids=["unknown-key", "wrong-type", "null", "negative", "bad-pin", "pin-of-no-file", "path-in-name", "scheme"])
def test_params_errors_name_the_key(previous_raw, change, message):
    write_params(**change)
    with pytest.raises(ParamError, match=message):
        download.main()
    assert_unharmed(previous_raw)


def no_name_resolution(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A machine without network or DNS: every name lookup fails as getaddrinfo does offline."""
    looked_up: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


def test_offline_without_mirror_fails_at_once_naming_the_mirror_and_local_dir(previous_raw, monkeypatch, sleeps):
    looked_up = no_name_resolution(monkeypatch)
    started = time.monotonic()
    with pytest.raises(StageError) as offline:
        download.main()
    assert time.monotonic() - started < 5 and sleeps == [] and looked_up == ["dataverse.harvard.edu"], "no retry"
    message = str(offline.value)
    assert message.startswith("https://dataverse.harvard.edu/api/datasets/") and "cannot resolve host " \
        "dataverse.harvard.edu (Temporary failure in name resolution)" in message
    assert download.MIRROR_ENV in message and "download.local_dir" in message
    assert_unharmed(previous_raw)


def test_offline_mirror_keeps_the_partial_download(previous_raw, monkeypatch, sleeps):
    CACHE.mkdir()
    (CACHE / f"{P1}.part").write_bytes(b"PK\x03\x04 first bytes")
    monkeypatch.setenv(download.MIRROR_ENV, "https://mirror.example.org/ham/")
    monkeypatch.setattr(download, "resolve_mirror", lambda base, params: [  # as if SHA256SUMS had come
        download.Remote(name, base + name) for name in params.files])
    no_name_resolution(monkeypatch)
    with pytest.raises(StageError, match=f"^https://mirror.example.org/ham/{P1}: cannot resolve host "
                                         f"mirror.example.org .*{download.MIRROR_ENV}=<base URL>"):
        download.main()
    assert sleeps == [] and (CACHE / f"{P1}.part").read_bytes() == b"PK\x03\x04 first bytes", "kept for later"
    assert_unharmed(previous_raw)


def test_mirror_variable_must_be_a_url(previous_raw, monkeypatch):
    monkeypatch.setenv(download.MIRROR_ENV, "/some/folder")
    with pytest.raises(StageError, match=f"{download.MIRROR_ENV}='/some/folder': must be an http"):
        download.main()
    assert_unharmed(previous_raw)


# ---- faults across runs: a dropped connection, a full disk, a killed process (issue 4) ---------
def test_dropped_connection_after_the_last_retry_resumes_on_the_next_run(previous_raw, monkeypatch, sleeps):
    files = mirror_files()
    half = len(files[P1]) // 2
    write_params(retries=0)
    with FileServer(files) as server:
        server.drop(P1, after_bytes=half)
        use_mirror(monkeypatch, server)
        with pytest.raises(StageError, match=rf"{server.url}{P1}: connection (lost|closed) after "
                                             rf"{half:,} .*gave up after 0 retries"):
            download.main()
        assert (CACHE / f"{P1}.part").read_bytes() == files[P1][:half], "kept for the next run"
        assert not (CACHE / P1).exists()
        assert_unharmed(previous_raw)

        download.main()  # the next run asks for the rest only
        last = [r for r in server.requests if r.path == P1][-1]
    assert (last.range, last.status) == (f"bytes={half}-", 206)
    assert (CACHE / P1).read_bytes() == files[P1] and not (CACHE / f"{P1}.part").exists()
    assert raw_files() == expected_raw() and sleeps == []


def test_disk_full_during_extraction_keeps_downloads_and_previous_output(previous_raw, monkeypatch, sleeps,
                                                                        capsys):
    real_extract, calls = download.extract_entry, []

    def extract_until_disk_full(zf, info, target):
        calls.append(1)
        if len(calls) == 3:
            target.write_bytes(b"\xff\xd8")  # a few bytes land, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_extract(zf, info, target)

    with FileServer(mirror_files()) as server:
        use_mirror(monkeypatch, server)
        monkeypatch.setattr(download, "extract_entry", extract_until_disk_full)
        with pytest.raises(SystemExit) as full:
            run_stage(download.main, [])  # as `python -m stages.download` runs it
        assert full.value.code == 1
        err = capsys.readouterr().err  # the note in brackets is run_stage's (tests/lib/test_cli.py)
        assert re.fullmatch(rf"error: \[Errno {errno.ENOSPC}\] No space left on device \([^\n]+\)\n", err), \
            "one line, no traceback"
        assert_unharmed(previous_raw)  # no half-extracted data/raw, no temporary folder left
        assert {p.name for p in CACHE.iterdir()} == {P1, P2, META}, "verified downloads are kept"

        monkeypatch.setattr(download, "extract_entry", real_extract)
        download.main()  # space freed: the next run extracts from the cache, fetching nothing
        assert [server.count(name) for name in (P1, P2, META)] == [1, 1, 1]
    assert raw_files() == expected_raw()


def dead_pid() -> int:
    """The PID of a process that has ended."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    return int(ended.stdout)


def run_until_killed(code: str, ready: str, **env: str) -> None:
    """Run `code` in a fresh Python (in the cwd) and SIGKILL it as soon as it prints `ready`."""
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    try:
        if select.select([process.stdout], [], [], 60)[0]:
            line = process.stdout.readline().strip()
        else:
            line = "(nothing printed in 60 s)"
        if line != ready:
            process.kill()
            pytest.fail(f"expected {ready!r}, got {line!r}; stderr: {process.communicate()[1][-2000:]}")
        process.kill()  # SIGKILL: no cleanup code of the stage runs
    finally:
        process.kill()
        process.communicate()  # waits, and closes the pipes
    assert process.returncode == -signal.SIGKILL


HANG_IN_SECOND_ENTRY = """
import time
import stages.download as download
real_extract, calls = download.extract_entry, []
def extract_then_hang(zf, info, target):
    real_extract(zf, info, target)
    calls.append(1)
    if len(calls) == 2:
        print("extracting", flush=True)
        time.sleep(120)
download.extract_entry = extract_then_hang
download.main()
"""


def test_killed_extraction_leaves_previous_output_and_the_next_run_starts_clean(previous_raw):
    local = Path("local")
    local.mkdir()
    for name, data in release().items():
        (local / name).write_bytes(data)
    write_params(local_dir=str(local))
    run_until_killed(HANG_IN_SECOND_ENTRY, "extracting")
    (leftover,) = Path("data").glob(".raw.*.tmp")
    assert len(list((leftover / "images").iterdir())) == 2, "killed halfway through the extraction"
    assert raw_files() == previous_raw, "data/raw is still the previous complete output"

    download.main()
    assert raw_files() == expected_raw()
    assert not list(Path("data").glob(".raw.*")), "the killed run's folder was removed"


HANG_IN_DOWNLOAD = """
import time
import stages.download as download
download.CHUNK_BYTES = 1 << 16  # bigger than the file buffer: each chunk reaches the disk
class HangAfterFirstChunk:
    def __init__(self, *args, **kwargs): pass
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    def update(self, n):
        if n:  # 0: the resumed bytes of a .part, none on the first run
            print("downloading", flush=True)
            time.sleep(120)
download.Progress = HangAfterFirstChunk
download.main()
"""


def test_killed_download_resumes_on_the_next_run(previous_raw, monkeypatch, sleeps):
    files = release()
    padding = random.Random(4).randbytes(200_000)  # incompressible
    files[P1] = make_zip({**{f"ISIC_000000{i}.jpg": jpeg(i) for i in (1, 2, 3)}, "README.bin": padding})
    files["SHA256SUMS"] = sha256sums(files)
    with FileServer(files) as server:
        run_until_killed(HANG_IN_DOWNLOAD, "downloading", **{download.MIRROR_ENV: server.url})
        assert (CACHE / f"{P1}.part").stat().st_size == 1 << 16
        assert not (CACHE / P1).exists()
        assert_unharmed(previous_raw)

        use_mirror(monkeypatch, server)
        download.main()
        last = [r for r in server.requests if r.path == P1][-1]
    assert (last.range, last.status) == (f"bytes={1 << 16}-", 206)
    assert (CACHE / P1).read_bytes() == files[P1]  # and it matched SHA256SUMS
    assert raw_files() == expected_raw()
