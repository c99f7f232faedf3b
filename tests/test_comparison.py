"""The comparison of notebook 17: the thesis's table in `sslnb.thesis`, reading the method
notebooks' runs, stored evaluations, labels per class, covariance spectra and measured cost."""
import json

import matplotlib

matplotlib.use("Agg")
import pytest
import torch

from sslnb import analysis, evaluate, plots, thesis
from sslnb import train as T
from sslnb.data import labelled_subset
from sslnb.runs import Run


@pytest.fixture(scope="module")
def small_digits(digits):
    train, test = digits
    return train.subset(torch.arange(400)), test.subset(torch.arange(120))


def tiny_run(tmp_path, small_digits, key="byol", epochs=2, **kw):
    """A finished run of `key` under its notebook's name, as tiny as a test can afford."""
    cfg = thesis.config(key, quick=True, width=4, epochs=epochs, knn_k=20, **kw)
    return T.train(cfg, tmp_path / thesis.run_name(key, cfg.dataset), progress=False, data=small_digits), cfg


# -- the table ---------------------------------------------------------------------------------

def test_the_thesis_numbers_are_the_seeds():
    """Tables 4.1-4.3 and fig. 4.6's text (thesis, seeds/003), copied by hand."""
    linear = {k: e.linear for k, e in thesis.ENTRIES.items() if e.linear is not None}
    assert linear == {"moco": 82.37, "byol": 85.55, "simsiam": 82.88, "barlow_twins": 81.97, "directpred": 84.43,
                      "supervised": 92.34}
    assert thesis.PROBE_LR == {0.05: 85.3, 0.1: 85.48, 0.15: 85.48, 0.2: 85.51, 0.25: 85.52, 0.3: 85.55, 0.35: 85.7}
    assert thesis.FINETUNE == {("byol", 0.1): 82.8, ("byol", 1.0): 91.66, ("supervised", 0.1): 65.7,
                               ("supervised", 1.0): 92.34}
    peaks = {k: e.knn_peak for k, e in thesis.ENTRIES.items() if e.knn_peak is not None}
    assert peaks == {"moco": 85, "byol": 90, "simsiam": 90, "directpred": 90, "barlow_twins": 80}
    assert thesis.PROBE_LR[0.3] == thesis.entry("byol").linear  # the lr the thesis kept gives table 4.2's BYOL
    assert not thesis.entry("simclr").in_thesis and thesis.entry("simclr").linear is None


def test_configs_and_names_are_the_method_notebooks():
    """Notebooks 10-16 train `default_config(method, quick=QUICK)` as `<method>_<dataset>`, and
    notebook 16 also `supervised10_<dataset>` with label_fraction 0.1."""
    for quick in (False, True):
        for key in thesis.COMPARED:
            assert thesis.config(key, quick=quick) == T.default_config(key, quick=quick)
            assert thesis.run_name(key, "cifar10") == f"{key}_cifar10"
        sup10 = thesis.config("supervised10", quick=quick)
        assert sup10 == T.default_config("supervised", quick=quick, label_fraction=0.1)
    assert thesis.run_name("supervised10", "digits") == "supervised10_digits"
    assert thesis.COMPARED == ("simclr", "moco", "byol", "simsiam", "barlow_twins", "directpred", "supervised")
    numbers = [int(e.notebook[:2]) for e in thesis.ENTRIES.values()]
    assert numbers == [10, 11, 12, 13, 14, 15, 16, 16]
    with pytest.raises(ValueError, match="unknown run 'vicreg'; valid: simclr"):
        thesis.entry("vicreg")


def test_markdown_table_and_budget():
    text = plots.markdown_table(["a", "b", "c"], [[1.234, None, "x"]])
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1.23 | — | x |"]
    cfg = thesis.config("supervised10")
    assert thesis.budget(cfg) == "200 ep, resnet18 (w64), batch 512, cifar10, 10% labels"
    assert thesis.budget(thesis.config("byol", quick=True, image_size=16)).endswith("digits at 16 px")


# -- reading the runs ----------------------------------------------------------------------------

def test_load_runs_names_the_missing_notebook_and_goes_on(tmp_path, small_digits, capsys):
    run, cfg = tiny_run(tmp_path, small_digits, "byol")
    overrides = dict(width=4, epochs=2, knn_k=20)
    runs = thesis.load_runs(("byol", "moco"), quick=True, root=tmp_path, **overrides)
    out = capsys.readouterr().out
    assert list(runs) == ["byol"] and runs["byol"].path == run.path
    assert "missing: moco_digits" in out and "notebooks/11_moco.ipynb" in out

    T.train(cfg, tmp_path / "simsiam_digits", progress=False, data=small_digits)  # BYOL's config in SimSiam's place
    assert thesis.load_runs(("simsiam",), quick=True, root=tmp_path, **overrides) == {}
    out = capsys.readouterr().out
    assert "left out simsiam_digits" in out and "another config" in out

    partial = thesis.config("directpred", quick=True, **overrides)
    T.train(partial, tmp_path / "directpred_digits", progress=False, data=small_digits, until_epoch=1)
    assert thesis.load_runs(("directpred",), quick=True, root=tmp_path, **overrides) == {}
    out = capsys.readouterr().out
    assert "unfinished: directpred_digits has 1 of 2 epochs" in out and "15_directpred.ipynb" in out


def test_load_runs_trains_only_what_it_is_told_to(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSLNB_RUNS", str(tmp_path))
    overrides = dict(width=4, epochs=1, knn_k=20)
    runs = thesis.load_runs(("supervised10", "moco"), quick=True, train_missing=("supervised10",), progress=False,
                            **overrides)
    assert list(runs) == ["supervised10"] and runs["supervised10"].finished
    assert runs["supervised10"].path == tmp_path / "_quick" / "supervised10_digits"
    assert runs["supervised10"].config["label_fraction"] == 0.1
    assert "notebooks/11_moco.ipynb" in capsys.readouterr().out
    again = thesis.load_runs(("supervised10",), quick=True, train_missing=True, **overrides)  # loads, trains nothing
    assert again["supervised10"].history == runs["supervised10"].history
    assert "loaded the finished run" in capsys.readouterr().out


# -- evaluations ---------------------------------------------------------------------------------

def test_load_or_evaluate_computes_once_per_settings(tmp_path):
    run = Run(tmp_path)
    calls = []

    def compute(v):
        calls.append(v)
        return {"top1": v, "pair": (1, 2)}

    assert evaluate.load_or_evaluate(run, {"a": 1, "b": 2}, lambda: compute(1.5)) == {"top1": 1.5, "pair": [1, 2]}
    assert evaluate.load_or_evaluate(run, {"b": 2, "a": 1}, lambda: compute(9.0))["top1"] == 1.5  # stored
    assert evaluate.load_or_evaluate(run, {"a": 1, "b": 3}, lambda: compute(2.5))["top1"] == 2.5  # other settings
    assert calls == [1.5, 2.5]
    assert len(json.loads((tmp_path / "evaluations.json").read_text())) == 2


def test_labelled_indices_are_labelled_subsets_images(digits):
    from sslnb.data import labelled_indices

    train, _ = digits
    for n, seed in ((1, 0), (10, 3), (500, 1)):
        idx = labelled_indices(train.labels, train.num_classes, per_class=n, seed=seed)
        sub = labelled_subset(train, per_class=n, seed=seed)
        assert torch.equal(train.images[idx], sub.images) and torch.equal(train.labels[idx], sub.labels)
        assert torch.equal(idx, idx.unique())  # sorted, no image twice
    counts = torch.bincount(train.labels[labelled_indices(train.labels, 10, per_class=7)])
    assert counts.tolist() == [7] * 10


def test_probe_on_features_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 4
    y = torch.arange(5).repeat_interleave(40)
    x = centres[y] + torch.randn(len(y), 16, generator=g)
    yt = torch.arange(5).repeat(20)
    xt = centres[yt] + torch.randn(len(yt), 16, generator=g)
    acc = evaluate.probe_on_features(x, y, xt, yt, 5, steps=100)
    assert acc > 95
    assert evaluate.probe_on_features(x, y, xt, yt, 5, steps=100) == acc  # seeded
    assert evaluate.probe_on_features(x[:5], y[:5], xt, yt, 5, steps=5) < 100  # 1 per class, 5 steps: worse


def test_label_efficiency_more_labels_help(small_digits):
    from sslnb.models import resnet

    torch.manual_seed(0)
    train, test = small_digits
    res = evaluate.label_efficiency(resnet("resnet18", 4), train, test, per_class=(2, 30), seeds=(0, 1),
                                    mean=train.mean_std()[0], std=train.mean_std()[1], steps=50)
    assert set(res) == {2, 30} and len(res[2]["runs"]) == 2
    assert res[30]["mean"] > res[2]["mean"]
    assert res[2]["std"] == pytest.approx(torch.tensor(res[2]["runs"]).std().item())


def test_thesis_evaluations_of_a_run_are_stored_and_deduplicated(tmp_path, small_digits, monkeypatch):
    run, _ = tiny_run(tmp_path, small_digits, "byol")
    key = (run.config["dataset"], None, run.config["image_size"], "cpu")  # the run's data: the small subset
    monkeypatch.setitem(thesis._DATA, key, (*small_digits, *small_digits[0].mean_std()))
    last = thesis.probe(run, "backbone.pt", epochs=1, batch_size=64)
    assert 0 <= last["top1"] <= 100 and len(last["history"]) == 1
    stored = json.loads((run.path / "evaluations.json").read_text())
    best = thesis.probe(run, "backbone_best.pt", epochs=1, batch_size=64)
    if thesis.best_epoch(run) == run.config["epochs"]:  # the same weights: probed once
        assert best == last and json.loads((run.path / "evaluations.json").read_text()) == stored
    curve = thesis.label_curve(run, (2, 5), (0,), steps=20)
    assert set(curve) == {2, 5}  # int keys after the JSON round trip
    spec = thesis.spectra(run)
    model = analysis.load_method(run)
    assert len(spec["representation"]) == model.backbone.feature_dim
    assert len(spec["embedding"]) == model.eval().project(torch.zeros(2, model.backbone.feature_dim)).shape[1]
    assert spec["embedding"][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="only a supervised run has a classifier"):
        thesis.own_accuracy(run)


def test_best_epoch_is_the_last_best_knn(tmp_path):
    run = Run(tmp_path)
    run.write_history([{"epoch": 0, "knn_top1": 99.0}, {"epoch": 1, "knn_top1": 50.0},
                       {"epoch": 2, "knn_top1": 60.0}, {"epoch": 3, "knn_top1": 60.0}, {"epoch": 4, "knn_top1": 55.0}])
    assert thesis.best_epoch(run) == 3  # epoch 0 (untrained) never counts; ties: the later, as the loop saves


# -- spectra ------------------------------------------------------------------------------------

def test_covariance_spectrum_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    for n, d in ((300, 12), (6, 40)):  # both branches: eigenvalues of C, and via z's SVD when n < d
        z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64)
        zc = z - z.mean(0)
        ref = torch.linalg.svdvals(zc.T @ zc / (n - 1))
        torch.testing.assert_close(analysis.covariance_spectrum(z, normalize=False), ref)
        s = analysis.covariance_spectrum(z.float())
        assert s[0] == 1 and (s[:-1] >= s[1:]).all() and len(s) == d
    low = torch.randn(200, 3, generator=g) @ torch.randn(3, 10, generator=g)  # rank 3 in 10 dims
    s = analysis.covariance_spectrum(low)
    assert (s[3:] < 1e-6).all() and (s[:3] > 1e-3).all()
    assert analysis.directions_for_variance(s, 0.999) == 3
    assert analysis.directions_for_variance([1.0, 0.0, 0.0], 0.99) == 1
    assert analysis.directions_for_variance([1.0, 1.0], 1.0) == 2
    with pytest.raises(ValueError):
        analysis.covariance_spectrum(torch.randn(1, 4))


# -- cost ------------------------------------------------------------------------------------

def test_the_loop_records_peak_memory_and_device(tmp_path, small_digits):
    run, _ = tiny_run(tmp_path, small_digits, "supervised", epochs=1)
    rec = run.history[1]
    assert rec["device_name"].startswith("cpu (") and rec["peak_memory_mb"] is None
    assert "device_name" not in run.history[0]
    cost = thesis.run_cost(run)
    assert cost["device"] == rec["device_name"] and cost["peak_memory_mb"] is None
    assert cost["epoch_s"] == rec["epoch_time"] and cost["epochs"] == 1
    assert T.peak_memory_mb(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_on_cuda_is_reset_per_call():
    dev = torch.device("cuda")
    T.peak_memory_mb(dev, reset=True)
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
    assert T.peak_memory_mb(dev, reset=True) >= 64
    del x
    assert T.peak_memory_mb(dev) < 64 + torch.cuda.memory_allocated(dev) / 2**20
    assert T.device_name(dev) == torch.cuda.get_device_name(dev)


def test_run_cost_takes_medians_and_the_largest_peak(tmp_path):
    run = Run(tmp_path)
    run.write_history([{"epoch": 0, "knn_top1": 1.0}] + [
        {"epoch": e, "epoch_time": t, "images_per_s": 1000 / t, "eval_time": 1.0, "peak_memory_mb": m,
         "device_name": "NVIDIA T4"} for e, t, m in ((1, 9.0, 900.0), (2, 3.0, 1200.0), (3, 4.0, 1100.0))])
    cost = thesis.run_cost(run)
    assert cost == {"device": "NVIDIA T4", "epoch_s": 4.0, "eval_s": 1.0, "images_per_s": 1000 / 4.0,
                    "peak_memory_mb": 1200.0, "epochs": 3}


# -- plots -------------------------------------------------------------------------------------

def test_plots_draw_every_series_and_reference(tmp_path):
    import matplotlib.pyplot as plt

    a, b = Run(tmp_path / "a"), Run(tmp_path / "b")
    for run, v in ((a, 10.0), (b, 20.0)):
        run.path.mkdir()
        run.write_history([{"epoch": e, "knn_top1": v + e} for e in range(4)])
    ax = plots.knn_comparison({"A": a, "B": b}, {"A": 90.0, "B": 90.0})
    assert [line.get_label() for line in ax.lines[:2]] == ["A", "B"]
    assert list(ax.lines[0].get_ydata()) == [10, 11, 12, 13]
    marks = ax.lines[2:]  # one per method, in its run's colour, side by side at a shared value
    assert [m.get_ydata()[0] for m in marks] == [90.0, 90.0] and marks[0].get_xdata()[0] != marks[1].get_xdata()[0]
    assert [m.get_color() for m in marks] == [ax.lines[0].get_color(), ax.lines[1].get_color()]
    assert [t.get_text() for t in ax.texts] == ["thesis ~90: A, B"]
    ax = plots.label_efficiency({"A": {"5": {"mean": 40.0, "std": 1.0}, "50": {"mean": 60.0, "std": 0.5}}})
    assert ax.get_xscale() == "log" and list(ax.lines[0].get_xdata()) == [5, 50]
    ax = plots.spectra({"A": [1.0, 0.1, 0.0]})
    assert ax.get_yscale() == "log" and ax.lines[0].get_label() == "A (d=3)"
    plt.close("all")
