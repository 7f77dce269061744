"""Fuzz the readers the way an attacker or an unlucky user would: seeded mutants of every format.

Each case is a damaged copy of a valid file (real spectra from ``../shared/data/real/`` and files
written here: HDF5 scan/spectrum/NeXus, ``.npy`` + JSON, ``.npz``, text, EPICS and Amptek ``.mca``,
``.spe`` + ``.cfg``, EMSA ``.msa``/``.emsa``, ``.spx``, ``.bcf``, ``.rpl`` + ``.raw``) or random bytes
with a format's name. A long-lived child process (``_fuzz_worker.py``, address space capped at 8 GiB)
loads it with :func:`xrfnb.load`, then identifies the spectrum with the shipped model, or sums the scan
and maps its pigments. A case fails when

- the child raises anything but an :class:`xrfnb.XRFNBError`, or dies (a crash, a memory cap hit);
- it takes longer than :data:`CASE_LIMIT_S` (the child is killed and restarted);
- any file of the case (bytes, modification time, permissions) changes, or a file appears.

Mutants are drawn from ``numpy.random.default_rng((SEED, seed index, case index))``, so every failure
is reproducible from the names in the report; the damaged files of failing cases are kept under pytest's
``tmp_path``. The default run tries :data:`CASES_DEFAULT` mutants per seed file; ``-m slow`` tries
:data:`CASES_SLOW` per seed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from _bruker_files import write_bcf, write_ripple, write_spx

import xrfnb

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
WORKER = Path(__file__).resolve().with_name("_fuzz_worker.py")
SEED = 20261125
CASES_DEFAULT = 15
CASES_SLOW = 160
#: seconds one case may take (load + identify/map); normal cases take 0.01-0.5 s
CASE_LIMIT_S = 30.0
#: seconds the worker may take to start (imports and the shipped model)
START_LIMIT_S = 120.0
CAL = xrfnb.EnergyCalibration(0.0, 0.01)  # 4096 channels cover the model's 1-41 keV

#: a seed: (file to load, {file name: content}) -- the other files sit next to it (side-cars, .raw)
Seed = tuple[str, dict[str, bytes]]


# -- seeds -------------------------------------------------------------------------------------------
def _generated_seeds() -> dict[str, Seed]:
    rng = np.random.default_rng(SEED)
    seeds: dict[str, Seed] = {}
    scan = xrfnb.Scan(rng.poisson(2, (3, 4, 4096)).astype(np.uint16), CAL, pixel_size_um=50.0,
                      live_time_s=rng.uniform(0.09, 0.11, (3, 4)), metadata={"painting": "fuzz"})
    spectrum = xrfnb.Spectrum(rng.poisson(20, 4096), CAL, live_time_s=1.0, real_time_s=1.1)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)

        def files(*names: str) -> dict[str, bytes]:
            return {n: (t / n).read_bytes() for n in names}

        for name, obj in (("scan.h5", scan), ("spec.h5", spectrum), ("scan.npz", scan),
                          ("spec.txt", spectrum), ("spec.mca", spectrum)):
            xrfnb.save(obj, t / name)
            seeds[name] = (name, files(name))
        xrfnb.save(spectrum, t / "spec.npy")
        seeds["spec.npy"] = ("spec.npy", files("spec.npy", "spec.json"))
        xrfnb.save(scan, t / "scan.npy")
        seeds["scan.npy"] = ("scan.npy", files("scan.npy", "scan.json"))
        with h5py.File(t / "nexus.h5", "w") as f:  # foreign NeXus NXdata: contiguous float scan, eV axis
            f.attrs["default"] = "entry"
            entry = f.create_group("entry")
            entry.attrs["default"] = "data"
            data = entry.create_group("data")
            data.attrs.update(NX_class="NXdata", signal="counts", axes=[".", ".", "energy"])
            data.create_dataset("counts", data=rng.poisson(2, (2, 3, 4096)).astype(np.float32))
            data.create_dataset("energy", data=CAL.energies_keV(4096) * 1000.0).attrs["units"] = "eV"
        seeds["nexus.h5"] = ("nexus.h5", files("nexus.h5"))
        write_spx(t / "spec.spx", rng.poisson(5, 4096), offset_keV=-0.01, gain_keV=0.01, live_time_s=1.0,
                  real_time_s=1.1)
        seeds["spec.spx"] = ("spec.spx", files("spec.spx"))
        write_bcf(t / "map.bcf", rng.poisson(0.1, (2, 3, 4096)).astype(np.uint16), offset_keV=-0.01,
                  gain_keV=0.01, pixel_um=20.0, live_time_s=1.0, real_time_s=1.2)
        seeds["map.bcf"] = ("map.bcf", files("map.bcf"))
        write_ripple(t / "map.rpl", rng.poisson(2, (2, 3, 4096)).astype(np.uint16),
                     {"ev-per-chan": 10, "depth-origin": 0, "width-scale": 50, "width-units": "um"})
        seeds["map.rpl"] = ("map.rpl", files("map.rpl", "map.raw"))
        seeds["map.raw"] = ("map.raw", files("map.rpl", "map.raw"))
        # Amptek: header, calibration points, data
        body = "\n".join(str(int(c)) for c in rng.poisson(5, 4096))
        amptek = ("<<PMCA SPECTRUM>>\nTAG - live_data_rev1\nDESCRIPTION - fuzz\nGAIN - 2\nTHRESHOLD - 0\n"
                  "LIVE_MODE - 0\nPRESET_TIME - 100\nLIVE_TIME - 99.5\nREAL_TIME - 100.1\n"
                  "START_TIME - 11/25/2026 12:00:00\nSERIAL_NUMBER - 1234\n<<CALIBRATION>>\n"
                  "LABEL - Channel\n100 1.0\n2000 20.0\n<<DATA>>\n" + body + "\n<<END>>\n")
        seeds["amptek.mca"] = ("amptek.mca", {"amptek.mca": amptek.encode()})
        # EMSA/MAS: Y data four values a line (as Bruker writes it) and XY pairs in eV
        counts = rng.poisson(5, 4096)
        head = ("#FORMAT      : EMSA/MAS Spectral Data File\n#VERSION     : 1.0\n#TITLE       : fuzz\n"
                "#NPOINTS     : 4096.0\n#NCOLUMNS    : {cols}\n#XUNITS      : {units}\n"
                "#YUNITS      : Counts\n#DATATYPE    : {kind}\n#XPERCHAN    : {gain}\n#OFFSET      : 0.0\n"
                "#LIVETIME  -s: 1.0\n#REALTIME  -s: 1.1\n#TACTLYR  -cm: 0.045\n#TBEWIND  -cm: 0.00125\n"
                "#ELEVANGLE-dg: 40\n"
                "#SPECTRUM    : \n")
        rows = [", ".join(f"{c:.1f}" for c in counts[i:i + 4]) + "," for i in range(0, 4096, 4)]
        end = "\n#ENDOFDATA   : \n"
        msa = head.format(cols=4.0, units="keV", kind="Y", gain=0.01) + "\n".join(rows) + end
        seeds["spec.msa"] = ("spec.msa", {"spec.msa": msa.encode()})
        pairs = [f"{10.0 * i:.1f}, {c}" for i, c in enumerate(counts)]
        emsa = head.format(cols=1, units="eV", kind="XY", gain=10.0) + "\n".join(pairs) + end
        seeds["spec_xy.emsa"] = ("spec_xy.emsa", {"spec_xy.emsa": emsa.encode()})
    return seeds


def _real_seeds() -> dict[str, Seed]:
    if not REAL.is_dir():
        return {}
    seeds: dict[str, Seed] = {}
    for name in ("Steel.spe", "XRFSpectrum.mca", "xrf_spectra.mca", "srm1832.mca", "axorf4_21kev_i050.xrf",
                 "bruker_m6_jetstream_p059.spx"):
        if (REAL / name).is_file():
            extra = ["Steel.cfg"] if name == "Steel.spe" else []
            seeds[f"real/{name}"] = (name, {n: (REAL / n).read_bytes() for n in [name, *extra]})
    raw = REAL / "roman_fresco_vinca" / "raw_examples" / "prova1_10264_None_1.mca"
    if raw.is_file():
        seeds["real/amptek_prova1.mca"] = (raw.name, {raw.name: raw.read_bytes()})
    for name in ("Fe_50kv_50_ma_Rh_vac_D1.msa", "Zr_50kv_50_ma_Rh_vac_D1.msa"):  # Zr: negative residue
        msa = REAL / "bruker_m4_rh50kv" / "pure_elements" / name
        if msa.is_file():
            seeds[f"real/{name}"] = (msa.name, {msa.name: msa.read_bytes()})
    blank = REAL / "bruker_m4_rh50kv" / "acrylic_blanks" / "20170510_D1_Rh_50kv_100mA_acryl_f2_0.spx"
    if blank.is_file():
        seeds["real/acrylic_blank.spx"] = (blank.name, {blank.name: blank.read_bytes()})
    return seeds


SEEDS: dict[str, Seed] = {**_generated_seeds(), **_real_seeds()}
#: random-content seeds: (file name, text prefix or None for random binary)
RANDOM_SEEDS: dict[str, tuple[str, str | None]] = {
    **{f"random/{s}": (f"fuzz{s}", None) for s in (".h5", ".npy", ".npz", ".spx", ".bcf", ".rpl", ".mca")},
    "random/epics-header.mca": ("fuzz.mca", "VERSION: 3.1\nELEMENTS: 2\nCHANNELS: 4\n"),
    "random/spe-header.spe": ("fuzz.spe", "$SPEC_ID:\n\n$DATA:\n"),
    "random/amptek-header.mca": ("fuzz.mca", "<<PMCA SPECTRUM>>\n"),
    "random/text-header.txt": ("fuzz.txt", "# offset_keV = 0\n# gain_keV = 0.01\n"),
    "random/emsa-header.msa": ("fuzz.msa", "#FORMAT : EMSA/MAS Spectral Data File\n#NPOINTS : 8\n"
                               "#DATATYPE : Y\n#XPERCHAN : 0.01\n#OFFSET : 0\n#SPECTRUM :\n"),
    "random/rpl-header.rpl": ("fuzz.rpl", "width 2\nheight 2\ndepth 8\ndata-length 2\nrecord-by vector\n"),
}


# -- mutations ---------------------------------------------------------------------------------------
NUMBER = re.compile(rb"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?")
EXTREMES = [b"9" * 400, b"-1", b"0", b"nan", b"inf", b"-inf", b"1e309", b"1e-320", b"", b"-0", b"0x10",
            b"99999999999999999999", b"1,5", b"1e5", b"2147483648", b"-9223372036854775809", b"\xff\xfe",
            b"<", b"\x00"]


def _hdf5_chunks(content: bytes) -> list[tuple[int, int]]:
    """(byte offset, size) of every stored chunk of an HDF5 file's datasets."""
    with tempfile.NamedTemporaryFile(suffix=".h5") as tmp:
        tmp.write(content)
        tmp.flush()
        out: list[tuple[int, int]] = []
        with h5py.File(tmp.name, "r") as f:

            def visit(_name: str, obj: h5py.HLObject) -> None:
                if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
                    for i in range(obj.id.get_num_chunks()):
                        info = obj.id.get_chunk_info(i)
                        out.append((info.byte_offset, info.size))

            f.visititems(visit)
    return out


def _overwrite(raw: bytearray, rng: np.random.Generator, lo: int = 0, hi: int | None = None) -> str:
    hi = len(raw) if hi is None else min(hi, len(raw))
    if lo >= hi:  # an earlier mutation cut the region away
        lo, hi = 0, len(raw)
    n = int(rng.integers(1, 9))
    for _ in range(n):
        raw[int(rng.integers(lo, hi))] = int(rng.integers(0, 256))
    return f"overwrite {n} bytes in [{lo}, {hi})"


def _bitflip(raw: bytearray, rng: np.random.Generator) -> str:
    n = int(rng.integers(1, 5))
    for _ in range(n):
        raw[int(rng.integers(len(raw)))] ^= 1 << int(rng.integers(8))
    return f"flip {n} bits"


def _truncate(raw: bytearray, rng: np.random.Generator) -> str:
    cut = int(rng.integers(0, len(raw)))
    del raw[cut:]
    return f"truncate at {cut}"


def _splice(raw: bytearray, rng: np.random.Generator) -> str:
    a = int(rng.integers(len(raw)))
    b = min(len(raw), a + int(rng.integers(1, 257)))
    if rng.random() < 0.5:
        del raw[a:b]
        return f"delete bytes [{a}, {b})"
    raw[a:a] = raw[a:b] * int(rng.integers(1, 4))
    return f"repeat bytes [{a}, {b})"


def _token(raw: bytearray, rng: np.random.Generator) -> str:
    """Replace a number of a text file (half the time one of its first 40 lines: the header) with an
    extreme value, or delete, repeat or swap lines."""
    text = bytes(raw)
    if rng.random() < 0.25:
        lines = text.split(b"\n")
        i, j = (int(k) for k in rng.integers(len(lines), size=2))
        how = ["delete", "repeat", "swap"][int(rng.integers(3))]
        if how == "delete":
            del lines[i]
        elif how == "repeat":
            lines[i:i] = [lines[i]] * int(rng.integers(1, 50))
        else:
            lines[i], lines[j] = lines[j], lines[i]
        raw[:] = b"\n".join(lines)
        return f"{how} line {i}"
    head_end = len(text)
    if rng.random() < 0.5:
        newlines = [k for k, c in enumerate(text[:65536]) if c == 10][:40]
        head_end = newlines[-1] if len(newlines) == 40 else len(text)
    numbers = list(NUMBER.finditer(text, 0, head_end))
    if not numbers:
        return _overwrite(raw, rng)
    m = numbers[int(rng.integers(len(numbers)))]
    value = EXTREMES[int(rng.integers(len(EXTREMES)))]
    raw[m.start() : m.end()] = value
    return f"number {m.group()[:12]!r} at byte {m.start()} -> {value[:12]!r}"


def _npy_header(raw: bytearray, rng: np.random.Generator) -> str:
    """A number of a ``.npy`` header (its shape, say) replaced by an extreme value."""
    end = raw.find(b"\n", 0, 512) + 1 or min(len(raw), 128)
    head = bytearray(raw[:end])
    what = _token(head, rng)
    raw[:end] = head
    return "npy header: " + what


def _rezip(raw: bytearray, rng: np.random.Generator) -> str:
    """One member of a ``.npz`` (ZIP) archive damaged, the archive rebuilt with valid checksums."""
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    k = int(rng.integers(len(members)))
    data = bytearray(members[k][1])
    what = _npy_header(data, rng) if rng.random() < 0.5 else _overwrite(data, rng)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for i, (info, content) in enumerate(members):
            z.writestr(info, bytes(data) if i == k else content)
    raw[:] = buffer.getvalue()
    return f"member {members[k][0].filename}: {what}"


#: values an HDF5 attribute is set to by :func:`_hdf5_edit`
ATTRIBUTE_VALUES = [np.nan, np.inf, -1.0, 0.0, 1e308, 2**62, "x", "", b"\xff", np.arange(3), "{", "[]",
                    "/entry", ".", "../..", "entry/data/counts"]


def _hdf5_edit(raw: bytearray, rng: np.random.Generator) -> str:
    """A structural edit made with h5py: an attribute changed, a dataset replaced, an object removed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edit.h5"
        path.write_bytes(bytes(raw))
        with h5py.File(path, "a") as f:
            objects: list[str] = ["/"]
            f.visit(lambda name: objects.append("/" + name))
            name = objects[int(rng.integers(len(objects)))]
            obj = f[name]
            kind = int(rng.integers(4))
            if kind == 0 or (isinstance(obj, h5py.Group) and kind == 2):
                keys = list(obj.attrs) or ["default"]
                key = keys[int(rng.integers(len(keys)))]
                value = ATTRIBUTE_VALUES[int(rng.integers(len(ATTRIBUTE_VALUES)))]
                obj.attrs[key] = value
                what = f"attribute {name}@{key} = {value!r:.20}"
            elif kind == 1 and name != "/":
                del f[name]
                what = f"deleted {name}"
            elif isinstance(obj, h5py.Dataset):
                shape = [(), (0,), (1,), (5,), (2, 2), (1, 1, 1), (2, 3, 1), (1, 2, 3, 4), (3, 4, 4096)][
                    int(rng.integers(9))]
                dtype = ["u1", "i4", "f4", "f8", "S4", "c8", "?"][int(rng.integers(7))]
                fill = [0, -5, np.nan, np.inf, 2**31][int(rng.integers(5))]
                attrs = dict(obj.attrs)
                del f[name]
                with np.errstate(invalid="ignore", over="ignore"):
                    new = f.create_dataset(name, data=np.full(shape, fill).astype(dtype))
                new.attrs.update(attrs)
                what = f"dataset {name} -> {shape} {dtype} of {fill}"
            else:
                f[name].attrs["signal"] = "counts"
                what = f"attribute {name}@signal = 'counts'"
        raw[:] = path.read_bytes()
    return "h5py: " + what


def _is_text(content: bytes) -> bool:
    return b"\x00" not in content[:4096]


def mutate(name: str, files: dict[str, bytes], rng: np.random.Generator, chunks: list[tuple[int, int]]
           ) -> tuple[dict[str, bytes], str]:
    """A damaged copy of ``files``: one of them changed by one (sometimes two) of the mutations."""
    target = sorted(files)[int(rng.integers(len(files)))]
    raw = bytearray(files[target])
    ops: list[Callable[[], str]] = [lambda: _overwrite(raw, rng), lambda: _bitflip(raw, rng),
                                    lambda: _truncate(raw, rng), lambda: _splice(raw, rng)]
    if _is_text(files[target]):
        ops += [lambda: _token(raw, rng)] * 4
    if target.endswith(".npy"):
        ops += [lambda: _npy_header(raw, rng)] * 2
    if chunks and target.endswith(".h5"):  # compressed chunks and the metadata around them
        def in_chunk() -> str:
            off, size = chunks[int(rng.integers(len(chunks)))]
            return "chunk: " + _overwrite(raw, rng, off, off + size)
        ops += [in_chunk] * 2 + [lambda: "metadata: " + _overwrite(raw, rng, 0, min(len(raw), 4096))] * 2
    # structural edits parse the file here, so they only ever start from the valid seed
    first = [*ops, *[lambda: _rezip(raw, rng)] * 4 * target.endswith(".npz"),
             *[lambda: _hdf5_edit(raw, rng)] * 4 * target.endswith(".h5")]
    done = [first[int(rng.integers(len(first)))]()]
    if raw and rng.random() < 0.2:
        done.append(ops[int(rng.integers(len(ops)))]())
    return {**files, target: bytes(raw)}, f"{target}: " + "; ".join(done)


def random_case(name: str, prefix: str | None, rng: np.random.Generator) -> tuple[dict[str, bytes], str]:
    size = int(rng.integers(0, 2049))
    if prefix is None:
        content = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        if name.endswith(".h5") and rng.random() < 0.5:
            content = b"\x89HDF\r\n\x1a\n" + content
        return {name: content}, f"{size} random bytes"
    alphabet = np.frombuffer(b"0123456789 .-+eE\n#:$<>DATACHNLSV_,naif", dtype=np.uint8)
    text = alphabet[rng.integers(0, alphabet.size, size // 4)].tobytes()
    return {name: prefix.encode() + text}, f"header + {len(text)} random characters"


# -- the worker and one case -------------------------------------------------------------------------
class Worker:
    """The long-lived child process that loads and identifies; restarted after a crash or a timeout."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "XRFNB_PRECISION": "float32",
               "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
        answer = self._read(START_LIMIT_S)
        if answer != {"status": "ready"}:
            raise RuntimeError(f"the fuzz worker did not start ({answer}); see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and its HDF5 check children
        if self.proc is not None:
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
        self.proc = None

    def _read(self, timeout_s: float) -> dict | None:
        assert self.proc is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"status": "died", "returncode": self.proc.wait()}

    def run(self, path: Path, timeout_s: float) -> dict:
        if self.proc is None:
            self.start()
        assert self.proc is not None
        try:
            self.proc.stdin.write((json.dumps({"path": str(path)}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.stop()
            return {"status": "died", "returncode": None}
        answer = self._read(timeout_s)
        if answer is None:
            self.stop()
            return {"status": "timeout"}
        if answer["status"] == "died":
            self.stop()
        return answer


def _snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    out = {}
    for p in sorted(folder.iterdir()):
        st = p.stat()
        out[p.name] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def run_case(worker: Worker, folder: Path, target: str, files: dict[str, bytes],
             outcomes: collections.Counter | None = None) -> str | None:
    """Write the case into ``folder``, load it in the worker; the failure in words, or None.

    ``outcomes`` counts what happened: ``"ok Spectrum"``, ``"FormatError in load"``, ...
    """
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    past = time.time() - 3600.0  # an mtime in the past: a rewrite with the same bytes still shows
    for name in files:
        os.utime(folder / name, (past, past))
    before = _snapshot(folder)
    t0 = time.monotonic()
    answer = worker.run(folder / target, CASE_LIMIT_S)
    elapsed = time.monotonic() - t0
    after = _snapshot(folder)
    if outcomes is not None:
        outcomes[{"ok": f"ok {answer.get('kind')}", "xrfnb": f"{answer.get('type')} in {answer.get('stage')}"}
                 .get(answer["status"], answer["status"])] += 1
    problems = []
    if answer["status"] == "escape":
        problems.append(f"{answer['type']} in {answer['stage']}: {answer['message']}\n{answer['traceback']}")
    elif answer["status"] == "died":
        problems.append(f"the worker died (exit status {answer['returncode']}): crash or memory cap")
    elif answer["status"] == "timeout":
        problems.append(f"no answer within {CASE_LIMIT_S:.0f} s")
    if after != before:
        changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
        problems.append(f"files changed or appeared: {changed}")
    if not problems and elapsed > CASE_LIMIT_S:
        problems.append(f"took {elapsed:.1f} s")
    return "; ".join(problems) or None


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("fuzz-worker") / "stderr.log")
    w.start()
    yield w
    w.stop()


def _fuzz(worker: Worker, tmp: Path, seed_name: str, n_cases: int,
          outcomes: collections.Counter | None = None) -> tuple[int, list[str]]:
    index = sorted([*SEEDS, *RANDOM_SEEDS]).index(seed_name)
    if seed_name in SEEDS:
        target, files = SEEDS[seed_name]
        chunks = _hdf5_chunks(files[target]) if target.endswith(".h5") else []
    failures = []
    for i in range(n_cases):
        rng = np.random.default_rng((SEED, index, i))
        if seed_name in SEEDS:
            case, what = mutate(target, files, rng, chunks)
        else:
            target, prefix = RANDOM_SEEDS[seed_name]
            case, what = random_case(target, prefix, rng)
        folder = tmp / f"case{i:04d}"
        problem = run_case(worker, folder, target, case, outcomes)
        if problem is None:
            shutil.rmtree(folder)
        else:
            failures.append(f"{seed_name} case {i} ({what}; kept in {folder}): {problem}")
    return n_cases, failures


ALL_SEEDS = sorted([*SEEDS, *RANDOM_SEEDS])


def test_every_seed_file_loads_and_is_identified(worker, tmp_path):
    """Mutants start from valid files: each seed loads and is identified or mapped as it is."""
    outcomes = {}
    for name, (target, files) in SEEDS.items():
        counter: collections.Counter = collections.Counter()
        assert run_case(worker, tmp_path / name.replace("/", "_"), target, files, counter) is None
        (outcomes[name],) = counter
    expected = {name: "ok Scan" if name.split("/")[-1].startswith(("scan", "nexus", "map")) else "ok Spectrum"
                for name in SEEDS}
    if "real/XRFSpectrum.mca" in expected:  # states no calibration: the model asks for one
        expected["real/XRFSpectrum.mca"] = "ModelError in identify"
    assert outcomes == expected


@pytest.mark.parametrize("seed_name", ALL_SEEDS)
def test_mutants_load_or_fail_cleanly(worker, tmp_path, seed_name):
    n, failures = _fuzz(worker, tmp_path, seed_name, CASES_DEFAULT)
    assert not failures, f"{len(failures)} of {n} cases failed:\n" + "\n\n".join(failures[:10])


@pytest.mark.slow
@pytest.mark.parametrize("seed_name", ALL_SEEDS)
def test_many_mutants_load_or_fail_cleanly(worker, tmp_path, seed_name):
    n, failures = _fuzz(worker, tmp_path, seed_name, CASES_SLOW)
    assert not failures, f"{len(failures)} of {n} cases failed:\n" + "\n\n".join(failures[:10])


def test_the_harness_sees_escapes_changes_and_hangs(worker, tmp_path, monkeypatch):
    """The failure kinds are reported: an escaped exception, a changed input, a case over time."""
    import _fuzz_worker

    target, good = SEEDS["spec.txt"]
    assert run_case(worker, tmp_path / "good", target, good) is None

    class BrokenModel:
        def identify(self, spectrum):
            raise TypeError("not an XRFNBError")

    escape = _fuzz_worker._handle(str(tmp_path / "good" / target), BrokenModel())
    assert (escape["status"], escape["stage"], escape["type"]) == ("escape", "identify", "TypeError")
    # a change to the input is seen even with the same bytes (only the modification time changes)
    real_run = worker.run

    def run_and_touch(path, timeout_s):
        out = real_run(path, timeout_s)
        os.utime(path)
        return out

    monkeypatch.setattr(worker, "run", run_and_touch)
    assert "files changed or appeared: ['spec.txt']" in run_case(worker, tmp_path / "touched", target, good)
    monkeypatch.undo()
    # a worker that stops answering is cut at the limit, and the next case starts a new one
    os.kill(worker.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    assert worker.run(tmp_path / "good" / target, 2.0) == {"status": "timeout"}
    assert time.monotonic() - t0 < 10 and worker.proc is None
    assert run_case(worker, tmp_path / "after", target, good) is None
