"""XISF files (PixInsight's format, which N.I.N.A. and others write): is a file whole, its header, its pixels.

An XISF file is a signature (``XISF0100``), the length of an XML header, the header, and data blocks at the byte
positions the header names (``location="attachment:<position>:<size>"``). :func:`scan_xisf` checks all of that
from the header alone (a file still being written fails as ``truncated``); the pixels and the metadata are read
by the ``xisf`` package. The image's FITS keywords become an astropy header, with NAXIS1/NAXIS2, the colour
filter array as ``BAYERPAT`` and ``ROWORDER = 'TOP-DOWN'`` (XISF stores the top row first), so the rest of
nightshift sees a FITS frame. Only mono images are frames: a colour (RGB) XISF is refused like a FITS cube; a
one-shot-colour camera's raw frame is a mono mosaic with its colour filter array.
"""

from __future__ import annotations

import os
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from nightshift.service.frame import FrameError, Image

__all__ = ["SIGNATURE", "XisfInfo", "is_xisf", "read_xisf", "read_xisf_header", "scan_xisf", "xisf_pixels"]

SIGNATURE = b"XISF0100"
_NS = "{http://www.pixinsight.com/xisf}"
_PREAMBLE = 16  # signature, header length (uint32 little-endian), reserved
_MAX_HEADER = 64 * 2**20
_LOCATION = re.compile(r"^attachment:(\d+):(\d+)$")
_SAMPLE = {"UInt8": "u1", "UInt16": "u2", "UInt32": "u4", "Float32": "f4", "Float64": "f8"}
#: The FITS BITPIX (and BZERO) that stores each XISF sample type.
_FITS_TYPE = {"u1": (8, 0), "u2": (16, 32768), "u4": (32, 2**31), "f4": (-32, 0), "f8": (-64, 0)}


@dataclass(frozen=True)
class XisfInfo:
    """The first image of an XISF file: (width, height, channels), sample dtype, where its data lies."""

    geometry: tuple[int, ...]
    dtype: np.dtype
    position: int | None  # byte offset of an attached, uncompressed block (memory-mappable), else None
    compressed: bool
    colour_space: str
    cfa: str | None
    element: ET.Element

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        return self.geometry[1], self.geometry[0]


def is_xisf(path: Path) -> bool:
    """True when the file starts with the XISF signature."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SIGNATURE)) == SIGNATURE
    except OSError:
        return False


def _read_xml(path: Path) -> tuple[ET.Element, int]:
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(_PREAMBLE)
            if len(head) < _PREAMBLE:
                raise FrameError("truncated", f"{path.name} is {size} bytes, too short to hold an XISF header yet")
            length = int.from_bytes(head[8:12], "little")
            if length <= 0 or length > _MAX_HEADER:
                raise FrameError("not_fits", f"{path.name}: XISF header length {length} is not plausible")
            raw = f.read(length)
    except OSError as exc:
        raise FrameError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) < length:
        raise FrameError(
            "truncated",
            f"{path.name}: the XISF header promises {length} bytes but the file ends after {len(raw)}: "
            "cut short or still being written",
        )
    try:
        return ET.fromstring(raw.rstrip(b"\0")), size
    except ET.ParseError as exc:
        raise FrameError("not_fits", f"{path.name}: the XISF header is not XML ({exc})") from None


def scan_xisf(path: Path) -> XisfInfo:
    """Check an XISF file is whole (header complete, every attached block inside the file); describe its image.

    Raises
    ------
    FrameError
        ``truncated`` (header or a data block beyond the end of the file), ``not_fits`` (no signature, a header
        that is not XML), ``no_image_data`` (no Image element), ``unsupported_dimensions`` (not a 2-D mono image),
        ``unreadable``.
    """
    path = Path(path)
    if not is_xisf(path):
        raise FrameError("not_fits", f"{path.name} does not start with the XISF signature")
    root, size = _read_xml(path)
    for element in root.iter():
        location = element.attrib.get("location", "")
        found = _LOCATION.match(location)
        if found and int(found[1]) + int(found[2]) > size:
            end = int(found[1]) + int(found[2])
            raise FrameError(
                "truncated",
                f"{path.name}: a data block ends at byte {end} but the file is {size} bytes: "
                f"{end - size} bytes missing",
            )
    images = root.findall(f"{_NS}Image")
    if not images:
        raise FrameError("no_image_data", f"{path.name}: the XISF file holds no image")
    image = images[0]
    try:
        geometry = tuple(int(n) for n in image.attrib["geometry"].split(":"))
        dtype = np.dtype(_SAMPLE[image.attrib.get("sampleFormat", "")])
    except (KeyError, ValueError):
        raise FrameError(
            "not_fits",
            f"{path.name}: image geometry {image.attrib.get('geometry')!r} / sample format "
            f"{image.attrib.get('sampleFormat')!r} not understood",
        ) from None
    dtype = dtype.newbyteorder(">" if image.attrib.get("byteOrder", "little") == "big" else "<")
    colour = image.attrib.get("colorSpace", "Gray")
    if len(geometry) != 3 or geometry[2] != 1:
        dims = " x ".join(str(n) for n in geometry[:-1])
        what = f"a {len(geometry) - 1}-D image"
        if len(geometry) == 3:
            what = f"a {colour} image of {geometry[-1]} channels"
        raise FrameError(
            "unsupported_dimensions",
            f"{path.name} holds {what} of {dims} pixels (debayered or stacked?); nightshift needs a single 2-D frame",
        )
    cfa = image.find(f"{_NS}ColorFilterArray")
    found = _LOCATION.match(image.attrib.get("location", ""))
    compressed = "compression" in image.attrib
    return XisfInfo(
        geometry=geometry,
        dtype=dtype,
        position=int(found[1]) if found and not compressed else None,
        compressed=compressed,
        colour_space=colour,
        cfa=cfa.attrib.get("pattern") if cfa is not None else None,
        element=image,
    )


def _card_value(text: str):
    """A FITS keyword value as XISF stores it (text) back to a Python value."""
    value = text.strip()
    if value.startswith("'"):
        return value.strip("'").strip()
    if value in ("T", "F"):
        return value == "T"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def read_xisf_header(path: Path, info: XisfInfo | None = None) -> fits.Header:
    """The image's FITS keywords as an astropy header, with NAXIS1/NAXIS2, BAYERPAT and ROWORDER."""
    path = Path(path)
    info = info or scan_xisf(path)
    header = fits.Header()
    bitpix, bzero = _FITS_TYPE[info.dtype.kind + str(info.dtype.itemsize)]
    header["BITPIX"] = (bitpix, "FITS type of the XISF samples")
    if bzero:
        header["BZERO"] = (bzero, "unsigned XISF samples, as FITS writes them")
    header["NAXIS"] = 2
    header["NAXIS1"] = info.geometry[0]
    header["NAXIS2"] = info.geometry[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for card in info.element.findall(f"{_NS}FITSKeyword"):
            name = card.attrib.get("name", "").strip().upper()
            if not name or name in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "END"):
                continue
            comment = card.attrib.get("comment", "")
            try:
                if name == "HISTORY":
                    header.add_history(comment)
                    continue
                if name == "COMMENT":
                    header.add_comment(comment)
                    continue
                value = _card_value(card.attrib.get("value", ""))
                if name in ("BZERO", "BSCALE"):
                    continue  # XISF samples are stored as they are: the FITS scaling they had does not apply
                header.append(fits.Card(name, value, comment))
            except (ValueError, fits.VerifyError):
                continue
    if info.cfa and "BAYERPAT" not in header:
        header["BAYERPAT"] = (info.cfa, "colour filter array of the XISF image")
    if "ROWORDER" not in header:
        header["ROWORDER"] = ("TOP-DOWN", "XISF stores the top row first")
    header["XISFFILE"] = (True, "read from an XISF file")
    return header


def xisf_pixels(path: Path, info: XisfInfo | None = None) -> np.ndarray:
    """The image as stored: a read-only memory map of an uncompressed attachment, else decoded in memory.

    2-D (rows, columns), in the file's sample type; slice and convert it as needed.
    """
    path = Path(path)
    info = info or scan_xisf(path)
    if info.position is not None:
        return np.memmap(path, dtype=info.dtype, mode="r", offset=info.position, shape=info.shape)
    from xisf import XISF

    try:
        data = XISF(str(path)).read_image(0, data_format="channels_first")
    except Exception as exc:
        raise FrameError("not_fits", f"{path.name}: the XISF image cannot be decoded ({exc})") from None
    return np.asarray(data[0])


def read_xisf(path: Path) -> Image:
    """Read an XISF frame: float32 pixels and a FITS header (see :func:`read_xisf_header`)."""
    path = Path(path)
    info = scan_xisf(path)
    header = read_xisf_header(path, info)
    pixels = xisf_pixels(path, info)
    data = np.array(pixels, dtype=np.float32)
    del pixels
    return Image(data=data, header=header)
