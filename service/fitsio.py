"""Frame files on disk: is a file whole, read its image as float32, write results atomically.

The structural walk (:func:`scan_hdus`) reads only header blocks: it tells a finished file from one still
being written, and finds where each HDU's data lives so pixels are read in one pass straight into float32.
Header text is parsed by astropy; tile-compressed images (``.fits.fz``, the image in an extension) are decoded
by astropy too. A gzip-compressed file (``.fits.gz``, ``.fit.gz``) is decompressed in memory first, its gzip
stream checked whole (a file still being written fails as ``truncated``). XISF files are handed to
:mod:`nightshift.service.xisfio`. Products are always written as FITS.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import os
import stat
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from nightshift.service.frame import FrameError, Image
from nightshift.service.xisfio import is_xisf, read_xisf, read_xisf_header, scan_xisf, xisf_pixels

__all__ = [
    "BLOCK",
    "MASK_BAD",
    "MASK_SATURATED",
    "FrameSource",
    "HduInfo",
    "check_complete",
    "find_image_hdu",
    "header_from_bytes",
    "is_frame_shape",
    "open_frame",
    "read_flags",
    "read_frame_header",
    "read_header",
    "read_image",
    "read_mask",
    "read_pixels",
    "scan_hdus",
    "sha256_file",
    "write_bytes_atomic",
    "write_fits_atomic",
]

#: FITS logical record size: headers and data are padded to multiples of it.
BLOCK = 2880
#: Bits of the MASK extension: the pixel has no usable value; the pixel reached the camera's saturation.
MASK_BAD = 1
MASK_SATURATED = 2
_CARD = 80
#: A header longer than this (2.9 MB of cards) is not a camera's header: refuse rather than read a whole file.
_MAX_HEADER_BLOCKS = 1000
_BITPIX_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_WALK_KEYS = ("SIMPLE", "XTENSION", "BITPIX", "PCOUNT", "GCOUNT", "GROUPS", "ZIMAGE", "ZBITPIX")
_STRUCTURAL = ("SIMPLE", "XTENSION", "BITPIX", "EXTEND", "PCOUNT", "GCOUNT", "GROUPS")
_SCALING = ("BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM")
#: The first bytes of a gzip stream.
GZIP_MAGIC = b"\x1f\x8b"
#: A gzip-compressed frame larger than this once decompressed is refused (not a camera frame).
_MAX_GUNZIPPED = 4 * 2**30
#: Header bytes outside printable ASCII (forbidden by the standard, written by some programs) become '?'.
_PRINTABLE = bytes(b if 0x20 <= b <= 0x7E else 0x3F for b in range(256))


@dataclass(frozen=True)
class HduInfo:
    """Where one HDU lives in a file and what its mandatory keywords say.

    ``axes`` are NAXIS1..NAXISn in FITS order (x first). For a tile-compressed image (a BINTABLE with
    ZIMAGE = T), ``zaxes`` and ``zbitpix`` describe the image it holds.
    """

    index: int
    header_offset: int
    data_offset: int
    data_size: int  # bytes of data the header promises, without padding
    xtension: str | None  # None for the primary HDU
    bitpix: int
    axes: tuple[int, ...]
    raw_header: bytes  # the header's cards up to and including END
    zimage: bool = False
    zbitpix: int | None = None
    zaxes: tuple[int, ...] = ()

    @property
    def is_image(self) -> bool:
        """True for a primary or IMAGE extension holding pixels, or a tile-compressed image."""
        if self.zimage:
            return len(self.zaxes) > 0 and all(n > 0 for n in self.zaxes)
        if self.xtension not in (None, "IMAGE"):
            return False
        return len(self.axes) > 0 and all(n > 0 for n in self.axes)

    @property
    def image_axes(self) -> tuple[int, ...]:
        """The image's axes in FITS order (x first), compressed or not."""
        return self.zaxes if self.zimage else self.axes

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy shape of the image with trailing length-1 axes (NAXIS3 = 1 ...) dropped."""
        axes = list(self.image_axes)
        while len(axes) > 2 and axes[-1] == 1:
            axes.pop()
        return tuple(reversed(axes))


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks of ``chunk`` bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _unreadable(path: Path, exc: OSError) -> FrameError:
    why = exc.strerror or type(exc).__name__
    return FrameError("unreadable", f"cannot read {path}: {why}")


def _open_regular(path: Path):
    """Open for reading without blocking on a FIFO; refuse anything that is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except IsADirectoryError as exc:
        raise FrameError("unreadable", f"{path} is a directory, not a file") from exc
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        os.close(fd)
        raise FrameError("unreadable", f"{path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FrameError("unreadable", f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def _gunzip(f, path: Path) -> bytes:
    """The decompressed bytes of a gzip file, its whole stream checked (CRC and length)."""
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") as gz:
            while chunk := gz.read(1 << 22):
                out += chunk
                if len(out) > _MAX_GUNZIPPED:
                    raise FrameError(
                        "unsupported_dimensions", f"{path.name} decompresses to over {_MAX_GUNZIPPED >> 30} GB"
                    )
    except EOFError:
        raise FrameError(
            "truncated",
            f"{path.name}: the gzip stream ends after {len(out)} decompressed bytes without its end marker: "
            "cut short or still being written",
        ) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise FrameError("not_fits", f"{path.name}: broken gzip data ({exc})") from None
    return bytes(out)


@contextlib.contextmanager
def _fits_stream(path: Path) -> Iterator[tuple[Any, int]]:
    """(readable, seekable FITS bytes, their length): the file itself, or a gzip file decompressed in memory."""
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise FrameError("empty", f"{path.name} is empty (0 bytes)")
        head = f.read(2)
        f.seek(0)
        if head == GZIP_MAGIC:
            data = _gunzip(f, path)
            if not data:
                raise FrameError("empty", f"{path.name} decompresses to nothing")
            yield io.BytesIO(data), len(data)
        else:
            yield f, size


def _card_value(card: bytes) -> str | None:
    """The value text of a ``KEY = value / comment`` card, quotes removed for strings."""
    if card[8:9] != b"=":
        return None
    text = card[9:].decode("ascii", "replace").strip()
    if text.startswith("'"):
        out, i = [], 1
        while i < len(text):
            if text[i] == "'":
                if text[i + 1 : i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(text[i])
            i += 1
        return "".join(out).rstrip()
    return text.split("/", 1)[0].strip()


def _read_header_blocks(f, offset: int, size: int, index: int) -> bytes:
    """The cards of the header starting at ``offset``, through its END card."""
    f.seek(offset)
    cards = bytearray()
    for _ in range(_MAX_HEADER_BLOCKS):
        block = f.read(BLOCK)
        if len(block) < BLOCK:
            raise FrameError(
                "truncated",
                f"header of HDU {index} starting at byte {offset} stops after {len(cards) + len(block)} "
                f"bytes without an END card (file is {size} bytes): cut short or still being written",
            )
        for i in range(0, BLOCK, _CARD):
            card = block[i : i + _CARD]
            if card[:8] == b"END     ":
                cards += block[: i + _CARD]
                return bytes(cards)
        cards += block
    raise FrameError(
        "not_fits", f"header of HDU {index} at byte {offset} has no END card in {_MAX_HEADER_BLOCKS} blocks"
    )


def _parse_structure(raw: bytes, index: int, offset: int, header_len: int) -> HduInfo:
    values: dict[str, str] = {}
    for i in range(0, len(raw), _CARD):
        card = raw[i : i + _CARD]
        key = card[:8].decode("ascii", "replace").strip()
        if key in values or not key:
            continue
        if key in _WALK_KEYS or key.startswith(("NAXIS", "ZNAXIS")):
            value = _card_value(card)
            if value is not None:
                values[key] = value
    where = "primary header" if index == 0 else f"header of HDU {index}"

    def integer(key: str, default: int | None = None) -> int:
        text = values.get(key)
        if text is None:
            if default is not None:
                return default
            raise FrameError("not_fits", f"{where} lacks the mandatory keyword {key}")
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if not number.is_integer():
                raise FrameError("not_fits", f"{where} has {key} = {text!r}, not an integer") from None
            return int(number)

    bitpix = integer("BITPIX")
    if bitpix not in _BITPIX_DTYPES:
        raise FrameError("not_fits", f"{where} has BITPIX = {bitpix}, not one of 8, 16, 32, 64, -32, -64")
    naxis = integer("NAXIS")
    if not 0 <= naxis <= 999:
        raise FrameError("not_fits", f"{where} has NAXIS = {naxis}")
    axes = tuple(integer(f"NAXIS{n}") for n in range(1, naxis + 1))
    if any(n < 0 for n in axes):
        raise FrameError("not_fits", f"{where} has a negative axis length {axes}")
    pcount, gcount = integer("PCOUNT", 0), integer("GCOUNT", 1)
    if naxis == 0:
        data_size = 0
    else:
        counted = axes[1:] if values.get("GROUPS") == "T" and axes[0] == 0 else axes
        data_size = abs(bitpix) // 8 * gcount * (pcount + math.prod(counted))
    xtension = values.get("XTENSION") if index > 0 else None
    zimage = xtension == "BINTABLE" and values.get("ZIMAGE") == "T"
    zaxes: tuple[int, ...] = ()
    zbitpix = None
    if zimage:
        zbitpix = integer("ZBITPIX")
        zaxes = tuple(integer(f"ZNAXIS{n}") for n in range(1, integer("ZNAXIS") + 1))
    return HduInfo(
        index=index,
        header_offset=offset,
        data_offset=offset + header_len,
        data_size=data_size,
        xtension=xtension,
        bitpix=bitpix,
        axes=axes,
        raw_header=raw,
        zimage=zimage,
        zbitpix=zbitpix,
        zaxes=zaxes,
    )


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _walk(f, size: int, path: Path) -> list[HduInfo]:
    head = f.read(min(size, BLOCK))
    magic = b"SIMPLE  ="
    if not head.startswith(magic):
        if len(head) < len(magic) and magic.startswith(head):
            raise FrameError("truncated", f"{path.name} is {size} bytes, too short to hold a FITS header yet")
        shown = head[:16].decode("ascii", "replace")
        raise FrameError("not_fits", f"{path.name} does not start with a FITS primary header: {shown!r}")
    infos: list[HduInfo] = []
    offset = 0
    while True:
        index = len(infos)
        raw = _read_header_blocks(f, offset, size, index)
        info = _parse_structure(raw, index, offset, _padded(len(raw)))
        end_of_data = info.data_offset + info.data_size
        if end_of_data > size:
            raise FrameError(
                "truncated",
                f"HDU {index} promises {info.data_size} bytes of data from byte {info.data_offset} "
                f"(to byte {end_of_data}) but the file is {size} bytes: {end_of_data - size} bytes missing",
            )
        infos.append(info)
        offset = info.data_offset + _padded(info.data_size)
        if offset >= size:
            return infos
        f.seek(offset)
        peek = f.read(8)
        if peek.startswith(b"XTENSION"):
            continue
        if b"XTENSION".startswith(peek):
            raise FrameError(
                "truncated", f"an extension header starts at byte {offset} but the file ends at byte {size}"
            )
        return infos  # bytes after the last HDU (padding or special records): allowed by the standard


def scan_hdus(path: Path) -> list[HduInfo]:
    """Walk every HDU of a FITS file reading only its headers; check the file holds all the data they promise.

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    list of HduInfo
        One per HDU, in file order.

    Raises
    ------
    FrameError
        ``empty`` (0 bytes), ``not_fits`` (no FITS primary header, broken mandatory keywords),
        ``truncated`` (a header without END, or data shorter than promised: also a file still being
        written), ``unreadable`` (the system refused, a directory, vanished).
    """
    path = Path(path)
    try:
        with _fits_stream(path) as (f, size):
            return _walk(f, size, path)
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def check_complete(path: Path) -> None:
    """Raise FrameError unless ``path`` is a whole frame file: FITS (every header ends, all promised data present;
    a gzip file's whole stream decompresses), or XISF (header complete, every data block inside the file).

    Cheap for plain FITS and XISF: only headers are read. A file still being written fails as ``truncated``.
    See :func:`scan_hdus` and :func:`nightshift.service.xisfio.scan_xisf` for the reasons.
    """
    if is_xisf(Path(path)):
        scan_xisf(Path(path))
    else:
        scan_hdus(path)


def is_frame_shape(shape: tuple[int, ...]) -> bool:
    """True for the shapes nightshift takes: a 2-D frame, or a colour cube of 3 planes (R, G, B) as SharpCap and
    ASIAIR save debayered frames (NAXIS3 = 3)."""
    return len(shape) == 2 or (len(shape) == 3 and shape[0] == 3)


def find_image_hdu(infos: list[HduInfo]) -> HduInfo:
    """The HDU holding the frame: the first image HDU that is 2-D (trailing length-1 axes allowed) or a 3-plane
    colour cube.

    Raises
    ------
    FrameError
        ``no_image_data`` when no HDU holds pixels; ``unsupported_dimensions`` when images exist but none
        is 2-D or a 3-plane cube.
    """
    images = [info for info in infos if info.is_image]
    if not images:
        kinds = ", ".join(f"HDU {i.index} {i.xtension or 'primary'} NAXIS={len(i.axes)}" for i in infos)
        raise FrameError("no_image_data", f"no HDU holds an image ({kinds})")
    for info in images:
        if is_frame_shape(info.shape):
            return info
    first = images[0]
    dims = " x ".join(str(n) for n in first.image_axes)
    what = "1-D spectrum or row" if len(first.shape) == 1 else f"{len(first.shape)}-D cube"
    planes = f" of {first.shape[0]} planes" if len(first.shape) == 3 else ""
    raise FrameError(
        "unsupported_dimensions",
        f"HDU {first.index} holds a {what}{planes} ({dims} pixels); nightshift needs a single 2-D frame or a "
        "colour cube of 3 planes",
    )


def header_from_bytes(raw: bytes) -> fits.Header:
    """An astropy Header from raw cards; bytes outside printable ASCII become '?' so odd headers parse."""
    text = raw.translate(_PRINTABLE).decode("ascii")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fits.Header.fromstring(text)


def read_header(path: Path, info: HduInfo, infos: list[HduInfo] | None = None) -> fits.Header:
    """The header of the image HDU ``info``.

    For an extension, keywords of the primary header that the extension lacks are added (observation
    metadata such as DATE-OBS often lives only in the primary header of multi-extension files).
    """
    if info.zimage:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                    header = hdul[info.index].header.copy()
        except OSError as exc:
            raise _unreadable(Path(path), exc) from exc
    else:
        header = header_from_bytes(info.raw_header)
    if info.index > 0 and infos:
        primary = header_from_bytes(infos[0].raw_header)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for card in primary.cards:
                key = card.keyword
                if not key or key in ("COMMENT", "HISTORY") or key.startswith("NAXIS"):
                    continue
                if key in _STRUCTURAL or key in _SCALING or key in header:
                    continue
                try:
                    header.append(fits.Card(key, card.value, card.comment))
                except (ValueError, fits.VerifyError):
                    continue  # an unparsable card of the primary header is not worth inheriting
    return header


def _float_key(header: fits.Header, key: str, default: float) -> float:
    try:
        value = header.get(key, default)
        number = float(value)
    except (TypeError, ValueError, fits.VerifyError) as exc:
        card = str(header.cards[key]).strip() if key in header else key
        raise FrameError("bad_header_value", f"{card!r}: {key} is not a number") from exc
    if not math.isfinite(number):
        raise FrameError("bad_header_value", f"{key} = {value!r} is not a finite number")
    return number


def read_pixels(path: Path, info: HduInfo, header: fits.Header) -> np.ndarray:
    """The image of HDU ``info`` as a float32 array with BZERO/BSCALE applied and BLANK pixels as NaN: 2-D, or
    (3, rows, columns) for a colour cube.

    One pass from the file's big-endian integers to float32 (no float64 copy); uint16 with BZERO = 32768
    comes out exact. The file is closed on return.
    """
    path = Path(path)
    shape = info.shape
    if not is_frame_shape(shape):
        raise FrameError("unsupported_dimensions", f"HDU {info.index} has shape {shape}, not 2-D nor 3 planes")
    if info.zimage:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                    data = np.asarray(hdul[info.index].data, dtype=np.float32)
        except OSError as exc:
            raise _unreadable(path, exc) from exc
        return np.ascontiguousarray(data.reshape(shape))
    dtype = np.dtype(_BITPIX_DTYPES[info.bitpix])
    count = math.prod(shape)
    try:
        with _fits_stream(path) as (f, _size):
            if isinstance(f, io.BytesIO):
                buffer = f.getbuffer()[info.data_offset : info.data_offset + count * dtype.itemsize]
                raw = np.frombuffer(bytes(buffer), dtype=dtype)
                del buffer
            else:
                f.seek(info.data_offset)
                raw = np.fromfile(f, dtype=dtype, count=count)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    if raw.size < count:
        raise FrameError("truncated", f"HDU {info.index} should hold {count} pixels but the file has only {raw.size}")
    raw = raw.reshape(shape)
    bzero = _float_key(header, "BZERO", 0.0)
    bscale = _float_key(header, "BSCALE", 1.0)
    out = np.empty(shape, dtype=np.float32)
    if bscale != 1.0:
        np.multiply(raw, np.float32(bscale), out=out)
        if bzero != 0.0:
            out += np.float32(bzero)
    elif bzero != 0.0:
        np.add(raw, np.float32(bzero), out=out)
    else:
        out[...] = raw
    if info.bitpix > 0 and "BLANK" in header:
        blank = _float_key(header, "BLANK", 0.0)
        out[raw == blank] = np.nan
    return out


def read_image(path: Path) -> Image:
    """Read the frame of a file: float32 pixels of the first 2-D image HDU (or 3-plane cube) and its header.

    Parameters
    ----------
    path : Path
        The file: FITS (uint16 with BZERO = 32768, any BITPIX with BSCALE/BZERO; tile-compressed images;
        gzip-compressed files) or XISF (:func:`nightshift.service.xisfio.read_xisf`).

    Returns
    -------
    Image
        ``data`` float32 with BZERO/BSCALE applied, ``header`` as written in the file (for an extension,
        plus the primary header's keywords it lacks), ``mask`` None.

    Raises
    ------
    FrameError
        For every failure: see :func:`scan_hdus` and :func:`find_image_hdu`.
    """
    path = Path(path)
    if is_xisf(path):
        return read_xisf(path)
    infos = scan_hdus(path)
    info = find_image_hdu(infos)
    header = read_header(path, info, infos)
    return Image(data=read_pixels(path, info, header), header=header)


def read_frame_header(path: Path) -> fits.Header:
    """The header of a file's frame, as :func:`read_image` gives it (FITS or XISF), without reading pixels
    (a gzip file is decompressed)."""
    path = Path(path)
    if is_xisf(path):
        return read_xisf_header(path)
    infos = scan_hdus(path)
    return read_header(path, find_image_hdu(infos), infos)


@dataclass
class FrameSource:
    """An open frame to read in pieces: ``section[rows, columns]`` gives float-convertible pixels with
    BZERO/BSCALE applied (astropy's ``hdu.section`` for FITS, compressed or not; a memory map for XISF).

    A colour cube of 3 planes reads as one tall 2-D image, its planes one under the other (``planes`` = 3,
    ``shape`` = (3 x rows, columns)), so that row-band readers work on it unchanged."""

    path: Path
    header: fits.Header
    shape: tuple[int, int]
    section: Any
    planes: int = 1


class _Planes:
    """``section`` of a 3-plane cube as a tall image: rows y of the tall image are plane y // rows, row y % rows."""

    def __init__(self, section: Any, rows: int, planes: int) -> None:
        self._section, self._rows, self._planes = section, rows, planes

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, columns = key
        y0, y1, _ = rows.indices(self._rows * self._planes)
        parts = []
        for plane in range(y0 // self._rows, (y1 - 1) // self._rows + 1):
            a = max(y0, plane * self._rows) - plane * self._rows
            b = min(y1, (plane + 1) * self._rows) - plane * self._rows
            parts.append(np.asarray(self._section[plane, a:b, columns]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@contextlib.contextmanager
def open_frame(path: Path) -> Iterator[FrameSource]:
    """Open a frame file for reading rows or strips without loading it whole (see :class:`FrameSource`)."""
    path = Path(path)
    if is_xisf(path):
        info = scan_xisf(path)
        pixels = xisf_pixels(path, info)
        try:
            yield FrameSource(path, read_xisf_header(path, info), info.shape, pixels)
        finally:
            mapped = getattr(pixels, "_mmap", None)
            del pixels
            if mapped is not None:
                with contextlib.suppress(BufferError, ValueError):
                    mapped.close()
        return
    header = read_frame_header(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hdul = fits.open(path, memmap=False)
    try:
        for hdu in hdul:
            if (hdu.is_image or isinstance(hdu, fits.CompImageHDU)) and hdu.header.get("NAXIS", 0) >= 1:
                shape = tuple(hdu.shape)
                if len(shape) == 3 and shape[0] == 3:
                    tall = (3 * shape[1], shape[2])
                    yield FrameSource(path, header, tall, _Planes(hdu.section, shape[1], 3), planes=3)
                    return
                if len(shape) != 2:
                    raise FrameError(
                        "unsupported_dimensions", f"{path.name}: image is {len(shape)}-D, not 2-D nor 3 planes"
                    )
                yield FrameSource(path, header, shape, hdu.section)  # type: ignore[arg-type]
                return
        raise FrameError("no_image_data", f"{path.name}: no image HDU")
    finally:
        hdul.close()


def _clean_header(header: fits.Header) -> fits.Header:
    clean = header.copy()
    for key in list(dict.fromkeys(clean.keys())):
        if key in _STRUCTURAL or key in _SCALING or key.startswith("NAXIS") or key.startswith("ZNAXIS"):
            clean.remove(key, remove_all=True)
    return clean


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cached(fd: int) -> None:
    """Let the kernel drop a file's pages from the page cache once they are on disk.

    A night writes gigabytes of products that are read at most once, later: cached, they would evict what the
    capture program and the system use. Recycling those pages also makes the next write fast where fresh pages are
    slow to come by (a virtual machine whose free memory goes back to the host: a 16 MB product took 0.22 s to
    write and fsync on this project's 2-core VM, 0.018 s with its pages dropped after each file).
    """
    if hasattr(os, "posix_fadvise"):  # not on macOS
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _write_atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            _drop_cached(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_fits_atomic(path: Path, image: Image, *, extra_hdus: list | None = None) -> None:
    """Write ``image`` as a float32 FITS file, atomically.

    Parameters
    ----------
    path : Path
        Destination; parent folders are created. A temp file ``.<name>.<random>.tmp`` in the same folder is
        written, fsynced (its pages then dropped from the page cache) and renamed over ``path``; the folder is fsynced.
    image : Image
        Pixels go to the primary HDU as float32 under ``image.header`` (its BZERO/BSCALE/BLANK, structural
        and checksum keywords dropped); ``image.mask`` and ``image.saturated``, if any, to an ImageHDU named
        MASK (uint8 bits: :data:`MASK_BAD` = 1 bad, :data:`MASK_SATURATED` = 2 saturated): for a colour frame one
        (rows, columns) plane for all three planes, unless its flags are all per plane.
    extra_hdus : list, optional
        More astropy HDUs appended after MASK.
    """
    data = np.asarray(image.data, dtype=np.float32)
    hdus: list = [fits.PrimaryHDU(data=data, header=_clean_header(image.header))]
    if image.mask is not None or image.saturated is not None:
        given = [np.asarray(f, dtype=bool) for f in (image.mask, image.saturated) if f is not None]
        # a colour frame's flags are one plane for all three unless every one of them is per plane
        shape = data.shape if all(f.shape == data.shape for f in given) else data.shape[-2:]

        def plane(f: np.ndarray | None) -> np.ndarray | None:
            if f is None:
                return None
            f = np.asarray(f, dtype=bool)
            return f.any(axis=0) if f.shape != shape else f

        flags = np.zeros(shape, dtype=np.uint8)
        if image.mask is not None:
            flags[plane(image.mask)] = MASK_BAD
        if image.saturated is not None:
            flags[plane(image.saturated)] |= MASK_SATURATED
        hdu = fits.ImageHDU(data=flags, name="MASK")
        hdu.header["MASKBITS"] = ("1 bad, 2 saturated", "meaning of the bits of each pixel")
        hdus.append(hdu)
    hdus.extend(extra_hdus or [])
    hdul = fits.HDUList(hdus)

    def write(f) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdul.writeto(f, output_verify="silentfix+ignore")

    _write_atomic(path, write)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename, fsync folder)."""
    _write_atomic(path, lambda f: f.write(data))


def read_mask(path: Path) -> np.ndarray | None:
    """The bad pixels of a file written by :func:`write_fits_atomic` as bool (True = bad), or None."""
    return read_flags(path)[0]


def read_flags(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The bad and the saturated pixels (bool arrays) of a file's MASK extension; (None, None) without one."""
    flags = _read_mask_hdu(Path(path))
    if flags is None:
        return None, None
    return (flags & MASK_BAD) != 0, (flags & MASK_SATURATED) != 0


def _read_mask_hdu(path: Path) -> np.ndarray | None:
    scan_hdus(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False) as hdul:
                for hdu in hdul[1:]:
                    if hdu.name == "MASK" and hdu.data is not None:
                        return np.asarray(hdu.data, dtype=np.uint8)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    return None
