"""Several processes (torchrun, DistributedDataParallel) on a CPU with gloo.

The reference for a step on N processes is one process on the same global batch: with the same
pre-made views and batch norm in eval mode (torch has no SyncBatchNorm for CPU tensors, and BN
statistics over a half batch differ from the whole batch's by design), every method's loss and
parameter update must agree within float tolerance.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslnb import distributed
from sslnb.methods import METHODS, build_method
from sslnb.optim import build_optimizer
from sslnb.train import default_config, train, train_step

GLOBAL_BATCH, WORLD = 64, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(method: str, views, labels, forward_wrapper=None):
    """One step of `method` (quick settings, width 8) on `views`; BN layers in eval mode.
    Returns (loss, state_dict after the step)."""
    cfg = default_config(method, quick=True)
    torch.manual_seed(0)  # the same initial model (and MoCo queue) in every process
    model = build_method(method, cfg.backbone, cfg.width, 10, **cfg.method_kwargs)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()  # running statistics: the same normalisation for any split of the batch
    optimizer = build_optimizer(model.parameter_groups(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    forward = forward_wrapper(model) if forward_wrapper else model
    views = views[:METHODS[method].cls.num_views]
    terms = train_step(model, optimizer, scaler, views, labels, None, forward)
    return distributed.mean_over_processes(terms["loss"].detach()), model.state_dict()


def _views():
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g) for _ in range(2)]
    return views, torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def _step_worker(rank, port, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    views, labels = _views()
    n = GLOBAL_BATCH // WORLD
    mine = [v[rank * n:(rank + 1) * n] for v in views]  # this process's half of the global batch
    out = {}
    for method in METHODS:
        wrap = lambda m: distributed.wrap(m, torch.device("cpu"), METHODS[method].cls.sync_batchnorm)  # noqa: E731
        loss, state = _step(method, mine, labels[rank * n:(rank + 1) * n], wrap)
        out[method] = {"loss": loss, "state": state}
    torch.save(out, f"{folder}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip the teardown where gloo's threads may abort (see test_losses)


def test_one_step_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_step_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    views, labels = _views()
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for method in METHODS:
        loss, state = _step(method, views, labels)
        for rank in range(WORLD):
            got = results[rank][method]
            torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-6, msg=f"{method}: loss, rank {rank}")
            for name, value in state.items():  # parameters, EMA targets, MoCo's queue, DirectPred's F and W
                # DirectPred's W takes square roots of F's eigenvalues, some near 1e-6: F's rounding
                # (1e-8 here, from summing the batch in another order) becomes up to 5e-6 in W
                atol = 2e-5 if name == "predictor_weight" else 1e-6
                torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=atol,
                                           msg=f"{method}: {name} after one step, rank {rank}")
        moved = [k for k, v in state.items() if v.is_floating_point() and k.startswith("backbone.")
                 and not torch.equal(v, _initial_state(method)[k])]
        assert moved, f"{method}: the step changed no backbone parameter: the comparison would be vacuous"


def _initial_state(method):
    cfg = default_config(method, quick=True)
    torch.manual_seed(0)
    return build_method(method, cfg.backbone, cfg.width, 10, **cfg.method_kwargs).state_dict()


# -- the command line under torchrun ------------------------------------------------------------

def _torchrun(*args, nproc=WORLD, wait=True, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "sslnb", "pretrain", "--quick", "--device", "cpu", "--no-progress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_process_run_writes_one_run_and_resumes(tmp_path):
    run_dir = tmp_path / "simclr"
    first = _torchrun("--method", "simclr", "--epochs", "2", "--until-epoch", "1", "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(first.stdout.splitlines()) == 1, first.stdout  # rank 0 alone prints the result
    assert json.loads(first.stdout)["epochs_done"] == 1
    assert "2 processes x 32 images = a global batch of 64" in first.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["simclr"]
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2

    # another number of processes is refused, with what to do
    one = subprocess.run([sys.executable, "-m", "sslnb", "pretrain", "--quick", "--method", "simclr", "--epochs", "2",
                          "--run-dir", str(run_dir), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 2 and "trained by 2 process(es) and this launch has 1" in one.stderr, one.stderr

    second = _torchrun("--method", "simclr", "--epochs", "2", "--run-dir", str(run_dir))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stderr and json.loads(second.stdout)["finished"] is True
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng_ranks"]) == 2  # every process's random streams, for an exact resume
    assert not torch.equal(ckpt["rng_ranks"][0]["generator"], ckpt["rng_ranks"][1]["generator"])


def test_a_global_batch_that_does_not_split_is_refused_before_anything_runs(tmp_path):
    proc = _torchrun("--method", "simclr", "--epochs", "1", "--batch-size", "63", "--run-dir", str(tmp_path / "r"))
    assert proc.returncode != 0
    assert "batch_size 63 is the global batch and must split into 2 processes" in proc.stderr
    assert not (tmp_path / "r").exists()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.split(b"=")[1]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through Linux's /proc")
def test_killing_one_process_ends_the_others_with_a_message(tmp_path):
    run_dir = tmp_path / "run"
    proc = _torchrun("--method", "simclr", "--epochs", "200", "--run-dir", str(run_dir), wait=False)
    try:
        deadline = time.time() + 180
        while not (run_dir / "checkpoint.pt").exists():  # training is under way: epoch 1 ended
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        victim = [p for p in _children(proc.pid) if _rank_of(p) == 1]
        assert victim, "no worker with RANK=1 under torchrun"
        os.kill(victim[0], signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=120)  # a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and time.time() - killed < 60
    line = [ln for ln in err.splitlines() if ln.startswith("python -m sslnb pretrain (process 0 of 2): error:")]
    assert line, err[-3000:]
    assert "another process of the run ended" in line[0] and "the same torchrun command resumes it" in line[0]


# -- one process never touches torch.distributed -------------------------------------------------

def test_a_single_process_never_initialises_torch_distributed(tmp_path, monkeypatch, digits):
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise AssertionError("a single-process run initialised torch.distributed")

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist, "init_process_group", refuse)
    monkeypatch.setattr(dist, "all_reduce", refuse)
    cfg = default_config("moco", quick=True, epochs=1)
    run = train(cfg, tmp_path / "run", device="cpu", progress=False)
    assert run.finished and not dist.is_initialized()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 1
    assert "rng_ranks" not in torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)


def test_torchrun_environment_is_read_and_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.launched() is distributed.SINGLE  # one process under torchrun: nothing distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.launched() == distributed.ProcessContext(rank=2, world_size=4, local_rank=0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="outside"):
        distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        distributed.launched()
    assert distributed.rank_seed(7, 0) == 7  # rank 0 draws what a single process draws
