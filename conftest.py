"""Every pytest invocation gets a fresh runs folder, so a quick run left by older code (in a
notebook or a test) can never stand in for the one this code makes. Set before any notebook
kernel starts: nbval's kernels inherit the environment.

The test command runs two worker processes (pytest-xdist) on a 2-core machine: each worker and
the notebook kernels it starts use one thread, as two processes with two spinning threads each
would fight over the cores."""
import os
import tempfile

os.environ["SSLNB_RUNS"] = tempfile.mkdtemp(prefix="sslnb-test-runs-")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
