"""Property tests of stlm_nb.losses against independent float64 formulas (numpy, explicit loops).

Fast (seconds): every divergence on random logits with extreme values and -inf entries at T in {0.5, 1, 2, 4},
JSD endpoints, gradcheck, micro-batch split invariance, masks, sparse (top-k + tail) records, the chunked
path, ensembles, hint losses and the error paths.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from stlm_nb.losses import (KD_KINDS, HintProjector, SparseTeacherLogits, chunked_kd_loss_sum_count, distillation_loss,
                            divergence, ensemble_teacher_logits, hint_loss, kd_loss, kd_loss_sum_count, uniform_layer_map)

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
FAST = settings(max_examples=30, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny tensors: one intra-op thread avoids OpenMP wake-up costs (10x slower on 2 busy cores); restored afterwards."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- independent float64 references (numpy, loops)
def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z)
    e = np.exp(z - m)
    return e / e.sum()


FLOAT32_SMALLEST = 1.4e-45  # smallest float32 subnormal: a smaller weight is exactly 0 in a float32 computation


def np_kl(a, b):
    "sum_i a_i log(a_i / b_i) over a_i > 0 (0 log 0 = 0); inf when some a_i > 0 has b_i = 0."
    total = 0.0
    for ai, bi in zip(a, b):
        if ai >= FLOAT32_SMALLEST:   # (a weight that float32 cannot hold contributes 0, not 0 * inf)
            total += math.inf if bi == 0 else ai * math.log(ai / bi)
    return total


def np_div(q, p, kind, beta, skew):
    "Divergence between student probabilities q and teacher probabilities p, straight from the definitions."
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return np_kl(p, q)
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return np_kl(q, p)
    if kind == "jsd":
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    if kind == "sfkl":
        return np_kl(p, [skew * pi + (1 - skew) * qi for pi, qi in zip(p, q)])
    if kind == "srkl":
        return np_kl(q, [(1 - skew) * pi + skew * qi for pi, qi in zip(p, q)])
    return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))


def np_dense(zs, zt, kind, T, beta=0.5, skew=0.1):
    "(N,) divergences of rows of student/teacher logits."
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    return np.array([np_div(np_softmax(a / T), np_softmax(b / T), kind, beta, skew) for a, b in zip(zs, zt)])


def np_sparse(zs, zt, k, kind, T, beta=0.5, skew=0.1):
    "(N,) divergences over the k teacher-top ids plus one tail category (student tail = mass outside those ids)."
    out = []
    for a, b in zip(np.asarray(zs, np.float64), np.asarray(zt, np.float64)):
        ids = np.argsort(-b, kind="stable")[:k]
        q, p = np_softmax(a / T), np_softmax(b / T)
        q_k, p_k = [q[i] for i in ids], [p[i] for i in ids]
        q_k.append(max(1 - sum(q_k), 0.0))
        p_k.append(max(1 - sum(p_k), 0.0))
        out.append(np_div(q_k, p_k, kind, beta, skew))
    return np.array(out)


def logits_pair(seed, n, vocab, scale, inf_mode, extreme):
    "Random student/teacher logits (float32): scale, a few extreme entries, and -inf entries."
    g = torch.Generator().manual_seed(seed)
    zs, zt = scale * torch.randn(n, vocab, generator=g), scale * torch.randn(n, vocab, generator=g)
    if extreme:  # one very large and one very negative logit per row (|z|/T stays < 700: no float64 underflow in the reference)
        zs[:, 0], zt[:, -1], zt[:, 0] = 150.0, 120.0, -150.0
    if inf_mode != "none" and vocab > 2:
        ids = torch.randperm(vocab, generator=g)[: max(1, vocab // 4)]
        zt[0, ids] = -math.inf
        if inf_mode == "both":
            zs[0, ids] = -math.inf
    return zs, zt


kinds = st.sampled_from(KD_KINDS)
temps = st.sampled_from(TEMPERATURES)
betas = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])
skews = st.sampled_from([0.0, 0.1, 0.5, 1.0])


# ---------------------------------------------------------------- every kind vs the float64 formula
@FAST
@given(kind=kinds, T=temps, beta=betas, skew=skews, seed=st.integers(0, 10**6), n=st.integers(1, 4), vocab=st.integers(2, 40),
       scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]), inf_mode=st.sampled_from(["none", "teacher", "both"]), extreme=st.booleans())
def test_each_kind_matches_float64_reference(kind, T, beta, skew, seed, n, vocab, scale, inf_mode, extreme):
    zs, zt = logits_pair(seed, n, vocab, scale, inf_mode, extreme)
    got = divergence(torch.log_softmax(zs / T, -1), torch.log_softmax(zt / T, -1), kind, beta, skew).numpy()
    ref = np_dense(zs.numpy(), zt.numpy(), kind, T, beta, skew)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5)   # inf where the divergence is infinite, in both
    total, count = kd_loss_sum_count(zs, zt, kind=kind, temperature=T, beta=beta, skew=skew)
    assert count.item() == n
    np.testing.assert_allclose(total.item(), ref.sum(), rtol=2e-4, atol=1e-4)


@FAST
@given(kind=kinds, T=temps, seed=st.integers(0, 10**6), n=st.integers(1, 3), vocab=st.integers(3, 30), k_frac=st.floats(0.1, 0.9))
def test_sparse_matches_its_k_plus_1_category_definition(kind, T, seed, n, vocab, k_frac):
    zs, zt = logits_pair(seed, n, vocab, 2.0, "none", False)
    k = max(1, min(vocab - 1, int(k_frac * vocab)))
    rec = SparseTeacherLogits.from_dense(zt, k=k, temperatures=(T,))
    got = kd_loss_sum_count(zs, rec, kind=kind, temperature=T, beta=0.3, skew=0.1)[0].item()
    np.testing.assert_allclose(got, np_sparse(zs.numpy(), zt.numpy(), k, kind, T, 0.3, 0.1).sum(), rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------- KL >= 0, = 0 iff equal; JSD endpoints
@FAST
@given(kind=kinds, T=temps, seed=st.integers(0, 10**6), vocab=st.integers(2, 30), shift=st.floats(-50, 50))
def test_zero_iff_equal(kind, T, seed, vocab, shift):
    g = torch.Generator().manual_seed(seed)
    zt = 2 * torch.randn(3, vocab, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(zt / T, -1)
    same = divergence(torch.log_softmax((zt + shift) / T, -1), lp, kind)          # a shift of the logits: same distribution
    assert same.abs().max().item() < 1e-10
    bumped = zt.clone()
    bumped[torch.arange(3), zt.argmin(-1)] += 1.0                                  # a different distribution
    diff = divergence(torch.log_softmax(bumped / T, -1), lp, kind, skew=0.1)
    assert (diff > 1e-12).all()


@FAST
@given(kind=kinds, T=temps, seed=st.integers(0, 10**6), vocab=st.integers(2, 30), scale=st.sampled_from([1.0, 10.0, 50.0]))
def test_nonnegative(kind, T, seed, vocab, scale):
    zs, zt = logits_pair(seed, 4, vocab, scale, "teacher", False)
    d = divergence(torch.log_softmax(zs / T, -1), torch.log_softmax(zt / T, -1), kind, beta=0.4, skew=0.2)
    assert (d >= -1e-6).all()


@FAST
@given(T=temps, seed=st.integers(0, 10**6), vocab=st.integers(2, 30), sparse=st.booleans())
def test_jsd_endpoints_are_fkl_and_rkl(T, seed, vocab, sparse):
    zs, zt = logits_pair(seed, 3, vocab, 3.0, "none", False)
    teacher = SparseTeacherLogits.from_dense(zt, k=max(1, vocab // 2), temperatures=(T,)) if sparse else zt
    for beta, kind in ((0.0, "fkl"), (1.0, "rkl")):
        assert torch.equal(kd_loss(zs, teacher, kind="jsd", beta=beta, temperature=T), kd_loss(zs, teacher, kind=kind, temperature=T))
    inner = kd_loss(zs, teacher, kind="jsd", beta=1e-3, temperature=T)               # no special case inside: the
    assert inner.item() < 0.1 * kd_loss(zs, teacher, kind="fkl", temperature=T).item() + 1e-6   # value is near 0 there


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("teacher_format", ["dense", "sparse"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck_float64(kind, teacher_format, chunk_size):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 8, dtype=torch.float64, generator=g)
    if kind != "rkl":
        t[1, 3] = -math.inf     # a token the teacher rules out (reverse KL would be +inf)
    teacher = SparseTeacherLogits.from_dense(t, k=3, temperatures=(2.0,)) if teacher_format == "sparse" else t
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, teacher, kind=kind, temperature=2.0, beta=0.3, mask=mask, chunk_size=chunk_size), (s,))


@pytest.mark.parametrize("kind", KD_KINDS)
def test_gradcheck_fused_lm_head(kind):
    g = torch.Generator().manual_seed(8)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_kd_loss_sum_count(h, w, t, lm_head_bias=b, kind=kind, temperature=2.0, chunk_size=2)[0], (h, w, b))


# ---------------------------------------------------------------- normalisation, masks, micro-batches
def batch(seed, B, T, V, frac_ignored):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, T, V, generator=g)
    teacher = 2 * torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < frac_ignored] = -100
    return logits, teacher, labels


@FAST
@given(seed=st.integers(0, 10**6), B=st.integers(2, 5), T=st.integers(3, 8), kind=kinds, sparse=st.booleans(),
       alpha=st.sampled_from([0.0, 0.3, 1.0]), frac_ignored=st.floats(0, 0.6), data=st.data())
def test_micro_batch_split_invariance(seed, B, T, kind, sparse, alpha, frac_ignored, data):
    V = 12
    logits, teacher, labels = batch(seed, B, T, V, frac_ignored)
    if sparse:
        teacher = SparseTeacherLogits.from_dense(teacher, k=5, temperatures=(2.0,))
    kw = dict(alpha=alpha, temperature=2.0, kind=kind, beta=0.4)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, B - 1), max_size=B - 1))))
    bounds = [0, *cuts, B]
    n_items = int((labels[:, 1:] != -100).sum())

    x = logits.clone().requires_grad_()
    full = distillation_loss(x, labels, teacher, **kw)
    full["loss"].backward()
    y = logits.clone().requires_grad_()
    parts = [distillation_loss(y[a:b], labels[a:b], teacher[a:b], num_items=n_items, **kw) for a, b in zip(bounds, bounds[1:])]
    sum(p["loss"] for p in parts).backward()
    torch.testing.assert_close(sum(p["loss"] for p in parts), full["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-7)
    if alpha < 1:
        torch.testing.assert_close(sum(p["kd"] for p in parts), full["kd"], rtol=1e-5, atol=1e-6)


@FAST
@given(seed=st.integers(0, 10**6), kind=kinds, sparse=st.booleans(), chunk=st.sampled_from([None, 1, 3]),
       garbage=st.sampled_from([math.nan, math.inf, -math.inf, 1e30]))
def test_masked_positions_have_no_effect(seed, kind, sparse, chunk, garbage):
    logits, teacher, _ = batch(seed, 2, 6, 10, 0.0)
    mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    mask[0, 0] = True
    make = (lambda t: SparseTeacherLogits.from_dense(t, k=4, temperatures=(2.0,))) if sparse else (lambda t: t)
    x = logits.clone().requires_grad_()
    ref = kd_loss(x, make(teacher), kind=kind, temperature=2.0, mask=mask, chunk_size=chunk)
    ref.backward()
    bad_s, bad_t = logits.clone(), teacher.clone()
    bad_s[~mask], bad_t[~mask] = garbage, garbage
    y = bad_s.requires_grad_()
    got = kd_loss(y, make(bad_t) if not sparse else make(teacher), kind=kind, temperature=2.0, mask=mask, chunk_size=chunk)
    got.backward()
    assert torch.equal(got, ref)
    assert torch.equal(y.grad, x.grad)
    assert y.grad[~mask].abs().sum().item() == 0


def test_mean_over_counted_positions_not_batchmean():
    logits, teacher, _ = batch(0, 2, 8, 10, 0.0)
    per_position = np_dense(logits.reshape(-1, 10).numpy(), teacher.reshape(-1, 10).numpy(), "fkl", 1.0)
    np.testing.assert_allclose(kd_loss(logits, teacher).item(), per_position.mean(), rtol=1e-5)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    assert kd_loss(logits, teacher, mask=mask).item() == 0.0                    # nothing counts: 0, not nan
    total, count = kd_loss_sum_count(logits, teacher, kind="fkl", temperature=1.0, beta=0.5, skew=0.1, mask=mask)
    assert total.item() == 0.0 and count.item() == 0


# ---------------------------------------------------------------- sparse teachers
@FAST
@given(kind=kinds, T=temps, seed=st.integers(0, 10**6), vocab=st.integers(2, 30), scale=st.sampled_from([1.0, 5.0, 30.0]),
       chunk=st.sampled_from([None, 2]))
def test_sparse_with_k_equal_V_is_dense(kind, T, seed, vocab, scale, chunk):
    zs, zt = logits_pair(seed, 3, vocab, scale, "both", False)
    rec = SparseTeacherLogits.from_dense(zt, k=vocab, temperatures=TEMPERATURES)
    torch.testing.assert_close(kd_loss(zs, rec, kind=kind, temperature=T, chunk_size=chunk),
                               kd_loss(zs, zt, kind=kind, temperature=T), rtol=2e-5, atol=2e-5)


@FAST
@given(kind=kinds, T=temps, seed=st.integers(0, 10**6), vocab=st.integers(3, 40), k_frac=st.floats(0.05, 0.95))
def test_sparse_is_a_lower_bound_of_dense(kind, T, seed, vocab, k_frac):
    "Merging the tail into one category cannot increase an f-divergence (data processing inequality)."
    zs, zt = logits_pair(seed, 3, vocab, 3.0, "none", False)
    k = max(1, min(vocab - 1, int(k_frac * vocab)))
    rec = SparseTeacherLogits.from_dense(zt, k=k, temperatures=(T,))
    assert kd_loss(zs, rec, kind=kind, temperature=T).item() <= kd_loss(zs, zt, kind=kind, temperature=T).item() + 1e-5


def test_sparse_top_k_at_T2_is_not_the_renormalised_top_k():
    "The tail matters at T > 1: the renormalised top-k is a different (and far worse) target."
    g = torch.Generator().manual_seed(0)
    V, k = 8192, 32
    teacher = -1.5 * torch.arange(1, V + 1, dtype=torch.float32).log() + 0.3 * torch.randn(8, V, generator=g)
    student = teacher + torch.randn(8, V, generator=g)
    rec = SparseTeacherLogits.from_dense(teacher, k=k, temperatures=(1.0, 2.0))
    mass = {T: rec.log_probs(T)[..., :k].exp().sum(-1).mean().item() for T in (1.0, 2.0)}
    assert mass[1.0] > 0.6 and mass[2.0] < 0.3
    p = torch.softmax(rec.values / 2, -1)                                       # renormalised top-k at T = 2
    log_q = torch.log_softmax(student / 2, -1).gather(-1, rec.indices)
    renormalised = (p * (p.log() - log_q)).sum(-1).mean().item()
    exact = kd_loss(student, rec, temperature=2.0).item()
    dense = kd_loss(student, teacher, temperature=2.0).item()
    assert abs(exact - renormalised) > 0.2 * dense
    assert abs(dense - exact) < abs(dense - renormalised)


def test_sparse_record_helpers():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 20, generator=g)
    rec = SparseTeacherLogits.from_dense(z, k=5, temperatures=(1, 2.0))
    assert rec.temperatures == (1.0, 2.0) and rec.k == 5 and rec.shape == (2, 3)
    lp = rec.log_probs(2)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(lp[..., :5], torch.log_softmax(z / 2, -1).gather(-1, rec.indices))
    assert rec[:, :-1].shape == (2, 2) and rec[:, :-1].k == 5
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(rec[mask].values, rec.values[mask]) and torch.equal(rec[mask].log_normalizers[2.0], rec.log_normalizers[2.0][mask])
    assert rec.reshape(-1).shape == (6,)
    assert rec.to("cpu").values.device.type == "cpu"
    assert torch.equal(rec[mask].log_tails[2.0], rec.log_tails[2.0][mask]) and rec.reshape(-1).log_tails[1.0].shape == (6,)
    rec32 = SparseTeacherLogits(rec.values.half(), rec.indices.int(), rec.log_normalizers,                  # cache storage dtypes
                                {t: v.float() for t, v in rec.log_tails.items()})
    torch.testing.assert_close(kd_loss(z, rec32, temperature=2.0), kd_loss(z, rec, temperature=2.0), rtol=2e-3, atol=2e-3)
    peaked = torch.zeros(1, 50)
    peaked[0, 0] = 40.0                                                          # top-1 holds 1 - 1e-16: tail rounds to 0
    rec_peaked = SparseTeacherLogits.from_dense(peaked, k=1)
    assert math.isfinite(kd_loss(torch.zeros(1, 50), rec_peaked, kind="rkl").item())   # floored, not +inf
    with pytest.raises(ValueError, match="Ellipsis"):
        rec[..., 0]


def dense_k_plus_1(logits, k, T):
    "float64 reference: log-probabilities of the teacher's top-k ids (of `logits`' own top k) and of the merged tail."
    lp = torch.log_softmax(logits.double() / T, -1)
    ids = logits.topk(k, -1).indices
    rest = lp.scatter(-1, ids, -math.inf)
    return torch.cat([lp.gather(-1, ids), torch.logsumexp(rest, -1, keepdim=True)], -1), ids


@pytest.mark.parametrize("gap", [38.0, 90.0])
def test_sparse_tail_of_a_confident_teacher_is_exact(gap):
    "Issue 12d: the tail is stored as a log mass; 1 − Σ p_i was rounding noise (log tail −87.3 for −34.1 at gap 38)."
    V, k, T = 50, 2, 1.0
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(2, 3, V, generator=g)
    zt[..., 0] += gap                                                            # one token `gap` above the rest
    zs = 2 * torch.randn(2, 3, V, generator=g)                                   # a student with a real tail
    rec = SparseTeacherLogits.from_dense(zt, k=k, temperatures=(T, 2.0))
    lp_ref, ids = dense_k_plus_1(zt, k, T)
    assert torch.equal(rec.indices, ids)
    np.testing.assert_allclose(rec.log_probs(T)[..., -1].double().numpy(), lp_ref[..., -1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(rec.log_tail(T).numpy(), lp_ref[..., -1].numpy(), rtol=1e-6)
    lq_ref = torch.cat([torch.log_softmax(zs.double(), -1).gather(-1, ids),
                        torch.logsumexp(torch.log_softmax(zs.double(), -1).scatter(-1, ids, -math.inf), -1, keepdim=True)], -1)
    ref = {"rkl": (lq_ref.exp() * (lq_ref - lp_ref)).sum(-1).mean().item(), "fkl": (lp_ref.exp() * (lp_ref - lq_ref)).sum(-1).mean().item()}
    labels = torch.zeros(2, 3, dtype=torch.long)
    for kind, want in ref.items():
        for chunk in (None, 2):                                                  # plain and chunked paths
            np.testing.assert_allclose(kd_loss(zs, rec, kind=kind, chunk_size=chunk).item(), want, rtol=1e-5)
        np.testing.assert_allclose(kd_loss(zs, [rec, rec], kind=kind).item(), want, rtol=1e-5)   # a list of teachers
        x = zs.clone().requires_grad_()                                          # the fused CE + KD path (one sparse teacher)
        fused = distillation_loss(x, labels, rec, alpha=0.0, kind=kind)["kd"].item()
        want_shifted = {"rkl": (lq_ref.exp() * (lq_ref - lp_ref)), "fkl": (lp_ref.exp() * (lp_ref - lq_ref))}[kind][:, :-1].sum(-1).mean().item()
        np.testing.assert_allclose(fused, want_shifted, rtol=1e-5)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_fused_tail_gradient_of_a_confident_student(kind):
    "Issue 12e: the student's tail mass (~4e-38 at a logit gap of 90, T = 1) underflows; its tokens keep their gradient."
    V = 50
    zs = torch.zeros(1, 4, V); zs[..., 0] = 90.0                                # student: certain of token 0
    zt = torch.zeros(1, 4, V); zt[..., 0] = 5.0; zt[0, 2, 3] = 4.0               # teacher: p_tail ~ 0.25
    rec = SparseTeacherLogits.from_dense(zt, k=1)
    labels = torch.tensor([[0, 0, 7, 0]])
    kw = dict(alpha=0.3, kind=kind, beta=0.3, skew=0.1)
    grads = {}
    for name, teacher in (("fused", rec), ("plain", [rec])):                     # a list of one teacher: plain autograd path
        x = zs.clone().requires_grad_()
        distillation_loss(x, labels, teacher, **kw)["loss"].backward()
        grads[name] = x.grad
    # float64 autograd reference over the k+1 = 2 categories, from the definitions
    x = zs.double().requires_grad_()
    lq = torch.log_softmax(x[:, :-1], -1)
    lp = torch.log_softmax(zt[:, :-1].double(), -1)
    merge = lambda l: torch.stack([l[..., 0], torch.logsumexp(l[..., 1:], -1)], -1)
    q, p = merge(lq).exp(), merge(lp).exp()
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)
    kd = {"fkl": kl(p, q), "rkl": kl(q, p), "jsd": 0.3 * kl(p, 0.3 * p + 0.7 * q) + 0.7 * kl(q, 0.3 * p + 0.7 * q),
          "sfkl": kl(p, 0.1 * p + 0.9 * q), "srkl": kl(q, 0.9 * p + 0.1 * q), "tvd": 0.5 * (p - q).abs().sum(-1)}[kind]
    ce = F.cross_entropy(x[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    ((0.3 * ce + 0.7 * kd.sum()) / 3).backward()
    ref = x.grad.float()
    for name, got in grads.items():
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-9, msg=lambda m: f"{name}: {m}")
    if kind == "fkl":                                                            # here the tail tokens' gradient is large (−p_tail/49)
        assert ref[0, 0, 1].item() < -1e-3


def test_hint_pairs_match_normalised_with_normalised():
    "Issue 12f: the last hidden state (after the final norm, RMS ~1) pairs with the last, raw layers with raw ones."
    from stlm_nb.models import make_student
    for L_s, L_t in ((4, 30), (3, 7), (2, 6), (16, 24), (5, 5), (1, 9)):
        pairs = uniform_layer_map(L_s, L_t)
        assert len(pairs) == L_s and [s for s, _ in pairs] == list(range(1, L_s + 1))
        assert all((s == L_s) == (t == L_t) for s, t in pairs), (L_s, L_t, pairs)
    assert uniform_layer_map(4, 30) == [(1, 8), (2, 15), (3, 23), (4, 30)]
    student = make_student("llama-tiny", vocab_size=50, num_hidden_layers=3, seed=0)
    teacher = make_student("llama-tiny", vocab_size=50, hidden_size=48, num_hidden_layers=7, seed=1)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs, ht = student(ids, output_hidden_states=True).hidden_states, teacher(ids, output_hidden_states=True).hidden_states
    rms = lambda h: h.pow(2).mean().sqrt().item()
    for s, t in uniform_layer_map(3, 7):                                         # like with like: the scales agree
        assert (rms(hs[s]) > 0.5) == (rms(ht[t]) > 0.5), (s, t, rms(hs[s]), rms(ht[t]))
    assert rms(hs[3]) > 0.5 and rms(ht[7]) > 0.5 and rms(hs[1]) < 0.2 and rms(ht[6]) < 0.2
    projector = HintProjector(32, 48, uniform_layer_map(3, 7))
    assert hint_loss(hs, ht, projector).item() > 0
    with pytest.raises(ValueError, match=r"layer pair \(3, 6\) mixes the student's last state 3"):
        hint_loss(hs, ht, HintProjector(32, 48, [(1, 2), (3, 6)]))              # the old map's pair for L_s=3, L_t=7
    with pytest.raises(ValueError, match=r"layer pair \(2, 7\) mixes the teacher's last state 7"):
        hint_loss(hs, ht, HintProjector(32, 48, [(2, 7)]))


# ---------------------------------------------------------------- chunked == plain
@FAST
@given(kind=kinds, sparse=st.booleans(), seed=st.integers(0, 10**6), n=st.integers(1, 9), chunk=st.integers(1, 5),
       use_mask=st.booleans(), use_bias=st.booleans(), T=temps)
def test_chunked_equals_plain(kind, sparse, seed, n, chunk, use_mask, use_bias, T):
    g = torch.Generator().manual_seed(seed)
    D, V = 6, 17
    hidden, w, b = torch.randn(n, D, generator=g), torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    t = 2 * torch.randn(n, V, generator=g)
    teacher = SparseTeacherLogits.from_dense(t, k=5, temperatures=(T,)) if sparse else t
    mask = (torch.rand(n, generator=g) < 0.6) if use_mask else None
    kw = dict(kind=kind, temperature=T, beta=0.3, skew=0.2, mask=mask)

    def run(fn):
        h_, w_, b_ = (x.clone().requires_grad_() for x in (hidden, w, b))
        total, count = fn(h_, w_, b_ if use_bias else None)
        total.backward()
        return [total.detach(), count, h_.grad, w_.grad] + ([b_.grad] if use_bias else [])

    plain = run(lambda h, w, b: kd_loss_sum_count(F.linear(h, w, b), teacher, **kw))
    fused = run(lambda h, w, b: chunked_kd_loss_sum_count(h, w, teacher, lm_head_bias=b, chunk_size=chunk, **kw))
    logits_chunked = run(lambda h, w, b: kd_loss_sum_count(F.linear(h, w, b), teacher, chunk_size=chunk, **kw))
    for other in (fused, logits_chunked):
        for a, c in zip(other, plain):   # float32 tolerance, relative to the tensor's scale (sums in another order)
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5 * max(1.0, c.abs().max().item()))


def test_chunked_padded_vocab_and_no_grad():
    g = torch.Generator().manual_seed(3)
    h, w, t = torch.randn(2, 5, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    plain = kd_loss_sum_count(F.linear(h, w)[..., :32], t, kind="jsd", temperature=2.0, beta=0.5, skew=0.1, mask=None)[0]
    with torch.no_grad():
        fused = chunked_kd_loss_sum_count(h, w, t, kind="jsd", temperature=2.0, vocab_size=32, chunk_size=3)[0]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="V_s=40.*V_t=32"):
        chunked_kd_loss_sum_count(h, w, t)


# ---------------------------------------------------------------- the objective
def test_distillation_loss_shift_t2_and_parts():
    logits, teacher, labels = batch(3, 2, 7, 11, 0.3)
    labels[0, 1] = 5
    m = labels[:, 1:] != -100
    ce = F.cross_entropy(logits[:, :-1][m].double(), labels[:, 1:][m]).item()
    kd = np_dense(logits[:, :-1][m].numpy(), teacher[:, :-1][m].numpy(), "fkl", 2.0).mean()
    out = distillation_loss(logits, labels, teacher, alpha=0.25, temperature=2.0)
    assert set(out) == {"loss", "ce", "kd"}
    np.testing.assert_allclose([out["ce"].item(), out["kd"].item()], [ce, kd], rtol=1e-5)
    np.testing.assert_allclose(out["loss"].item(), 0.25 * ce + 0.75 * 4 * kd, rtol=1e-5)
    no_t2 = distillation_loss(logits, labels, teacher, alpha=0.25, temperature=2.0, t_squared=False)
    np.testing.assert_allclose(no_t2["loss"].item(), 0.25 * ce + 0.75 * kd, rtol=1e-5)
    for parts in (distillation_loss(logits, labels, None), distillation_loss(logits, labels, teacher, alpha=1.0)):
        np.testing.assert_allclose(parts["loss"].item(), ce, rtol=1e-5)
        assert math.isnan(parts["kd"].item())
    bf16 = distillation_loss(logits.bfloat16(), labels, teacher.bfloat16(), temperature=2.0)
    assert bf16["loss"].dtype == torch.float32


def test_ensembles():
    g = torch.Generator().manual_seed(4)
    t1, t2, s = (2 * torch.randn(3, 9, generator=g) for _ in range(3))
    T = 2.0
    geo = ensemble_teacher_logits([t1, t2], weights=[3, 1])
    p1, p2 = torch.softmax(t1 / T, -1), torch.softmax(t2 / T, -1)
    ref = p1 ** 0.75 * p2 ** 0.25
    torch.testing.assert_close(torch.softmax(geo / T, -1), ref / ref.sum(-1, keepdim=True))
    mix = ensemble_teacher_logits([t1, t2], weights=[3, 1], mode="prob_mean", temperature=T)
    torch.testing.assert_close(torch.softmax(mix / T, -1), 0.75 * p1 + 0.25 * p2)
    per_teacher = kd_loss(s, [t1, t2], teacher_weights=[3, 1], temperature=T, kind="rkl")
    torch.testing.assert_close(per_teacher, 0.75 * kd_loss(s, t1, temperature=T, kind="rkl") + 0.25 * kd_loss(s, t2, temperature=T, kind="rkl"))
    labels = torch.randint(0, 9, (1, 3), generator=g)
    out = distillation_loss(s[None], labels, [t1[None], t2[None]], teacher_weights=[1, 1], temperature=T)
    torch.testing.assert_close(out["kd"], (kd_loss(s[:2], t1[:2], temperature=T) + kd_loss(s[:2], t2[:2], temperature=T)) / 2)


# ---------------------------------------------------------------- hint losses
def test_hint_loss_zero_when_projection_matches_and_projector_outside_student():
    from stlm_nb.models import count_parameters, make_student
    student = make_student("llama-tiny", vocab_size=50)
    n_before = count_parameters(student)["total"]
    keys_before = set(student.state_dict())
    layer_map = uniform_layer_map(2, 6, include_embeddings=True)
    assert layer_map == [(0, 0), (1, 3), (2, 6)]
    projector = HintProjector(32, 48, layer_map)
    assert count_parameters(student)["total"] == n_before and set(student.state_dict()) == keys_before
    assert not {id(p) for p in projector.parameters()} & {id(p) for p in student.parameters()}
    hs = student(torch.randint(0, 50, (2, 5)), output_hidden_states=True).hidden_states
    teacher_states = [torch.randn(2, 5, 48) for _ in range(7)]
    for y, (_, t) in zip(projector(hs), layer_map):
        teacher_states[t] = y.detach()
    assert hint_loss(hs, teacher_states, projector, layer_map).item() == 0.0
    teacher_states[3] = teacher_states[3] + 2.0                                  # one pair off by 2 in every dim
    np.testing.assert_allclose(hint_loss(hs, teacher_states, projector).item(), 4.0 / 3, rtol=1e-5)
    mask = torch.tensor([[True, False, False, False, False], [False] * 5])
    np.testing.assert_allclose(hint_loss(hs, teacher_states, projector, mask=mask).item(), 4.0 / 3, rtol=1e-5)


# ---------------------------------------------------------------- error paths
@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="kl"), "kind='kl'"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(temperature=-2), "temperature=-2"),
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(temperature=math.inf), "temperature=inf"),
    (dict(kind="jsd", beta=1.5), "beta=1.5"),
    (dict(beta=-0.1), "beta=-0.1"),
    (dict(beta=math.nan), "beta=nan"),
    (dict(kind="sfkl", skew=2.0), "skew=2.0"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match=match):
        kd_loss(s, t, **kwargs)


def test_error_paths():
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    labels = torch.randint(0, 8, (2, 3))
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"alpha={alpha}"):
            distillation_loss(s, labels, t, alpha=alpha)
    with pytest.raises(ValueError, match="V_s=8.*V_t=10.*stlm_nb.adapt"):
        kd_loss(s, torch.randn(2, 3, 10))
    torch.testing.assert_close(kd_loss(s, torch.cat([t, torch.randn(2, 3, 2)], -1), vocab_size=8), kd_loss(s, t))  # padded rows
    with pytest.raises(ValueError, match="vocab_size=9"):
        kd_loss(s, t, vocab_size=9)
    with pytest.raises(ValueError, match="teacher token ids reach"):
        kd_loss(s[..., :4], SparseTeacherLogits.from_dense(t, k=8))
    with pytest.raises(ValueError, match="temperature=2.0"):
        kd_loss(s, SparseTeacherLogits.from_dense(t, k=3), temperature=2.0)
    with pytest.raises(ValueError, match="mask has shape"):
        kd_loss(s, t, mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        kd_loss(s, t, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="teacher positions"):
        kd_loss(s, t[:, :2])
    with pytest.raises(ValueError, match="teacher_weights"):
        kd_loss(s, [t, t], teacher_weights=[1.0])
    with pytest.raises(ValueError, match="mode='geometric'"):
        ensemble_teacher_logits([t, t], mode="geometric")
    with pytest.raises(ValueError, match="share one shape"):
        ensemble_teacher_logits([t, t[..., :4]])
    with pytest.raises(ValueError, match="n_teacher_layers=2"):
        uniform_layer_map(3, 2)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(s, labels[:, :2], t)
