"""Evaluation: kNN against a brute-force reference, probes keep the backbone frozen, fine-tuning
uses the requested labels, collapse statistics on known cases."""
import math

import pytest
import torch

from sslnb import augment, evaluate
from sslnb.analysis import collapse_stats
from sslnb.models import resnet


def knn_reference(features, bank, labels, num_classes, k, t):
    """The thesis's fig. 4.4 as plain loops: weighted votes of the k most cosine-similar bank items."""
    preds = []
    for f in features.tolist():
        sims = []
        for b, y in zip(bank.tolist(), labels.tolist()):
            cos = sum(x * z for x, z in zip(f, b)) / math.sqrt(sum(x * x for x in f) * sum(z * z for z in b))
            sims.append((cos, y))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for cos, y in sims[:k]:
            votes[y] += math.exp(cos / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def test_knn_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    bank, feats = torch.randn(60, 5, generator=g), torch.randn(25, 5, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    for k, t in [(200, 0.1), (7, 0.1), (7, 1.0)]:  # k above the bank size uses the whole bank
        expected = knn_reference(feats, bank, labels, 4, min(k, 60), t)
        assert torch.equal(evaluate.knn_predict(feats, bank, labels, 4, k, t, chunk=8), expected)


def test_knn_is_perfect_on_separated_clusters():
    centres = torch.eye(3) * 10
    bank = centres.repeat_interleave(20, 0) + torch.randn(60, 3) * 0.1
    labels = torch.arange(3).repeat_interleave(20)
    assert evaluate.knn_accuracy(bank, labels, centres, torch.arange(3), 3, k=200).item() == 100.0


@pytest.fixture(scope="module")
def small(digits):
    train, test = digits
    return train.subset(torch.arange(0, len(train), 3)), test


def test_linear_probe_keeps_the_backbone_frozen_and_learns(small):
    train, test = small
    torch.manual_seed(0)
    net = resnet("resnet18", width=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = evaluate.linear_probe(net, train, test, "thesis", *train.mean_std(), progress=False, epochs=2, batch_size=64)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics untouched
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    assert out["settings"]["lr"] == 0.3 and out["settings"]["flip"] is False and not out["cached"]
    # on cached features of the un-augmented images the probe has enough steps to learn digits
    cached = evaluate.linear_probe(net, train, test, "thesis", *train.mean_std(), progress=False, cached=True,
                                   epochs=20, batch_size=64)
    assert cached["cached"] and cached["top1"] > 60  # random conv features of digits: ~80% kNN
    assert evaluate.PROBES["vicreg"]["epochs"] == 100 and evaluate.PROBES["vicreg"]["lr"] == 0.01


def test_the_probe_copy_runs_in_eval_mode(small, monkeypatch):
    train, test = small
    modes = []
    net = resnet("resnet18", width=4)
    net.register_forward_pre_hook(lambda m, x: modes.append(m.training))
    evaluate.linear_probe(net, train, test, "vicreg", progress=False, epochs=1, batch_size=64)
    assert modes and not any(modes)


def test_finetune_uses_a_fraction_of_the_labels_and_trains_the_backbone(small, monkeypatch):
    train, test = small
    seen = []
    real_fit = evaluate._fit

    def spy(model, head, params, fit_set, *a, **k):
        seen.append(len(fit_set))
        return real_fit(model, head, params, fit_set, *a, **k)

    monkeypatch.setattr(evaluate, "_fit", spy)
    net = resnet("resnet18", width=4)
    out = evaluate.finetune(net, train, test, label_fraction=0.1, progress=False, epochs=1, batch_size=16)
    assert seen == [pytest.approx(len(train) * 0.1, abs=10)]
    assert out["settings"]["lr"] == 0.005 and out["label_fraction"] == 0.1
    with pytest.raises(ValueError, match="unknown linear-probe protocol 'imagenet'"):
        evaluate.linear_probe(net, train, test, "imagenet")


def test_collapse_statistics_on_known_cases():
    collapsed = collapse_stats(torch.ones(100, 16) * 3)
    assert collapsed["std"] == pytest.approx(0.0, abs=1e-6) and collapsed["rank"] == pytest.approx(1.0, abs=1e-3)
    spread = collapse_stats(torch.randn(20000, 16, generator=torch.Generator().manual_seed(0)))
    assert spread["std"] == pytest.approx(1.0, abs=0.02)  # isotropic: each dimension of a unit vector ~ 1/sqrt(d)
    assert spread["rank"] == pytest.approx(16, abs=0.3)
    low_rank = collapse_stats(torch.randn(500, 2) @ torch.randn(2, 16))
    assert low_rank["rank"] < 2.01  # dimensional collapse to a plane
