"""Size caps and pixel decoding: what is checked on headers before any pixel is decoded.

Decoded size caps, checked on headers before any pixel is decoded or allocated: a study may
declare at most ``max_voxels`` voxels (default ``MAX_STUDY_VOXELS``, 512 x 512 x 256). For
DICOM, every file's ``Rows x Columns x NumberOfFrames`` (:func:`find_series`) and the chosen
series' total (:func:`read_series`) are checked from ``stop_before_pixels`` headers; a file in
the Deflated Explicit VR Little Endian syntax (the whole dataset zlib-compressed, so pydicom
inflates it all even to read the header) is first inflated as a stream, keeping nothing, and
refused when it inflates beyond ``2 x max_voxels`` bytes (16-bit pixels) plus 16 MiB of
header. An encapsulated (JPEG, JPEG-LS, JPEG 2000) frame's own codestream header must declare
the DICOM ``Rows x Columns`` before any file of the series is decoded (a decoder allocates
what the codestream declares; :func:`_check_codestreams`). For NIfTI, the header's dimensions
are checked before nibabel loads a voxel. A study over the cap is refused with a :class:`SeriesError` that gives the declared and allowed sizes.

``check_decoders`` reports which compressed transfer syntaxes pydicom can decode here;
``_decode`` refuses a file without pixel data, in colour, in a syntax without a decoder, or
whose codestream declares another size than its header, before decoding it.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.uid

from client.dicom_series.records import SeriesError

logger = logging.getLogger(__name__)

# Largest volume a site decodes (voxels): 512 x 512 x 256 = 2^26, about 67 M voxels (268 MB as
# float32). Hip MRI series are about 512 x 512 x 20-60 (2D) and up to 512 x 512 x 200 (3D).
MAX_STUDY_VOXELS: int = 512 * 512 * 256
# Header allowance of a deflated DICOM file on top of its pixel bytes.
_DEFLATED_HEADER_BYTES = 16 << 20


def _n_frames(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _declared_voxels(ds: pydicom.Dataset) -> int:
    """``Rows x Columns x NumberOfFrames`` from a header (0 when absent or unreadable)."""
    try:
        return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * _n_frames(ds)
    except (TypeError, ValueError):
        return 0


def _over_cap(what: str, declared: int, max_voxels: int) -> str:
    return (
        f"{what} declares {declared:,} voxels, more than the {max_voxels:,} a study may have "
        "(max-study-voxels); refused before decoding"
    )


def _check_deflated(path: Path, max_voxels: int) -> None:
    """Refuse a Deflated Explicit VR file that inflates beyond ``2 * max_voxels`` bytes + 16 MiB.

    pydicom inflates a deflated dataset whole, even for ``stop_before_pixels``, so the size is
    measured first by inflating it as a stream (64 KiB at a time, nothing kept). Files that are
    not DICOM, or not deflated, are left to ``dcmread``.

    Raises:
        SeriesError: the file inflates beyond the cap, or its deflate stream is corrupt.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    cap = 2 * max_voxels + _DEFLATED_HEADER_BYTES
    with open(path, "rb") as fh:
        try:
            if read_preamble(fh, False) is None:
                return
            meta = _read_file_meta_info(fh)
        except Exception:
            return
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while chunk := fh.read(1 << 16):
                while chunk:
                    total += len(inflater.decompress(chunk, 1 << 20))
                    chunk = inflater.unconsumed_tail
                    if total > cap:
                        raise SeriesError(
                            path.parent,
                            f"a deflated DICOM file inflates to more than {cap:,} bytes "
                            f"(max-study-voxels {max_voxels:,} at 16 bits); refused",
                        )
        except zlib.error as exc:
            raise SeriesError(path.parent, f"a deflated DICOM file is corrupt ({exc})") from None


def check_decoders() -> dict[str, bool]:
    """Which compressed transfer syntaxes pydicom can decode here, by name.

    Called once when a site starts (:class:`client.site_data.SiteData`); a missing decoder
    is logged as a warning, and a series that needs it is refused naming its syntax.
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        JPEG2000,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        RLELossless,
    )

    out = {}
    for uid in (
        RLELossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
    ):
        try:
            out[uid.name] = bool(get_decoder(uid).is_available)
        except (NotImplementedError, ValueError):
            out[uid.name] = False
    missing = [name for name, ok in out.items() if not ok]
    if missing:
        logger.warning("no pixel decoder for %d transfer syntax(es): %s", len(missing), "; ".join(missing))
    else:
        logger.debug("pixel decoders available for all %d compressed transfer syntaxes", len(out))
    return out


# Codestream headers checked before decoding (see _check_codestreams).
_J2K_SYNTAXES = frozenset(pydicom.uid.JPEG2000TransferSyntaxes)
_JPEG_SYNTAXES = frozenset(pydicom.uid.JPEGTransferSyntaxes) | frozenset(pydicom.uid.JPEGLSTransferSyntaxes)
_RLE_SYNTAXES = frozenset(pydicom.uid.RLETransferSyntaxes)
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_J2K_SEARCH_BYTES = 4096  # a JP2 box wrapper (signature, ftyp, jp2h) precedes the codestream
_JPEG_HEADER_BYTES = 1 << 20  # tables and APPn segments before the SOF marker
# SOFn markers (ITU-T T.81 B.1.1.3: 0xC0-0xCF except DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55 (T.87).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_JPEG_NO_LENGTH = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: markers without a length


def _j2k_size(head: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` from a JPEG 2000 SIZ marker segment (ISO/IEC 15444-1 A.5.1), or None."""
    at = head.find(_J2K_SOC_SIZ, 0, _J2K_SEARCH_BYTES)
    if at < 0 or len(head) < at + 4 + 2 + 2 + 16:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", head[at + 8 : at + 24])  # after Lsiz, Rsiz
    return ysiz - yosiz, xsiz - xosiz


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` from the first SOFn (or JPEG-LS SOF55) segment of a JPEG stream, or None."""
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            i += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        length = struct.unpack(">H", head[i + 2 : i + 4])[0]
        if marker in _JPEG_SOF:
            if i + 9 > len(head) or length < 8:
                return None
            rows, columns = struct.unpack(">HH", head[i + 5 : i + 9])  # after length, precision
            return rows, columns
        i += 2 + length
    return None


def _check_codestreams(ds: pydicom.Dataset, syntax: pydicom.uid.UID, study: str) -> None:
    """Refuse encapsulated frames whose codestream declares another size than ``Rows x Columns``.

    The cap (:func:`read_series`) reads the DICOM header, but a decoder allocates what the
    codestream itself declares: a file of a few hundred bytes can declare 65535 x 65535. So
    before anything is decoded, every frame's codestream header is read: the JPEG 2000 SIZ
    segment (ISO/IEC 15444-1 A.5.1; also HTJ2K, 15444-15), or the JPEG / JPEG-LS frame header
    (T.81 B.2.2, T.87 C.2.2). Their dimensions must equal the DICOM ``Rows`` and ``Columns``.
    RLE declares no size of its own (PS3.5 G.3: its segments fill ``Rows x Columns``). A
    codestream that cannot be parsed, or any other encapsulated syntax, is refused as
    unreadable rather than decoded blindly.

    Raises:
        SeriesError: naming the file's study and the mismatch.
    """
    if syntax in _RLE_SYNTAXES:
        return
    if syntax in _J2K_SYNTAXES:
        parse, what = _j2k_size, "JPEG 2000"
    elif syntax in _JPEG_SYNTAXES:
        parse, what = _jpeg_size, "JPEG"
    else:
        raise SeriesError(
            study, f"pixel data in the transfer syntax {syntax.name!r} cannot be checked before decoding; refused"
        )
    expected = (int(ds.Rows), int(ds.Columns))
    n_frames = _n_frames(ds)
    seen = 0
    try:
        for fragments in pydicom.encaps.generate_fragmented_frames(ds.PixelData, number_of_frames=n_frames):
            head = b""
            for fragment in fragments:
                head += fragment[: _JPEG_HEADER_BYTES - len(head)]
                if len(head) >= _JPEG_HEADER_BYTES:
                    break
            size = parse(head)
            if size is None:
                raise SeriesError(study, f"a {what} frame has no readable codestream header; refused before decoding")
            if size != expected:
                raise SeriesError(
                    study,
                    f"a {what} codestream declares {size[0]} x {size[1]} pixels but the DICOM header "
                    f"{expected[0]} x {expected[1]}; refused before decoding",
                )
            seen += 1
            if seen == n_frames:
                break
    except SeriesError:
        raise
    except Exception as exc:
        raise SeriesError(study, f"unreadable encapsulated pixel data ({type(exc).__name__})") from None
    if seen < n_frames:
        raise SeriesError(study, f"encapsulated pixel data holds {seen} frame(s), the header declares {n_frames}")


def _check_decodable(ds: pydicom.Dataset, study: str) -> None:
    """Refuse, before decoding, a file without pixel data, in colour, in a syntax without a decoder,
    or whose codestream declares another size than its header (:func:`_check_codestreams`)."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        raise SeriesError(study, "pixel data missing in a slice file (truncated file?)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise SeriesError(study, "colour (multi-sample) images are not supported")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_compressed:
        try:
            available = bool(get_decoder(syntax).is_available)
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            raise SeriesError(
                study,
                f"no decoder for the transfer syntax {syntax.name!r} (install python-gdcm, pylibjpeg and pylibjpeg-openjpeg)",
            )
    if syntax is not None and syntax.is_encapsulated:
        _check_codestreams(ds, syntax, study)


def _decode(ds: pydicom.Dataset, study: str) -> np.ndarray:
    """Pixel data of one file as ``(frames, rows, columns)``; refuses undecodable data naming the syntax."""
    _check_decodable(ds, study)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise SeriesError(study, f"cannot decode pixel data ({name}; {type(exc).__name__}: {exc})") from exc
    pixels = np.asarray(pixels)
    return pixels[None] if pixels.ndim == 2 else pixels
