"""Where :func:`xrfnb.map_pigments` puts the results of each block of rows: in memory
(:class:`MemorySink`), or as completed block files in ``OUT.partial/`` that a later run resumes from and
that are assembled into the maps file at the end (:class:`PartialSink`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DataError, FormatError
from ..fitting.elements import ElementMaps
from ..io.atomic import atomic_path
from .pigmentmaps import MASK_OK, MASK_REASONS
from .storage import (
    check_free_space,
    create_map_datasets,
    h5_writer,
    maps_file_bytes,
    partial_dir,
    write_element_maps,
    write_error,
    write_header,
)

__all__ = ["PARTIAL_FORMAT", "RESUME_HINT", "MemorySink", "PartialSink", "block_file_bytes"]

#: ``format`` of the ``manifest.json`` that marks ``OUT.partial/`` as xrfnb's working folder
PARTIAL_FORMAT = "xrfnb-pigment-maps-partial"
#: files xrfnb writes in ``OUT.partial/`` (nothing else there is ever deleted)
_PARTIAL_ENTRY = re.compile(r"manifest\.json|\.manifest\.json\.tmp|\.?rows_(\d{7})_(\d{7})\.npz(\.tmp)?")
_BLOCK_FILE = re.compile(r"rows_(\d{7})_(\d{7})\.npz")
_BLOCK_ARRAYS = ("probability", "buried_probability", "ood_score", "mask_reason")
_NPZ_OVERHEAD_BYTES = 4096  # zip directory and .npy headers of one block file

_log = logging.getLogger("xrfnb.mapping")


def block_file_bytes(n_pixels: int, k: int) -> int:
    """Size of one ``rows_*.npz`` block file of ``n_pixels`` pixels (uncompressed npz)."""
    return n_pixels * (8 * k + 4 + 1) + _NPZ_OVERHEAD_BYTES


class MemorySink:
    """The results in preallocated in-memory maps (``map_pigments`` without ``out``).

    Attributes
    ----------
    prob, bur : numpy.ndarray, shape (rows, cols, K), float32
        Probability and buried probability; NaN until written (and at masked pixels).
    ood : numpy.ndarray, shape (rows, cols), float32
        Out-of-distribution score; NaN until written.
    reason : numpy.ndarray, shape (rows, cols), uint8
        Mask reason per pixel (:data:`xrfnb.maps.pigmentmaps.MASK_REASONS`; 0 valid).
    """

    def __init__(self, rows: int, cols: int, k: int) -> None:
        self.prob = np.full((rows, cols, k), np.nan, dtype=np.float32)
        self.bur = np.full((rows, cols, k), np.nan, dtype=np.float32)
        self.ood = np.full((rows, cols), np.nan, dtype=np.float32)
        self.reason = np.zeros((rows, cols), dtype=np.uint8)

    def done(self, sl: slice) -> bool:
        """Whether the rows ``sl`` are already done: never (nothing is kept between runs)."""
        return False

    def write(
        self, sl: slice, prob: np.ndarray, bur: np.ndarray, ood: np.ndarray, reason: np.ndarray
    ) -> None:
        """Store the results of the rows ``sl`` (shapes as the attributes, rows ``sl`` only)."""
        self.prob[sl], self.bur[sl], self.ood[sl], self.reason[sl] = prob, bur, ood, reason


#: appended to a no-space message while ``OUT.partial/`` holds completed blocks (``.format(dir=...)``)
RESUME_HINT = (
    ": the completed blocks are kept in {dir}; free some space, then rerun with --resume (resume=True) "
    "to continue from them"
)


class PartialSink:
    """Completed blocks as ``OUT.partial/rows_<r0>_<r1>.npz`` files, each written atomically.

    The folder is xrfnb's when it holds a ``manifest.json`` of format ``xrfnb-pigment-maps-partial``
    (written first, before any block). Only the files xrfnb writes there (the manifest, ``rows_*.npz``
    and their ``.tmp`` files, recognised by name) are ever deleted; a folder of that name that is not
    xrfnb's is refused, and anything else found in xrfnb's folder is left alone (the folder then stays).
    """

    def __init__(self, out: Path, manifest: dict[str, Any], resume: bool, bytes_left: int = 0) -> None:
        self.out = out
        self.dir = partial_dir(out)
        self.manifest = manifest
        self.bytes_left = bytes_left  # still to write (blocks and final file), for the no-space message
        self.completed: set[tuple[int, int]] = set()
        exists = self.dir.is_dir() and not self.dir.is_symlink()
        if exists and resume and (self.dir / "manifest.json").exists():
            self._load_existing()
            return
        if exists:
            if not self._is_ours():
                raise FormatError(
                    f"{self.dir} exists and is not an xrfnb working folder (no xrfnb manifest.json; it "
                    f"holds {', '.join(sorted(p.name for p in self.dir.iterdir())[:5])}): xrfnb never "
                    f"deletes what it did not write; move that folder away or choose another output"
                )
            self._clear()
        else:
            try:
                self.dir.mkdir()
            except OSError as exc:
                raise write_error(exc, self.dir / "manifest.json", _NPZ_OVERHEAD_BYTES) from None
        try:
            _write_json_atomic(self.dir / "manifest.json", manifest)
        except OSError as exc:
            raise write_error(exc, self.dir / "manifest.json", _NPZ_OVERHEAD_BYTES) from None

    def _is_ours(self) -> bool:
        """The folder holds xrfnb's manifest, or nothing but xrfnb's files (a run killed before the
        manifest was in place), or nothing at all."""
        try:
            manifest = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, ValueError):
            manifest = None
        if isinstance(manifest, dict) and manifest.get("format") == PARTIAL_FORMAT:
            return True
        names = [p.name for p in self.dir.iterdir()]
        return all(n == ".manifest.json.tmp" for n in names)

    def _clear(self) -> None:
        """Delete the files xrfnb wrote in the folder (by name), nothing else."""
        for p in self.dir.iterdir():
            if _PARTIAL_ENTRY.fullmatch(p.name) and (p.is_file() or p.is_symlink()):
                p.unlink()

    def _load_existing(self) -> None:
        try:
            old = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(
                f"cannot resume: {self.dir / 'manifest.json'} is unreadable ({exc}); "
                f"delete {self.dir} or run "
                "without --resume to start over"
            ) from None
        if not isinstance(old, dict) or old.get("format") != PARTIAL_FORMAT:
            raise FormatError(
                f"cannot resume: {self.dir} is not an xrfnb working folder (its manifest.json is not "
                "xrfnb's); move that folder away or choose another output"
            )
        for key in ("format", "input", "model", "shape", "block_rows"):
            if old.get(key) != self.manifest.get(key):
                raise DataError(
                    f"cannot resume: the partial results in {self.dir} were made with a different {key} "
                    f"({old.get(key)!r} != {self.manifest.get(key)!r}); run without --resume to start over"
                )
        for p in self.dir.iterdir():
            m = _BLOCK_FILE.fullmatch(p.name)
            if m is None:
                continue
            block = slice(int(m.group(1)), int(m.group(2)))
            problem = self._check_block(p, block)
            if problem is None:
                self.completed.add((block.start, block.stop))
                continue
            _log.warning(
                "damaged block file %s (%s): computing rows %d-%d again", p, problem, block.start, block.stop
            )
            with contextlib.suppress(OSError):
                p.unlink()

    def _check_block(self, path: Path, sl: slice) -> str | None:
        """Why a block file cannot be used (truncated, unreadable, wrong arrays), or None."""
        rows, cols = self.manifest["shape"]
        k = len(self.manifest["model"]["classes"])
        n = sl.stop - sl.start
        if not 0 <= sl.start < sl.stop <= rows:
            return f"rows outside the scan's {rows}"
        expect = {"probability": (n, cols, k), "buried_probability": (n, cols, k), "ood_score": (n, cols),
                  "mask_reason": (n, cols)}
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # fh: closed on errors too
                if sorted(z.files) != sorted(_BLOCK_ARRAYS):
                    return f"arrays {sorted(z.files)}"
                for name, shape in expect.items():
                    a = z[name]  # reads the whole member: a truncated file fails its CRC or its size here
                    if a.shape != shape:
                        return f"{name} has shape {a.shape}, expected {shape}"
        except Exception as exc:  # zipfile, zlib, numpy and OS errors alike: redo the block
            return f"{type(exc).__name__}: {exc}"
        return None

    def done(self, sl: slice) -> bool:
        """Whether the rows ``sl`` were completed (by this run, or by the interrupted run resumed)."""
        return (sl.start, sl.stop) in self.completed

    def write(
        self, sl: slice, prob: np.ndarray, bur: np.ndarray, ood: np.ndarray, reason: np.ndarray
    ) -> None:
        """Write the results of the rows ``sl`` atomically as ``rows_<r0>_<r1>.npz``.

        Parameters
        ----------
        sl : slice
            The rows of the block.
        prob, bur : numpy.ndarray, shape (rows in sl, cols, K), float32
        ood : numpy.ndarray, shape (rows in sl, cols), float32
        reason : numpy.ndarray, shape (rows in sl, cols), uint8
        """
        target = self.dir / f"rows_{sl.start:07d}_{sl.stop:07d}.npz"
        tmp = self.dir / f".{target.name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, probability=prob, buried_probability=bur, ood_score=ood, mask_reason=reason)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise write_error(exc, target, self.bytes_left, RESUME_HINT.format(dir=self.dir)) from None
        self.completed.add((sl.start, sl.stop))
        with contextlib.suppress(OSError):
            self.bytes_left = max(0, self.bytes_left - target.stat().st_size)

    def read(self, sl: slice) -> dict[str, np.ndarray]:
        """The arrays of a completed block (``probability``, ``buried_probability``, ``ood_score``,
        ``mask_reason``); a :class:`~xrfnb.FormatError` naming the file when it is damaged."""
        path = self.dir / f"rows_{sl.start:07d}_{sl.stop:07d}.npz"
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # fh: closed on errors too
                return {n: z[n] for n in z.files}
        except Exception as exc:  # damaged after it was checked: say which file
            raise FormatError(
                f"block file {path} is damaged ({type(exc).__name__}: {exc}); rerun with --resume "
                "(resume=True) to compute its rows again"
            ) from None

    def assemble(
        self,
        classes: Sequence[str],
        colors: Sequence[str],
        thresholds: np.ndarray,
        ood_threshold: float,
        metadata: Mapping[str, Any],
        slices: list[slice],
        element_maps: ElementMaps | None,
    ) -> None:
        """Write the maps file ``out`` (atomically) from the completed blocks ``slices``, then delete the
        working folder; no space left is a :class:`~xrfnb.FormatError` that keeps the blocks for resume."""
        rows, cols = self.manifest["shape"]
        needed = maps_file_bytes(rows, cols, len(classes), element_maps)
        hint = RESUME_HINT.format(dir=self.dir)
        check_free_space(self.out.parent, needed, self.out, hint)
        with atomic_path(self.out) as tmp, h5_writer(tmp, self.out, needed, hint) as (f, failed):
            write_header(f, classes, colors, thresholds, ood_threshold, metadata)
            d = create_map_datasets(f, rows, cols, len(classes), MASK_REASONS)
            for sl in slices:
                if failed():
                    break
                z = self.read(sl)
                d["probability"][sl] = z["probability"]
                d["buried_probability"][sl] = z["buried_probability"]
                d["ood_score"][sl] = z["ood_score"]
                d["mask_reason"][sl] = z["mask_reason"]
                d["mask"][sl] = z["mask_reason"] != MASK_OK
            if element_maps is not None and not failed():
                write_element_maps(f, element_maps)
        self.remove()

    def remove(self) -> None:
        """Delete xrfnb's files and then the folder, if nothing else is left in it."""
        with contextlib.suppress(OSError):
            self._clear()
            self.dir.rmdir()


def _write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
