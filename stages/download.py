"""Stage download: fetch the HAM10000 release and unpack it into data/raw/.

Sources, by precedence: `download.local_dir` (a folder holding the files, or Kaggle's extracted
copy); `HAM10000_MIRROR=<base URL>` (the same names, checked against its SHA256SUMS if it has one);
the official release on Harvard Dataverse (native API). Downloads go through the environment's proxy
if it names one, are retried (urllib3), resumed (Range) and verified into data/downloads/, a cache
that is no DVC output. data/raw/ holds `images/ISIC_XXXXXXX.jpg` (flat), the metadata CSV and
`source.json` (each file's size and sha256, no URL: the same files give the same data/raw from any
server; the source goes to data/downloads/source.json). Archive entries are checked (names, sizes,
overlaps) before one is unpacked; data/raw is written whole or not at all. Faults: docs/faults.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import struct
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from time import sleep
from typing import BinaryIO

import urllib3
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NameResolutionError, ProtocolError, ReadTimeoutError
from urllib3.util.retry import Retry

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
USER_AGENT = "ham10000-pipeline/1.0 (+urllib3; stages/download.py)"
DIRECT = urllib3.PoolManager()  # connections without a proxy, kept alive between requests
CHUNK_BYTES = 1 << 20
TRANSIENT_STATUSES = frozenset({429, *range(500, 600)})  # retried; any other error status is final
MAX_REDIRECTS = 10  # Dataverse's access API redirects to its file store
IMAGE_SUFFIXES = (".jpg", ".jpeg")
LOCAL_HEADER = struct.Struct("<4s2x2H4x3I2H")  # zip local header: signature, flags, method, CRC, sizes, lengths
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.(zip|csv)$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DownloadParams:
    dataverse_url: str
    dataset_doi: str
    files: list[str]
    retries: int
    timeout_s: float
    max_entry_bytes: int  # the archive limits: anything beyond is refused as a bomb or a lie
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
        for name, digest in self.sha256.items():
            if name not in self.files:
                raise ValueError(f"sha256.{name} pins a file that is not in files")
            if not SHA256_HEX.match(digest):
                raise ValueError(f"sha256.{name} must be 64 lowercase hex digits, got {digest!r}")
        in_range("retries", self.retries, 0)
        for key in ("timeout_s", "max_entry_bytes", "max_total_bytes", "max_compression_ratio"):
            in_range(key, getattr(self, key), 0, lo_open=True)


# ---- where each file comes from, and what it must hash to -----------------------------------
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


def pin_checksums(name: str, pins: dict[str, str], pins_key: str = "download.sha256") -> tuple[Checksum, ...]:
    """The params' sha256 pin (`pins_key` in params.yaml), if any: it holds whichever server or
    folder the file comes from."""
    return (Checksum("sha256", pins[name], f"params.yaml {pins_key}.{name}"),) if name in pins else ()


def resolve_mirror(base: str, params: DownloadParams) -> list[Remote]:
    """Like a package-index mirror: the same names under another base URL, each checked against the
    mirror's SHA256SUMS (`sha256sum` output) where it lists it; SHA256SUMS itself is optional."""
    text = fetch_bytes(sums_url := base + SUMS_FILE, params, missing_ok=True)
    if text is None:
        log.warning("%s: no %s (404): files are checked by their content and pins only", base, SUMS_FILE)
    lines = re.findall(r"^([0-9a-fA-F]{64}) [ *](.+?)\r?$", (text or b"").decode("utf-8", "replace"), re.M)
    sums = {name: digest.lower() for digest, name in lines}
    remotes = []
    for name in params.files:
        if text is not None and name not in sums:
            log.warning("%s does not list %s: it is checked by its content only", sums_url, name)
        checksums = (Checksum("sha256", sums[name], sums_url),) if name in sums else ()
        remotes.append(Remote(name, base + urllib.parse.quote(name), checksums))
    return remotes


def resolve_dataverse(params: DownloadParams) -> list[Remote]:
    """The wanted names among the dataset's files, each with Dataverse's checksum (`checksum{type,value}`
    or older `md5`). An uploaded CSV is ingested as `.tab`, the upload kept as `originalFileName`: so
    `HAM10000_metadata.csv` may be listed as `HAM10000_metadata.tab`, fetched with `?format=original`."""
    site = params.dataverse_url.rstrip("/")
    url = (f"{site}/api/datasets/:persistentId/versions/:latest-published/files?"
           + urllib.parse.urlencode({"persistentId": params.dataset_doi}))
    try:
        listing = json.loads(fetch_bytes(url, params))
        files = [item["dataFile"] for item in listing["data"] if "dataFile" in item]
        if not all(isinstance(f, dict) and "id" in f for f in files):
            raise TypeError
    except (ValueError, TypeError, KeyError):  # JSONDecodeError is a ValueError
        raise StageError(f"{url}: answer is not a Dataverse file listing") from None
    remotes = []
    for name in params.files:
        found = next((f for f in files if name in (f.get("originalFileName"), f.get("filename"))), None)
        if found is None:
            listed = ", ".join(sorted(str(f.get("originalFileName") or f.get("filename")) for f in files))
            raise StageError(f"{url}: dataset has no file {name} (it lists: {listed})")
        original = found.get("originalFileName") == name and found.get("filename") != name
        given = found.get("checksum") or {"type": "MD5", "value": found.get("md5")}
        algorithm = str(given.get("type", "")).lower().replace("-", "")
        checksums = ((Checksum(algorithm, str(given["value"]).lower(), f"Dataverse {url}"),)
                     if given.get("value") and algorithm in hashlib.algorithms_guaranteed else ())
        file_url = f"{site}/api/access/datafile/{found['id']}" + ("?format=original" if original else "")
        remotes.append(Remote(name, file_url, checksums))
    return remotes


# ---- HTTP: urllib3 retries transient failures; a broken body resumes from the .part ----------
class Retries(Retry):
    """urllib3's Retry, with a warning before each retry; none for a host name that does not resolve."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        if isinstance(error, NameResolutionError):
            raise error
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def sleep(self, response=None) -> None:
        last = self.history[-1]  # its url: the path, or the whole URL after a broken body
        why = f"HTTP {response.status} {response.reason}" if response else last.error
        log.warning("%s: %s; retry %d in %.0f s", last.url, why, len(self.history), self.get_backoff_time())
        sleep(self.get_backoff_time())


def new_retries(params: DownloadParams) -> Retries:
    """Up to `retries` retries of each kind of transient failure (connection, read, 429 or 5xx status),
    waiting 0, 2, 4, 8 ... s (urllib3's back-off) before them."""
    return Retries(total=None, connect=params.retries, read=params.retries, status=params.retries, other=0,
                   redirect=MAX_REDIRECTS, status_forcelist=TRANSIENT_STATUSES, raise_on_status=False,
                   backoff_factor=1)


def connection_pool(url: str) -> urllib3.PoolManager:
    """Through the proxy the environment names for `url` (https_proxy, http_proxy, no_proxy), else direct."""
    scheme, host = urllib.parse.urlsplit(url).scheme, urllib.parse.urlsplit(url).hostname or ""
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(scheme)
    return urllib3.ProxyManager(proxy) if proxy else DIRECT


def request(url: str, params: DownloadParams, retries: Retries, what: str, offset: int = 0,
            preload: bool = False, missing_ok: bool = False) -> urllib3.BaseHTTPResponse:
    """GET `url` (from byte `offset`), retried by urllib3; StageError for a status that stays an
    error (but 404 if `missing_ok`, 416 for a Range), or an HTML page (a login or error page)
    served instead of `what`."""
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = connection_pool(url).request("GET", url, headers=headers, retries=retries,
                                                timeout=params.timeout_s, preload_content=preload, decode_content=False)
    except NameResolutionError as err:
        host, cause = urllib.parse.urlsplit(url).hostname, err.__cause__ or err
        raise StageError(f"{url}: cannot resolve host {host} ({getattr(cause, 'strerror', None) or cause}): "
                         f"no network? Set {MIRROR_ENV}=<base URL> to fetch from a mirror, or download.local_dir "
                         "in params.yaml to a folder holding the files") from None
    except MaxRetryError as err:
        why = err.reason
        if isinstance(why, ConnectTimeoutError):  # refused, unreachable, timed out while connecting
            why = f"cannot connect ({why.__cause__ or why})"
        elif not isinstance(why, (ProtocolError, ReadTimeoutError)):  # a bad certificate, too many redirects
            raise StageError(f"{url}: {why}") from None
        raise StageError(f"{url}: {why} (gave up after {params.retries} retries)") from None
    if response.status in TRANSIENT_STATUSES:
        raise StageError(f"{url}: HTTP {response.status} {response.reason} (gave up after {params.retries} retries)")
    if response.status >= 400 and response.status not in (416 if offset else None, 404 if missing_ok else None):
        raise StageError(f"{url}: HTTP {response.status} {response.reason}")
    content_type = response.headers.get("Content-Type", "")
    if response.status < 300 and content_type.lower().startswith("text/html"):
        raise StageError(f"{url}: server answered an HTML page (Content-Type {content_type}), not {what}; "
                         "check the URL or the mirror")
    return response


def fetch_bytes(url: str, params: DownloadParams, missing_ok: bool = False) -> bytes | None:
    """A small document (API listing, SHA256SUMS) read into memory; None for a 404 if `missing_ok`."""
    response = request(url, params, new_retries(params), "a data document", preload=True, missing_ok=missing_ok)
    return None if response.status == 404 else response.data


def download(url: str, part: Path, name: str, params: DownloadParams) -> None:
    """Fill `part` with the body of `url`, resuming from its size with a Range request (now after a
    dropped connection, or on the next run after a kill or the last retry: the .part is kept)."""
    retries = new_retries(params)
    while True:
        offset = part.stat().st_size if part.exists() else 0
        response = request(url, params, retries, name, offset)
        retries = response.retries or retries
        if response.status == 416:  # the .part is longer than the file: stale
            response.release_conn()
            part.unlink()
            continue
        start = offset if response.status == 206 else 0  # 200: the server ignored the Range
        length = response.headers.get("Content-Length")
        with open(part, "ab" if start else "wb") as out, Progress(
                start + int(length) if length else 0, what=f"download {name}", unit="bytes", logger=log) as bar:
            bar.update(start)
            try:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
                return
            except (ProtocolError, ReadTimeoutError) as err:  # reset, closed early, timed out
                why = "read timed out" if isinstance(err, ReadTimeoutError) else "connection lost"
                error = ProtocolError(f"{why} after {out.tell():,}{f' of {bar.total:,}' if bar.total else ''} bytes")
        try:
            retries = retries.increment("GET", url, error=error)
        except MaxRetryError:
            raise StageError(f"{url}: {error} (gave up after {params.retries} retries)") from None
        retries.sleep()


# ---- checking a file before it is kept ------------------------------------------------------
def file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def file_problem(path: Path, name: str, checksums: tuple[Checksum, ...]) -> str | None:
    """Why the file is not the one wanted (an archive that is no zip, a checksum that fails), or None."""
    if name.endswith(".zip") and not zipfile.is_zipfile(path):
        return "not a zip archive"
    for c in checksums:
        if (actual := file_digest(path, c.algorithm)) != c.hexdigest:
            return f"{c.algorithm} mismatch: expected {c.hexdigest} ({c.source}), got {actual}"
    return None


def fetch_cached(remote: Remote, cache: Path, params: DownloadParams) -> Path:
    """The verified file in the cache, downloading it (or the rest of it) only when needed."""
    dest = cache / remote.name
    if dest.exists():
        if (problem := file_problem(dest, remote.name, remote.checksums)) is None:
            log.info("%s: using cached %s", remote.name, dest)
            return dest
        log.warning("%s: cached copy fails its check (%s); downloading again", dest, problem)
        dest.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log.info("%s: fetching %s", remote.name, remote.url)
    download(remote.url, part, remote.name, params)
    if problem := file_problem(part, remote.name, remote.checksums):
        part.unlink()
        raise StageError(f"{remote.url}: {problem}; the download was deleted")
    os.replace(part, dest)
    log.info("%s: %s bytes verified (%s)", remote.name, f"{dest.stat().st_size:,}",
             ", ".join(c.algorithm for c in remote.checksums) or "content only")
    return dest


def locate_local(folder: Path, params: DownloadParams, pins_key: str = "download.sha256") -> list[Path]:
    """Each file from `folder`: as named, or (Kaggle's layout) an archive as its extracted folder."""
    found = []
    for name in params.files:
        path, extracted = folder / name, folder / name.removesuffix(".zip")
        if path.is_file():
            if problem := file_problem(path, name, pin_checksums(name, params.sha256, pins_key)):
                raise StageError(f"{path}: {problem} (download.local_dir; the file was left as it is)")
            found.append(path)
        elif name.endswith(".zip") and extracted.is_dir():
            found.append(extracted)
        else:
            raise StageError(f"download.local_dir: {folder} holds neither {name} nor {extracted.name}/")
        log.info("%s: using local %s", name, found[-1])
    return found


def gather(params: DownloadParams, mirror: str | None, cache: Path,
           pins_key: str = "download.sha256") -> tuple[list[Path], dict]:
    """Every file of the release as a local path (a file, or a folder of images), and its source;
    `params.sha256` is `pins_key` in params.yaml (stages/isic2018.py fetches its own files here)."""
    if params.local_dir is not None:
        where = {"source": "local", "url": None, "doi": None, "local_dir": params.local_dir}
        return locate_local(Path(params.local_dir), params, pins_key), where
    if mirror:
        if not mirror.startswith(("https://", "http://")):
            raise StageError(f"{MIRROR_ENV}={mirror!r}: must be an http(s):// base URL")
        base = mirror.rstrip("/") + "/"
        remotes, where = resolve_mirror(base, params), {"source": "mirror", "url": base, "doi": None, "local_dir": None}
    else:
        where = {"source": "official", "url": params.dataverse_url, "doi": params.dataset_doi, "local_dir": None}
        remotes = resolve_dataverse(params)
    return [fetch_cached(dataclasses.replace(r, checksums=r.checksums + pin_checksums(r.name, params.sha256, pins_key)),
                         cache, params) for r in remotes], where


def content_facts(names: list[str], inputs: list[Path]) -> dict:
    """data/raw/source.json: what each input is, not where it came from: a file's size and sha256,
    a folder of extracted images its image count and total size."""
    files = {}
    for name, path in zip(names, inputs):
        if path.is_file():
            files[name] = {"bytes": path.stat().st_size, "sha256": file_digest(path, "sha256")}
        else:
            images = [p for p in path.iterdir() if p.is_file() and is_image(p.name)]
            files[name] = {"images": len(images), "bytes": sum(p.stat().st_size for p in images)}
    return {"files": files}


# ---- safe extraction: zipfile checks each CRC, each local header's name, and never reads past an
# entry's declared size; the checks here are those Python 3.11's zipfile lacks ------------------
def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.endswith("/")


def entry_problem(info: zipfile.ZipInfo, limits: DownloadParams) -> str | None:
    """Why an entry is a path outside the folder, a link, or an image over the limits; or None."""
    name = info.filename
    if name.startswith("/") or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return "absolute path, drive letter or backslash"
    if ".." in name.split("/"):
        return "'..' path component"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    if is_image(name) and info.file_size > limits.max_entry_bytes:
        return f"declares {info.file_size:,} bytes, over max_entry_bytes {limits.max_entry_bytes:,}"
    ratio = info.file_size / max(info.compress_size, 1)
    if is_image(name) and ratio > limits.max_compression_ratio:
        return f"compression ratio {ratio:.0f} is over max_compression_ratio {limits.max_compression_ratio:g}"
    return None


def plan_archive(infos: list[zipfile.ZipInfo], archive: Path, limits: DownloadParams,
                 archive_bytes: int) -> list[zipfile.ZipInfo]:
    """The image entries to take, or StageError naming the archive and the first bad entry. The declared
    total is capped by max_total_bytes and by max_compression_ratio times the archive's size."""
    for info in infos:
        if problem := entry_problem(info, limits):
            raise StageError(f"{archive}: entry {info.filename!r} refused: {problem}")
    images = [info for info in infos if is_image(info.filename)]
    total = sum(info.file_size for info in images)
    if total > limits.max_total_bytes:
        raise StageError(f"{archive}: declares {total:,} bytes of images in all, "
                         f"over max_total_bytes {limits.max_total_bytes:,}")
    if total > limits.max_compression_ratio * archive_bytes:
        raise StageError(f"{archive}: declares {total:,} bytes of images in an archive of {archive_bytes:,} "
                         f"bytes, ratio {total / max(archive_bytes, 1):.0f} over max_compression_ratio "
                         f"{limits.max_compression_ratio:g} (a zip bomb: entries sharing their data)")
    return images


def layout_problem(f: BinaryIO, infos: list[zipfile.ZipInfo], central_directory: int) -> str | None:
    """Why entries overlap or run into the central directory (overlaps inflate one stream many
    times: a bomb that passes every per-entry check), or a local header disagrees with the central
    directory on the method, CRC or sizes (zipfile reads the central directory alone); or None."""
    spans = []
    for info in infos:
        f.seek(info.header_offset)
        raw = f.read(LOCAL_HEADER.size)
        if len(raw) < LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
            return f"entry {info.filename!r}: no local header at offset {info.header_offset:,}"
        _, flags, method, crc, packed, size, name_len, extra_len = LOCAL_HEADER.unpack(raw)
        for what, local, central in (("compression method", method, info.compress_type), ("CRC", crc, info.CRC),
                                     ("compressed size", packed, info.compress_size), ("size", size, info.file_size)):
            # with flag 0x08 the CRC and sizes follow the data (zeros here); 0xFFFFFFFF: in the zip64 field
            if local not in (central, 0xFFFFFFFF) and (what == "compression method" or not flags & 0x08):
                return (f"entry {info.filename!r}: local header's {what} {local:,} differs from the "
                        f"central directory's {central:,}")
        end = info.header_offset + LOCAL_HEADER.size + name_len + extra_len + info.compress_size
        if end > central_directory:
            return f"entry {info.filename!r}: its data runs into the central directory"
        spans.append((info.header_offset, end, info.filename))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            return f"entries {name!r} and {other!r} overlap (they share compressed data: a zip bomb)"
    return None


def flat_name(entry_name: str) -> str:
    """An image entry's file in images/: its base name, suffix `.jpg` (ISIC_1.JPEG -> ISIC_1.jpg)."""
    base = entry_name.rsplit("/", 1)[-1]
    return base[:base.rfind(".")] + ".jpg"


def claim(names: dict[str, str], name: str, origin: str) -> None:
    """Refuse two images that would land on one file in images/ (case-insensitive filesystems too)."""
    key = name.casefold()
    if key in names:
        raise StageError(f"{origin}: image {name} would overwrite the one from {names[key]}")
    names[key] = origin


def extract_images(archive: Path, images_dir: Path, limits: DownloadParams, taken: dict[str, str],
                   cache: Path) -> int:
    """Check every entry, then copy the images flat into `images_dir`; returns the count. A damaged
    archive in the `cache` is deleted, so that the next run downloads it again."""
    try:
        with zipfile.ZipFile(archive) as zf, open(archive, "rb") as f:
            infos = zf.infolist()
            entries = plan_archive(infos, archive, limits, archive.stat().st_size)
            if problem := layout_problem(f, infos, zf.start_dir):
                raise StageError(f"{archive}: refused: {problem}")
            for info in entries:
                claim(taken, flat_name(info.filename), f"{archive.name}:{info.filename}")
            for info in entries:
                extract_entry(zf, info, images_dir / flat_name(info.filename))
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        if archive.parent != cache:
            raise StageError(f"{archive}: corrupt zip archive ({err})") from None
        archive.unlink()
        raise StageError(f"{archive}: corrupt zip archive ({err}) (removed from {cache}; the next run "
                         "downloads it again)") from None
    log.info("%s: %d images extracted, %d other entries skipped", archive, len(entries), len(infos) - len(entries))
    return len(entries)


def extract_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    with zf.open(info) as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst, CHUNK_BYTES)


def copy_folder_images(folder: Path, images_dir: Path, taken: dict[str, str]) -> int:
    """Kaggle's extracted layout: a flat folder of JPEGs, copied byte for byte (named as `flat_name` says)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image(p.name))
    for path in files:
        claim(taken, flat_name(path.name), str(folder))
    for path in files:
        shutil.copyfile(path, images_dir / flat_name(path.name))
    log.info("%s: %d images copied", folder, len(files))
    return len(files)


def build_raw(inputs: list[Path], out: Path, limits: DownloadParams, cache: Path) -> int:
    """Fill `out` (an empty folder) with images/ and the metadata CSV; returns the image count."""
    images_dir = out / "images"
    images_dir.mkdir()
    taken: dict[str, str] = {}
    count = 0
    for path in inputs:
        if path.is_dir():
            count += copy_folder_images(path, images_dir, taken)
        elif path.suffix == ".zip":
            count += extract_images(path, images_dir, limits, taken, cache)
        else:
            shutil.copyfile(path, out / path.name)
    if count == 0:
        raise StageError(f"no images found in {', '.join(str(p) for p in inputs)}")
    return count


def main(params_path: Path = PARAMS_FILE, out_dir: Path = RAW_DIR, cache_dir: Path = CACHE_DIR) -> None:
    """Fetch (or take from `download.local_dir`) the release into `out_dir`, via the `cache_dir`."""
    params = load_params("download", DownloadParams, params_path)
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    mirror = os.environ.get(MIRROR_ENV) or None
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings repeat Retries.sleep's
    inputs, where = gather(params, mirror, cache_dir)
    facts = content_facts(params.files, inputs)
    with atomic_dir(out_dir) as tmp:
        count = build_raw(inputs, tmp, params, cache_dir)
        atomic_write_json(tmp / SOURCE_FILE, facts)
    atomic_write_json(cache_dir / SOURCE_FILE, {**where, **facts})
    log.info("%s: %d images and %s, from the %s source (%s; recorded in %s)", out_dir, count,
             ", ".join(p.name for p in inputs if p.suffix == ".csv"), where["source"],
             where["local_dir"] or where["doi"] or where["url"], cache_dir / SOURCE_FILE)


if __name__ == "__main__":
    run_stage(main)
