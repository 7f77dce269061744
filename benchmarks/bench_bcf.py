"""Benchmark: Bruker ``.bcf`` hypermaps decoded as a stream, and pigment maps straight from the ``.bcf``.

Writes synthetic ``.bcf`` files (an SFS container of 4 KiB chunks, as Esprit writes them) of n x n pixels x
4096 channels in Esprit's "instructed" packing (per 16 channels: an empty bunch, or a gain plus 4-bit,
8-bit or 16-bit offsets), encoded a row block at a time with NumPy and streamed to disk. The spectra are
those of ``bench_mapping.py`` (Poisson samples of pigment templates, about 2,000 counts per pixel, as in a
10-50 ms macro-XRF dwell). Then, each in a fresh process:

* ``decode``: ``xrfnb.load(path)`` (the row index pass) and every block of rows read through
  ``scan.iter_blocks()`` (read, checked bunch by bunch, decoded): spectra/s and peak RSS (``ru_maxrss``);
* ``map``: ``map_pigments(scan, model, out=...)`` straight from the ``.bcf``: spectra/s end to end and
  peak RSS.

At two sizes four times apart (512^2 and 1024^2; ``--small``: 128^2 and 256^2). Targets: >= 20,000 spectra/s
end to end and peak RSS < 1 GB at both sizes.

Figures on the 2-core project machine (shipped model, float32 on this CPU), shared with other users'
test runs, so they depend on the load (the 1-minute load average, printed by the benchmark with each
figure):

* before the speed work (commit 8973a58, load 1.3 rising to 3.5-4.5): decode 30,900 / 30,300 spectra/s
  at 512^2 / 1024^2; map_pigments from the ``.bcf`` 2,071 / 2,823 spectra/s (identify 123 s of 127 s /
  362 s of 371 s), peak RSS 956 / 1,030 MB;
* after it (commit 9e93c22, load 6.3 rising to 8.5): decode 22,900 / 27,000 spectra/s; map_pigments
  6,130 / 5,179 spectra/s (identify 39 s of 43 s / 190 s of 203 s), peak RSS 897 / 909 MB (+12 MB for 4x
  the pixels);
* the second pass (commits e43cf6a..be26ede; ``--shape 512x512``, the code before it, fe789d9, run
  alternately, in brackets): map_pigments 6,927 / 8,441 / 11,751 and 11,070 spectra/s at loads 7.6 / 5.9 /
  1.8-2.0 (4,353 / 5,443 / 11,356), decode 38,168 / 52,016 / 44,179 and 60,724 spectra/s (27,367 / 31,999 /
  36,393), peak RSS 705-714 MB (903-913). Whole-process CPU at load 3-4: 102-112 us per spectrum
  (122-129). ``--stages`` at load 4.5 (best of 5): index 2.8-3.1 us (4.6-4.9), read 1.6 (4.1), check 1.2
  (4.7-5.5), decode 8.1 (8.0-9.0), the three as mapped 10.1-10.7 (17.0-17.7), rebin 7.7-8.0 (8.4-9.2),
  unexplained-peak term 3.7-4.0 (10.4-11.0), reconstruction 4.4-4.8 (4.6-4.7), network 39-43 either way;
  ``identify_batch`` on a decoded 8,192-pixel block, medians of 7, four runs each at load 5: 67-78 (86-102).

Where the time went: torch's OpenMP threads spin for about 300,000 turns whenever they wait; with the block
decoder's thread and other processes on the same two cores they took the CPU the work needed
(``identify_batch`` on 8,192 spectra at load 4-5, three runs each: 121-236 us of CPU per spectrum with
spinning threads, 82-107 us once they wait passively: the model room sets ``OMP_WAIT_POLICY=PASSIVE``). The
same 64 x 512 map, old and new code alternating at load 7: 1,600-1,800 against 4,000-5,300 spectra/s, 258-317
against 105-124 us of CPU per spectrum end to end. Decoding alone, old and new alternating at load 6.5: 25
against 21 us of CPU per spectrum (whole-row slices decoded without the per-block copies). Of the ~110 us end
to end: decoding ~21 (rosettasciio's decoder ~12, the record check ~6, reading ~2), rebinning ~10, the network
and the out-of-distribution terms the rest. At ~110 us of CPU per spectrum two cores give at most ~18,000
spectra/s with nothing else running: the 20,000 target needs fewer CPU-seconds per spectrum than the float32
network leaves (a CPU with native bfloat16, or more cores), not a faster reader. The second pass took what
was not the network: fresh 100 MB arrays per block (kernel page faults: 15-40 us of system CPU per spectrum
under load), seven copies of each block's bytes, the bunch walk over every pixel, the unexplained-peak
background over the whole grid, per-batch copies of the valid pixels; about 100-110 us remain, the network
~40 of them, and near an idle machine the pipeline does not keep both cores busy (the network's two threads
scale imperfectly; the index pass and physics check run on one thread).

Usage::

    python benchmarks/bench_bcf.py                # 512^2 and 1024^2 (needs ~4 GB in /tmp)
    python benchmarks/bench_bcf.py --small        # 128^2 and 256^2, about a minute
    python benchmarks/bench_bcf.py --tmpdir /scratch --no-map
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _bruker_files import bcf_header, write_bcf_streamed  # noqa: E402
from bench_mapping import N_CHANNELS, _fallback_model, _rss_mb, _SyntheticCounts  # noqa: E402
from bench_mapping import _subprocess as _run_script  # noqa: E402

GAIN_keV = 0.01
BUNCH = 16
TARGET_SPECTRA_PER_S = 20_000
TARGET_RSS_MB = 1024
ROWS_PER_WRITE = 16


def encode_rows(block: np.ndarray) -> bytes:
    """Pulse-stream bytes of rows of counts (rows, cols, 4096), every pixel "instructed"-packed (flag 2).

    Per bunch of 16 channels: ``[0, 16]`` when empty; else ``[1, 16, gain]`` + 8 bytes of 4-bit offsets,
    ``[2, 16]`` + 16-bit gain + 16 bytes, or ``[4, 16]`` + 32-bit gain + 16 16-bit offsets; every pixel
    record ends with the 4-byte trailer of a pixel without extra pulses.
    """
    rows, cols, n_ch = block.shape
    nb = n_ch // BUNCH
    x = block.reshape(rows * cols, nb, BUNCH).astype(np.int64)
    lo, hi = x.min(-1), x.max(-1)
    span = hi - lo
    t0 = hi == 0
    t1 = ~t0 & (span < 16) & (lo < 256)
    t2 = ~t0 & ~t1 & (span < 256) & (lo < 65536)
    t4 = ~(t0 | t1 | t2)
    blen = np.where(t0, 2, np.where(t1, 3 + BUNCH // 2, np.where(t2, 4 + BUNCH, 6 + 2 * BUNCH)))
    payload = blen.sum(1)
    rec = 22 + payload + 4
    # offsets: each row starts with a 4-byte pixel count
    per_row = rec.reshape(rows, cols)
    row_len = 4 + per_row.sum(1)
    row_start = np.concatenate([[0], np.cumsum(row_len)[:-1]])
    rec_start = (row_start[:, None] + 4 + np.cumsum(per_row, 1) - per_row).ravel()
    out = np.zeros(int(row_len.sum()), np.uint8)
    out[(row_start[:, None] + np.arange(4)).ravel()] = np.tile(
        np.frombuffer(np.int32(cols).tobytes(), np.uint8), rows
    )
    head = np.zeros(
        rows * cols,
        np.dtype(
            [
                ("x", "<u4"),
                ("c1", "<u2"),
                ("c2", "<u2"),
                ("d", "<u4"),
                ("flag", "<u2"),
                ("s1", "<u2"),
                ("n", "<u2"),
                ("size", "<u4"),
            ]
        ),
    )
    head["x"] = np.tile(np.arange(cols), rows)
    head["c1"] = head["c2"] = n_ch
    head["flag"] = 2
    head["size"] = payload + 4
    out[rec_start[:, None] + np.arange(22)] = head.view(np.uint8).reshape(-1, 22)
    pos = rec_start[:, None] + 22 + np.cumsum(blen, 1) - blen  # (pixels, bunches)
    vals = x - lo[..., None]
    for mask, size in ((t0, 0), (t1, 1), (t2, 2), (t4, 4)):
        p = pos[mask]
        out[p] = size
        out[p + 1] = BUNCH
        if size == 1:
            v = vals[mask]
            out[p + 2] = lo[mask]
            out[p[:, None] + 3 + np.arange(BUNCH // 2)] = v[:, 0::2] | (v[:, 1::2] << 4)
        elif size == 2:
            g = lo[mask]
            out[p + 2], out[p + 3] = g & 0xFF, g >> 8
            out[p[:, None] + 4 + np.arange(BUNCH)] = vals[mask]
        elif size == 4:
            g = lo[mask]
            for k in range(4):
                out[p + 2 + k] = (g >> (8 * k)) & 0xFF
            v = vals[mask]
            out[p[:, None] + 6 + 2 * np.arange(BUNCH)] = v & 0xFF
            out[p[:, None] + 7 + 2 * np.arange(BUNCH)] = v >> 8
    return out.tobytes()


def generate(path: Path, n: int, cols: int | None = None) -> dict:
    rows_n, cols_n = n, (cols or n)
    counts = _SyntheticCounts(rows_n, cols_n)
    header = bcf_header(
        rows_n,
        cols_n,
        np.zeros(N_CHANNELS, np.int64),
        offset_keV=0.0,
        gain_keV=GAIN_keV,
        pixel_um=100.0,
        live_time_s=0.02 * rows_n * cols_n,
        real_time_s=0.021 * rows_n * cols_n,
    )
    check = counts[0:2]

    def rows():
        for r0 in range(0, rows_n, ROWS_PER_WRITE):
            yield encode_rows(counts[r0 : min(rows_n, r0 + ROWS_PER_WRITE)])

    write_bcf_streamed(path, header, rows_n, cols_n, rows(), chunk=0x1000)
    return {"ok": True, "check_sum": int(check.sum())}


def worker_decode(path: Path) -> dict:
    import xrfnb

    base = _rss_mb()
    t0 = time.perf_counter()
    scan = xrfnb.load(path)
    t_index = time.perf_counter() - t0
    rows, cols, _ = scan.shape
    expect = _SyntheticCounts(rows, cols)[0 : min(rows, ROWS_PER_WRITE)][:2]  # as generate() wrote them
    assert np.array_equal(scan.counts[0:2], expect), "decoded counts differ from the counts written"
    total = 0
    for _, block in scan.iter_blocks(max_pixels=cols * scan.counts.block_rows):  # one block at a time
        total += int(block.sum(dtype=np.int64))
    elapsed = time.perf_counter() - t0
    rows, cols, _ = scan.shape
    return {
        "what": "decode",
        "pixels": rows * cols,
        "index_s": t_index,
        "elapsed_s": elapsed,
        "spectra_per_s": rows * cols / elapsed,
        "baseline_rss_mb": base,
        "peak_rss_mb": _rss_mb(),
        "mean_counts": total / (rows * cols),
        "block_rows": scan.counts.block_rows,
        "load": os.getloadavg()[0],
    }


def worker_map(path: Path, out: Path, chunk_pixels: int, model_name: str = "default") -> dict:
    import xrfnb
    from xrfnb.maps.mapping import map_pigments

    note = "shipped model" if model_name == "default" else f"model {model_name}"
    try:
        model = xrfnb.load_model(model_name)
    except xrfnb.XRFNBError as exc:
        model, note = _fallback_model(), f"NO SHIPPED MODEL ({exc}); freshly initialised default architecture"
    model.identify_batch(np.asarray(_SyntheticCounts(1, 64)[0:1][0]), xrfnb.EnergyCalibration(0.0, GAIN_keV))
    base = _rss_mb()
    t0 = time.perf_counter()
    scan = xrfnb.load(path)  # the index pass counts: the map is made straight from the .bcf
    maps = map_pigments(scan, model, out=out, progress=False, chunk_pixels=chunk_pixels)
    elapsed = time.perf_counter() - t0
    rows, cols, _ = scan.shape
    return {
        "what": "map_pigments",
        "model": f"{model.name}: {note}",
        "pixels": rows * cols,
        "elapsed_s": elapsed,
        "spectra_per_s": rows * cols / elapsed,
        "baseline_rss_mb": base,
        "peak_rss_mb": _rss_mb(),
        "masked": maps.summary().n_masked,
        "timing_s": maps.metadata.get("timing_s", {}),
        "load": os.getloadavg()[0],
    }


def _cpu_s() -> float:
    """CPU seconds of this process so far (user + system, all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker_stages(path: Path, n: int, repeats: int, model_name: str = "default") -> dict:
    """CPU per spectrum of each stage, from the first ``n`` pixels of the ``.bcf`` (the best of ``repeats``
    runs of each): the index pass, reading, the block check and decoding; then the model's rebinning,
    network input, network, the unexplained-peak, Mahalanobis and reconstruction terms of the OOD score,
    all of ``_infer_binned`` and ``identify_batch`` (chunks of 2,048 spectra, as ``identify_batch``).
    Works with the code before the speed work too (``PYTHONPATH`` of an older checkout)."""
    import xrfnb
    import xrfnb.model.model as model_module
    from xrfnb.io import bcf
    from xrfnb.model.nn import features_from_binned

    torch = sys.modules["torch"]  # loaded by the model room, after it set OMP_WAIT_POLICY
    # the network input as the model makes it: its own function where it has one (with the grid totals)
    own = getattr(model_module, "_features", None)

    def features(b):
        return own(b, b.sum(dim=1, keepdim=True)) if own is not None else features_from_binned(b)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = _cpu_s()
            fn()
            times.append(_cpu_s() - t0)
        return min(times) / n * 1e6

    out: dict = {"what": "stages", "code": str(Path(xrfnb.__file__).parent), "spectra": n}
    t0 = _cpu_s()
    scan = xrfnb.load(path)
    rows, cols, n_ch = scan.shape
    out["index pass (whole map)"] = (_cpu_s() - t0) / (rows * cols) * 1e6
    counts = scan.counts
    n_rows = max(1, n // cols)
    step = max(1, counts.block_rows)
    spans = [(r, min(n_rows, r + step)) for r in range(0, n_rows, step)]
    stream = counts._stream
    read = getattr(stream, "read_array", stream.read)
    datas = []

    def do_read():
        datas.clear()
        for a, b in spans:
            lo, hi = int(counts._offsets[a]), int(counts._offsets[b])
            datas.append(bytes(read(lo, hi - lo)))

    out["read"] = best(do_read)
    pieces = list(zip(datas, spans, strict=True))
    out["check"] = best(lambda: [bcf.check_bcf_block(d, b - a, cols, "x", a) for d, (a, b) in pieces])
    dtype = counts.dtype
    out["decode"] = best(lambda: [bcf.decode_bcf_block(d, b - a, cols, n_ch, dtype) for d, (a, b) in pieces])
    # read, check and decode as map_pigments does: into two arrays used in turn where the code can
    bufs = [np.empty((step, cols, n_ch), dtype) for _ in range(2)]
    into = "out" in inspect.signature(counts.read_rows).parameters

    def blocks():
        for i, (a, b) in enumerate(spans):
            counts.read_rows(a, b, out=bufs[i % 2][: b - a]) if into else counts[a:b]

    out["read+check+decode (mapping)"] = best(blocks)
    block = np.concatenate(
        [bcf.decode_bcf_block(d, b - a, cols, n_ch, counts.dtype) for d, (a, b) in pieces]
    ).reshape(-1, n_ch)
    model = xrfnb.load_model(model_name)
    cal = scan.calibration
    model.identify_batch(block[:64], cal)
    chunks = [block[i : i + 2048] for i in range(0, block.shape[0], 2048)]
    binned: list = []

    def rebin():
        binned[:] = [torch.from_numpy(model._rebin_parallel(c, cal)) for c in chunks]

    out["rebin"] = best(rebin)
    with torch.inference_mode():
        feats = [features(b) for b in binned]
        out["features"] = best(lambda: [features(b) for b in binned])
        nets = [model.net(x, lc) for x, lc in feats]
        out["network"] = best(lambda: [model.net(x, lc) for x, lc in feats])
        present = [(torch.softmax(lg / model.temperature, dim=2)[..., 1:].sum(-1) >= 0.1).float()
                   for lg, _ in nets]
        pairs = list(zip(binned, present, strict=True))
        out["unexplained"] = best(lambda: [model._unexplained_fraction(b, p) for b, p in pairs])
        mean, white = model._feature_mean, model._feature_whitening
        out["mahalanobis"] = best(lambda: [torch.sqrt((((f - mean) @ white) ** 2).mean(1)) for _, f in nets])
        out["reconstruction"] = best(lambda: [model._reconstruction(b) for b in binned])
        out["infer_binned"] = best(lambda: [model._infer_binned(b) for b in binned])
    out["identify_batch"] = best(lambda: model.identify_batch(block, cal))
    out["load"] = os.getloadavg()[0]
    return out


def _subprocess(args: list[str], timeout_s: float) -> dict:
    return _run_script(args, timeout_s, script=__file__)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="128^2 and 256^2 pixels (quick check)")
    ap.add_argument("--tmpdir", default=None, help="where to write the files (default: system temp)")
    ap.add_argument("--no-map", action="store_true", help="decode only")
    ap.add_argument("--chunk-pixels", type=int, default=8192)
    ap.add_argument(
        "--stages",
        metavar="BCF",
        help="CPU per spectrum of each stage on the first --stage-spectra pixels of this .bcf (e.g. one "
        "written by a run with --keep), then exit",
    )
    ap.add_argument("--stage-spectra", type=int, default=8192)
    ap.add_argument(
        "--model",
        default="default",
        help="model name or folder to map with (default: the shipped one), e.g. the weights of an earlier "
        "commit for a before/after figure",
    )
    ap.add_argument("--keep", action="store_true", help="keep the .bcf files (their folder is printed)")
    ap.add_argument("--worker", choices=["generate", "decode", "map", "stages"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument(
        "--shape",
        default=None,
        help="one map of ROWSxCOLS pixels instead of the two sizes (e.g. 1273x1662, a large M6 map)",
    )
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cols", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "generate":
        print(json.dumps(generate(Path(args.path), args.n, args.cols)))
        return 0
    if args.worker == "decode":
        print(json.dumps(worker_decode(Path(args.path))))
        return 0
    if args.worker == "map":
        print(json.dumps(worker_map(Path(args.path), Path(args.path + ".maps.h5"), args.chunk_pixels,
                                    args.model)))
        return 0
    if args.worker == "stages" or args.stages:
        res = worker_stages(Path(args.stages or args.path), args.stage_spectra, 5, args.model)
        for k, v in res.items():
            stage = isinstance(v, float) and k != "load"
            print(f"  {k:24s} {v:8.2f} us CPU/spectrum" if stage else f"  {k}: {v}")
        return 0

    sizes: tuple[tuple[int, int], ...] = (
        ((128, 128), (256, 256)) if args.small else ((512, 512), (1024, 1024))
    )
    if args.shape:
        try:
            r_s, c_s = (int(v) for v in args.shape.lower().split("x"))
        except ValueError:
            ap.error(f"--shape must be ROWSxCOLS, e.g. 1273x1662, not {args.shape!r}")
        sizes = ((r_s, c_s),)
    work = Path(tempfile.mkdtemp(prefix="xrfnb-bench-bcf-", dir=args.tmpdir))
    print(f"bench_bcf: files in {work} (deleted afterwards); {os.cpu_count()} CPUs")
    results = []
    try:
        for n, cols in sizes:
            path = work / f"map_{n}x{cols}.bcf"
            t0 = time.perf_counter()
            gen = _subprocess(
                ["--worker", "generate", "--path", str(path), "--n", str(n), "--cols", str(cols)], 3600
            )
            if "error" in gen:
                print(f"  generating {n} x {cols} failed: {gen['error']}")
                return 1
            print(
                f"\n{n} x {cols} x {N_CHANNELS}: .bcf of {path.stat().st_size / 2**20:.0f} MiB "
                f"(written in {time.perf_counter() - t0:.0f} s; "
                f"decoded uint32 {n * cols * N_CHANNELS * 4 / 2**20:.0f} MiB)"
            )
            d = _subprocess(["--worker", "decode", "--path", str(path)], 3600)
            if "error" in d:
                print(f"  decode failed: {d['error']}")
                return 1
            print(
                f"  decode: {d['spectra_per_s']:,.0f} spectra/s ({d['elapsed_s']:.1f} s, index pass "
                f"{d['index_s']:.1f} s, {d['block_rows']} rows per block), "
                f"peak RSS {d['peak_rss_mb']:.0f} MB, "
                f"{d['mean_counts']:.0f} counts per pixel; load average {d['load']:.1f}"
            )
            m: dict = {"skipped": "--no-map"}
            if not args.no_map:
                m = _subprocess(
                    ["--worker", "map", "--path", str(path), "--chunk-pixels", str(args.chunk_pixels),
                     "--model", args.model],
                    3600,
                )
                if "error" in m:
                    print(f"  map_pigments failed: {m['error']}")
                    return 1
                print(f"  model: {m['model']}; stage seconds: {m['timing_s']}")
                print(
                    f"  map_pigments from the .bcf: {m['spectra_per_s']:,.0f} spectra/s "
                    f"({m['elapsed_s']:.1f} s), peak RSS {m['peak_rss_mb']:.0f} MB "
                    f"(after imports and model {m['baseline_rss_mb']:.0f} MB); load average {m['load']:.1f}"
                )
            results.append((f"{n} x {cols}", d, m))
            if not args.keep:
                path.unlink(missing_ok=True)
            Path(str(path) + ".maps.h5").unlink(missing_ok=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\nsummary")
    ok = True
    for n, d, m in results:
        end = m if "spectra_per_s" in m else d
        speed_ok = end["spectra_per_s"] >= TARGET_SPECTRA_PER_S
        rss = max(d["peak_rss_mb"], m.get("peak_rss_mb", 0))
        rss_ok = rss < TARGET_RSS_MB
        ok &= speed_ok and rss_ok
        print(
            f"  {n:>11}: decode {d['spectra_per_s']:>9,.0f} spectra/s, end to end "
            f"{end['spectra_per_s']:>9,.0f} spectra/s "
            f"[{'ok' if speed_ok else 'BELOW'} {TARGET_SPECTRA_PER_S:,}]"
            f"  peak RSS {rss:>6.0f} MB [{'ok' if rss_ok else 'ABOVE'} {TARGET_RSS_MB} MB]"
        )
    if len(results) == 2:
        grow = max(results[1][1]["peak_rss_mb"], results[1][2].get("peak_rss_mb", 0)) - max(
            results[0][1]["peak_rss_mb"], results[0][2].get("peak_rss_mb", 0)
        )
        print(f"  peak RSS change for 4x the pixels: {grow:+.0f} MB")
    print("targets met" if ok else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
