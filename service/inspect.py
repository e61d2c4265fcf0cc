"""The whole ingest check of one raw file: is it a usable frame, and what does its header say.

:func:`inspect_frame` either returns the frame's :class:`~nightshift.service.frame.FrameMeta` or raises a
:class:`~nightshift.service.frame.FrameError` whose reason is one of QUARANTINE_REASONS and whose message tells a person
what is wrong with the file. Nothing else escapes it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from nightshift.service.classify import ClassifyOptions, normalise
from nightshift.service.fitsio import (
    HduInfo,
    find_image_hdu,
    header_from_bytes,
    read_header,
    read_pixels,
    scan_hdus,
    sha256_file,
)
from nightshift.service.frame import FrameError, FrameMeta
from nightshift.service.lookalike import looks_like, override_hint
from nightshift.service.xisfio import is_xisf, read_xisf_header, scan_xisf, xisf_pixels

__all__ = ["MIN_SIZE", "check_one_amplifier", "check_pixels", "inspect_frame"]

#: Frames smaller than this on either axis are not camera frames (thumbnails, test patterns, junk).
MIN_SIZE = 16
#: Names of image extensions that travel with a frame (masks, uncertainties) rather than being other amplifiers.
_COMPANION = re.compile(r"^(MASK|BPM|DQ|UNCERT|ERR|ERROR|VAR|VARIANCE|IVAR|WEIGHT|WHT|SIG|SIGMA|NOISE|FLAGS)$", re.I)


def check_pixels(data: np.ndarray) -> dict[str, float]:
    """Refuse pixels no frame should have; return a few numbers worth keeping.

    Raises
    ------
    FrameError
        ``nan_data`` when more than half the pixels are NaN or infinite; ``constant_data`` when every finite
        pixel has the same value.

    Returns
    -------
    dict
        ``nonfinite`` (count of NaN/inf pixels), ``min`` and ``max`` of the finite pixels.
    """
    total = data.size
    finite = np.isfinite(data)
    n_finite = int(np.count_nonzero(finite))
    bad = total - n_finite
    if n_finite == 0:
        raise FrameError("nan_data", f"all {total} pixels are NaN or infinite")
    if bad * 2 > total:
        share = f"{100 * bad / total:.0f}%"
        raise FrameError("nan_data", f"{bad} of {total} pixels ({share}) are NaN or infinite")
    values = data if bad == 0 else data[finite]
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise FrameError("constant_data", f"every pixel has the value {low:g}: no signal was recorded")
    return {"nonfinite": bad, "min": low, "max": high}


def inspect_frame(path: Path, *, options: ClassifyOptions, sha256: str | None = None) -> FrameMeta:
    """Check one raw file from its bytes to its pixels and describe it.

    Steps: the file is whole (:func:`~nightshift.service.fitsio.check_complete`'s walk); an image HDU exists and is a
    2-D frame (or a 3-plane colour cube) of at least :data:`MIN_SIZE` pixels each way, read by one amplifier; the
    header normalises (kind, exposure, date, colour layout...); the pixels are not mostly NaN/inf and not all
    equal. A light whose pixels look like a flat or a bias (:func:`~nightshift.service.lookalike.looks_like`)
    stays a light, and its ``header_note`` says so with the filename override that would file it otherwise. FITS
    (plain, tile-compressed, gzip) and XISF files are read. The raw file is only read.

    Parameters
    ----------
    path : Path
        The raw file.
    options : ClassifyOptions
        Synonyms, overrides, filter aliases, site longitude/timezone.
    sha256 : str, optional
        The file's hash when the caller already computed it.

    Returns
    -------
    FrameMeta
        ``extra`` also holds ``hdu`` (index of the image HDU; ``format = "xisf"`` for XISF),
        ``pixel_min``/``pixel_max``/``nonfinite``, and ``looks_like`` when a light looks like something else.

    Raises
    ------
    FrameError
        Always this and nothing else: the file's own problem as its reason (``empty``, ``not_fits``,
        ``truncated``, ``unreadable``, ``no_image_data``, ``unsupported_dimensions``, ``multiple_amplifiers``,
        ``unknown_type``,
        ``missing_exposure``, ``bad_header_value``, ``nan_data``, ``constant_data``), or ``processing_error``
        naming an unexpected exception.
    """
    path = Path(path)
    try:
        return _inspect(path, options, sha256)
    except FrameError:
        raise
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise FrameError("unreadable", f"cannot read {path}: {why}") from exc
    except MemoryError as exc:
        raise FrameError("processing_error", f"not enough memory to inspect {path.name}") from exc
    except Exception as exc:
        raise FrameError("processing_error", f"inspecting {path.name} failed: {type(exc).__name__}: {exc}") from exc


def check_one_amplifier(infos: list[HduInfo]) -> None:
    """Refuse a file holding one image extension per amplifier (several 2-D images besides masks and the like).

    Raises
    ------
    FrameError
        ``multiple_amplifiers``, naming the extensions.
    """
    images = []
    for info in infos:
        if not info.is_image or len(info.shape) != 2:
            continue
        name = str(header_from_bytes(info.raw_header).get("EXTNAME", "")).strip()
        if info.index > 0 and _COMPANION.match(name):
            continue
        images.append(f"{info.index}" + (f" ({name})" if name else ""))
    if len(images) > 1:
        raise FrameError(
            "multiple_amplifiers",
            f"{len(images)} image HDUs ({', '.join(images[:6])}): one per amplifier, each with its own bias level "
            "and sections; nightshift reduces frames read by one amplifier",
        )


def _check_size(height: int, width: int) -> None:
    if height < MIN_SIZE or width < MIN_SIZE:
        raise FrameError(
            "unsupported_dimensions",
            f"the image is {width} x {height} pixels; a frame is at least {MIN_SIZE} x {MIN_SIZE}",
        )


def _inspect(path: Path, options: ClassifyOptions, sha256: str | None) -> FrameMeta:
    if is_xisf(path):
        xinfo = scan_xisf(path)
        _check_size(*xinfo.shape)
        header = read_xisf_header(path, xinfo)

        def pixels() -> np.ndarray:
            return np.asarray(xisf_pixels(path, xinfo), dtype=np.float32)

        where: dict = {"format": "xisf"}
        shape = xinfo.shape
    else:
        infos = scan_hdus(path)
        info = find_image_hdu(infos)
        shape = info.shape
        _check_size(*shape[-2:])
        check_one_amplifier(infos)
        header = read_header(path, info, infos)

        def pixels() -> np.ndarray:
            return read_pixels(path, info, header)

        where = {"hdu": info.index}
    st = os.stat(path)
    digest = sha256 if sha256 is not None else sha256_file(path)
    meta = normalise(
        header, path=str(path), sha256=digest, size_bytes=st.st_size, options=options, mtime=st.st_mtime, shape=shape
    )
    data = pixels()
    stats = check_pixels(data)
    meta.extra.update(where, pixel_min=stats["min"], pixel_max=stats["max"], nonfinite=int(stats["nonfinite"]))
    if meta.kind == "light":
        seen = looks_like(data, exptime=meta.exptime, dtype=meta.dtype)
        if seen is not None:
            note = (
                f"the header says light, but the pixels look like a {seen.kind} ({seen.why}); "
                f"if it is one, file it so: {override_hint(str(path), seen.kind)}"
            )
            meta.extra["looks_like"] = seen.kind
            meta.header_note = f"{meta.header_note}; {note}" if meta.header_note else note
    return meta
