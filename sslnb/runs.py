"""The run directory: everything a run needs to resume, and everything a figure needs to draw.

runs/<name>/
    config.json      the TrainConfig (enough to reproduce the run)
    history.jsonl    one JSON object per epoch (epoch 0 = the untrained backbone)
    checkpoint.pt    the latest state: model (with EMA targets), optimizer, GradScaler, every
                     random generator, MoCo's queue, DirectPred's F; written atomically
    backbone.pt      final backbone weights; backbone_epochNNN.pt / backbone_best.pt snapshots
Checkpoints load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .models import resnet


class RunError(ValueError):
    """A run directory that cannot be used as asked (another config, a corrupt checkpoint)."""


def project_dir() -> Path:
    """The source checkout when sslnb is imported from one, else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def runs_root(quick: bool = False) -> Path:
    """Where runs live: `$SSLNB_RUNS` (e.g. on Google Drive) or `runs/` in the project.

    Quick-mode runs go to their own `_quick/` subfolder, so they never mix with real ones
    and a later notebook reuses the quick runs of earlier ones.
    """
    root = Path(os.environ.get("SSLNB_RUNS") or project_dir() / "runs")
    return root / "_quick" if quick else root


def _json_normal(obj) -> dict:
    return json.loads(json.dumps(obj))  # tuples -> lists, so a config compares equal to its file


def _comparable(config: dict) -> dict:
    """A config as JSON, with its method options resolved against the method's defaults, so that
    passing an option at its default value is the same config; one key per option for the diff."""
    config = _json_normal(config)
    config.pop("world_size", None)  # how many processes ran it: checked by the loop, not part of what it is
    kwargs = config.pop("method_kwargs", None)
    if isinstance(kwargs, dict):
        from .methods import METHODS, method_options

        defaults = _json_normal(method_options(config["method"])) if config.get("method") in METHODS else {}
        config.update({f"option {k}": v for k, v in {**defaults, **kwargs}.items()})
    elif kwargs is not None:
        config["method_kwargs"] = kwargs
    return config


def _check_creatable(path: Path) -> None:
    """Raise a RunError if `path` is a file or lies under one (before anything is written)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise RunError(f"cannot use {path} as a run folder: {p} is a file; choose another --run-dir")
            return


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Run:
    """A run directory; reading one never needs the data or a GPU."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self):
        return f"Run({str(self.path)!r}, epochs done: {self.epochs_done})"

    # -- files
    @property
    def config(self) -> dict | None:
        f = self.path / "config.json"
        if not f.is_file():
            return None
        try:
            cfg = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{f} is not valid JSON; repair it, or start the run in another folder") from None
        if not isinstance(cfg, dict):
            raise RunError(f"{f} holds a JSON {type(cfg).__name__}, not a run config (a JSON object of the "
                           "run's settings, as pretrain writes it)")
        return cfg

    def require(self, *keys: str) -> dict:
        """The config, or a RunError naming the settings it lacks."""
        cfg = self.config
        if cfg is None:
            raise RunError(f"{self.path} is not a run directory (no config.json); pretrain first")
        missing = [k for k in keys if k not in cfg]
        if missing:
            raise RunError(f"{self.path / 'config.json'} lacks {', '.join(missing)}; it was not written by "
                           "`python -m sslnb pretrain` (or was edited): pretrain the run again in a new folder")
        return cfg

    @property
    def history(self) -> list[dict]:
        f = self.path / "history.jsonl"
        if not f.is_file():
            return []
        rows = []
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise RunError(f"{f} line {n} is not an epoch record; every line must be one JSON object "
                               "with an integer \"epoch\", as the training loop writes it: repair that line")
            rows.append(row)
        return rows

    @property
    def epochs_done(self) -> int:
        h = self.history
        return h[-1]["epoch"] if h else -1

    @property
    def finished(self) -> bool:
        try:
            cfg = self.config
        except RunError:
            return False
        return (cfg is not None and self.epochs_done >= cfg.get("epochs", float("inf"))
                and (self.path / "backbone.pt").exists())

    @property
    def has_finished_epoch(self) -> bool:
        """Whether any training epoch ended here: only then does the folder hold a run worth keeping."""
        return (self.path / "checkpoint.pt").exists() or self.epochs_done >= 1

    def column(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of one history field, skipping epochs without it."""
        rows = [(r["epoch"], r[key]) for r in self.history if r.get(key) is not None]
        return [e for e, _ in rows], [v for _, v in rows]

    def check(self, config: dict) -> bool:
        """Raise if a run cannot start here: the path is (or lies under) a file, or the folder holds a
        finished epoch of a run made with another config. Writes nothing. Returns True when the
        folder holds a run with this config (to resume), False when a start writes it afresh: a
        folder where no epoch finished (a refused or failed start) never blocks a corrected one."""
        _check_creatable(self.path)
        try:
            old = self.config
        except RunError:  # an unreadable config.json: only a folder without a checkpoint may be started afresh
            if (self.path / "checkpoint.pt").exists():
                raise
            return False
        if old is None and (self.path / "checkpoint.pt").exists():  # never overwrite a run we cannot compare
            raise RunError(f"{self.path} holds a checkpoint.pt but no config.json; restore its config.json, "
                           "or choose another run folder")
        if old is None:
            return False
        new, old = _comparable(config), _comparable(old)
        if old == new:
            return True
        if not self.has_finished_epoch:
            return False
        diff = ", ".join(f"{k}: {old.get(k, '(none)')!r} -> {new.get(k, '(none)')!r}"
                         for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
        raise RunError(f"run {self.path} was made with another config ({diff}); "
                       "choose another run folder (--run-dir, or another name), or delete that folder")

    def prepare(self, config: dict) -> None:
        """Create the directory and its config.json, or check that an existing run has the same config.
        A folder that held another config but no finished epoch is started afresh, as is one whose
        unfinished start ran with another number of processes (`world_size`)."""
        if self.check(config) and (self.has_finished_epoch or
                                   self.config.get("world_size", 1) == config.get("world_size", 1)):
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "history.jsonl").unlink(missing_ok=True)  # an unfinished start's epoch 0, if any
        text = json.dumps(_json_normal(config), indent=2)
        _atomic_write(self.path / "config.json", lambda f: f.write(text.encode()))

    def write_history(self, records: list[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        _atomic_write(self.path / "history.jsonl", lambda f: f.write(text.encode()))

    # -- checkpoints and weights
    def save(self, obj, name: str = "checkpoint.pt") -> None:
        _atomic_write(self.path / name, lambda f: torch.save(obj, f))

    def load(self, name: str = "checkpoint.pt", map_location="cpu"):
        """Load a file of this run (None if absent); a damaged file is reported with its path."""
        f = self.path / name
        if not f.exists():
            return None
        try:
            return torch.load(f, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated zip, wrong format, unpickling refused...
            if name == "checkpoint.pt":
                raise RunError(f"checkpoint {f} is corrupt or unreadable ({type(e).__name__}); delete it to start "
                               "this run over from epoch 0") from None
            have = ", ".join(sorted(p.name for p in self.path.glob("backbone*.pt"))) or "no backbone files yet"
            what = "is corrupt or unreadable" if f.suffix == ".pt" else "is not a weights file"
            raise RunError(f"{f} {what} ({type(e).__name__}); pass a backbone file of this run ({have})") from None

    def load_backbone(self, name: str = "backbone.pt", device="cpu") -> torch.nn.Module:
        """The backbone (a CIFAR ResNet from the run's config) with saved weights, in eval mode."""
        cfg = self.require("backbone", "width")
        state = self.load(name, map_location=device)
        if state is None:
            have = sorted(p.name for p in self.path.glob("backbone*.pt"))
            raise RunError(f"{self.path / name} does not exist; this run has: {', '.join(have) or 'no weights yet'}")
        net = resnet(cfg["backbone"], cfg["width"]).to(device)
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError):
            raise RunError(f"{self.path / name} does not hold {cfg['backbone']} (width {cfg['width']}) weights; "
                           "pass a backbone file (backbone.pt, backbone_best.pt, backbone_epochNNN.pt)") from None
        return net.eval()
