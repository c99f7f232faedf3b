"""Issue 8, a first hour without walls: a failed start never poisons a run folder, a user's mistake
is one line and exit status 2 (never a traceback), nonsense is refused before anything is written,
Ctrl-C says how to resume, messages do not mislead, and the docs and notebooks say what is true.

Every command is the real entry point called in-process (`sslnb.__main__.main`), on digits at
8x8 pixels with a width-4 backbone, so the whole file runs in seconds."""
import contextlib
import io
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from sslnb import evaluate, methods, plots
from sslnb import train as T
from sslnb.data import load_dataset
from sslnb.runs import Run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "digits", "--width", "4", "--batch-size", "256", "--epochs", "1", "--image-size", "8",
        "--no-progress"]


@pytest.fixture(autouse=True)
def _not_quick(monkeypatch):
    monkeypatch.delenv("SSLNB_QUICK", raising=False)


def cli(*args):
    """`python -m sslnb ARGS` in this process: (status, stdout, stderr)."""
    from sslnb.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors and --help
            status = e.code
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def pretrain(run_dir, *args, method="simclr"):
    return cli("pretrain", "--method", method, *TINY, "--run-dir", run_dir, *args)


def one_line_error(proc, *fragments, status=2):
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("first_hour") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SSLNB_QUICK", raising=False)
        proc = pretrain(run_dir)
    assert proc.returncode == 0, proc.stderr
    return run_dir


# -- 1. a failed start never poisons the run folder --------------------------------------------

@pytest.mark.parametrize("bad,fragments", [
    (["--batch-size", "5000"], ["batch_size 5000", "1438"]),
    (["--lr", "-1"], ["lr must be", "got -1"]),
    (["--weight-decay", "-1"], ["weight_decay must be", "got -1"]),
    (["--option", "temperature=0"], ["temperature", "> 0"]),
])
def test_a_refused_start_writes_nothing_and_the_corrected_command_runs(tmp_path, bad, fragments):
    run_dir = tmp_path / "run"
    one_line_error(pretrain(run_dir, *bad), *fragments)
    assert not (run_dir / "config.json").exists()  # everything checkable is checked before writing
    proc = pretrain(run_dir, "--until-epoch", "0")
    assert proc.returncode == 0, proc.stderr


def test_moco_queue_size_zero_is_refused_before_writing(tmp_path):
    run_dir = tmp_path / "run"
    one_line_error(pretrain(run_dir, "--option", "queue_size=0", method="moco"), "queue_size", ">= 1")
    assert not run_dir.exists()


def _nan_views(*args, **kwargs):
    return lambda images, generator=None: (torch.full((len(images), 3, 8, 8), float("nan")),) * 2


def test_a_nan_stop_in_the_first_epoch_does_not_block_the_corrected_command(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(T.augment, "train_views", _nan_views)
        line = one_line_error(pretrain(run_dir, "--lr", "5"), "loss became nan in epoch 1", "lower the lr")
    assert "checkpoint (epoch 0)" not in line and "no epoch finished" in line  # no promise of a checkpoint
    assert not (run_dir / "checkpoint.pt").exists()
    proc = pretrain(run_dir, "--lr", "0.03")  # another config in the same folder: it held no finished epoch
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.03


def test_a_folder_with_a_finished_epoch_still_refuses_another_config(finished_run):
    one_line_error(pretrain(finished_run, "--lr", "0.5"), "another config", "lr: 0.06 -> 0.5")


def test_a_folder_with_an_unreadable_config_but_no_checkpoint_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("[1, 2]")
    proc = pretrain(run_dir, "--until-epoch", "0")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "config.json").read_text())["method"] == "simclr"


def test_a_checkpoint_without_its_config_is_never_overwritten(finished_run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes((finished_run / "checkpoint.pt").read_bytes())
    one_line_error(pretrain(bad), "checkpoint.pt but no config.json")
    assert (bad / "checkpoint.pt").read_bytes() == (finished_run / "checkpoint.pt").read_bytes()


# -- 2. no tracebacks ---------------------------------------------------------------------------

@pytest.mark.parametrize("option,fragments", [
    ("bn_splits=0", ["bn_splits", ">= 1", "got 0"]),
    ("bn_splits=-8", ["bn_splits", ">= 1", "got -8"]),
    ("queue_size=0", ["queue_size", ">= 1"]),
])
def test_moco_options_that_used_to_raise_are_one_line(tmp_path, option, fragments):
    one_line_error(pretrain(tmp_path / "run", "--option", option, method="moco"), *fragments)


def test_evaluate_on_a_broken_config_is_one_line(finished_run, tmp_path):
    cfg = json.loads((finished_run / "config.json").read_text())
    for name, text, fragments in [
        ("missing", json.dumps({k: v for k, v in cfg.items() if k != "backbone"}), ["config.json", "backbone"]),
        ("a_list", json.dumps([1, 2]), ["config.json", "JSON object"]),
    ]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text(text)
        (bad / "backbone.pt").write_bytes((finished_run / "backbone.pt").read_bytes())
        one_line_error(cli("evaluate", "--run-dir", bad), *fragments)


def test_ctrl_c_says_where_the_run_stopped_and_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_set_lr, calls = T.set_lr, []

    def interrupt_in_epoch_2(optimizer, step, total_steps, *args):
        calls.append(step)
        if step == total_steps // 2 + 3:  # a few steps into epoch 2 of 2
            raise KeyboardInterrupt
        return real_set_lr(optimizer, step, total_steps, *args)

    with monkeypatch.context() as mp:
        mp.setattr(T, "set_lr", interrupt_in_epoch_2)
        proc = pretrain(run_dir, "--epochs", "2")
    line = one_line_error(proc, "interrupted in epoch 2", "after epoch 1", "same command", status=130)
    assert str(run_dir) in line
    ckpt = Run(run_dir).load()  # loadable, holds epoch 1
    assert ckpt["history"][-1]["epoch"] == 1 and Run(run_dir).epochs_done == 1
    proc = pretrain(run_dir, "--epochs", "2")
    assert proc.returncode == 0 and json.loads(proc.stdout)["epochs_done"] == 2, proc.stderr
    assert "resuming" in proc.stderr


def test_a_real_sigint_is_one_line_and_exit_status_130(tmp_path):
    """The signal itself (not a raised exception), sent to this process once epoch 1 is saved."""
    import os
    import signal
    import threading
    import time

    run_dir = tmp_path / "run"

    def press_ctrl_c():
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    proc = pretrain(run_dir, "--epochs", "1000")  # never finishes by itself
    line = one_line_error(proc, "interrupted in epoch", "same command", status=130)
    assert proc.stdout == ""
    done = Run(run_dir).load()["history"][-1]["epoch"]  # the last checkpoint loads
    assert f"after epoch {done} of 1000" in line, line


# -- 3. nonsense is refused ---------------------------------------------------------------------

@pytest.mark.parametrize("args,fragments", [
    (["--lr", "0"], ["lr must be", "got 0"]),
    (["--lr", "nan"], ["lr must be", "nan"]),
    (["--lr", "inf"], ["lr must be", "inf"]),
    (["--option", "temperature=-1"], ["temperature", "> 0", "got -1"]),
    (["--option", "temperature=0"], ["temperature", "> 0"]),
    (["--until-epoch", "-2"], ["until-epoch", ">= 0"]),
    (["--data-root", "/somewhere"], ["--data-root", "digits"]),
    (["--epochs", "0"], ["epochs must be at least 1"]),
])
def test_nonsense_is_refused_in_one_line(tmp_path, args, fragments):
    one_line_error(pretrain(tmp_path / "run", *args), *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method,option,fragments", [
    ("byol", "ema=2", ["ema", "[0, 1]", "got 2"]),
    ("directpred", "f_momentum=1.5", ["f_momentum", "[0, 1]"]),
    ("byol", "target_updates_per_step=0", ["target_updates_per_step", ">= 1"]),
    ("simsiam", "output_affine=2", ["output_affine", "true or false"]),
    ("vicreg", "var_weight=-1", ["var_weight", ">= 0"]),
])
def test_method_options_out_of_range_are_refused(tmp_path, method, option, fragments):
    one_line_error(pretrain(tmp_path / "run", "--option", option, "--warmup-epochs", "0", method=method), *fragments)


def test_every_method_option_declares_its_range_and_one_check_enforces_it():
    for name in methods.METHODS:
        declared = methods.option_ranges(name)
        assert set(declared) == set(methods.method_options(name)), name  # no option without a range
        for key, (default, rule) in declared.items():
            methods.check_options(name, {key: default})  # every default is valid
            for bad in rule.examples_outside():
                with pytest.raises(ValueError, match=re.escape(key)):
                    methods.check_options(name, {key: bad})


@pytest.mark.parametrize("args,fragments", [
    (["--protocol", "knn", "--label-fraction", "0.1"], ["--label-fraction", "finetune"]),
    (["--protocol", "knn", "--cached"], ["--cached", "linear"]),
    (["--protocol", "knn", "--epochs", "3"], ["--epochs", "knn"]),
    (["--protocol", "linear", "--label-fraction", "0.1"], ["--label-fraction", "finetune"]),
    (["--protocol", "finetune", "--probe", "vicreg"], ["--probe", "linear"]),
    (["--data-root", "/somewhere"], ["--data-root", "digits"]),
])
def test_evaluate_refuses_options_its_protocol_ignores(finished_run, args, fragments):
    one_line_error(cli("evaluate", "--run-dir", finished_run, *args), *fragments)


# -- 4. image folders ---------------------------------------------------------------------------

def _folder(root, train=("a", "b"), test=("a", "b"), empty=()):
    for split, classes in (("train", train), ("test", test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 200 if c == "a" else 0, 90)).save(root / split / c / f"{i}.png")
    for folder in empty:
        (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def test_a_test_class_missing_from_train_is_refused(tmp_path):
    _folder(tmp_path, train=("a", "b"), test=("a", "b", "c"))
    with pytest.raises(ValueError, match=r"test/c.*no training images"):
        load_dataset("imagefolder", tmp_path, image_size=8)


def test_a_single_class_is_refused(tmp_path):
    _folder(tmp_path, train=("a",), test=("a",))
    with pytest.raises(ValueError, match=r"one class \(a\).*at least two"):
        load_dataset("imagefolder", tmp_path, image_size=8)


def test_unusual_folders_are_named_in_a_warning(tmp_path):
    _folder(tmp_path, train=("a", "b", "c"), test=("a", "b"), empty=("train/d", "test/d"))
    with pytest.warns(UserWarning) as record:
        train, test = load_dataset("imagefolder", tmp_path, image_size=8)
    text = " ".join(str(w.message) for w in record)
    assert "train/c" in text and "no test images" in text
    assert "train/d" in text and "empty" in text
    assert train.classes == ["a", "b", "c"]  # the empty class is left out, c stays (it trains)


def test_a_clean_image_folder_gives_no_warning(tmp_path):
    _folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, test = load_dataset("imagefolder", tmp_path, image_size=8)
    assert train.classes == test.classes == ["a", "b"]


def test_image_folder_mistakes_are_one_line_from_the_cli(tmp_path):
    _folder(tmp_path / "data", train=("a",), test=("a",))
    one_line_error(cli("pretrain", "--method", "simclr", "--dataset", "imagefolder", "--data-root", tmp_path / "data",
                       "--run-dir", tmp_path / "run", "--no-progress"), "at least two")
    assert not (tmp_path / "run").exists()


# -- 5. --option parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("pair,expected", [
    ("temperature=.2", {"temperature": 0.2}),
    ("temperature = 0.2", {"temperature": 0.2}),
    ("proj_dims=512,128", {"proj_dims": (512, 128)}),
    ("proj_dims=[512, 128]", {"proj_dims": (512, 128)}),
    ("use_projector=False", {"use_projector": False}),
    ("predictor_lr=none", {"predictor_lr": None}),
])
def test_option_values_are_read_as_people_write_them(pair, expected):
    from sslnb.__main__ import _options

    assert _options([pair]) == expected


def test_option_mistakes_show_the_accepted_form(tmp_path):
    one_line_error(pretrain(tmp_path / "r", "--option", "proj_dims=[0,128]"), "proj_dims", "e.g. proj_dims=512,128")
    one_line_error(pretrain(tmp_path / "r", "--option", "proj_dims=big"), "proj_dims", "e.g. proj_dims=512,128")
    one_line_error(pretrain(tmp_path / "r", "--option", "temperature=warm"), "temperature", "a number")
    line = one_line_error(pretrain(tmp_path / "r", "--option", "x=1", method="supervised"), "supervised has no options")
    assert not line.rstrip().endswith(":")


def test_an_option_at_its_default_matches_the_existing_run(finished_run):
    proc = pretrain(finished_run, "--option", "temperature=0.5")
    assert proc.returncode == 0, proc.stderr
    assert "finished" in proc.stderr


# -- 6. messages that do not mislead ------------------------------------------------------------

def test_weights_that_are_not_weights_never_advise_deleting(finished_run):
    line = one_line_error(cli("evaluate", "--run-dir", finished_run, "--weights", "config.json"),
                          "config.json", "backbone.pt")
    assert "delete" not in line


def test_a_garbage_history_names_its_file(finished_run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "backbone.pt"):
        (bad / f).write_bytes((finished_run / f).read_bytes())
    (bad / "history.jsonl").write_text('{"epoch": 0}\nnot json\n')
    one_line_error(pretrain(bad), str(bad / "history.jsonl"), "line 2")


def test_a_run_folder_that_is_a_file_says_so(tmp_path):
    (tmp_path / "run").write_text("")
    line = one_line_error(pretrain(tmp_path / "run"), str(tmp_path / "run"), "is a file")
    assert "Errno" not in line


def test_a_moved_image_folder_points_at_evaluate_data_root(tmp_path):
    data = _folder(tmp_path / "data")
    proc = cli("pretrain", "--method", "simclr", "--dataset", "imagefolder", "--data-root", data, "--width", "4",
               "--batch-size", "2", "--epochs", "1", "--image-size", "8", "--run-dir", tmp_path / "run",
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    data.rename(tmp_path / "moved")
    one_line_error(cli("evaluate", "--run-dir", tmp_path / "run"), "evaluate --data-root")
    proc = cli("evaluate", "--run-dir", tmp_path / "run", "--data-root", tmp_path / "moved")
    assert proc.returncode == 0, proc.stderr


def test_pretrain_says_when_it_resumes_and_when_the_run_is_finished(tmp_path):
    run_dir = tmp_path / "run"
    assert pretrain(run_dir, "--epochs", "2", "--until-epoch", "1").returncode == 0
    proc = pretrain(run_dir, "--epochs", "2")
    assert proc.returncode == 0 and "resuming" in proc.stderr and "after epoch 1" in proc.stderr, proc.stderr
    json.loads(proc.stdout)  # stdout stays one JSON object
    proc = pretrain(run_dir, "--epochs", "2")
    assert proc.returncode == 0 and "already finished" in proc.stderr, proc.stderr


def test_help_shows_each_methods_defaults():
    proc = cli("pretrain", "--help")
    assert proc.returncode == 0
    for fragment in ("simclr", "400 epochs", "batch 512", "lr 0.06", "weight decay 0.0005", "seed 0",
                     "vicreg", "lr 0.2"):
        assert fragment in proc.stdout, fragment


# -- 7. evaluation output -----------------------------------------------------------------------

def test_the_linear_probe_sees_every_image_and_reports_the_batch_it_used(digits, monkeypatch):
    train, test = digits  # 1,438 training images: batch 512 used to drop 414 of them every epoch
    seen = []
    real = evaluate.augment.linear_eval_transform

    def counting(*args, **kwargs):
        t = real(*args, **kwargs)

        def apply(x, generator=None):
            seen.append(len(x))
            return t(x, generator=generator)
        return apply

    monkeypatch.setattr(evaluate.augment, "linear_eval_transform", counting)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    net.feature_dim = 4
    out = evaluate.linear_probe(net, train, test, "thesis", *train.mean_std(), progress=False, epochs=1)
    assert sum(seen) == len(train) == 1438
    assert out["settings"]["batch_size"] == max(seen) <= 512
    small = train.subset(torch.arange(144))
    sub = evaluate.linear_probe(net, small, test, "thesis", *train.mean_std(), progress=False, epochs=1)
    assert sub["settings"]["batch_size"] == 144  # not the protocol's 512


def test_accuracies_print_rounded(finished_run):
    proc = cli("evaluate", "--run-dir", finished_run)
    assert proc.returncode == 0, proc.stderr
    top1 = json.loads(proc.stdout)["top1"]
    assert top1 == round(top1, 2)
    out = json.loads(pretrain(finished_run).stdout)
    assert out["knn_top1"] == round(out["knn_top1"], 2)


# -- 8. docs, notebook 00 and plots -------------------------------------------------------------

def _notebooks():
    import nbformat

    return {p.name: nbformat.read(p, as_version=4) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}


def _repo_url():
    import tomllib

    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    return urls["Repository"].rstrip("/")


def test_every_notebook_badge_and_install_line_use_the_one_repository_url():
    url = _repo_url()
    owner_repo = url.removeprefix("https://github.com/")
    for name, nb in _notebooks().items():
        text = "\n".join(c.source for c in nb.cells)
        badge = f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{name}"
        assert badge in nb.cells[0].source, name
        assert f"git+{url}.git" in nb.cells[1].source, name
        for found in re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", text):
            assert found == badge, (name, found)
        for found in re.findall(r"git\+https://[^\s\"']+", text):
            assert found == f"git+{url}.git", (name, found)


def test_readme_claims_only_notebooks_that_exist():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"^\| `(\d\d_\w+)`", table, flags=re.M)
    assert named and all((ROOT / "notebooks" / f"{n}.ipynb").exists() for n in named), named
    assert "../shared" not in readme  # a folder users do not have
    assert "drive=False" in readme and "authori" in readme


def test_the_digits_split_is_documented_as_it_is(digits):
    from sslnb import data

    train, test = digits
    doc = " ".join(data._load_digits.__doc__.split())
    assert f"{len(train):,} training and {len(test):,} test" in doc


def test_notebook_00_teaches_what_quick_mode_shows():
    nb = _notebooks()["00_start_here.ipynb"]
    text = "\n".join(c.source for c in nb.cells)
    assert "top four rows" not in text.lower()
    assert "drive=False" in text and "authori" in text
    training = next(c.source for c in nb.cells if c.cell_type == "code" and "load_or_train" in c.source)
    assert 'default_config("simclr", quick=QUICK' in training
    assert re.search(r"assert .*last\[\"knn_top1\"\] > first\[\"knn_top1\"\]", text)
    params = next(c.source for c in nb.cells if c.source.startswith("QUICK ="))
    assert re.search(r"FIRST_RUN_EPOCHS = None if QUICK", params)  # quick mode: the registry's settings


def test_ipywidgets_is_required_for_tqdm_auto_in_jupyter():
    reqs = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^ipywidgets", reqs, flags=re.M)


def test_the_lr_panel_draws_the_schedule_not_a_triangle(finished_run, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    fig = plots.run_summary(Run(finished_run))
    ax = fig.axes[3]
    cfg = Run(finished_run).config
    line = max(ax.get_lines(), key=lambda l: len(l.get_xdata()))
    x, y = line.get_xdata(), line.get_ydata()
    assert x[0] == 0 and y[0] == pytest.approx(cfg["lr"])  # no warm-up: the schedule starts at its peak
    assert y[-1] == pytest.approx(cfg["final_lr"], abs=1e-9) and len(x) > 10
    assert all(b <= a + 1e-12 for a, b in zip(y, y[1:]))  # cosine: never rises
    matplotlib.pyplot.close(fig)


# -- SPEC section 9's mistakes ------------------------------------------------------------------

@pytest.mark.parametrize("args,fragments", [
    (["pretrain", "--method", "simclear"], ["invalid choice: 'simclear'", "simclr"]),
    (["pretrain", "--method", "simclr", "--dataset", "mnist"], ["invalid choice: 'mnist'", "digits"]),
    (["pretrain", "--method", "simclr", "--dataset", "imagefolder", "--data-root", "/no/such"], ["/no/such", "train/"]),
    (["evaluate", "--run-dir", "/no/such/run"], ["/no/such/run", "pretrain"]),
    (["pretrain", "--method", "simclr", *TINY, "--batch-size", "1"], ["batch_size must be at least 2"]),
])
def test_spec_section_9_mistakes(args, fragments):
    one_line_error(cli(*args), *fragments)


def test_a_corrupt_checkpoint_is_one_line_when_resuming_and_evaluating(tmp_path):
    run_dir = tmp_path / "run"
    assert pretrain(run_dir, "--epochs", "2", "--until-epoch", "1").returncode == 0
    (run_dir / "checkpoint.pt").write_bytes(b"garbage")
    one_line_error(pretrain(run_dir, "--epochs", "2"), str(run_dir / "checkpoint.pt"), "corrupt")
    (run_dir / "backbone_best.pt").write_bytes(b"garbage")
    one_line_error(cli("evaluate", "--run-dir", run_dir, "--weights", "backbone_best.pt"), "corrupt")
