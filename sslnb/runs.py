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
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{f} is not valid JSON; repair or delete it") from None

    @property
    def history(self) -> list[dict]:
        f = self.path / "history.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []

    @property
    def epochs_done(self) -> int:
        h = self.history
        return h[-1]["epoch"] if h else -1

    @property
    def finished(self) -> bool:
        cfg = self.config
        return cfg is not None and self.epochs_done >= cfg["epochs"] and (self.path / "backbone.pt").exists()

    def column(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of one history field, skipping epochs without it."""
        rows = [(r["epoch"], r[key]) for r in self.history if r.get(key) is not None]
        return [e for e, _ in rows], [v for _, v in rows]

    def check(self, config: dict) -> None:
        """Raise if this directory already holds a run made with another config."""
        config, old = _json_normal(config), self.config
        if old is not None and old != config:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
                             if old.get(k) != config.get(k))
            raise RunError(f"run {self.path} was made with another config ({diff}); "
                           "choose another run name or delete that folder")

    def prepare(self, config: dict) -> None:
        """Create the directory and its config.json, or check that an existing run has the same config."""
        self.check(config)
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config is None:
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
            raise RunError(f"checkpoint {f} is corrupt or unreadable ({type(e).__name__}); "
                           "delete it to start over") from None

    def load_backbone(self, name: str = "backbone.pt", device="cpu") -> torch.nn.Module:
        """The backbone (a CIFAR ResNet from the run's config) with saved weights, in eval mode."""
        cfg = self.config
        if cfg is None:
            raise RunError(f"{self.path} is not a run directory (no config.json)")
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
