"""`python -m sslnb`: it trains and evaluates, and a user's mistake is one clear line with exit 2."""
import json
import os
import subprocess
import sys

import pytest

ENV = {k: v for k, v in os.environ.items() if k != "SSLNB_QUICK"}


def sslnb(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sslnb", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=600)


def sslnb_in_process(*args):
    """The same entry point without a new interpreter (fast): returns (status, stdout, stderr)."""
    import contextlib
    import io

    from sslnb.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as e:  # argparse's own errors
            status = e.code
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = sslnb("pretrain", "--method", "simclr", "--epochs", "1", "--width", "4", "--run-dir", str(run_dir),
                 "--no-progress", env={"SSLNB_QUICK": "1"})
    assert proc.returncode == 0, proc.stderr
    return run_dir, json.loads(proc.stdout)


def test_pretrain_in_quick_mode_then_evaluate(quick_run):
    run_dir, out = quick_run
    assert out["finished"] and out["epochs_done"] == 1 and out["run_dir"] == str(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["dataset"] == "digits" and cfg["width"] == 4  # quick-mode defaults, overridden width
    proc = sslnb("evaluate", "--run-dir", str(run_dir), "--protocol", "knn")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["k"] == 200 and res["t"] == 0.1 and res["top1"] == pytest.approx(out["knn_top1"], abs=1e-3)
    proc = sslnb("evaluate", "--run-dir", str(run_dir), "--protocol", "linear", "--epochs", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["probe"] == "thesis" and res["settings"]["lr"] == 0.3 and 0 <= res["top1"] <= 100


def test_training_options_reach_the_run_config(tmp_path):
    run_dir = tmp_path / "run"
    proc = sslnb_in_process("pretrain", "--method", "barlow_twins", "--quick", "--width", "4", "--optimizer", "lars",
                            "--lr", "0.2", "--lr-batch-scaling", "--weight-decay", "1.5e-6", "--warmup-epochs", "1",
                            "--crop-scale", "0.2", "1", "--option", "lambd=0.01", "--until-epoch", "0",
                            "--run-dir", str(run_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((run_dir / "config.json").read_text())
    assert (cfg["optimizer"], cfg["lr"], cfg["lr_batch_scaling"], cfg["weight_decay"], cfg["warmup_epochs"]) == \
        ("lars", 0.2, True, 1.5e-6, 1)
    assert cfg["crop_scale"] == [0.2, 1.0] and cfg["method_kwargs"]["lambd"] == 0.01  # beside quick mode's own
    assert json.loads(proc.stdout)["epochs_done"] == 0


@pytest.mark.parametrize("args,fragments", [
    (["pretrain", "--method", "simclear"], ["invalid choice: 'simclear'", "'simclr', 'moco'"]),
    (["pretrain", "--method", "byol", "--dataset", "mnist"], ["invalid choice: 'mnist'", "digits"]),
    (["pretrain", "--method", "byol", "--dataset", "imagefolder", "--data-root", "/no/such/folder"],
     ["/no/such/folder", "train/"]),
    (["pretrain", "--method", "byol", "--dataset", "digits", "--batch-size", "1"], ["batch_size must be at least 2"]),
    (["pretrain", "--method", "byol", "--dataset", "digits", "--device", "tpu"], ["unknown device 'tpu'"]),
    (["pretrain", "--method", "moco", "--dataset", "digits", "--option", "queue=512"],
     ["moco has no option queue", "queue_size"]),
    (["pretrain", "--method", "moco", "--dataset", "digits", "--option", "queue_size"], ["KEY=VALUE"]),
    (["pretrain", "--method", "byol", "--optimizer", "adam"], ["invalid choice: 'adam'", "'sgd', 'lars'"]),
    (["evaluate", "--run-dir", "/no/such/run"], ["not a run directory"]),
])
def test_bad_input_is_one_line_and_exit_status_2(args, fragments, monkeypatch):
    monkeypatch.delenv("SSLNB_QUICK", raising=False)
    one_line_error(sslnb_in_process(*args), *fragments)


def test_bad_input_from_a_real_process_shows_no_traceback():
    one_line_error(sslnb("pretrain", "--method", "byol", "--dataset", "digits", "--batch-size", "1"),
                   "batch_size must be at least 2")


def test_evaluate_mistakes_are_one_line(quick_run, tmp_path):
    run_dir, _ = quick_run
    one_line_error(sslnb_in_process("evaluate", "--run-dir", str(run_dir), "--weights", "checkpoint.pt"),
                   "does not hold resnet18", "backbone_best.pt")
    one_line_error(sslnb_in_process("evaluate", "--run-dir", str(run_dir), "--protocol", "linear", "--epochs", "0"),
                   "epochs and batch_size must be >= 1")
    one_line_error(sslnb_in_process("evaluate", "--run-dir", str(run_dir), "--protocol", "finetune",
                                    "--label-fraction", "1.5"), "label_fraction must be in (0, 1]")
    a_file = tmp_path / "file"
    a_file.write_text("")
    one_line_error(sslnb_in_process("pretrain", "--method", "simclr", "--dataset", "digits", "--width", "4",
                                    "--epochs", "1", "--run-dir", str(a_file / "run"), "--no-progress"), str(a_file))
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    one_line_error(sslnb_in_process("evaluate", "--run-dir", str(bad)), "config.json is not valid JSON")


def test_a_corrupt_checkpoint_is_named(quick_run, tmp_path):
    run_dir, _ = quick_run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((run_dir / "config.json").read_text())
    (bad / "backbone.pt").write_bytes(b"garbage")
    one_line_error(sslnb_in_process("evaluate", "--run-dir", str(bad)), "corrupt", str(bad / "backbone.pt"))
