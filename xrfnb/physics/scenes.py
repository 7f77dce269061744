"""Mock-up scans with ground truth: built-in scenes rendered with the physics simulator.

A *scene* is a label image whose labels map to paint stacks. :func:`render_scan` simulates the expected
spectrum of every distinct stack once (fundamental parameters, detector response, pile-up) and then draws
Poisson counts per pixel, so a 128 x 128 x 4096 scan renders in seconds. The ground truth (which pigment,
in which layer, at what weight fraction) is kept per pixel and saved next to the scan in xrfnb's HDF5.

Two scenes are built in, both generated deterministically from the pigment library:

``"mockup-panel"``
    Like a lab-prepared mock-up painting: swatches of each library pigment in linseed oil over a chalk
    ground, binary mixtures, layered pairs with top-layer thickness steps (5, 10, 20, 40 um) and dilution
    steps (1, 5, 20, 50 wt %).
``"hidden-painting"``
    A surface composition painted over a different underlying composition, after Gauguin's *Poèmes
    Barbares* (1896), where X-radiography revealed a landscape with horses and riders under the visible
    picture: an underlying sky, hills, two horses with riders, overpainted by a seated figure, a wall and
    a background in other pigments.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._errors import FormatError, SimulationError
from ..core.spectrum import Scan
from ..io.atomic import atomic_path
from ..io.hdf5 import trust_written_file, write_hdf5
from .instrument import DEFAULT_INSTRUMENT, Instrument, resolve_instrument
from .pigments import PigmentLibrary, pigments
from .sampling import GuideSampler
from .simulate import simulate_batch
from .stack import Layer, Stack

__all__ = ["GroundTruth", "render_scan", "scenes"]

#: Layer index meaning "pigment absent" in :attr:`GroundTruth.layer_index`.
ABSENT = -1


@dataclasses.dataclass(frozen=True, eq=False)
class GroundTruth:
    """What is where in a rendered scene.

    Attributes
    ----------
    scene : str
        Scene name.
    labels : numpy.ndarray
        Label image, shape (rows, cols), int32; label ``k`` is painted with ``stacks[k]``.
    stacks : tuple of Stack
        The paint stack of each label.
    descriptions : tuple of str
        A readable description of each label ("vermilion 10 um over emerald green").
    pigments : tuple of str
        Every library pigment used anywhere in the scene (sorted).
    layer_index : numpy.ndarray
        Shape (rows, cols, n_pigments), int8: index in :attr:`Stack.all_layers` of the top-most layer
        holding the pigment (0 = surface paint layer), or -1 where it is absent.
    weight_fraction : numpy.ndarray
        Shape (rows, cols, n_pigments), float32: the pigment's largest weight fraction in any layer.
    depth_um : numpy.ndarray
        Shape (rows, cols, n_pigments), float32: thickness of paint above the top-most layer holding the
        pigment, micrometres (0 at the surface, NaN where absent).
    """

    scene: str
    labels: np.ndarray
    stacks: tuple[Stack, ...]
    descriptions: tuple[str, ...]
    pigments: tuple[str, ...]
    layer_index: np.ndarray
    weight_fraction: np.ndarray
    depth_um: np.ndarray

    @classmethod
    def from_labels(
        cls, scene: str, labels: np.ndarray, stacks: Sequence[Stack], descriptions: Sequence[str]
    ) -> GroundTruth:
        """Derive the per-pixel arrays from a label image and the stack of each label."""
        labels = np.asarray(labels, dtype=np.int32)
        pigments = sorted(
            {p for s in stacks for layer in s.all_layers for p in layer.pigments if _is_library_pigment(p)}
        )
        index = {p: i for i, p in enumerate(pigments)}
        n_lab, n_pig = len(stacks), len(pigments)
        lay = np.full((n_lab, n_pig), ABSENT, dtype=np.int8)
        frac = np.zeros((n_lab, n_pig), dtype=np.float32)
        depth = np.full((n_lab, n_pig), np.nan, dtype=np.float32)
        for k, s in enumerate(stacks):
            above = 0.0
            for li, layer in enumerate(s.all_layers):
                for p, w in layer.pigments.items():
                    if p not in index or w <= 0:
                        continue
                    j = index[p]
                    if lay[k, j] == ABSENT:
                        lay[k, j] = li
                        depth[k, j] = above
                    frac[k, j] = max(frac[k, j], w)
                above += layer.thickness_um
        return cls(
            scene,
            labels,
            tuple(stacks),
            tuple(descriptions),
            tuple(pigments),
            lay[labels],
            frac[labels],
            depth[labels],
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return tuple(int(s) for s in self.labels.shape)  # type: ignore[return-value]

    def present(self, pigment: str, *, max_depth_um: float = np.inf) -> np.ndarray:
        """Boolean map (rows, cols) of where ``pigment`` lies at most ``max_depth_um`` below the surface."""
        j = self._index(pigment)
        d = self.depth_um[..., j]
        return (self.layer_index[..., j] != ABSENT) & (np.nan_to_num(d, nan=np.inf) <= max_depth_um)

    def surface(self, pigment: str) -> np.ndarray:
        """Boolean map (rows, cols) of where ``pigment`` is in the surface paint layer."""
        return self.layer_index[..., self._index(pigment)] == 0

    def group_maps(
        self, library: PigmentLibrary | None = None
    ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
        """Presence per ambiguity group of the pigment library.

        Returns
        -------
        groups : tuple of str
            Group names present in the scene (sorted).
        present : numpy.ndarray
            (rows, cols, n_groups) bool: some pigment of the group is anywhere in the stack.
        surface : numpy.ndarray
            (rows, cols, n_groups) bool: some pigment of the group is in the surface paint layer.
        """
        lib = library if library is not None else _library()
        group_of = {p: lib[p].group for p in self.pigments}
        groups = tuple(sorted(set(group_of.values())))
        present = np.zeros((*self.shape, len(groups)), dtype=bool)
        surface = np.zeros_like(present)
        for j, p in enumerate(self.pigments):
            g = groups.index(group_of[p])
            present[..., g] |= self.layer_index[..., j] != ABSENT
            surface[..., g] |= self.layer_index[..., j] == 0
        return groups, present, surface

    def _index(self, pigment: str) -> int:
        try:
            return self.pigments.index(pigment)
        except ValueError:
            raise SimulationError(
                f"pigment {pigment!r} is not in scene {self.scene!r}; it has {', '.join(self.pigments)}"
            ) from None

    # -- HDF5 ------------------------------------------------------------------------------------
    def write(self, group: h5py.Group) -> None:
        """Write into an (empty) HDF5 group."""
        group.attrs["scene"] = self.scene
        group.attrs["pigments"] = json.dumps(list(self.pigments))
        group.attrs["descriptions"] = json.dumps(list(self.descriptions))
        group.attrs["stacks"] = json.dumps([_stack_to_dict(s) for s in self.stacks])
        opts = {"compression": "gzip", "shuffle": True}
        group.create_dataset("labels", data=self.labels, **opts)
        group.create_dataset("layer_index", data=self.layer_index, **opts)
        group.create_dataset("weight_fraction", data=self.weight_fraction, **opts)
        d = group.create_dataset("depth_um", data=self.depth_um, **opts)
        d.attrs["units"] = "um"

    @classmethod
    def read(cls, group: h5py.Group) -> GroundTruth:
        """Read what :meth:`write` wrote."""
        try:
            stacks = tuple(_stack_from_dict(d) for d in json.loads(group.attrs["stacks"]))
            return cls(
                str(group.attrs["scene"]),
                group["labels"][()],
                stacks,
                tuple(json.loads(group.attrs["descriptions"])),
                tuple(json.loads(group.attrs["pigments"])),
                group["layer_index"][()],
                group["weight_fraction"][()],
                group["depth_um"][()],
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(
                f"{group.file.filename}:{group.name}: not an xrfnb ground-truth group ({exc})"
            ) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GroundTruth:
        """Read the ground truth saved by :func:`render_scan` next to a scan (``/entry/ground_truth``)."""
        try:
            with h5py.File(path, "r") as f:
                if "entry/ground_truth" not in f:
                    raise FormatError(f"{path}: has no /entry/ground_truth group (not a rendered scene)")
                return cls.read(f["entry/ground_truth"])
        except OSError as exc:
            raise FormatError(f"{path}: cannot open as HDF5 ({exc})") from None


def _library() -> PigmentLibrary:
    return pigments()


def _is_library_pigment(name: str) -> bool:
    try:
        _library()[name]
    except Exception:
        return False
    return True


def _layer_to_dict(layer: Layer) -> dict[str, Any]:
    return {
        "pigments": dict(layer.pigments),
        "binder": layer.binder,
        "thickness_um": layer.thickness_um,
        "density_g_cm3": layer.density_g_cm3,
        "binder_fraction": layer.binder_fraction,
        "name": layer.name,
    }


def _stack_to_dict(stack: Stack) -> dict[str, Any]:
    return {
        "layers": [_layer_to_dict(x) for x in stack.layers],
        "ground": None if stack.ground is None else _layer_to_dict(stack.ground),
        "substrate": None if stack.substrate is None else _layer_to_dict(stack.substrate),
    }


def _stack_from_dict(d: dict[str, Any]) -> Stack:
    def layer(x: dict[str, Any] | None) -> Layer | None:
        return None if x is None else Layer(**x)

    return Stack(
        [Layer(**x) for x in d["layers"]], ground=layer(d["ground"]), substrate=layer(d["substrate"])
    )


# -- scene definitions ----------------------------------------------------------------------------------

GROUND_UM = 150.0
SWATCH_UM = 30.0
PIGMENT_FRACTION = 0.7  # pigment weight fraction of a pure oil paint swatch (PVC typical of oil paint)


def _ground() -> Layer:
    return Layer({"chalk": 0.9}, binder="animal glue", thickness_um=GROUND_UM, name="chalk ground")


def _paint(pigments: dict[str, float], thickness_um: float = SWATCH_UM, name: str = "") -> Layer:
    return Layer(pigments, binder="linseed oil", thickness_um=thickness_um, name=name)


def _mockup_panel(rows: int, cols: int) -> tuple[np.ndarray, list[Stack], list[str]]:
    lib = _library()
    names = [p.name for p in lib]
    cells: list[tuple[Stack, str]] = []
    for p in names:  # pure swatches, XRF-silent ones included
        cells.append((Stack([_paint({p: PIGMENT_FRACTION})], ground=_ground()), f"{p} swatch"))
    mixtures = [
        ("lead white", "vermilion"),
        ("lead white", "ultramarine"),
        ("lead white", "prussian blue"),
        ("zinc white", "cobalt blue"),
        ("chrome yellow", "prussian blue"),
        ("yellow ochre", "viridian"),
        ("vermilion", "madder lake"),
        ("emerald green", "lead white"),
        ("cadmium yellow", "zinc white"),
        ("naples yellow", "red ochre"),
        ("azurite", "lead-tin yellow type i"),
        ("cerulean blue", "titanium white"),
        ("bone black", "lead white"),
        ("smalt", "red lead"),
    ]
    for a, b in mixtures:
        cells.append(
            (
                Stack([_paint({a: PIGMENT_FRACTION / 2, b: PIGMENT_FRACTION / 2})], ground=_ground()),
                f"{a} + {b} (1:1)",
            )
        )
    layered = [
        ("lead white", "vermilion"),
        ("ultramarine", "lead white"),
        ("chrome yellow", "cobalt blue"),
        ("zinc white", "emerald green"),
        ("prussian blue", "naples yellow"),
        ("cadmium yellow", "smalt"),
    ]
    for top, below in layered:
        for t in (5.0, 10.0, 20.0, 40.0):
            cells.append(
                (
                    Stack(
                        [_paint({top: PIGMENT_FRACTION}, t, "top"), _paint({below: PIGMENT_FRACTION})],
                        ground=_ground(),
                    ),
                    f"{top} {t:g} um over {below}",
                )
            )
    for p in (
        "vermilion",
        "cobalt blue",
        "emerald green",
        "chrome yellow",
        "cadmium yellow",
        "naples yellow",
        "zinc white",
        "strontium yellow",
    ):
        for pct in (1, 5, 20, 50):
            w = pct / 100  # of the dry layer; chalk extender and oil make up the rest
            cells.append(
                (
                    Stack([_paint({p: w, "chalk": PIGMENT_FRACTION - w})], ground=_ground()),
                    f"{p} {pct} wt % in chalk",
                )
            )
    return _grid(rows, cols, cells)


def _grid(rows: int, cols: int, cells: list[tuple[Stack, str]]) -> tuple[np.ndarray, list[Stack], list[str]]:
    """Lay cells out on a square grid with a 1-pixel bare-ground gutter (label 0)."""
    n = len(cells)
    side = int(np.ceil(np.sqrt(n)))
    cell_h, cell_w = rows / side, cols / side
    if cell_h < 3 or cell_w < 3:
        raise SimulationError(
            f"a {rows} x {cols} scan is too small for {n} swatches: use at least "
            f"{3 * side} x {3 * side} pixels"
        )
    labels = np.zeros((rows, cols), dtype=np.int32)
    r_idx = np.arange(rows)
    c_idx = np.arange(cols)
    for k in range(n):
        i, j = divmod(k, side)
        r0, r1 = round(i * cell_h) + 1, round((i + 1) * cell_h)
        c0, c1 = round(j * cell_w) + 1, round((j + 1) * cell_w)
        labels[np.ix_((r_idx >= r0) & (r_idx < r1), (c_idx >= c0) & (c_idx < c1))] = k + 1
    bare = Stack([_paint({"chalk": 0.05}, 2.0, "size")], ground=_ground())
    stacks = [bare] + [s for s, _ in cells]
    desc = ["bare chalk ground"] + [d for _, d in cells]
    return labels, stacks, desc


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _hidden_painting(rows: int, cols: int) -> tuple[np.ndarray, list[Stack], list[str]]:
    yy, xx = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    # underlying landscape: sky, hills, two horses with riders
    under = np.zeros((rows, cols), dtype=np.int32)  # 0 sky
    hill = yy > 0.45 + 0.08 * np.sin(2 * np.pi * xx * 1.5)
    under[hill] = 1
    horse = np.zeros_like(hill)
    rider = np.zeros_like(hill)
    for cx, cy in ((0.3, 0.62), (0.68, 0.66)):
        body = _ellipse(yy, xx, cy, cx, 0.06, 0.12)
        neck = _ellipse(yy, xx, cy - 0.08, cx + 0.11, 0.07, 0.035)
        legs = np.zeros_like(body)
        for dx in (-0.09, -0.05, 0.05, 0.09):
            legs |= (np.abs(xx - (cx + dx)) < 0.012) & (yy > cy) & (yy < cy + 0.15)
        horse |= body | neck | legs
        rider |= _ellipse(yy, xx, cy - 0.12, cx - 0.01, 0.07, 0.03) | _ellipse(
            yy, xx, cy - 0.21, cx, 0.03, 0.025
        )
    under[horse] = 2
    under[rider] = 3
    under_layers = [
        _paint({"lead white": 0.45, "cobalt blue": 0.25}, 25, "sky"),
        _paint({"emerald green": 0.5, "yellow ochre": 0.2}, 25, "hills"),
        _paint({"red ochre": 0.4, "lead white": 0.3}, 25, "horses"),
        _paint({"vermilion": 0.6}, 25, "riders"),
    ]
    under_names = [
        "sky (lead white + cobalt blue)",
        "hills (emerald green + yellow ochre)",
        "horses (red ochre + lead white)",
        "riders (vermilion)",
    ]
    # surface picture: background, a wall band, a seated figure with a red cloth
    surf = np.zeros((rows, cols), dtype=np.int32)  # 0 background
    surf[(yy > 0.75)] = 1  # wall / floor band
    figure = _ellipse(yy, xx, 0.45, 0.5, 0.3, 0.13) | _ellipse(yy, xx, 0.14, 0.5, 0.07, 0.055)
    surf[figure] = 2
    cloth = figure & (yy > 0.5) & (yy < 0.68)
    surf[cloth] = 3
    surface_layers = [
        _paint({"chrome yellow": 0.3, "zinc white": 0.3}, 12, "background"),
        _paint({"prussian blue": 0.15, "zinc white": 0.45}, 15, "wall"),
        _paint({"cadmium yellow": 0.2, "mars red": 0.15, "zinc white": 0.3}, 10, "figure"),
        _paint({"madder lake": 0.2, "cadmium red": 0.3, "zinc white": 0.2}, 10, "cloth"),
    ]
    surface_names = [
        "background (chrome yellow + zinc white)",
        "wall (prussian blue + zinc white)",
        "figure (cadmium yellow + mars red + zinc white)",
        "cloth (madder lake + cadmium red + zinc white)",
    ]
    combo = surf * len(under_layers) + under
    labels = np.zeros_like(combo)
    stacks: list[Stack] = []
    desc: list[str] = []
    for k, code in enumerate(np.unique(combo)):
        s, u = divmod(int(code), len(under_layers))
        labels[combo == code] = k
        stacks.append(Stack([surface_layers[s], under_layers[u]], ground=_ground()))
        desc.append(f"{surface_names[s]} over {under_names[u]}")
    return labels, stacks, desc


_SCENES: dict[str, Callable[[int, int], tuple[np.ndarray, list[Stack], list[str]]]] = {
    "mockup-panel": _mockup_panel,
    "hidden-painting": _hidden_painting,
}


def scenes() -> tuple[str, ...]:
    """Names of the built-in scenes."""
    return tuple(_SCENES)


def render_scan(
    scene: str | tuple[np.ndarray, Sequence[Stack]],
    instrument: Instrument | str = DEFAULT_INSTRUMENT,
    *,
    shape: tuple[int, int] = (128, 128),
    counts_per_pixel: float = 1500.0,
    counts_spread: float = 0.15,
    pixel_size_um: float = 500.0,
    rng: np.random.Generator | int | None = 0,
    path: str | os.PathLike[str] | None = None,
) -> tuple[Scan, GroundTruth]:
    """Render a scene into a simulated scan with per-pixel ground truth.

    Parameters
    ----------
    scene : str or (labels, stacks)
        A built-in scene name (see :func:`scenes`) or a custom scene: a label image (rows, cols) of ints
        and the stack of each label.
    instrument : Instrument or str, optional
        The instrument, or a preset name (default ``"bruker-m6"``).
    shape : (int, int), optional
        (rows, cols) of a built-in scene.
    counts_per_pixel : float, optional
        Mean total counts per pixel spectrum (macro-XRF: hundreds to a few thousand).
    counts_spread : float, optional
        Relative pixel-to-pixel spread (log-normal sigma) of the counts, as from surface relief and
        tube-current drift.
    pixel_size_um : float, optional
        Pixel pitch, micrometres.
    rng : numpy.random.Generator or int, optional
        Random generator or seed (default 0: deterministic).
    path : path-like, optional
        If given, save the scan and the ground truth (``/entry/ground_truth``) in xrfnb's HDF5, atomically.

    Returns
    -------
    scan : Scan
        Counts (rows, cols, channels) uint16, with the instrument's calibration and a per-pixel live time.
    truth : GroundTruth
        Which pigment is where and in which layer.
    """
    inst = resolve_instrument(instrument)
    if isinstance(scene, str):
        if scene not in _SCENES:
            raise SimulationError(f"unknown scene {scene!r}; built-in scenes: {', '.join(_SCENES)}")
        rows, cols = (int(v) for v in shape)
        labels, stacks, desc = _SCENES[scene](rows, cols)
        name = scene
    else:
        labels, stacks = scene
        labels = np.asarray(labels, dtype=np.int32)
        stacks = list(stacks)
        if labels.ndim != 2 or labels.min() < 0 or labels.max() >= len(stacks):
            raise SimulationError("a custom scene needs a 2-D label image with labels 0 .. len(stacks)-1")
        desc = [repr(s) for s in stacks]
        name = "custom"
    if not counts_per_pixel > 0:
        raise SimulationError(f"counts_per_pixel must be > 0, got {counts_per_pixel!r}")

    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    rows, cols = labels.shape
    # expected spectrum of every label once (per second of live time, with within-layer secondary
    # fluorescence and pile-up at that label's count rate), then photon events per pixel
    expected = simulate_batch(stacks, inst, noise=False, secondary=True, dtype=np.float64)
    rate_cps = expected.sum(axis=1)
    if np.any(rate_cps <= 0):
        raise SimulationError("a scene stack gives no detected photons with this instrument")
    expected = inst.detector_response().pileup(expected, rate_cps)
    sampler = GuideSampler(expected)
    n_pix = gen.lognormal(np.log(counts_per_pixel), counts_spread, size=(rows, cols))
    n_ch = inst.n_channels
    counts = np.empty((rows, cols, n_ch), dtype=np.uint16)
    for r0 in range(0, rows, 16):  # blocks of rows bound the event buffers
        lab = labels[r0 : r0 + 16].ravel()
        n_events = gen.poisson(n_pix[r0 : r0 + 16].ravel())
        channel = sampler.sample(np.repeat(lab.astype(np.int32), n_events), gen).astype(np.int64)
        channel += np.repeat(np.arange(lab.size, dtype=np.int64) * n_ch, n_events)
        block = np.bincount(channel, minlength=lab.size * n_ch)
        counts[r0 : r0 + 16] = np.minimum(block, np.iinfo(np.uint16).max).reshape(-1, cols, n_ch)
    live_time_s = (n_pix / rate_cps[labels]).astype(np.float64)
    meta = {
        "source": f"simulated scene {name!r}",
        "simulated": True,
        "scene": name,
        "instrument": getattr(inst, "name", None),
        "counts_per_pixel": float(counts_per_pixel),
    }
    scan = Scan(counts, inst.calibration, pixel_size_um=pixel_size_um, live_time_s=live_time_s, metadata=meta)
    truth = GroundTruth.from_labels(name, labels, stacks, desc)
    if path is not None:
        _save_scene(scan, truth, Path(path))
    return scan, truth


def _save_scene(scan: Scan, truth: GroundTruth, path: Path) -> None:
    with atomic_path(path) as tmp:
        write_hdf5(scan, tmp)
        with h5py.File(tmp, "a") as f:
            truth.write(f["entry"].create_group("ground_truth"))
    trust_written_file(path)
