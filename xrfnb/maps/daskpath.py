"""The dask path of :func:`xrfnb.map_pigments`: a scan's counts as a :class:`dask.array.Array` of whole-row
blocks (:func:`dask_scan`), identified block by block with :func:`dask.array.blockwise` (:func:`map_dask`),
locally or on a ``dask.distributed`` cluster; the client receives only the maps.

dask and distributed are optional: they are imported when this path runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import queue
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.calibration import EnergyCalibration
from ..core.spectrum import Scan, is_dask
from .blocks import process_block

if TYPE_CHECKING:  # pragma: no cover
    import dask.array
    import distributed

    from ..model.model import PigmentModel

__all__ = ["dask_scan", "map_dask"]


def _dask_block(
    counts: np.ndarray,
    *maybe_lt: np.ndarray,
    model: PigmentModel,
    calibration: EnergyCalibration,
    live_time_s: float | None,
    saturation_counts: float | None,
    batch_pixels: int,
) -> np.ndarray:
    """Per-chunk function of the dask path: (r, c, channels) -> (r, c, 2 K + 2) float32 packed results."""
    lt = maybe_lt[0] if maybe_lt else live_time_s
    prob, bur, ood, reason = process_block(
        np.asarray(counts), model, calibration, lt, saturation_counts, batch_pixels
    )
    return np.concatenate([prob, bur, ood[..., None], reason[..., None].astype(np.float32)], axis=-1)


def _read_rows_by_path(path: str, dataset: str, r0: int, r1: int) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return np.asarray(f[dataset][r0:r1])


def dask_scan(scan: Scan, rows_per_chunk: int | None = None) -> Scan:
    """The same scan with its counts as a :class:`dask.array.Array` of whole-row blocks.

    An HDF5-backed scan becomes tasks that open the file read-only *by path* (they pickle, so they run on
    ``dask.distributed`` workers that see the same file system); an in-memory scan is wrapped with
    :func:`dask.array.from_array`; a dask scan is returned unchanged.

    Parameters
    ----------
    scan : Scan
        Shape (rows, cols, channels).
    rows_per_chunk : int, optional
        Rows per dask chunk (default: :meth:`Scan.block_rows`, aligned to the HDF5 chunks).
    """
    import dask
    import dask.array as da

    if is_dask(scan.counts):
        return scan
    rows, cols, n_ch = scan.shape
    step = int(rows_per_chunk or scan.block_rows())
    counts = scan.counts
    try:
        import h5py

        is_h5 = isinstance(counts, h5py.Dataset)
    except ImportError:  # pragma: no cover
        is_h5 = False
    if is_h5:
        path, name = str(counts.file.filename), str(counts.name)
        read = dask.delayed(_read_rows_by_path, pure=True)
        blocks = [
            da.from_delayed(
                read(path, name, r0, min(rows, r0 + step)),
                shape=(min(rows, r0 + step) - r0, cols, n_ch),
                dtype=counts.dtype,
            )
            for r0 in range(0, rows, step)
        ]
        arr = da.concatenate(blocks, axis=0)
    else:
        arr = da.from_array(counts, chunks=(step, cols, n_ch))
    return dataclasses.replace(scan, counts=arr)


def map_dask(
    scan: Scan,
    model: PigmentModel,
    saturation_counts: float | None,
    batch_pixels: int,
    progress: bool | Callable[[int, int], object],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Identify a dask-backed scan on the active scheduler (a ``dask.distributed`` client if one exists).

    Parameters
    ----------
    scan : Scan
        Counts a :class:`dask.array.Array` of shape (rows, cols, channels) (see :func:`dask_scan`).
    model : PigmentModel
        Sent to the workers with each task.
    saturation_counts : float or None
        A channel at or above this value marks the pixel saturated (None: never).
    batch_pixels : int
        Spectra passed to the model at once.
    progress : bool or callable
        As for :func:`xrfnb.map_pigments`; a callable gets ``(done_pixels, total_pixels)`` as dask tasks
        finish.

    Returns
    -------
    probability, buried_probability : numpy.ndarray, shape (rows, cols, K), float32
    ood_score : numpy.ndarray, shape (rows, cols), float32
    reason : numpy.ndarray, shape (rows, cols), uint8
        Mask reasons (0 valid).
    """
    import dask.array as da

    k = len(model.classes)
    counts = scan.counts.rechunk({2: -1})
    lt = scan.live_time_s
    fn = functools.partial(
        _dask_block,
        model=model,
        calibration=scan.calibration,
        live_time_s=None if isinstance(lt, np.ndarray) else lt,
        saturation_counts=saturation_counts,
        batch_pixels=batch_pixels,
    )
    args: list[Any] = [counts, "ijc"]
    if isinstance(lt, np.ndarray):
        args += [da.from_array(lt, chunks=(counts.chunks[0], counts.chunks[1])), "ij"]
    packed = da.blockwise(
        fn,
        "ijz",
        *args,
        new_axes={"z": 2 * k + 2},
        concatenate=True,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )
    total_px = int(scan.shape[0] * scan.shape[1])
    result = _compute(packed, progress, total_px)
    prob = result[..., :k]
    bur = result[..., k : 2 * k]
    ood = np.ascontiguousarray(result[..., 2 * k])
    reason = result[..., 2 * k + 1].astype(np.uint8)
    return np.ascontiguousarray(prob), np.ascontiguousarray(bur), ood, reason


def _compute(
    arr: dask.array.Array, progress: bool | Callable[[int, int], object], total_px: int
) -> np.ndarray:
    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if callable(progress):
        return _compute_reporting(arr, progress, total_px, client)
    if client is not None:
        if progress:
            from distributed import progress as dprogress

            fut = client.compute(arr)
            with contextlib.suppress(Exception):
                dprogress(fut, notebook=False)
            return np.asarray(fut.result())
        return np.asarray(client.compute(arr).result())
    if progress:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc="pigment maps"):
            return np.asarray(arr.compute())
    return np.asarray(arr.compute())


def _compute_reporting(
    arr: dask.array.Array,
    report: Callable[[int, int], object],
    total_px: int,
    client: distributed.Client | None,
) -> np.ndarray:
    """Compute a (rows, cols, z) dask array, calling ``report(done_pixels, total_pixels)`` as blocks finish.

    On a ``dask.distributed`` client the row-column blocks are submitted as futures and reported as they
    complete; with a local scheduler a :class:`dask.callbacks.Callback` reports the share of finished tasks.
    The callback always runs in the calling thread.
    """
    report(0, total_px)
    if client is not None:
        from distributed import as_completed

        blocks = arr.to_delayed()  # object array (n_row_blocks, n_col_blocks, 1) of delayed blocks
        futures = client.compute(list(blocks.ravel()))
        where = {f.key: i for i, f in enumerate(futures)}
        sizes = [r * c for r in arr.chunks[0] for c in arr.chunks[1]]
        results: list[np.ndarray | None] = [None] * len(futures)
        done = 0
        for fut in as_completed(futures):
            i = where[fut.key]
            results[i] = fut.result()
            done += sizes[i]
            report(done, total_px)
        grid = np.empty(blocks.shape[:2], dtype=object)
        for i, part in enumerate(results):
            grid[np.unravel_index(i, grid.shape)] = part
        return np.concatenate([np.concatenate(list(row), axis=1) for row in grid], axis=0)

    from dask.callbacks import Callback

    finished: queue.SimpleQueue[int] = queue.SimpleQueue()

    class _Count(Callback):
        def _start_state(self, dsk: Any, state: Any) -> None:
            self.total = max(1, len(state["ready"]) + len(state["waiting"]) + len(state["running"]))

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            finished.put(len(state["finished"]))

    counter = _Count()
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            with counter:
                out["value"] = np.asarray(arr.compute())
        except BaseException as exc:  # re-raised in the calling thread
            out["error"] = exc
        finally:
            finished.put(-1)

    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrfnb-dask")
    with worker:
        worker.submit(run)
        while True:
            n = finished.get()
            if n < 0:
                break
            total = getattr(counter, "total", 0)
            if total:
                report(min(total_px - 1, total_px * n // total), total_px)
    if "error" in out:
        raise out["error"]
    return out["value"]
