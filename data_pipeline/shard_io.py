"""WebDataset shards on disk: listing, opening, raw sample groups with faults, atomic writing.

Uses webdataset for what it does well (brace expansion, `pipe:`/URL opening, TarWriter). We
iterate tar members and group them into samples ourselves: webdataset's grouping raises on the
first duplicate and cannot tell *which* key or reason a skipped sample had, and tarfile's
stream mode takes a shard cut at (or inside) a member header for a normal end of archive.
Every skip here is attributed to a key and a reason so that it can be counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from data_pipeline.options import DEFAULT_MAX_IMAGE_PIXELS

# Reasons a sample is skipped; each is counted separately (stage summaries, logs, tests).
TRUNCATED_TAR = "truncated_tar"  # the shard ends inside a member (counted once per shard)
UNREADABLE_SHARD = "unreadable_shard"  # the shard cannot be opened at all
NOT_A_TAR = "not_a_tar"  # not a tar archive from its first byte (a failed download's HTML page, random bytes)
NOT_A_TAR_DETAIL = "its first 512 bytes are not a tar header"
DUPLICATE_KEY = "duplicate_key"  # a key (or a member of a sample) seen before in this shard
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE = "empty_image"  # zero-byte image member
UNDECODABLE_IMAGE = "undecodable_image"
IMAGE_TOO_LARGE = "image_too_large"  # more pixels than data.reader.max_image_pixels (a decompression bomb)
MISSING_CAPTION = "missing_caption"
MISSING_MEMBER = "missing_member"  # a binary member the stage needs (a cache entry) is absent
EMPTY_CAPTION = "empty_caption"
BAD_JSON = "bad_json"
FAULT_REASONS = (TRUNCATED_TAR, UNREADABLE_SHARD, NOT_A_TAR, DUPLICATE_KEY, MISSING_IMAGE, EMPTY_IMAGE, UNDECODABLE_IMAGE,
                 IMAGE_TOO_LARGE, MISSING_CAPTION, EMPTY_CAPTION, BAD_JSON)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")


class DataError(RuntimeError):
    """Bad data the run cannot continue with (strict mode, or too many skipped samples)."""


class NoShardsError(ValueError):
    """A shard specification matched nothing."""


def list_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into shard URLs, in a stable order.

    ``spec``: a directory (its ``*.tar`` files, sorted), a path or URL with braces
    (``/data/{00000..00099}.tar``), ``pipe:`` commands (braces expanded as webdataset does),
    several of these joined by ``::``, or a list of them.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in expand_urls(item):
            if is_local(url) and Path(url).is_dir():
                found = [str(p) for p in sorted(Path(url).glob("*.tar")) if p.is_file()]
                if not found:
                    raise NoShardsError(f"shard directory {url} has no .tar files")
                urls.extend(found)
            else:
                urls.append(url)
    if not urls:
        raise NoShardsError(f"no shards found in {spec!r}")
    missing = [u for u in urls if is_local(u) and not Path(u).exists()]
    if missing:
        first = missing[0]
        if len(urls) == 1 and not Path(first).suffix:  # meant as a directory of shards
            raise NoShardsError(f"shard directory {first} does not exist")
        raise NoShardsError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {first}")
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def shard_name(url: str) -> str:
    """A short, secret-free name for messages: the last path component (`00012.tar`), without a
    query string; for a ``pipe:`` command, that of its last argument naming a ``.tar``."""
    if url.startswith("pipe:"):
        tokens = [t.strip("'\"") for t in url[len("pipe:"):].split()]
        path = next((t for t in reversed(tokens) if ".tar" in t), tokens[-1] if tokens else "")
        return "pipe:" + (shard_name(path) if path else "")
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def open_shard(url: str) -> IO[bytes]:
    """A readable binary stream: local files directly, everything else through webdataset's gopen."""
    if is_local(url):
        return open(url, "rb")
    from webdataset.gopen import gopen

    return gopen(url, "rb")


@dataclass
class RawSample:
    """One sample's members as bytes, by extension (``jpg``, ``txt``, ``json``, ``ssc.txt`` ...).

    ``offset`` is the ordinal of this group in its shard (good or bad), the unit of resume
    positions. ``fault`` is set when the group itself is unusable (duplicate key).
    """

    key: str
    members: dict[str, bytes]
    offset: int
    fault: str | None = None


def iter_raw_samples(stream: IO[bytes], seen_keys: set[str] | None = None, *,
                     report_cut: bool = False) -> Iterator[RawSample | str]:
    """Group a tar stream's members into samples (consecutive members with the same key).

    Yields RawSample for each group, then the string TRUNCATED_TAR if the tar ends early; only
    the string NOT_A_TAR when its first 512 bytes are not a tar header.
    Groups whose key appeared earlier in the shard, or that hold the same member twice, come
    with ``fault=DUPLICATE_KEY`` (the first occurrence is kept). ``seen_keys`` is filled in.
    With ``report_cut``, the group open at a cut (complete or not: it cannot be told) is
    yielded with ``fault=TRUNCATED_TAR`` before the string, so its key can be accounted for.
    """
    seen = set() if seen_keys is None else seen_keys
    current: RawSample | None = None
    offset = 0
    try:
        for fname, data in _tar_members(stream):
            key, ext = base_plus_ext(fname)
            if key is None:
                continue
            ext = ext.lower()
            if current is not None and key == current.key:
                if ext in current.members:
                    current.fault = DUPLICATE_KEY
                current.members[ext] = data
                continue
            if current is not None:
                yield current  # complete: a member of another sample follows it
                offset += 1
            if data is None:  # this member's data is cut off; _tar_members raises next
                current = RawSample(key, {}, offset, TRUNCATED_TAR)
                continue
            current = RawSample(key, {ext: data}, offset, DUPLICATE_KEY if key in seen else None)
            seen.add(key)
    except NotATarError:
        yield NOT_A_TAR
        return
    except (tarfile.TarError, EOFError, OSError, ValueError):
        # A cut-off shard: the partial group at the cut is lost with the rest of the shard.
        if report_cut and current is not None:
            current.fault = TRUNCATED_TAR
            yield current
        yield TRUNCATED_TAR
        return
    if current is not None:
        yield current


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped meta members (__index__ ...)


class NotATarError(tarfile.ReadError):
    """The stream's first header block is not a tar header."""


class _CheckedTarInfo(tarfile.TarInfo):
    """A tar header that refuses to be the end of the archive unless it is the zero block.

    tarfile's stream mode ends the member list silently when a header after the first member
    is missing, cut short or corrupt, so a shard cut at a member boundary or inside a header
    would read as complete (its last, partial sample included). Only the all-zero
    end-of-archive block ends a shard here; anything else is a read error.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as exc:
            # The very first header, and bytes were read: they were never a tar archive. (An empty
            # stream stays a truncated one: a failed `pipe:` command gives one too.)
            if tarfile_.offset == 0 and not isinstance(exc, tarfile.EmptyHeaderError):
                raise NotATarError(str(exc)) from None
            raise tarfile.ReadError(f"{exc} at byte {tarfile_.offset}") from None


def _tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of the regular members of a tar stream, in order (like webdataset's
    tar_file_iterator); raises tarfile.ReadError (or OSError) when the stream ends early.

    A member whose header was read but whose data is cut off comes as (name, None) just before
    the error: its name tells that the sample before it was complete.
    """
    tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CheckedTarInfo)
    for info in tar:
        if info.isreg() and not _META_MEMBER.match(info.name):
            try:
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
            except (tarfile.TarError, EOFError, OSError, ValueError):
                yield info.name, None
                raise
            yield info.name, data
        tar.members = []  # a shard can hold many members; keep none


def image_member(members: dict[str, bytes]) -> str | None:
    """The extension of the sample's image member, if any."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)


def decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def decode_json(data: bytes) -> dict[str, Any] | None:
    """The sample's metadata dict, or None when it is not a JSON object."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


class ImageTooLarge(ValueError):
    """The image has more pixels than the limit (decoding it could exhaust memory)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Any:
    """PIL RGB image, fully decoded (a truncated JPEG fails here, not later in a transform).

    Raises ImageTooLarge when the header announces more than ``max_pixels`` pixels (checked
    before decoding; PIL itself refuses anything above twice its Image.MAX_IMAGE_PIXELS), and
    ValueError with the decoder's reason when the bytes are not a readable image. 16-bit
    greyscale is scaled to 8 bits (PIL's convert would clip it: a 61% grey became white).
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageTooLarge(f"{width}x{height} = {width * height} pixels, more than the limit "
                                        f"{max_pixels} (data.reader.max_image_pixels)")
                img.load()
                return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # PIL names the buffer object (with its address); keep the reason stable across runs.
        reason = _OBJECT_REPR.sub("", str(exc)).strip() or type(exc).__name__
        raise ValueError(reason) from None


def _to_rgb(img: Any) -> Any:
    """RGB of a decoded image; 16-bit greyscale (PIL's "I;16*", or "I" for some 16-bit PNGs)
    scaled from 0-65535 to 0-255."""
    if img.mode.startswith("I;16") or img.mode == "I":
        import numpy as np
        from PIL import Image

        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


class AtomicShardWriter:
    """Write one WebDataset shard under a temporary name; rename into place on `commit()`.

    A reader (or a rerun) never sees a half-written shard: until commit the file is
    ``.<name>.partial``; `commit()` fsyncs and renames atomically. ``mtime`` (an int: a float costs a pax header per member) fixes the tar
    member times so that the same samples give byte-identical shards.
    """

    def __init__(self, path: str | os.PathLike[str], mtime: int = 0) -> None:
        from webdataset import TarWriter

        self.path = Path(path)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.partial, "wb")
        self._tar = TarWriter(self._file, mtime=mtime, encoder=False)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add sample ``key`` with members {extension: bytes}."""
        self._tar.write({"__key__": key, **members})
        self.count += 1

    def commit(self) -> Path:
        self._tar.close()  # writes the tar trailer; the file object stays ours to close
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        try:
            # Flush tarfile's buffer now: left for garbage collection it would be written into
            # the closed file (an "Exception ignored" ValueError).
            self._tar.close()
        except (OSError, ValueError, tarfile.TarError):
            pass
        finally:
            self._file.close()
            self.partial.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, fsync, rename: readers see the old file or the new."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON under a temporary name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
