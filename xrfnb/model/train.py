"""Training, calibration and evaluation of pigment-identification models.

``train_model(config, out_dir)`` trains a :class:`~xrfnb.model.nn.PigmentNet` on spectra simulated on the fly
(:mod:`xrfnb.model.trainingdata`), then calibrates it on a validation set from another seed:

1. temperature scaling of the per-class three-way softmax (minimum validation cross-entropy);
2. per-class decision thresholds maximising validation F1 of "present within the probed depth";
3. out-of-distribution statistics: mean and covariance of the last hidden features (first half of the
   validation set) and the 99th percentiles of the unexplained-peak fraction and of the Mahalanobis distance
   and of the combined score (second half), see :mod:`xrfnb.model.model`.

Training is reproducible: batch ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` and torch is
seeded, so a resumed run sees the same data as an uninterrupted one. The number of optimisation steps is
``max_steps``, reduced so that the run fits ``time_budget_min``: planned from the speed of steps 20-40, then
fixed from the speed of steps 100-400; the fixed number is stored in the checkpoint, so a resumed run keeps
the same learning-rate schedule.

Checkpoints (``out_dir/checkpoint/state.safetensors`` + ``state.json``) hold the network, the optimiser
state and the step, every ``checkpoint_every`` steps and on Ctrl-C; ``resume=True`` continues from them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import ModelError
from ..core.calls import is_buried, is_present
from ..core.spectrum import Scan
from ..fitting.baseline import assign_pigments_by_elements
from ..fitting.elements import fit_elements
from ..physics.instrument import Instrument
from ..physics.scenes import render_scan
from .model import PigmentModel, load_model
from .nn import PigmentNet, features_from_binned
from .trainingdata import DataConfig, TrainingData

__all__ = [
    "ModelConfig",
    "OptimConfig",
    "TrainingConfig",
    "load_config",
    "train_model",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Network and input grid.

    Attributes
    ----------
    n_bins, e_min_keV, e_max_keV, grid_noise_keV
        The model's energy grid (see :func:`xrfnb.model.nn.energy_grid_edges_keV`).
    conv_channels, kernel, hidden, dropout
        :class:`xrfnb.model.nn.PigmentNet` arguments.
    """

    n_bins: int = 512
    e_min_keV: float = 1.0
    e_max_keV: float = 41.0
    grid_noise_keV: float = 0.08
    conv_channels: int = 8
    kernel: int = 7
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.1


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
    data: Any = None  # xrfnb.model.trainingdata.DataConfig
    optim: OptimConfig = OptimConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (for model.json)."""
        return {
            "name": self.name,
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "optim": dataclasses.asdict(self.optim),
        }


def _build(cls: type, table: Mapping[str, Any], where: str) -> Any:
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
        model=_build(ModelConfig, table.get("model", {}), f"{where} [model]"),
        data=_build(DataConfig, table.get("data", {}), f"{where} [data]"),
        optim=_build(OptimConfig, table.get("optim", {}), f"{where} [optim]"),
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


def _init_weights(net: PigmentNet, source: str | os.PathLike) -> Path:
    """Load the network weights of a model folder or checkpoint folder into ``net`` (strict)."""
    from safetensors.torch import load_file

    src = Path(source)
    candidates = [src] if src.is_file() else [src / "model.safetensors", src / "state.safetensors",
                                             src / "checkpoint" / "state.safetensors"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise ModelError(f"init_from: no model.safetensors or checkpoint/state.safetensors in {src}")
    try:
        tensors = load_file(str(path))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
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
_WORKER_DATA: Any = None


def _worker_init(data_cfg: Any, grid: dict[str, Any]) -> None:
    global _WORKER_DATA
    import signal


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

    def __init__(self, data: Any, data_cfg: Any, grid: dict[str, Any], seed: int, batch_size: int,
                 workers: int, reuse: int = 1, prefetch: int = 3) -> None:
        self.data, self.seed, self.batch_size = data, seed, batch_size
        self.reuse = max(1, int(reuse))
        self.last: tuple[int, Any] | None = None
        self.pool = None
        self.pending: list[Any] = []
        self.prefetch = max(1, prefetch) * max(1, workers)
        if workers > 0:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
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
    from tqdm.auto import tqdm

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
                     dropout=mc.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    state: dict[str, Any] = {"step": 0, "planned_steps": None, "elapsed_s": 0.0, "config": cfg.to_dict()}
    if cfg.optim.init_from and not resume:
        state["init_from"] = str(_init_weights(net, cfg.optim.init_from))
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
    t_mark: tuple[int, float] | None = None
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
                # fit the run into the time budget: a first plan from the speed of steps 20-40 (after
                # start-up), refined once from steps 100-400 (worker processes warmed up, prefetch queue
                # in its steady state); the plan is then fixed and kept in the checkpoint. A run resumed
                # inside a timing window plans from its mean speed so far.
                if state["planned_steps"] is None and step in (20, 100):
                    t_mark = (step, elapsed)
                if state["planned_steps"] is None and (step == 40 or step >= 400):
                    per_step = (elapsed - t_mark[1]) / (step - t_mark[0]) if t_mark else elapsed / step
                    planned = int(min(cfg.optim.max_steps, max(60, step + (budget_s - elapsed) / per_step)))
                    if step >= 400 or planned <= 400:
                        state["planned_steps"] = planned
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


def _n_groups(n: int) -> int:
    """Instrument groups for a set of ``n`` spectra: one per :data:`GROUP_SIZE` started."""
    return max(1, -(-int(n) // GROUP_SIZE))


def _training_data(cfg: TrainingConfig) -> Any:
    """The training-data source of a config, on the model grid of its ``[model]`` table."""
    mc = cfg.model
    return TrainingData(cfg.data, n_bins=mc.n_bins, e_min_keV=mc.e_min_keV, e_max_keV=mc.e_max_keV,
                        grid_noise_keV=mc.grid_noise_keV)


def validation_set(data: Any, cfg: TrainingConfig) -> tuple[np.ndarray, np.ndarray]:
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
    return data.batch(n_val, rng, n_groups=_n_groups(n_val))


def calibrate_model(
    net: PigmentNet, data: Any, cfg: TrainingConfig, *, progress: bool = False
) -> PigmentModel:
    """Temperature, thresholds and OOD statistics on a validation set; returns the finished model."""
    import xrfnb

    binned, labels = validation_set(data, cfg)
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
        "code_version": xrfnb.__version__,
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


def recalibrate_model(model: Any, out_dir: str | os.PathLike) -> PigmentModel:
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
    model = load_model(model, precision="float32")
    record = dict(model.meta.get("training", {}))
    cfg = load_config({k: record[k] for k in ("name", "model", "data", "optim") if k in record})
    data = _training_data(cfg)
    if tuple(data.classes) != tuple(model.classes):
        raise ModelError("the model's classes differ from the current pigment library's groups: retrain it")
    net = copy.deepcopy(model.net).float().eval()
    new = calibrate_model(net, data, cfg)
    for k, v in record.items():
        new.meta["training"].setdefault(k, v)
    new.meta["training"]["recalibrated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    new.meta["created"] = model.meta.get("created", new.meta["created"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    new.save(out)
    new.path = out
    return new._with_precision("auto")


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------
EVAL_SETS: dict[str, str] = {
    "single": "(a) one pigment in one layer",
    "mixture": "(b) 2-3 pigments mixed in one layer",
    "buried": "(c) one pigment 5-40 um thick over a layer of 1-2 others",
    "low": "(d) a main pigment with a second at 1-10 wt%",
}
#: seed of the held-out evaluation spectra; never used for training or calibration
EVAL_SEED = 31_415_927


@dataclasses.dataclass(frozen=True, eq=False)
class EvaluationReport:
    """Results of :func:`evaluate_model`.

    Attributes
    ----------
    classes : tuple of str
        Classes (K).
    rows : tuple of dict
        One row per (set, counts, method) with ``n``, ``macro_precision``, ``macro_recall``,
        ``macro_f1`` (over classes present in the set), ``target_f1`` (buried set: F1 of the classes
        present only below the surface, counting every false "present" as a false positive; low set:
        recall of the minor pigment's class where visible), ``ood_rate`` and, for the buried set,
        ``buried_errors``: ``tp``, ``fp``, ``fn`` of that F1 and how many false positives and negatives
        fall on a class sharing an element with another class present in the spectrum (``fp_shared``,
        ``fn_shared``).
    per_class : dict
        ``(set, counts, method) -> {"precision", "recall", "f1", "support"}`` arrays of shape (K,).
    settings : dict
        Seed, spectra per cell, instrument envelope.
    """

    classes: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]
    per_class: dict[tuple[str, int, str], dict[str, np.ndarray]]
    settings: dict[str, Any]

    def table(self, method: str = "model") -> list[dict[str, Any]]:
        """Rows of one method."""
        return [r for r in self.rows if r["method"] == method]

    def to_markdown(self) -> str:
        """Markdown tables: macro scores per set and count level, model beside the baseline."""
        methods = sorted({r["method"] for r in self.rows}, key=lambda m: (m != "model", m))
        out = [
            f"Held-out synthetic spectra (seed {self.settings['seed']}, {self.settings['n_per_cell']} per "
            "cell, wider instrument envelope than training: FWHM x0.8-1.3, calibration errors x2).",
            "",
            "| set | counts | " + " | ".join(f"{m} macro P / R / F1 | {m} target" for m in methods) + " |",
            "|---|---:|" + "---:|---:|" * len(methods),
        ]
        keys = sorted({(r["set"], r["counts"]) for r in self.rows},
                      key=lambda k: (list(EVAL_SETS).index(k[0]), k[1]))
        by = {(r["set"], r["counts"], r["method"]): r for r in self.rows}
        for s, c in keys:
            cells = []
            for m in methods:
                r = by.get((s, c, m))
                if r is None:
                    cells += ["-", "-"]
                    continue
                p_, r_, f_ = r["macro_precision"], r["macro_recall"], r["macro_f1"]
                cells.append(f"{p_:.2f} / {r_:.2f} / **{f_:.2f}**")
                cells.append("-" if r["target_f1"] is None else f"{r['target_f1']:.2f}")
            out.append(f"| {s} | {c:,} | " + " | ".join(cells) + " |")
        out += ["", "target: buried set = F1 of the classes present only below the surface layer; "
                "low set = recall of the minor (1-10 wt%) pigment's class where it is visible."]
        return "\n".join(out)

    def per_class_markdown(self, counts: int = 1000, method: str = "model") -> str:
        """Per-class F1 of every set at one count level."""
        sets = [s for s in EVAL_SETS if (s, counts, method) in self.per_class]
        out = [f"Per-class F1 ({method}, {counts:,} counts; support in brackets)", "",
               "| class | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
        for k, c in enumerate(self.classes):
            cells = []
            for s in sets:
                pc = self.per_class[(s, counts, method)]
                f1, sup = pc["f1"][k], int(pc["support"][k])
                cells.append("-" if sup == 0 or np.isnan(f1) else f"{f1:.2f} ({sup})")
            out.append(f"| {c} | " + " | ".join(cells) + " |")
        return "\n".join(out)

    to_text = to_markdown

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (the rows and settings)."""
        return {"rows": [dict(r) for r in self.rows], "settings": dict(self.settings)}


def _baseline_present(raw: np.ndarray, cal: Any, instrument: Any, classes: tuple[str, ...],
                      elements: tuple[str, ...]) -> np.ndarray:
    """The expert baseline (element fit + assignment) on spectra, as bool (n, K) in ``classes`` order."""
    scan = Scan(raw[None].astype(np.float32), cal)
    maps = fit_elements(scan, instrument, list(elements), progress=False)
    res = assign_pigments_by_elements(maps)
    out = np.zeros((raw.shape[0], len(classes)), dtype=bool)
    for k, c in enumerate(classes):
        if c in res.classes:
            out[:, k] = res.present[0, :, res.classes.index(c)]
    return out


def evaluate_model(
    model: Any = "default",
    *,
    n_per_cell: int = 300,
    counts: tuple[int, ...] = (300, 1000, 3000, 10000),
    sets: tuple[str, ...] = tuple(EVAL_SETS),
    seed: int = EVAL_SEED,
    baseline: bool = True,
    progress: bool = True,
) -> EvaluationReport:
    """Evaluate a model on held-out synthetic test sets, beside the expert element-map baseline.

    For each set (see :data:`EVAL_SETS`) the same stacks are simulated at every count level, with a wider
    instrument envelope than training (FWHM x0.8-1.3, doubled calibration errors) and a seed never used
    in training. Each cell is split into groups of :data:`GROUP_SIZE` spectra with an instrument variant
    drawn per group, so a cell covers the held-out envelope rather than one or two instruments. Ground
    truth follows the training label rule (a pigment counts when its strongest line is detectable, see
    :mod:`xrfnb.model.trainingdata`). The model sees the raw spectra and their (slightly
    wrong) calibration, exactly as a user's data; the baseline gets the same spectra and the exact
    instrument.

    Parameters
    ----------
    model : PigmentModel, str or path
        The model (default: the shipped one).
    n_per_cell : int
        Spectra per (set, count level).
    counts : tuple of int
        Total counts per spectrum.
    sets : tuple of str
        Subset of ``("single", "mixture", "buried", "low")``.
    seed : int
        Seed of the test spectra.
    baseline : bool
        Also score :func:`xrfnb.assign_pigments_by_elements` on :func:`xrfnb.fit_elements`.
    progress : bool
        Progress bar.

    Returns
    -------
    EvaluationReport
    """
    from tqdm.auto import tqdm


    model = load_model(model)
    unknown = sorted(set(sets) - set(EVAL_SETS))
    if unknown:
        raise ModelError(f"unknown evaluation sets {unknown}; choose from {list(EVAL_SETS)}")
    train_cfg = model.meta.get("training", {})
    data_table = {k: v for k, v in train_cfg.get("data", {}).items()}
    try:
        dcfg = _build(DataConfig, data_table, "model.json training.data")
    except ModelError:
        dcfg = DataConfig()
    grid = model.meta["energy_grid"]
    data = TrainingData(dcfg, n_bins=int(grid["n_bins"]), e_min_keV=float(grid["e_min_keV"]),
                        e_max_keV=float(grid["e_max_keV"]), grid_noise_keV=float(grid["noise_keV"]))
    if tuple(data.classes) != tuple(model.classes):
        raise ModelError("the model's classes differ from the current pigment library's groups: retrain it")
    classes = model.classes
    fit_els = {e for els in model.class_elements.values() for e in els} | {"Ca", "Fe", "K", "Si"}
    fit_els = tuple(sorted(fit_els))
    rows: list[dict[str, Any]] = []
    per_class: dict[tuple[str, int, str], dict[str, np.ndarray]] = {}
    # shares[i, j]: classes i != j have an element in common
    el_sets = [set(model.class_elements.get(c, ())) for c in classes]
    shares = np.array([[i != j and bool(ei & ej) for j, ej in enumerate(el_sets)]
                       for i, ei in enumerate(el_sets)], dtype=bool)
    cells = [(s, c) for s in sets for c in counts]
    bar = tqdm(cells, disable=not progress, desc="evaluating", unit="cell")
    for s, c in bar:
        bar.set_postfix(set=s, counts=c, refresh=False)
        rng = np.random.default_rng([seed, list(EVAL_SETS).index(s)])
        _, labels, raws, stacks = data.batch_raw(n_per_cell, rng, kind=s, counts=float(c), wider=True,
                                                 n_groups=_n_groups(n_per_cell))
        prob = np.zeros((n_per_cell, len(classes)), np.float32)
        ood = np.zeros(n_per_cell, bool)
        pred_base = np.zeros((n_per_cell, len(classes)), bool)
        for idx, raw, cal, inst in raws:
            res = model.identify_batch(raw, cal)
            prob[idx] = res.probability
            ood[idx] = res.ood
            if baseline:
                try:
                    pred_base[idx] = _baseline_present(raw, cal, inst, classes, fit_els)
                except Exception as exc:  # the baseline is someone else's code: report and go on
                    baseline = False
                    print(f"baseline disabled: {type(exc).__name__}: {exc}")
        truth = labels > 0
        preds = {"model": prob >= model.thresholds}
        if baseline:
            preds["baseline"] = pred_base
        minor_cls = None
        if s == "low":
            pw = stacks.pigment_wt[:, 0, :]
            masked = np.where(pw > 0, pw, np.inf)
            minor = np.argmin(masked, axis=1)
            minor_cls = data.table.pigment_class[minor]
        for m, pred in preds.items():
            pc = prf(pred, truth)
            per_class[(s, c, m)] = pc
            target = None
            anatomy = None
            if s == "buried":
                tp_m, fp_m, fn_m = pred & (labels == 2), pred & (labels == 0), ~pred & (labels == 2)
                tp, fp, fn = int(tp_m.sum()), int(fp_m.sum()), int(fn_m.sum())
                target = 2 * tp / max(1, 2 * tp + fp + fn)
                # where the errors are: on a class that shares an element with another class present in
                # the spectrum (Cu + As under a layer look like a copper arsenite green, Co + Zn like
                # cobalt green) or on a class whose elements no other present class carries
                shared = (truth.astype(np.int64) @ shares.T.astype(np.int64)) > 0
                anatomy = {"tp": tp, "fp": fp, "fn": fn, "fp_shared": int((fp_m & shared).sum()),
                           "fn_shared": int((fn_m & shared).sum())}
            elif s == "low" and minor_cls is not None:
                ok = minor_cls >= 0
                rows_i = np.flatnonzero(ok)
                vis = truth[rows_i, minor_cls[ok]]
                hit = pred[rows_i, minor_cls[ok]]
                target = float(hit[vis].mean()) if vis.any() else None
            rows.append({
                "set": s, "counts": int(c), "method": m, "n": int(n_per_cell),
                "macro_precision": float(np.nanmean(pc["precision"])),
                "macro_recall": float(np.nanmean(pc["recall"])),
                "macro_f1": float(np.nanmean(pc["f1"])),
                "target_f1": target,
                "ood_rate": float(ood.mean()) if m == "model" else None,
                "buried_errors": anatomy,
            })
    bar.close()
    settings = {"seed": seed, "n_per_cell": n_per_cell, "counts": list(counts), "sets": list(sets),
                "baseline": baseline, "model": model.name}
    return EvaluationReport(tuple(classes), tuple(rows), per_class, settings)


def evaluate_scenes(
    model: Any = "default",
    *,
    scenes: tuple[str, ...] = ("mockup-panel", "hidden-painting"),
    shape: tuple[int, int] = (64, 64),
    counts_per_pixel: float = 1500.0,
    baseline: bool = True,
    seed: int = EVAL_SEED,
) -> dict[str, dict[str, Any]]:
    """Pixel-wise scores on the built-in demo scans (:func:`xrfnb.render_scan`), model beside baseline.

    Ground truth is :meth:`GroundTruth.group_maps` "present": the group is somewhere in the pixel's stack,
    however deep (so pigments too deep to be seen count as misses: a lower bound of the recall).

    Returns
    -------
    dict
        Scene -> {"classes": groups scored, "model": {"f1": per class, "macro_f1"}, "baseline": ...}.
    """
    model = load_model(model)
    out: dict[str, dict[str, Any]] = {}
    for name in scenes:
        scan, truth = render_scan(name, "bruker-m6", shape=shape, counts_per_pixel=counts_per_pixel,
                                  rng=np.random.default_rng([seed, 7]))
        groups, present, _ = truth.group_maps()
        counts = np.asarray(scan.counts).reshape(-1, scan.n_channels)
        res = model.identify_batch(counts, scan.calibration)
        scored = [g for g in groups if g in model.classes]
        t = np.stack([present[..., groups.index(g)].reshape(-1) for g in scored], axis=1)
        preds = {"model": res.present[:, [model.classes.index(g) for g in scored]]}
        if baseline:
            try:

                els = sorted({e for v in model.class_elements.values() for e in v} | {"Ca", "Fe", "K", "Si"})
                maps = fit_elements(scan, Instrument.preset("bruker-m6"), els, progress=False)
                ba = assign_pigments_by_elements(maps)
                preds["baseline"] = np.stack(
                    [ba.present[..., ba.classes.index(g)].reshape(-1) if g in ba.classes
                     else np.zeros(t.shape[0], bool) for g in scored], axis=1)
            except Exception as exc:  # the baseline is someone else's code: report and go on
                print(f"baseline disabled on {name}: {type(exc).__name__}: {exc}")
        entry: dict[str, Any] = {"classes": scored, "ood_rate": float(res.ood.mean())}
        for m, p in preds.items():
            pc = prf(p, t)
            entry[m] = {"f1": [None if np.isnan(v) else round(float(v), 3) for v in pc["f1"]],
                        "macro_f1": float(np.nanmean(pc["f1"]))}
        out[name] = entry
    return out
