"""Training on a CPU that another busy process shares: sslnb's thread choice against fixed threads.

The README's first command (SimCLR on digits at 16 px, width 8, batch 64) is trained in this
process for --epochs epochs, with and without one other process spinning on a core (a Python
busy loop: what a second notebook, a compile or a browser tab does to a 2-core Colab VM), and
  (a) sslnb's default: all the threads torch starts with, lowered to the cores the other
      processes leave free (sslnb.cpu.SharedCpuThreads, re-measured every second);
  (b) the same threads, fixed (the governor switched off): what the loop did before;
  (c) one thread, fixed.
Reports images/s over the epochs after the first (median) and the share each keeps of its own
uncontended speed. Writes benchmarks/results/contention.json.

    python benchmarks/contention.py                     # all cores, 5 epochs per setting
    python benchmarks/contention.py --epochs 3 --out /tmp/c.json
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch

from sslnb import cpu
from sslnb.data import load_dataset
from sslnb.train import default_config, train

from common import default_out, describe_machine, median, print_machine, write_json

SETTINGS = {  # name: (threads, governor on)
    "sslnb default (threads follow the free cores)": (None, True),
    "fixed threads (before)": (None, False),
    "1 thread": (1, False),
}


def run_once(threads: int, governed: bool, epochs: int, data) -> list:
    """images/s of each epoch of the README's digits run."""
    torch.set_num_threads(threads)
    update = cpu.SharedCpuThreads.update
    if not governed:
        cpu.SharedCpuThreads.update = lambda self: None
    try:
        cfg = default_config("simclr", dataset="digits", image_size=16, width=8, batch_size=64, epochs=epochs,
                             lr=0.03, crop_scale=(0.5, 1.0), seed=1, method_kwargs={"temperature": 0.2})
        with tempfile.TemporaryDirectory() as run_dir:
            history = train(cfg, run_dir, device="cpu", progress=False, data=data).history
    finally:
        cpu.SharedCpuThreads.update = update
        torch.set_num_threads(threads)
    return [h["images_per_s"] for h in history[1:]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="per setting; the first is not counted")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default: torch's (all cores)")
    parser.add_argument("--out", default=default_out("contention"))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is not counted")
    machine = describe_machine("cpu")
    data = load_dataset("digits", image_size=16)

    rows = []
    for busy in (0, 1):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for name, (threads, governed) in SETTINGS.items():
                n = threads or args.threads
                per_epoch = run_once(n, governed, args.epochs, data)
                rows.append(dict(setting=name, threads=n, governed=governed, busy_processes=busy,
                                 images_per_s=median(per_epoch[1:]), per_epoch=per_epoch))
                print(f"busy {busy}: {name}: {rows[-1]['images_per_s']:.0f} img/s", flush=True)
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
    for r in rows:  # the share of the same setting's speed on an idle machine, measured in this run
        idle = next(q for q in rows if q["setting"] == r["setting"] and q["busy_processes"] == 0)
        r["share_of_idle"] = r["images_per_s"] / idle["images_per_s"]
        r["share_of_idle_default"] = r["images_per_s"] / rows[0]["images_per_s"]

    print()
    print_machine(machine)
    print(f"SimCLR on digits 16 px, width 8, batch 64, {args.epochs} epochs per setting (first not counted); "
          f"{os.cpu_count()} CPUs; the other process: a Python busy loop")
    print(f"{'setting':<48}{'busy':>5}{'threads':>8}{'img/s':>8}{'of its idle':>13}{'of idle default':>17}")
    for r in rows:
        print(f"{r['setting']:<48}{r['busy_processes']:>5}{r['threads']:>8}{r['images_per_s']:>8.0f}"
              f"{r['share_of_idle']:>12.0%}{r['share_of_idle_default']:>17.0%}")
    write_json(dict(epochs=args.epochs, machine=machine, results=rows), args.out)


if __name__ == "__main__":
    main()
