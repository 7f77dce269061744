"""Training and calibration of pigment-identification models (evaluation: :mod:`xrfnb.model.evaluate`).

``train_model(config, out_dir)`` trains a :class:`~xrfnb.model.nn.PigmentNet` on spectra simulated on the fly
(:mod:`xrfnb.model.trainingdata`), then calibrates it on a validation set from another seed:

1. temperature scaling of the per-class three-way softmax (minimum validation cross-entropy);
2. per-class decision thresholds maximising validation F1 of "present within the probed depth";
3. out-of-distribution statistics: mean and covariance of the last hidden features (first half of the
   validation set) and the 99th percentiles of the unexplained-peak fraction and of the Mahalanobis distance
   and of the combined score (second half), see :mod:`xrfnb.model.model`.

Training is reproducible: batch ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` and torch is
seeded, so a resumed run sees the same data as an uninterrupted one. The number of optimisation steps is
``max_steps``, reduced so that the run fits ``time_budget_min``: planned again at every step from step 40
(from the speed since step 20, then since step 100) and fixed at step 400; the fixed number is stored in the
checkpoint, so a resumed run keeps the same learning-rate schedule.

Checkpoints (``out_dir/checkpoint/state.safetensors`` + ``state.json``) hold the network, the optimiser
state and the step, every ``checkpoint_every`` steps and on Ctrl-C; ``resume=True`` continues from them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from .._errors import ModelError
from ..core.calls import is_buried, is_present
from .model import PigmentModel, load_model
from .nn import PigmentNet, factor_first_layer, features_from_binned
from .trainingdata import DataConfig, TrainingData

if TYPE_CHECKING:
    from multiprocessing.pool import AsyncResult

__all__ = [
    "GROUP_SIZE",
    "ModelConfig",
    "OptimConfig",
    "TrainingConfig",
    "best_f1_thresholds",
    "calibrate_model",
    "config_from_table",
    "factor_model",
    "fit_temperature",
    "load_config",
    "n_groups",
    "prf",
    "recalibrate_model",
    "train_model",
    "validation_set",
]

_C = TypeVar("_C")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Network and input grid.

    Attributes
    ----------
    n_bins, e_min_keV, e_max_keV, grid_noise_keV
        The model's energy grid (see :func:`xrfnb.model.nn.energy_grid_edges_keV`).
    conv_channels, kernel, hidden, dropout
        :class:`xrfnb.model.nn.PigmentNet` arguments.
    rank : int
        0: a full first fully connected layer. Otherwise it is factored to this rank
        (:class:`~xrfnb.model.nn.PigmentNet`); a full layer loaded by ``optim.init_from`` is factored
        first, fitted to the run's validation spectra (:func:`~xrfnb.model.nn.factor_first_layer`).
    """

    n_bins: int = 512
    e_min_keV: float = 1.0
    e_max_keV: float = 41.0
    grid_noise_keV: float = 0.08
    conv_channels: int = 8
    kernel: int = 7
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.1
    rank: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimisation.

    Attributes
    ----------
    seed : int
        Seed of the training data and of torch.
    val_seed : int
        Seed of the validation set used for calibration (never the evaluation seeds).
    batch_size : int
        Spectra per step.
    max_steps : int
        Upper bound on optimisation steps.
    time_budget_min : float
        Wall-clock budget of the optimisation in minutes (calibration comes on top, about a minute).
    lr, weight_decay : float
        AdamW learning rate (peak of the one-cycle schedule) and weight decay.
    warmup_frac : float
        Fraction of the steps with a linearly rising learning rate.
    n_val : int
        Validation spectra for calibration.
    checkpoint_every : int
        Steps between checkpoints.
    threads : int
        torch threads (0: leave torch's default).
    workers : int
        Processes simulating training batches ahead of the optimiser (0: simulate in the main process).
    reuse : int
        Optimisation steps per simulated batch (> 1 when simulation is the bottleneck).
    init_from : str
        Fine-tuning: a model folder (``model.safetensors``) or a training checkpoint folder
        (``state.safetensors``) whose network weights initialise a new run (same ``[model]`` table
        required); the optimiser and the learning-rate schedule start afresh. A relative path is taken
        relative to the working directory. Empty (default): random initialisation. Ignored on resume
        (the checkpoint holds the weights).
    """

    seed: int = 1
    val_seed: int = 1_000_001
    batch_size: int = 256
    max_steps: int = 20000
    time_budget_min: float = 30.0
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.03
    n_val: int = 4096
    checkpoint_every: int = 200
    threads: int = 0
    workers: int = 1
    reuse: int = 1
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Everything that defines a training run (read from TOML by :func:`load_config`)."""

    name: str = "xrfnb-pigments"
    model: ModelConfig = ModelConfig()
    data: DataConfig | None = None  # load_config fills it
    optim: OptimConfig = OptimConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (for model.json)."""
        return {
            "name": self.name,
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "optim": dataclasses.asdict(self.optim),
        }


def config_from_table(cls: type[_C], table: Mapping[str, Any], where: str) -> _C:
    """A config dataclass from a TOML table (lists become tuples).

    Parameters
    ----------
    cls : type
        The dataclass (:class:`ModelConfig`, :class:`OptimConfig`, :class:`DataConfig` ...).
    table : mapping
        Its fields by name.
    where : str
        Where the table comes from (a file and table name), for the messages.

    Returns
    -------
    The dataclass instance.

    Raises
    ------
    ModelError
        Unknown keys, or values the dataclass refuses.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ModelError(f"{where}: unknown keys {unknown}; known keys: {sorted(fields)}")
    kwargs = {}
    for k, v in table.items():
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: {exc}") from None


def load_config(
    config: str | os.PathLike | Mapping[str, Any] | TrainingConfig | None = None,
) -> TrainingConfig:
    """Read a training configuration.

    Parameters
    ----------
    config : path, mapping, TrainingConfig or None
        A TOML file with tables ``[model]``, ``[data]``, ``[optim]`` and a top-level ``name``; a mapping of
        the same shape; or None for the shipped default (``xrfnb/data/train_default.toml``).

    Raises
    ------
    ModelError
        Unreadable file or unknown keys (the message lists the known ones).
    """
    if isinstance(config, TrainingConfig):
        return config
    where = "training config"
    if config is None:
        import importlib.resources

        text = importlib.resources.files("xrfnb").joinpath("data", "train_default.toml").read_text("utf-8")
        table = tomllib.loads(text)
        where = "train_default.toml"
    elif isinstance(config, Mapping):
        table = dict(config)
    else:
        path = Path(config)
        where = str(path)
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"training config {path} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ModelError(f"cannot read training config {path}: {exc}") from None
    unknown = sorted(set(table) - {"name", "model", "data", "optim"})
    if unknown:
        raise ModelError(f"{where}: unknown sections {unknown}; expected name, [model], [data], [optim]")
    return TrainingConfig(
        name=str(table.get("name", "xrfnb-pigments")),
        model=config_from_table(ModelConfig, table.get("model", {}), f"{where} [model]"),
        data=config_from_table(DataConfig, table.get("data", {}), f"{where} [data]"),
        optim=config_from_table(OptimConfig, table.get("optim", {}), f"{where} [optim]"),
    )


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, net: PigmentNet, opt: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for key, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"opt.{idx}.{key}"] = t.detach().contiguous().reshape(t.shape)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(folder / "state.safetensors.tmp"))
    state = {**state, "param_groups": osd["param_groups"]}
    (folder / "state.json.tmp").write_text(json.dumps(state, indent=1), encoding="utf-8")
    os.replace(folder / "state.safetensors.tmp", folder / "state.safetensors")
    os.replace(folder / "state.json.tmp", folder / "state.json")


def _init_weights(
    net: PigmentNet, source: str | os.PathLike, validation: Callable[[], np.ndarray] | None = None
) -> Path:
    """Load the network weights of a model folder or checkpoint folder into ``net`` (strict).

    A full first layer loaded into a factored ``net`` (``net.rank``) is factored first
    (:func:`~xrfnb.model.nn.factor_first_layer`), fitted to the spectra ``validation()`` returns; a factored
    one loaded into a full ``net`` becomes the product of its factors (the same function, and the full
    layer's cost: use :attr:`PigmentModel.network_config` as ``[model]`` to keep the rank).
    """
    from safetensors.torch import load_file

    src = Path(source)
    candidates = [src] if src.is_file() else [src / "model.safetensors", src / "state.safetensors",
                                             src / "checkpoint" / "state.safetensors"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise ModelError(f"init_from: no model.safetensors or checkpoint/state.safetensors in {src}")
    try:
        tensors = load_file(str(path))
        state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        if net.rank and "project.weight" not in state and validation is not None:
            full = PigmentNet(net.n_bins, net.n_classes, conv_channels=net.conv_channels, kernel=net.kernel,
                              hidden=net.hidden)
            full.load_state_dict(state, strict=True)
            state = factor_first_layer(full, validation(), net.rank).state_dict()
        elif not net.rank and "project.weight" in state:
            # a factored source into a full layer: the product of its factors is the same function
            state = dict(state)
            state["mlp.0.weight"] = state["mlp.0.weight"] @ state.pop("project.weight")
        net.load_state_dict(state, strict=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"init_from: cannot load the weights of {path} into this [model] ({exc})") from None
    return path


def _load_checkpoint(folder: Path, net: PigmentNet, opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / "state.safetensors"))
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot resume: checkpoint in {folder} is missing or unreadable ({exc})") from None
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt.") and "." in k[4:]:
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return state


# ---------------------------------------------------------------------------------------------------------
# calibration helpers
# ---------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def _forward_all(net: PigmentNet, binned: np.ndarray, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    logits, feats = [], []
    for i in range(0, binned.shape[0], chunk):
        x, lc = features_from_binned(torch.from_numpy(binned[i : i + chunk]))
        lg, f = net(x, lc)
        logits.append(lg)
        feats.append(f)
    return torch.cat(logits), torch.cat(feats)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising the cross-entropy of ``softmax(logits / T)``, shape (n, K, 3) vs (n, K)."""
    grid = np.exp(np.linspace(np.log(0.4), np.log(4.0), 61))
    flat = logits.reshape(-1, 3)
    y = labels.reshape(-1).long()
    losses = [float(torch.nn.functional.cross_entropy(flat / t, y)) for t in grid]
    return float(grid[int(np.argmin(losses))])


def best_f1_thresholds(prob: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-class threshold in [0.05, 0.95] maximising F1 (0.5 for classes without positives), shape (K,)."""
    cand = np.linspace(0.05, 0.95, 91)
    out = np.full(prob.shape[1], 0.5, dtype=np.float32)
    for k in range(prob.shape[1]):
        t = truth[:, k]
        if t.sum() == 0:
            continue
        pred = prob[:, k][:, None] >= cand[None, :]
        tp = (pred & t[:, None]).sum(0)
        fp = (pred & ~t[:, None]).sum(0)
        fn = (~pred & t[:, None]).sum(0)
        f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        # among near-best thresholds take the middle one (robust to a different test distribution)
        best = np.flatnonzero(f1 >= f1.max() - 1e-3)
        out[k] = cand[best[len(best) // 2]]
    return out


def prf(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support of bool (n, K) predictions; empty classes give NaN."""
    tp = (pred & truth).sum(0).astype(float)
    fp = (pred & ~truth).sum(0).astype(float)
    fn = (~pred & truth).sum(0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.where(fn > 0, 0.0, np.nan))
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return {"precision": precision, "recall": recall, "f1": f1, "support": (tp + fn).astype(int)}


# ---------------------------------------------------------------------------------------------------------
# batches, optionally simulated in worker processes
# ---------------------------------------------------------------------------------------------------------
_WORKER_DATA: TrainingData | None = None


def _worker_init(data_cfg: DataConfig, grid: dict[str, Any]) -> None:
    global _WORKER_DATA

    # a forked worker inherits the parent's handlers (the CLI turns SIGTERM into KeyboardInterrupt): the
    # pool ends its workers with SIGTERM, which must end them quietly, and Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    _WORKER_DATA = TrainingData(data_cfg, **grid)


def _worker_batch(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, step, batch_size = args
    return _WORKER_DATA.batch(batch_size, np.random.default_rng([seed, step]))


class _BatchStream:
    """Training batches ``step, step + 1, ...``; with workers, simulated ahead in other processes.

    Batch ``i`` always comes from ``default_rng([seed, i])``, whichever process draws it.
    """

    def __init__(self, data: TrainingData, data_cfg: DataConfig, grid: dict[str, Any], seed: int,
                 batch_size: int, workers: int, reuse: int = 1, prefetch: int = 3) -> None:
        self.data, self.seed, self.batch_size = data, seed, batch_size
        self.reuse = max(1, int(reuse))
        self.last: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None
        self.pool = None
        self.pending: list[AsyncResult[tuple[np.ndarray, np.ndarray]]] = []
        self.prefetch = max(1, prefetch) * max(1, workers)
        if workers > 0:
            import multiprocessing as mp

            # not "fork": a process that has already run torch (a loaded model, PigmentModel.adapt, a
            # notebook) holds an OpenMP thread pool, and a forked child's first parallel region then waits
            # forever on it (GNU libgomp is not fork-safe). The fork server is a fresh process.
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
            self.pool = ctx.Pool(workers, initializer=_worker_init, initargs=(data_cfg, grid))

    def start(self, step: int) -> None:
        self.next_step = step // self.reuse
        if self.pool is not None:
            for _ in range(self.prefetch):
                self._submit()

    def _submit(self) -> None:
        args = (self.seed, self.next_step, self.batch_size)
        self.pending.append(self.pool.apply_async(_worker_batch, (args,)))
        self.next_step += 1

    def get(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch for optimisation step ``step`` (simulated batch ``step // reuse``)."""
        index = step // self.reuse
        if self.last is not None and self.last[0] == index:
            return self.last[1]
        if self.pool is None:
            res = self.data.batch(self.batch_size, np.random.default_rng([self.seed, index]))
        else:
            res = self.pending.pop(0).get()
            self._submit()
        self.last = (index, res)
        return res

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------
def _lr_factor(step: int, total: int, warmup_frac: float) -> float:
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    prog = min(1.0, (step - warm) / max(1, total - warm))
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * prog))


def train_model(
    config: str | os.PathLike | Mapping[str, Any] | TrainingConfig | None,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
) -> PigmentModel:
    """Train, calibrate and save a pigment-identification model.

    Parameters
    ----------
    config : path, mapping, TrainingConfig or None
        Training configuration (see :func:`load_config`; None = shipped default).
    out_dir : path
        Output folder; receives ``model.safetensors``, ``model.json``, ``train_log.jsonl`` and
        ``checkpoint/``.
    resume : bool
        Continue from ``out_dir/checkpoint`` (same config required).
    progress : bool
        Show a tqdm progress bar on stderr.

    Returns
    -------
    PigmentModel
        The calibrated model (also saved in ``out_dir``).

    Raises
    ------
    ModelError
        Bad configuration, an existing run in ``out_dir`` without ``resume``, or an unusable checkpoint.
    """
    cfg = load_config(config)
    if cfg.data is None:
        raise ModelError("training config has no [data] table")
    out = Path(out_dir)
    ckpt_dir = out / "checkpoint"
    if (ckpt_dir / "state.json").exists() and not resume:
        raise ModelError(
            f"{out} already holds a training checkpoint: pass resume=True (--resume) or another --out"
        )
    if resume and not (ckpt_dir / "state.json").exists():
        raise ModelError(f"cannot resume: {ckpt_dir} holds no checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.optim.threads > 0:
        torch.set_num_threads(cfg.optim.threads)
    torch.manual_seed(cfg.optim.seed)
    mc = cfg.model
    data = _training_data(cfg)
    k = len(data.classes)
    net = PigmentNet(mc.n_bins, k, conv_channels=mc.conv_channels, kernel=mc.kernel, hidden=mc.hidden,
                     dropout=mc.dropout, rank=mc.rank)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    state: dict[str, Any] = {"step": 0, "planned_steps": None, "elapsed_s": 0.0, "config": cfg.to_dict()}
    if cfg.optim.init_from and not resume:
        state["init_from"] = str(
            _init_weights(net, cfg.optim.init_from, lambda: validation_set(data, cfg)[0])
        )
    if resume:
        state = _load_checkpoint(ckpt_dir, net, opt)
        if state.get("config") != json.loads(json.dumps(cfg.to_dict())):
            raise ModelError(
                f"cannot resume: the config differs from the one of the checkpoint in {ckpt_dir}"
            )
    log_path = out / "train_log.jsonl"
    step = int(state["step"])
    planned = int(state["planned_steps"] or cfg.optim.max_steps)
    budget_s = 60.0 * cfg.optim.time_budget_min
    grid = {"n_bins": mc.n_bins, "e_min_keV": mc.e_min_keV, "e_max_keV": mc.e_max_keV,
            "grid_noise_keV": mc.grid_noise_keV}
    stream = _BatchStream(data, cfg.data, grid, cfg.optim.seed, cfg.optim.batch_size, cfg.optim.workers,
                          cfg.optim.reuse)
    stream.start(step)
    bar = tqdm(total=planned, initial=step, disable=not progress, desc=f"training {cfg.name}", unit="step")
    loss_ema: float | None = state.get("loss_ema")
    t0 = time.perf_counter() - float(state["elapsed_s"])
    t_marks: dict[int, float] = {}  # step -> elapsed s, the starts of the speed windows
    net.train()
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            while step < planned:
                binned, labels = stream.get(step)
                for g in opt.param_groups:
                    g["lr"] = cfg.optim.lr * _lr_factor(step, planned, cfg.optim.warmup_frac)
                x, lc = features_from_binned(torch.from_numpy(binned))
                logits, _ = net(x, lc)
                target = torch.from_numpy(labels).reshape(-1)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                lv = float(loss.detach())
                loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
                elapsed = time.perf_counter() - t0
                # fit the run into the time budget: planned again at every step from step 40 on, from
                # the speed since step 20 (after start-up), from step 140 on from the speed since step 100
                # (worker processes warmed up, prefetch queue in its steady state), and fixed at step 400
                # (kept in the checkpoint: a resumed run keeps its learning-rate schedule). Not fixed
                # earlier: the first steps of a new instrument are slow while the workers build its
                # tables (about 1 s against 0.2 s later), and a plan fixed from them ended adaptations
                # after a third of their budget. A run resumed inside a timing window plans from its
                # mean speed so far.
                if state["planned_steps"] is None and step in (20, 100):
                    t_marks[step] = elapsed
                if state["planned_steps"] is None and step >= 40:
                    mark = 100 if step >= 140 and 100 in t_marks else 20 if 20 in t_marks else 0
                    since = t_marks.get(mark, 0.0)
                    per_step = (elapsed - since) / (step - mark)
                    planned = int(min(cfg.optim.max_steps, max(60, step + (budget_s - elapsed) / per_step)))
                    if step >= 400:
                        state["planned_steps"] = planned
                    if bar.total != planned:
                        bar.total = planned
                        bar.refresh()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema:.4f}", refresh=False)
                if step % 25 == 0 or step == planned:
                    rec = {"step": step, "loss": round(loss_ema, 5), "elapsed_s": round(elapsed, 1),
                           "lr": opt.param_groups[0]["lr"]}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if step % cfg.optim.checkpoint_every == 0 or step == planned:
                    state.update(step=step, elapsed_s=elapsed, planned_steps=state["planned_steps"],
                                 loss_ema=loss_ema)
                    _save_checkpoint(ckpt_dir, net, opt, state)
    except KeyboardInterrupt:
        state.update(step=step, elapsed_s=time.perf_counter() - t0, loss_ema=loss_ema)
        _save_checkpoint(ckpt_dir, net, opt, state)
        raise
    finally:
        bar.close()
        stream.close()
    net.eval()
    train_s = time.perf_counter() - t0
    model = calibrate_model(net, data, cfg, progress=progress)
    model.meta["training"]["steps"] = step
    model.meta["training"]["train_time_s"] = round(train_s, 1)
    model.meta["training"]["spectra_seen"] = step * cfg.optim.batch_size
    model.meta["training"]["final_loss"] = loss_ema
    model.save(out)
    model.path = out
    # calibrated in float32; handed out like a loaded model (network precision "auto")
    return model._with_precision("auto")


#: spectra per instrument group in the validation and evaluation sets
GROUP_SIZE = 32


def n_groups(n: int) -> int:
    """Instrument groups for a set of ``n`` spectra: one per :data:`GROUP_SIZE` started.

    Parameters
    ----------
    n : int
        Spectra in the set.

    Returns
    -------
    int
        ``ceil(n / GROUP_SIZE)``, at least 1.
    """
    return max(1, -(-int(n) // GROUP_SIZE))


def _training_data(cfg: TrainingConfig) -> TrainingData:
    """The training-data source of a config, on the model grid of its ``[model]`` table."""
    mc = cfg.model
    return TrainingData(cfg.data, n_bins=mc.n_bins, e_min_keV=mc.e_min_keV, e_max_keV=mc.e_max_keV,
                        grid_noise_keV=mc.grid_noise_keV)


def validation_set(data: TrainingData, cfg: TrainingConfig) -> tuple[np.ndarray, np.ndarray]:
    """The calibration set: ``cfg.optim.n_val`` spectra of the training distribution, from ``val_seed``.

    Drawn in groups of :data:`GROUP_SIZE` spectra, each with an instrument variant of its own, so that
    temperature, thresholds and the out-of-distribution references see every training instrument variant
    (one draw of ``n_val`` spectra would use only ``variants_per_batch`` of them).

    Returns
    -------
    binned : numpy.ndarray
        (n_val, n_bins) counts on the model grid.
    labels : numpy.ndarray
        (n_val, K) labels 0/1/2.
    """
    n_val = int(cfg.optim.n_val)
    rng = np.random.default_rng([cfg.optim.val_seed])
    return data.batch(n_val, rng, n_groups=n_groups(n_val))


def calibrate_model(
    net: PigmentNet,
    data: TrainingData,
    cfg: TrainingConfig,
    *,
    progress: bool = False,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> PigmentModel:
    """Temperature, thresholds and OOD statistics on a validation set; returns the finished model.

    ``validation`` is :func:`validation_set` ``(data, cfg)`` where the caller has it already.
    """
    binned, labels = validation if validation is not None else validation_set(data, cfg)
    logits, feats = _forward_all(net.eval(), binned)
    lab = torch.from_numpy(labels)
    temperature = fit_temperature(logits, lab)
    p3 = torch.softmax(logits / temperature, dim=2).numpy()
    prob = p3[..., 1] + p3[..., 2]
    truth = labels > 0
    thresholds = best_f1_thresholds(prob, truth)
    pred = is_present(prob, thresholds)
    val = prf(pred, truth)
    present_both = pred & truth
    buried_pred = is_buried(prob, p3[..., 2])
    buried_truth = labels == 2
    agree = (buried_pred == buried_truth)[present_both]
    layer_acc = float(agree.mean()) if agree.size else float("nan")

    # OOD statistics: covariance from the first half, reference quantiles from the second
    half = binned.shape[0] // 2
    f_a = feats[:half].double()
    mean = f_a.mean(0)
    cov = torch.cov(f_a.T)
    d = cov.shape[0]
    cov = cov + torch.eye(d, dtype=cov.dtype) * (1e-3 * float(torch.trace(cov)) / d + 1e-8)
    chol = torch.linalg.cholesky(cov)
    whitening = torch.linalg.inv(chol).T.float().contiguous()
    meta = {
        "name": cfg.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": __version__,
        "classes": list(data.classes),
        "colors": list(data.colors),
        "class_pigments": {c: list(v) for c, v in data.class_pigments.items()},
        "class_elements": {c: list(v) for c, v in data.class_elements.items()},
        "energy_grid": {"n_bins": cfg.model.n_bins, "e_min_keV": cfg.model.e_min_keV,
                        "e_max_keV": cfg.model.e_max_keV, "noise_keV": cfg.model.grid_noise_keV},
        "default_input": data.default_input(),
        "instrument_envelope": data.envelope(),
        "label_definition": data.label_definition(),
        "temperature": temperature,
        "thresholds": [float(t) for t in thresholds],
        "max_counts": float(cfg.data.counts[1]),
        "ood": {"threshold": math.inf, "unexplained_ref": 1.0, "mahalanobis_ref": 1.0},
        "training": cfg.to_dict(),
        "metrics": {},
    }
    # principal subspace of the spectra's shapes (sqrt of the count-normalised spectrum), first half
    max_counts = float(cfg.data.counts[1])
    b_a = torch.from_numpy(binned[:half]).double()
    b_a = b_a * torch.clamp(max_counts / b_a.sum(1, keepdim=True).clamp_min(1.0), max=1.0)
    shape_a = torch.sqrt(b_a / b_a.sum(1, keepdim=True).clamp_min(1.0))
    pca_mean = shape_a.mean(0)
    _, _, vt = torch.linalg.svd(shape_a - pca_mean, full_matrices=False)
    n_pc = min(64, vt.shape[0])
    ood_tensors = {"feature_mean": mean.float(), "feature_whitening": whitening,
                   "pca_mean": pca_mean.float(), "pca_basis": vt[:n_pc].float().contiguous()}
    model = PigmentModel(net, meta, ood_tensors, precision="float32")  # calibrated in full precision
    _, _, _, unexpl, dist, recon = model._infer_binned(torch.from_numpy(binned[half:]))
    u_ref = max(float(np.quantile(unexpl.numpy(), 0.99)), 0.05)
    d_ref = float(np.quantile(dist.numpy(), 0.99))
    r_ref = float(np.quantile(recon.numpy(), 0.99))
    model._u_ref, model._d_ref, model._r_ref = u_ref, d_ref, r_ref
    score = torch.maximum(torch.maximum(unexpl / u_ref, dist / d_ref), recon / r_ref).numpy()
    model.ood_threshold = float(np.quantile(score, 0.99))
    model.meta["ood"] = {"threshold": model.ood_threshold, "unexplained_ref": u_ref, "mahalanobis_ref": d_ref,
                         "reconstruction_ref": r_ref, "n_principal_components": n_pc}
    model.meta["metrics"] = {
        "validation": {
            "n_spectra": int(binned.shape[0]),
            "macro_f1": float(np.nanmean(val["f1"])),
            "macro_precision": float(np.nanmean(val["precision"])),
            "macro_recall": float(np.nanmean(val["recall"])),
            "per_class_f1": {
                c: (None if np.isnan(v) else round(float(v), 4))
                for c, v in zip(data.classes, val["f1"], strict=True)
            },
            "surface_vs_buried_accuracy": layer_acc,
            "ood_flag_rate": float((score > model.ood_threshold).mean()),
        }
    }
    return model


def recalibrate_model(model: PigmentModel | str | os.PathLike[str],
                      out_dir: str | os.PathLike) -> PigmentModel:
    """Calibrate a trained model's network afresh (temperature, thresholds, OOD references) and save it.

    The network weights are not touched; the training record (``model.json`` ``training``) is kept and
    ``training.recalibrated`` notes when. This is what :func:`train_model` does after its last step, so a
    model recalibrated with the current code equals one trained with it.

    Parameters
    ----------
    model : PigmentModel, str or path
        The model to recalibrate (its ``training`` config defines the validation data).
    out_dir : path
        Where to save ``model.safetensors`` and ``model.json`` (may be the model's own folder).

    Returns
    -------
    PigmentModel
        The recalibrated model at network precision "auto".
    """
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return _calibrated_copy(model, out_dir, lambda net, binned: (net, {"recalibrated": now}))


def factor_model(model: PigmentModel | str | os.PathLike[str], rank: int,
                 out_dir: str | os.PathLike) -> PigmentModel:
    """A trained model with its first fully connected layer factored to ``rank``, calibrated and saved.

    The factors are fitted to the spectra of the model's own validation set (its training config's
    ``optim.val_seed`` and ``n_val``; :func:`~xrfnb.model.nn.factor_first_layer`), then temperature,
    thresholds and OOD references are fitted afresh on that set, as :func:`train_model` does after its
    last step. The training record is kept; ``training.factored`` says how the layer was factored and how
    much of its output on those spectra the factors keep. Mapping speed: see ``benchmarks/bench_bcf.py``.

    Parameters
    ----------
    model : PigmentModel, str or path
        A model with a full first layer.
    rank : int
        Directions kept (the shipped model: 128 of 512).
    out_dir : path
        Where to save ``model.safetensors`` and ``model.json``.

    Returns
    -------
    PigmentModel
        The factored model at network precision "auto".
    """
    def factor(net: PigmentNet, binned: np.ndarray) -> tuple[PigmentNet, dict[str, Any]]:
        small = factor_first_layer(net, binned, rank)
        with torch.inference_mode():
            x, lc = features_from_binned(torch.from_numpy(binned))
            h = net.first_layer_inputs(x, lc)
            full, approx = net.mlp[0](h), small.mlp[0](small.project(h))
            kept = 1.0 - float(((full - approx) ** 2).sum() / ((full - full.mean(0)) ** 2).sum())
        note = {
            "rank": int(rank),
            "fitted_on": f"the validation set ({binned.shape[0]} spectra)",
            "output_variance_kept": round(kept, 6),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return small, {"factored": note}

    return _calibrated_copy(model, out_dir, factor)


def _calibrated_copy(
    model: PigmentModel | str | os.PathLike[str],
    out_dir: str | os.PathLike,
    change: Callable[[PigmentNet, np.ndarray], tuple[PigmentNet, dict[str, Any]]],
) -> PigmentModel:
    """The body of :func:`recalibrate_model` and :func:`factor_model`: the model's network, changed by
    ``change(net, validation spectra)``, calibrated on its validation set and saved with its training
    record and the change's notes."""
    model = load_model(model, precision="float32")
    record = dict(model.meta.get("training", {}))
    cfg = load_config({k: record[k] for k in ("name", "model", "data", "optim") if k in record})
    data = _training_data(cfg)
    if tuple(data.classes) != tuple(model.classes):
        raise ModelError("the model's classes differ from the current pigment library's groups: retrain it")
    validation = validation_set(data, cfg)
    net, notes = change(copy.deepcopy(model.net).float().eval(), validation[0])
    new = calibrate_model(net, data, cfg, validation=validation)
    for k, v in record.items():
        new.meta["training"].setdefault(k, v)
    new.meta["training"].update(notes)
    new.meta["created"] = model.meta.get("created", new.meta["created"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    new.save(out)
    new.path = out
    return new._with_precision("auto")
