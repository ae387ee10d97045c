"""Stage download: fetch the HAM10000 release and unpack it into data/raw/.

Sources, in order of precedence:
  1. `download.local_dir`: a folder already holding the files (or Kaggle's extracted copy);
  2. `HAM10000_MIRROR=<base URL>`: the same file names from `<base>/<name>` (checked against the
     mirror's SHA256SUMS when it has one);
  3. the official release on Harvard Dataverse, resolved through its native API.

Downloads land in a persistent cache (data/downloads/, not a DVC output), so a re-run or a
dropped connection never fetches a verified byte twice. The output data/raw/ holds
`images/ISIC_XXXXXXX.jpg` (flat, from every archive), the metadata CSV and `source.json` (content
facts only: each file's size and sha256), published atomically. Where the files came from (URL,
DOI or folder) goes to data/downloads/source.json and the log, so the same files give the same
data/raw and dvc.lock from any server. Archives are hostile until checked (names, sizes,
overlapping entries): nothing is written before every entry passed. Faults: docs/faults.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import struct
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import sleep
from typing import BinaryIO, TypeVar

from stages.lib.cli import StageError, run_stage
from stages.lib.files import atomic_dir, atomic_write_json
from stages.lib.params import PARAMS_FILE, in_range, load_params
from stages.lib.progress import Progress

log = logging.getLogger("stages.download")
RAW_DIR = Path("data/raw")
CACHE_DIR = Path("data/downloads")
SOURCE_FILE = "source.json"  # data/raw's: each file's size and sha256; data/downloads': where they came from
MIRROR_ENV = "HAM10000_MIRROR"
SUMS_FILE = "SHA256SUMS"
USER_AGENT = "ham10000-pipeline/1.0 (+python-urllib; stages/download.py)"
CHUNK_BYTES = 1 << 20
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
IMAGE_SUFFIXES = (".jpg", ".jpeg")
LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header: signature .. name and extra lengths
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.(zip|csv)$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchiveLimits:
    """What one archive may unpack to; anything beyond is refused as a bomb or a lie."""

    max_entry_bytes: int
    max_total_bytes: int
    max_compression_ratio: float


@dataclass(frozen=True)
class DownloadParams:
    dataverse_url: str
    dataset_doi: str
    files: list[str]
    retries: int
    timeout_s: float
    max_entry_bytes: int
    max_total_bytes: int
    max_compression_ratio: float
    sha256: dict[str, str] = dataclasses.field(default_factory=dict)
    local_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.dataverse_url.startswith(("https://", "http://")):
            raise ValueError(f"dataverse_url must start with https://, got {self.dataverse_url!r}")
        for name in self.files:
            if not FILE_NAME.match(name):
                raise ValueError(f"files: {name!r} must be a plain file name ending in .zip or .csv")
        if len(set(self.files)) != len(self.files):
            raise ValueError(f"files: names must be unique, got {self.files}")
        if [n.endswith(".csv") for n in self.files].count(True) != 1:
            raise ValueError(f"files must name exactly one metadata .csv, got {self.files}")
        for name, digest in self.sha256.items():
            if name not in self.files:
                raise ValueError(f"sha256.{name} pins a file that is not in files")
            if not SHA256_HEX.match(digest):
                raise ValueError(f"sha256.{name} must be 64 lowercase hex digits, got {digest!r}")
        in_range("retries", self.retries, 0)
        for key in ("timeout_s", "max_entry_bytes", "max_total_bytes", "max_compression_ratio"):
            in_range(key, getattr(self, key), 0, lo_open=True)

    @property
    def limits(self) -> ArchiveLimits:
        return ArchiveLimits(self.max_entry_bytes, self.max_total_bytes, self.max_compression_ratio)


# --------------------------------------------------------------------------------------------
# Where each file comes from, and what it must hash to
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checksum:
    algorithm: str  # a hashlib name: md5, sha1, sha256, ...
    hexdigest: str
    source: str  # who vouches for it, for the error message


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    checksums: tuple[Checksum, ...] = ()


def pin_checksums(name: str, pins: dict[str, str]) -> tuple[Checksum, ...]:
    """The params' sha256 pin, if any: it holds whichever server or folder the file comes from."""
    return (Checksum("sha256", pins[name], f"params.yaml download.sha256.{name}"),) if name in pins else ()


def pinned(remote: Remote, pins: dict[str, str]) -> Remote:
    return dataclasses.replace(remote, checksums=remote.checksums + pin_checksums(remote.name, pins))


def parse_sha256sums(text: str, url: str) -> dict[str, str]:
    """`sha256sum` output (`<hex>  <name>` or `<hex> *<name>`) as {name: hex}."""
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = re.match(r"^([0-9a-fA-F]{64}) [ *](.+)$", line.rstrip("\r"))
        if not match:
            raise StageError(f"{url}: line {number} is not in sha256sum format: {line[:80]!r}")
        sums[match.group(2)] = match.group(1).lower()
    return sums


def mirror_remotes(base: str, names: list[str], sums: dict[str, str] | None, sums_url: str) -> list[Remote]:
    """The same file names under the mirror's base URL, with its SHA256SUMS where it lists them."""
    remotes = []
    for name in names:
        checksums = (Checksum("sha256", sums[name], sums_url),) if sums and name in sums else ()
        if sums is not None and not checksums:
            log.warning("%s does not list %s: it is checked by its content only", sums_url, name)
        remotes.append(Remote(name, base + urllib.parse.quote(name), checksums))
    return remotes


def mirror_base(value: str) -> str:
    if not value.startswith(("https://", "http://")):
        raise StageError(f"{MIRROR_ENV}={value!r}: must be an http(s):// base URL")
    return value.rstrip("/") + "/"


def resolve_mirror(base: str, params: DownloadParams) -> list[Remote]:
    """Like a package-index mirror: same names, other host; SHA256SUMS is optional."""
    sums_url = base + SUMS_FILE
    try:
        sums = parse_sha256sums(fetch_bytes(sums_url, params).decode("utf-8", "replace"), sums_url)
    except HTTPStatusError as err:
        if err.status != 404:
            raise
        log.warning("%s: no %s (404): files are checked by their content and pins only", base, SUMS_FILE)
        sums = None
    return mirror_remotes(base, params.files, sums, sums_url)


def dataverse_listing_url(dataverse_url: str, doi: str) -> str:
    query = urllib.parse.urlencode({"persistentId": doi})
    return f"{dataverse_url.rstrip('/')}/api/datasets/:persistentId/versions/:latest-published/files?{query}"


def dataverse_checksum(data_file: dict, listing_url: str) -> tuple[Checksum, ...]:
    """Dataverse's checksum of the original file (`checksum{type,value}`, or older `md5`)."""
    given = data_file.get("checksum")
    if not given and data_file.get("md5"):
        given = {"type": "MD5", "value": data_file["md5"]}
    if not given:
        return ()
    algorithm = str(given.get("type", "")).lower().replace("-", "")
    if algorithm not in hashlib.algorithms_guaranteed:
        log.warning("%s: unknown checksum type %r for %s, not checked", listing_url, given.get("type"),
                    data_file.get("filename"))
        return ()
    return (Checksum(algorithm, str(given["value"]).lower(), f"Dataverse {listing_url}"),)


def dataverse_remotes(listing: dict, dataverse_url: str, names: list[str], listing_url: str) -> list[Remote]:
    """Match wanted names to Dataverse files; ingested tables are fetched in their original format.

    Dataverse converts an uploaded CSV to `.tab` and keeps the upload as `originalFileName`, so
    `HAM10000_metadata.csv` may be listed as `HAM10000_metadata.tab` and needs `?format=original`.
    """
    if not isinstance(listing, dict) or listing.get("status") != "OK" or not isinstance(listing.get("data"), list):
        raise StageError(f"{listing_url}: not a Dataverse file listing: {str(listing)[:200]}")
    files = [item["dataFile"] for item in listing["data"] if isinstance(item, dict) and "dataFile" in item]
    remotes = []
    for name in names:
        found = next((f for f in files if name in (f.get("originalFileName"), f.get("filename"))), None)
        if found is None:
            listed = ", ".join(sorted(str(f.get("originalFileName") or f.get("filename")) for f in files))
            raise StageError(f"{listing_url}: dataset has no file {name} (it lists: {listed})")
        original = found.get("originalFileName") == name and found.get("filename") != name
        url = f"{dataverse_url.rstrip('/')}/api/access/datafile/{found['id']}"
        url += "?format=original" if original else ""
        remotes.append(Remote(name, url, dataverse_checksum(found, listing_url)))
    return remotes


def resolve_dataverse(params: DownloadParams) -> list[Remote]:
    url = dataverse_listing_url(params.dataverse_url, params.dataset_doi)
    try:
        listing = json.loads(fetch_bytes(url, params))
    except json.JSONDecodeError as err:
        raise StageError(f"{url}: answer is not JSON ({err})") from None
    return dataverse_remotes(listing, params.dataverse_url, params.files, url)


# --------------------------------------------------------------------------------------------
# HTTP: retries for transient failures only, resume from .part, checks before a file is kept
# --------------------------------------------------------------------------------------------
class HTTPStatusError(StageError):
    """The server answered an error status that retrying will not fix."""

    def __init__(self, url: str, status: int, reason: str):
        super().__init__(f"{url}: HTTP {status} {reason}".rstrip())
        self.status = status


class TransientError(Exception):
    """A failure worth retrying (connection lost, timeout, 429, 5xx); the message says which."""


class RetriesExhaustedError(StageError):
    """A transient failure that outlasted every retry; a partial download is kept for next time."""


class UnresolvableHostError(StageError):
    """The host name does not resolve (no network, no DNS): retrying will not help, the mirror or a
    local folder will; a partial download is kept for when the network is back."""


T = TypeVar("T")


def backoff_s(retry: int) -> float:
    """Exponential back-off (1 s, 2 s, 4 s, ...) so a struggling server gets room to recover."""
    return min(BACKOFF_FIRST_S * 2 ** (retry - 1), BACKOFF_MAX_S)


def with_retries(url: str, retries: int, attempt: Callable[[], T]) -> T:
    """Run `attempt` until it succeeds, retrying TransientError up to `retries` times."""
    retry = 0
    while True:
        try:
            return attempt()
        except TransientError as err:
            if retry == retries:
                raise RetriesExhaustedError(f"{url}: {err} (gave up after {retries} retries)") from None
            retry += 1
            log.warning("%s: %s; retry %d/%d in %.0f s", url, err, retry, retries, backoff_s(retry))
            sleep(backoff_s(retry))


def open_url(url: str, timeout_s: float, offset: int = 0) -> http.client.HTTPResponse:
    """GET `url` (from byte `offset`), sorting failures into transient and permanent ones."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 429 or err.code >= 500:
            raise TransientError(f"HTTP {err.code} {err.reason}") from None
        raise HTTPStatusError(url, err.code, str(err.reason)) from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, socket.gaierror):
            host = urllib.parse.urlsplit(url).hostname
            raise UnresolvableHostError(
                f"{url}: cannot resolve host {host} ({err.reason.strerror or err.reason}): no network? "
                f"Set {MIRROR_ENV}=<base URL> to fetch from a mirror, or download.local_dir in params.yaml "
                "to a folder holding the files") from None
        if isinstance(err.reason, OSError) and not isinstance(err.reason, ssl.SSLCertVerificationError):
            # refused, reset, timeout while connecting (a bad certificate will not heal)
            raise TransientError(f"cannot connect ({err.reason})") from None
        raise StageError(f"{url}: {err.reason}") from None
    except (ConnectionError, TimeoutError, http.client.HTTPException) as err:
        raise TransientError(f"connection failed ({err!r})") from None


def refuse_html(response: http.client.HTTPResponse, url: str, name: str) -> None:
    """A login page or error page served with 200 must never be taken for the data."""
    content_type = response.headers.get("Content-Type", "")
    if content_type.lower().startswith("text/html"):
        raise StageError(f"{url}: server answered an HTML page (Content-Type {content_type}), "
                         f"not {name}; check the URL or the mirror")


def fetch_bytes(url: str, params: DownloadParams) -> bytes:
    """A small document (API listing, SHA256SUMS) read into memory, with retries."""
    def attempt() -> bytes:
        with open_url(url, params.timeout_s) as response:
            refuse_html(response, url, "a data document")
            try:
                return response.read()
            except (ConnectionError, TimeoutError, http.client.HTTPException) as err:
                raise TransientError(f"connection lost ({err!r})") from None
    return with_retries(url, params.retries, attempt)


def resume_offset(response: http.client.HTTPResponse, offset: int, url: str) -> int:
    """Where the body starts: a 206 continues at `offset`; a 200 (Range ignored) starts over."""
    if not offset:
        return 0
    if response.status != 206:
        log.info("%s: server ignored the Range request, downloading from the start", url)
        return 0
    content_range = response.headers.get("Content-Range", "")
    if not content_range.startswith(f"bytes {offset}-"):
        raise TransientError(f"Content-Range {content_range!r} does not continue at byte {offset}")
    return offset


def download_once(url: str, part: Path, name: str, timeout_s: float) -> None:
    """One attempt: continue `part` from its size, or start it over; raises on a short body."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = open_url(url, timeout_s, offset)
    except HTTPStatusError as err:
        if err.status != 416 or not offset:
            raise
        part.unlink()  # our .part is longer than the file: it is stale
        raise TransientError("HTTP 416 for the resumed range; starting over") from None
    with response:
        refuse_html(response, url, name)
        try:
            start = resume_offset(response, offset, url)
        except TransientError:
            part.unlink()  # the server cannot continue it: start over on the next attempt
            raise
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        received = start
        with open(part, "ab" if start else "wb") as out, Progress(
                total or 0, what=f"download {name}", unit="bytes", logger=log) as bar:
            bar.update(start)  # resumed from the .part
            try:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (ConnectionError, TimeoutError, http.client.HTTPException) as err:
                raise TransientError(f"connection lost after {received:,} bytes ({err!r})") from None
    if total is not None and received < total:  # http.client returns b"" on an early close
        raise TransientError(f"connection closed after {received:,} of {total:,} bytes")


def download_resumable(url: str, part: Path, name: str, params: DownloadParams) -> None:
    """Fill `part` with the whole body of `url`, resuming after transient failures.

    After the last retry the partial file is kept so the next run continues it; after a
    permanent answer (404, an HTML page) it is deleted, since it may not belong to this file.
    """
    try:
        with_retries(url, params.retries, lambda: download_once(url, part, name, params.timeout_s))
    except (RetriesExhaustedError, UnresolvableHostError):
        raise
    except StageError:
        part.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Checking a file before it is kept
# --------------------------------------------------------------------------------------------
def file_digests(path: Path, algorithms: set[str]) -> dict[str, str]:
    """All wanted digests in one read of the file."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def checksum_problem(path: Path, checksums: tuple[Checksum, ...]) -> str | None:
    """Say which checksum fails (expected and actual), or None when all match."""
    if not checksums:
        return None
    actual = file_digests(path, {c.algorithm for c in checksums})
    for c in checksums:
        if actual[c.algorithm] != c.hexdigest:
            return f"{c.algorithm} mismatch: expected {c.hexdigest} ({c.source}), got {actual[c.algorithm]}"
    return None


def content_problem(path: Path, name: str) -> str | None:
    """Catch an error page saved as data: an archive must be a zip, the CSV plain non-empty text."""
    if name.endswith(".zip"):
        return None if zipfile.is_zipfile(path) else "not a zip archive"
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head.strip():
        return "empty file"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "an HTML/XML page, not CSV"
    return None


def fetch_cached(remote: Remote, cache: Path, params: DownloadParams) -> Path:
    """The verified file in the cache, downloading it (or the rest of it) only when needed."""
    dest = cache / remote.name
    if dest.exists():
        problem = checksum_problem(dest, remote.checksums)
        if problem is None:
            log.info("%s: using cached %s", remote.name, dest)
            return dest
        log.warning("%s: cached copy fails its check (%s); downloading again", dest, problem)
        dest.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log.info("%s: fetching %s", remote.name, remote.url)
    download_resumable(remote.url, part, remote.name, params)
    problem = content_problem(part, remote.name) or checksum_problem(part, remote.checksums)
    if problem:
        part.unlink()
        raise StageError(f"{remote.url}: {problem}; the download was deleted")
    os.replace(part, dest)
    log.info("%s: %s bytes verified (%s)", remote.name, f"{dest.stat().st_size:,}",
             ", ".join(c.algorithm for c in remote.checksums) or "content only")
    return dest


def locate_local(folder: Path, params: DownloadParams) -> list[Path]:
    """Each file from `folder`: as named, or (Kaggle's layout) an archive as its extracted folder."""
    if not folder.is_dir():
        raise StageError(f"download.local_dir: {folder} is not a folder")
    found = []
    for name in params.files:
        path, extracted = folder / name, folder / name.removesuffix(".zip")
        if path.is_file():
            pins = pin_checksums(name, params.sha256)
            problem = content_problem(path, name) or checksum_problem(path, pins)
            if problem:
                raise StageError(f"{path}: {problem} (download.local_dir; the file was left as it is)")
            found.append(path)
        elif name.endswith(".zip") and extracted.is_dir():
            found.append(extracted)
        else:
            raise StageError(f"download.local_dir: {folder} holds neither {name} nor {extracted.name}/")
        log.info("%s: using local %s", name, found[-1])
    return found


def gather(params: DownloadParams, mirror: str | None, cache: Path) -> list[Path]:
    """Every file of the release as a local path (a file, or a folder of images)."""
    if params.local_dir is not None:
        return locate_local(Path(params.local_dir), params)
    remotes = resolve_mirror(mirror_base(mirror), params) if mirror else resolve_dataverse(params)
    return [fetch_cached(pinned(r, params.sha256), cache, params) for r in remotes]


def content_facts(names: list[str], inputs: list[Path]) -> dict:
    """data/raw/source.json: what each input is, not where it came from: a file's size and sha256,
    a folder of extracted images its image count and total size."""
    files = {}
    for name, path in zip(names, inputs):
        if path.is_file():
            files[name] = {"bytes": path.stat().st_size, "sha256": file_digests(path, {"sha256"})["sha256"]}
        else:
            images = [p for p in path.iterdir() if p.is_file() and is_image(p.name)]
            files[name] = {"images": len(images), "bytes": sum(p.stat().st_size for p in images)}
    return {"files": files}


def origin(params: DownloadParams, mirror: str | None) -> dict:
    """data/downloads/source.json (untracked): which source the files came from (official / mirror /
    local folder) and its URL, DOI or folder; the same precedence as `gather`."""
    if params.local_dir is not None:
        return {"source": "local", "url": None, "doi": None, "local_dir": params.local_dir}
    if mirror:
        return {"source": "mirror", "url": mirror_base(mirror), "doi": None, "local_dir": None}
    return {"source": "official", "url": params.dataverse_url, "doi": params.dataset_doi, "local_dir": None}


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------
class CorruptArchiveError(StageError):
    """The archive's bytes are damaged; `path` tells main which file to drop from the cache."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path


def name_problem(info: zipfile.ZipInfo) -> str | None:
    """Why an entry could write outside the target folder or through a link, or None."""
    name = info.filename
    if name.startswith("/") or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return "absolute path, drive letter or backslash"
    if ".." in name.split("/"):
        return "'..' path component"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    return None


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.endswith("/")


def size_problem(info: zipfile.ZipInfo, limits: ArchiveLimits) -> str | None:
    """Refuse bombs by what the headers declare, before a byte is inflated."""
    if info.file_size > limits.max_entry_bytes:
        return f"declares {info.file_size:,} bytes, over max_entry_bytes {limits.max_entry_bytes:,}"
    ratio = info.file_size / max(info.compress_size, 1)
    if ratio > limits.max_compression_ratio:
        return f"compression ratio {ratio:.0f} is over max_compression_ratio {limits.max_compression_ratio:g}"
    return None


def plan_archive(infos: list[zipfile.ZipInfo], archive: Path, limits: ArchiveLimits,
                 archive_bytes: int) -> list[zipfile.ZipInfo]:
    """The image entries to take, or StageError naming the archive and the first bad entry.

    The declared total is capped twice: by max_total_bytes, and by max_compression_ratio times the
    archive's own size (entries that share compressed data each pass the per-entry ratio).
    """
    seen: set[str] = set()
    images, total = [], 0
    for info in infos:
        problem = name_problem(info) or ("duplicate name" if info.filename in seen else None)
        if problem is None and is_image(info.filename):
            problem = size_problem(info, limits)
            total += info.file_size
        if problem:
            raise StageError(f"{archive}: entry {info.filename!r} refused: {problem}")
        seen.add(info.filename)
        if is_image(info.filename):
            images.append(info)
    if total > limits.max_total_bytes:
        raise StageError(f"{archive}: declares {total:,} bytes of images in all, "
                         f"over max_total_bytes {limits.max_total_bytes:,}")
    if total > limits.max_compression_ratio * archive_bytes:
        raise StageError(f"{archive}: declares {total:,} bytes of images in an archive of {archive_bytes:,} "
                         f"bytes, ratio {total / max(archive_bytes, 1):.0f} over max_compression_ratio "
                         f"{limits.max_compression_ratio:g} (a zip bomb: entries sharing their data)")
    return images


def local_header_end(f: BinaryIO, info: zipfile.ZipInfo) -> int | str:
    """Where `info`'s compressed data ends, from its local header; or why that header does not
    match the central directory (name, method, CRC, sizes), which zipfile trusts on its own."""
    f.seek(info.header_offset)
    raw = f.read(LOCAL_HEADER.size)
    if len(raw) < LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
        return f"no local header at offset {info.header_offset:,}"
    _, _, flags, method, _, _, crc, packed, size, name_len, extra_len = LOCAL_HEADER.unpack(raw)
    name = f.read(name_len).decode("utf-8" if flags & 0x800 else "cp437", "replace")
    if name != info.orig_filename:
        return f"local header names {name!r}"
    if method != info.compress_type:
        return f"local header's compression method {method} differs from the central directory's {info.compress_type}"
    if not flags & 0x08:  # else the CRC and sizes follow the data, and the header holds zeros
        for what, local, central in (("CRC", crc, info.CRC), ("compressed size", packed, info.compress_size),
                                     ("size", size, info.file_size)):
            if local not in (central, 0xFFFFFFFF):  # 0xFFFFFFFF: in the zip64 extra field
                return f"local header's {what} {local:,} differs from the central directory's {central:,}"
    return info.header_offset + LOCAL_HEADER.size + name_len + extra_len + info.compress_size


def layout_problem(f: BinaryIO, infos: list[zipfile.ZipInfo], central_directory: int) -> str | None:
    """Why the entries' bytes are not disjoint (each local header and its data, before the central
    directory), or None. Overlapping entries inflate one stream many times: a zip bomb that every
    per-entry check passes, and Python's zipfile does not look for it."""
    spans = []
    for info in infos:
        end = local_header_end(f, info)
        if isinstance(end, str):
            return f"entry {info.filename!r}: {end}"
        if end > central_directory:
            return f"entry {info.filename!r}: its data runs into the central directory"
        spans.append((info.header_offset, end, info.filename))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            return f"entries {name!r} and {other!r} overlap (they share compressed data: a zip bomb)"
    return None


def copy_entry(src: BinaryIO, dst: BinaryIO, declared: int) -> None:
    """Stream one entry, stopping as soon as it holds more bytes than its header declared."""
    written = 0
    while chunk := src.read(CHUNK_BYTES):
        written += len(chunk)
        if written > declared:
            raise ValueError(f"holds more than its declared size of {declared:,} bytes")
        dst.write(chunk)


def flat_name(entry_name: str) -> str:
    """The file an image entry becomes in images/: its base name, with the suffix spelled `.jpg`
    (ISIC_1.JPEG -> ISIC_1.jpg), the one layout every later stage reads (images.image_file)."""
    base = entry_name.rsplit("/", 1)[-1]
    return base[:base.rfind(".")] + ".jpg"


def claim(names: dict[str, str], name: str, origin: str) -> None:
    """Refuse two images that would land on one file in images/ (case-insensitive filesystems too)."""
    key = name.casefold()
    if key in names:
        raise StageError(f"{origin}: image {name} would overwrite the one from {names[key]}")
    names[key] = origin


def extract_images(archive: Path, images_dir: Path, limits: ArchiveLimits, taken: dict[str, str]) -> int:
    """Check every entry, then copy the images flat into `images_dir`; returns the count."""
    try:
        with zipfile.ZipFile(archive) as zf, open(archive, "rb") as f:
            infos = zf.infolist()
            entries = plan_archive(infos, archive, limits, archive.stat().st_size)
            problem = layout_problem(f, infos, getattr(zf, "start_dir", archive.stat().st_size))
            if problem:
                raise StageError(f"{archive}: refused: {problem}")
            for info in entries:
                claim(taken, flat_name(info.filename), f"{archive.name}:{info.filename}")
            for info in entries:
                extract_entry(zf, info, images_dir / flat_name(info.filename), archive)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise CorruptArchiveError(archive, f"{archive}: corrupt zip archive ({err})") from None
    log.info("%s: %d images extracted, %d other entries skipped",
             archive.name, len(entries), len(infos) - len(entries))
    return len(entries)


def extract_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path) -> None:
    try:
        with zf.open(info) as src, open(target, "xb") as dst:
            copy_entry(src, dst, info.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:
        raise CorruptArchiveError(archive, f"{archive}: corrupt zip, entry {info.filename!r} does not "
                                           f"match its declared size and CRC ({err})") from None


def copy_folder_images(folder: Path, images_dir: Path, taken: dict[str, str]) -> int:
    """Kaggle's extracted layout: a flat folder of JPEGs, copied byte for byte (named as `flat_name` says)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image(p.name))
    for path in files:
        claim(taken, flat_name(path.name), str(folder))
    for path in files:
        shutil.copyfile(path, images_dir / flat_name(path.name))
    log.info("%s: %d images copied", folder, len(files))
    return len(files)


def build_raw(inputs: list[Path], out: Path, limits: ArchiveLimits) -> int:
    """Fill `out` (an empty folder) with images/ and the metadata CSV; returns the image count."""
    images_dir = out / "images"
    images_dir.mkdir()
    taken: dict[str, str] = {}
    count = 0
    for path in inputs:
        if path.is_dir():
            count += copy_folder_images(path, images_dir, taken)
        elif path.suffix == ".zip":
            count += extract_images(path, images_dir, limits, taken)
        else:
            shutil.copyfile(path, out / path.name)
    if count == 0:
        raise StageError(f"no images found in {', '.join(str(p) for p in inputs)}")
    return count


# --------------------------------------------------------------------------------------------
def main(params_path: Path = PARAMS_FILE, out_dir: Path = RAW_DIR, cache_dir: Path = CACHE_DIR) -> None:
    """Fetch (or take from `download.local_dir`) the release into `out_dir`, via the `cache_dir`."""
    params = load_params("download", DownloadParams, params_path)
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    mirror = os.environ.get(MIRROR_ENV) or None
    inputs = gather(params, mirror, cache_dir)
    facts, where = content_facts(params.files, inputs), origin(params, mirror)
    try:
        with atomic_dir(out_dir) as tmp:
            count = build_raw(inputs, tmp, params.limits)
            atomic_write_json(tmp / SOURCE_FILE, facts)
    except CorruptArchiveError as err:
        if err.path.parent == cache_dir:
            err.path.unlink(missing_ok=True)
            raise StageError(f"{err} (removed from {cache_dir}; the next run downloads it again)") from None
        raise
    atomic_write_json(cache_dir / SOURCE_FILE, {**where, **facts})
    log.info("%s: %d images and %s, from the %s source (%s; recorded in %s)", out_dir, count,
             ", ".join(p.name for p in inputs if p.suffix == ".csv"), where["source"],
             where["local_dir"] or where["doi"] or where["url"], cache_dir / SOURCE_FILE)


if __name__ == "__main__":
    run_stage(main)
