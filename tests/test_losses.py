"""Each loss against an independent reference written here from the paper's formula (float64,
plain loops where that is clearer), against known values, and against its invariances."""
import math
import os

import numpy as np
import pytest
import torch

from sslnb import losses


def _rand(n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# -- NT-Xent (SimCLR eq. 1) ----------------------------------------------------------------

def nt_xent_reference(z1, z2, t):
    z = _unit(np.concatenate([z1.numpy(), z2.numpy()]).astype(np.float64))
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        num = math.exp(z[i] @ z[pos] / t)
        den = sum(math.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


@pytest.mark.parametrize("t", [0.5, 0.1])
def test_nt_xent_matches_reference(t):
    z1, z2 = _rand()
    assert losses.nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_reference(z1, z2, t), rel=1e-5)


def test_nt_xent_known_value_orthogonal_identical_views():
    n, t = 4, 0.5
    z = torch.eye(n) * 3.0  # orthogonal images, both views identical: cos 1 to the positive, 0 to the rest
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert losses.nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_symmetric_and_scale_invariant():
    z1, z2 = _rand()
    a = losses.nt_xent(z1, z2)
    torch.testing.assert_close(losses.nt_xent(z2, z1), a)
    torch.testing.assert_close(losses.nt_xent(5 * z1, 0.1 * z2), a)


# -- InfoNCE (MoCo eq. 1) ------------------------------------------------------------------

def info_nce_reference(q, k, queue, t):
    q, k, queue = (_unit(a.numpy().astype(np.float64)) for a in (q, k, queue))
    total = 0.0
    for i in range(len(q)):
        logits = [q[i] @ k[i] / t] + [q[i] @ queue[j] / t for j in range(len(queue))]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    return total / len(q)


def test_info_nce_matches_reference():
    q, k = _rand(8, 6)
    queue = torch.randn(20, 6, generator=torch.Generator().manual_seed(3))
    assert losses.info_nce(q, k, queue, 0.1).item() == pytest.approx(info_nce_reference(q, k, queue, 0.1), rel=1e-5)


def test_info_nce_known_value():
    d, kq, t = 8, 5, 0.5
    q = torch.zeros(3, d)
    q[:, 0] = 1  # queries equal to their keys, every queue entry orthogonal to them
    queue = torch.eye(d)[1:1 + kq]
    expected = math.log(1 + kq * math.exp(-1 / t))
    assert losses.info_nce(q, q.clone(), queue, t).item() == pytest.approx(expected, rel=1e-6)


# -- negative cosine (SimSiam eq. 1) ---------------------------------------------------------

def test_negative_cosine_values_and_no_detach():
    p, z = _rand()
    ref = -np.mean([np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(p.numpy(), z.numpy())])
    assert losses.negative_cosine(p, z).item() == pytest.approx(ref, rel=1e-5)
    assert losses.negative_cosine(p, 2 * p).item() == pytest.approx(-1.0)
    assert losses.negative_cosine(p, -p).item() == pytest.approx(1.0)
    p.requires_grad_(True)
    z.requires_grad_(True)
    losses.negative_cosine(p, z).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # the method, not the loss, stops gradients


# -- Barlow Twins (eq. 1-2) ------------------------------------------------------------------

def barlow_reference(z1, z2, lambd):
    a, b = z1.numpy().astype(np.float64), z2.numpy().astype(np.float64)
    a = (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)
    b = (b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
    n, d = a.shape
    c = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            c[i, j] = sum(a[s, i] * b[s, j] for s in range(n)) / n
    return sum((1 - c[i, i]) ** 2 for i in range(d)) + lambd * sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)


def test_barlow_twins_matches_reference():
    z1, z2 = _rand(32, 6)
    assert losses.barlow_twins(z1, z2, 0.005).item() == pytest.approx(barlow_reference(z1, z2, 0.005), rel=1e-4)


def test_barlow_twins_zero_for_identical_decorrelated_views_and_affine_invariant():
    # columns of an orthogonal matrix, centred: standardized they correlate to the identity
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    z = q[:, 1:9] - q[:, 1:9].mean(0)  # [64, 8]
    assert losses.barlow_twins(z, z.clone()).item() == pytest.approx(0.0, abs=1e-3)
    z1, z2 = _rand(32, 6)
    scale, shift = torch.rand(6) + 0.5, torch.randn(6)  # per-dimension affine change of one branch
    torch.testing.assert_close(losses.barlow_twins(z1 * scale + shift, z2), losses.barlow_twins(z1, z2), rtol=1e-4, atol=1e-4)


# -- VICReg (eq. 1-6) --------------------------------------------------------------------------

def vicreg_paper_terms(z1, z2):
    """The study's printed formulas (sec. 2.1): s = 1/n sum ||z - z'||^2, v(Z) with gamma=1,
    c(Z) = 1/d sum_{i != j} C_ij^2, the loss summing v and c over both branches."""
    a, b = z1.numpy().astype(np.float64), z2.numpy().astype(np.float64)
    n, d = a.shape
    s = sum(np.sum((a[i] - b[i]) ** 2) for i in range(n)) / n

    def v(z):
        return sum(max(0.0, 1 - math.sqrt(z[:, j].var(ddof=1) + 1e-4)) for j in range(d)) / d

    def c(z):
        cov = np.cov(z, rowvar=False)  # (N-1) normalization, centred
        return sum(cov[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    return s, v(a) + v(b), c(a) + c(b)


def test_vicreg_matches_paper_formulas_up_to_the_stated_factors():
    z1, z2 = _rand(32, 6)
    z2 = 0.3 * z2  # put the variance hinge in its active region for some dimensions
    out = losses.vicreg(z1, z2)
    s, v_sum, c_sum = vicreg_paper_terms(z1, z2)
    d = z1.shape[1]
    assert out["invariance"].item() == pytest.approx(s / d, rel=1e-5)  # mean squared error = s / D
    assert out["variance"].item() == pytest.approx(v_sum / 2, rel=1e-5)  # averaged, the paper sums
    assert out["covariance"].item() == pytest.approx(c_sum, rel=1e-4)  # summed over branches, as printed
    expected = 25 * s / d + 25 * v_sum / 2 + 1 * c_sum
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_vicreg_known_values_on_collapse_and_translation():
    z = torch.ones(16, 8) * 0.7  # every sample the same: full collapse
    out = losses.vicreg(z, z.clone())
    assert out["invariance"].item() == 0
    assert out["variance"].item() == pytest.approx(1 - math.sqrt(1e-4), rel=1e-5)
    assert out["covariance"].item() == pytest.approx(0.0, abs=1e-10)
    z1, z2 = _rand()
    shift = torch.randn(8)
    a, b = losses.vicreg(z1, z2), losses.vicreg(z1 + shift, z2 + shift)  # variance/covariance ignore a shift
    torch.testing.assert_close(a["variance"], b["variance"])
    torch.testing.assert_close(a["covariance"], b["covariance"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["invariance"], b["invariance"], rtol=1e-5, atol=1e-6)


def test_vicreg_weights():
    z1, z2 = _rand()
    out = losses.vicreg(z1, z2, inv_weight=2.0, var_weight=3.0, cov_weight=0.5)
    torch.testing.assert_close(out["loss"], 2 * out["invariance"] + 3 * out["variance"] + 0.5 * out["covariance"])


# -- conventions shared by all losses ---------------------------------------------------------

BATCH_LOSSES = [
    ("nt_xent", lambda a, b: losses.nt_xent(a, b)),
    ("barlow_twins", lambda a, b: losses.barlow_twins(a, b)),
    ("vicreg", lambda a, b: losses.vicreg(a, b)["loss"]),
]


@pytest.mark.parametrize("name,fn", BATCH_LOSSES)
def test_batch_of_one_is_a_clear_error(name, fn):
    z = torch.randn(1, 8)
    with pytest.raises(ValueError, match=f"{name}.*at least 2 samples, got 1"):
        fn(z, z)


@pytest.mark.parametrize("name,fn", BATCH_LOSSES)
def test_shape_mismatch_is_a_clear_error(name, fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.randn(4, 8), torch.randn(4, 6))


def test_losses_are_float32_under_autocast():
    z1, z2 = (t.bfloat16() for t in _rand())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert losses.nt_xent(z1, z2).dtype == torch.float32
        assert losses.barlow_twins(z1, z2).dtype == torch.float32
        assert losses.vicreg(z1, z2)["loss"].dtype == torch.float32
        assert losses.info_nce(z1, z2, z2).dtype == torch.float32
        # in float32 the result equals the float32 computation on the same (rounded) inputs
        torch.testing.assert_close(losses.barlow_twins(z1, z2), losses.barlow_twins(z1.float(), z2.float()))


def test_off_diagonal():
    c = torch.arange(16.0).view(4, 4)
    expected = torch.tensor([x for i, row in enumerate(c.tolist()) for j, x in enumerate(row) if i != j])
    torch.testing.assert_close(losses.off_diagonal(c), expected)


# -- the global batch under torch.distributed ---------------------------------------------------

def _two_process_worker(rank, world, port, z1, z2, folder):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    half = len(z1) // world
    a = z1[rank * half:(rank + 1) * half].clone().requires_grad_(True)
    b = z2[rank * half:(rank + 1) * half].clone()
    values = [losses.nt_xent(a, b), losses.barlow_twins(a, b), losses.vicreg(a, b)["covariance"]]
    values[1].backward()
    torch.save(torch.stack([v.detach() for v in values] + [a.grad.abs().sum()]), f"{folder}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown, where gloo's threads can still hold tensors
    # whose destructors need the GIL: about one exit in 30 aborted there (SIGABRT, "terminate
    # called without an active exception"; see pytorch/pytorch#179291). The results are on
    # disk already, and an exception above still reaches mp.spawn and fails the test.
    os._exit(0)


def test_losses_gather_the_global_batch_across_processes(tmp_path):
    """Two processes with half a batch each see the same batch-statistics losses as one process with all of it."""
    import socket

    import torch.multiprocessing as mp

    z1, z2 = _rand(16, 6)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(2, port, z1, z2, str(tmp_path)), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    single = torch.stack([losses.nt_xent(z1, z2), losses.barlow_twins(z1, z2), losses.vicreg(z1, z2)["covariance"]])
    for rank in range(2):
        torch.testing.assert_close(out[rank][:3], single, rtol=1e-5, atol=1e-6)
        assert out[rank][3] > 0  # gradients flow back through the gather


def test_keyword_tensors_are_cast_too():
    z1, z2 = (t.bfloat16() for t in _rand())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert losses.vicreg(z_a=z1, z_b=z2)["loss"].dtype == torch.float32
        assert losses.info_nce(z1, z2, queue=z2).dtype == torch.float32
