"""What every notebook's setup cell does: Google Drive on Colab, seeds, the device."""
from __future__ import annotations

import os
import sys

import torch

from .runs import runs_root
from .train import pick_device, pick_precision, seed_everything


def in_colab() -> bool:
    return "google.colab" in sys.modules


def setup(seed: int = 0, drive: bool = True) -> torch.device:
    """Seed everything, keep runs (and CIFAR) on Google Drive when on Colab, print the device.

    On Colab a disconnect loses the VM's disk; with Drive mounted, a run resumes from its last
    checkpoint and finished runs load in seconds in a new session. Mounting opens Google's
    authorisation prompt (a pop-up asking to let this notebook access your Drive) and waits for
    your answer; `setup(drive=False)` skips it and keeps runs on the VM's disk, which a new
    session starts without.
    """
    if in_colab() and drive:
        from google.colab import drive as gdrive

        print("mounting Google Drive for runs and data: answer Google's authorisation prompt "
              "(or call sslnb.notebook.setup(drive=False) to keep runs on this VM's disk)")
        gdrive.mount("/content/drive")
        os.environ.setdefault("SSLNB_RUNS", "/content/drive/MyDrive/sslnb/runs")
        os.environ.setdefault("SSLNB_DATA", "/content/drive/MyDrive/sslnb/data")
    seed_everything(seed)
    device = pick_device()
    precision = {None: "float32", torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast"}[pick_precision(device)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device: {name} ({precision}); torch {torch.__version__}; runs in {runs_root()}")
    return device
