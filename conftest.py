"""Every pytest invocation gets a fresh runs folder, so a quick run left by older code (in a
notebook or a test) can never stand in for the one this code makes. Set before any notebook
kernel starts: nbval's kernels inherit the environment."""
import os
import tempfile

os.environ["SSLNB_RUNS"] = tempfile.mkdtemp(prefix="sslnb-test-runs-")
