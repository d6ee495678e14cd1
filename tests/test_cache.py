"""The teacher cache (stlm_nb.cache): exact log tails in the record (issue 12d), checksums, refusal of damaged and
old-format caches, `top_k` checked before anything is created, two processes building one cache (issue 13), and the
16-bit format 4 (issue 16). Ranks sharing one build under DDP: tests/test_cache_ddp.py."""
import hashlib
import json
import math
import multiprocessing as mp
import shutil
import types

import numpy as np
import pytest
import torch

from stlm_nb.cache import CACHE_FORMAT, TeacherCache, build_teacher_cache, cache_key, fingerprint_blocks, teacher_topk_record
from stlm_nb.losses import SparseTeacherLogits, kd_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FixedTeacher(torch.nn.Module):
    "A stand-in causal LM: logits are a fixed table row per input token (a config with vocab_size, like Hugging Face's)."
    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)   # (V_in, V) logits per input token
        self.config = types.SimpleNamespace(vocab_size=table.shape[1])
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return types.SimpleNamespace(logits=self.table[input_ids])


def tiny_teacher(V=40, seed=0):
    return FixedTeacher(3 * torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))


def build(tmp_path, teacher, n=6, T=16, k=8, temps=(1.0, 2.0), name="c", **kw):
    blocks = torch.randint(0, teacher.table.shape[0], (n, T), generator=torch.Generator().manual_seed(1))
    key = cache_key("fixed", "tok", fingerprint_blocks(blocks), T, k=k, temperatures=temps, dtype="float32")
    return build_teacher_cache(teacher, blocks, tmp_path / name, key, progress=False, **kw), blocks, key


# ---------------------------------------------------------------- issue 12d: the exact log tail
@pytest.mark.parametrize("gap", [38.0, 90.0])
def test_cached_tail_of_a_confident_teacher_is_exact(tmp_path, gap):
    V, k = 50, 3
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(2))
    table[:, 7] += gap                                                         # every position: token 7 is `gap` above the rest
    cache, blocks, _ = build(tmp_path, FixedTeacher(table), n=2, T=5, k=k, temps=(1.0, 2.0))
    z = table[blocks].double()                                                 # the dense teacher logits, float64
    for i, T in enumerate((1.0, 2.0)):
        lp = torch.log_softmax(z / T, -1)
        ref = torch.logsumexp(lp.scatter(-1, z.topk(k, -1).indices, -math.inf), -1)   # log mass outside the top k
        got = cache[[0, 1]].log_probs(T)[..., -1].double()
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6)
        np.testing.assert_allclose(cache.arrays["log_tail"][..., i], ref.numpy(), rtol=1e-6)
    rec = teacher_topk_record(table[blocks], k, (1.0,))
    assert set(rec) == {"values", "indices", "log_tail"} and rec["log_tail"].dtype == torch.float32
    assert rec["values"].dtype == torch.float16 and (rec["values"][..., 0] == 0).all()
    # reverse KL against the cached (float16) record at the gap equals the float64 one (issue 12d: a floored tail was off by tens of nats)
    student = 2 * torch.randn(2, 5, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = SparseTeacherLogits.from_dense(z, k, (1.0, 2.0))
    for T in (1.0, 2.0):
        for kind in ("rkl", "fkl"):
            got, want = (kd_loss(student, r, kind=kind, temperature=T).item() for r in (cache[[0, 1]], exact))
            assert abs(got - want) < 1e-4 * want, (T, kind, got, want)


def test_bytes_per_token(tmp_path):
    "Issue 16: <= 140 bytes per token at top-32 (format 3: 272 with one temperature, 284 with two)."
    one, _, _ = build(tmp_path, tiny_teacher(), k=32, temps=(1.0,), name="one")
    two, _, _ = build(tmp_path, tiny_teacher(), k=32, temps=(1.0, 2.0), name="two")
    assert one.bytes_per_token == 32 * (2 + 2) + 4 + 4 == 136                   # float16 values, uint16 ids, tail, target
    assert two.bytes_per_token == 32 * (2 + 2) + 2 * 4 + 4 == 140
    assert {n: a.dtype.name for n, a in two.arrays.items()} == {"values": "float16", "indices": "uint16", "log_tail": "float32",
                                                                "target_logprob": "float32"}
    assert two.key["format"] == CACHE_FORMAT == 4


# ---------------------------------------------------------------- issue 13: damaged, old and edited caches
def test_damaged_cache_is_refused_with_path_and_fix(tmp_path):
    cache, blocks, key = build(tmp_path, tiny_teacher(), n=200, T=64, k=40)  # values.npy ~1 MB: larger than the samples
    path = tmp_path / "c"
    fix = f"rebuild it: delete {path} and run again"
    assert TeacherCache(path, verify="full").arrays["values"].shape == (200, 64, 40)
    meta = json.loads((path / "meta.json").read_text())
    f = path / "values.npy"
    good = f.read_bytes()
    assert meta["files"]["values"]["sha256"] == hashlib.sha256(good).hexdigest() and meta["files"]["values"]["size"] == len(good)

    f.write_bytes(good[: len(good) // 2])                                      # truncated
    with pytest.raises(ValueError, match=f"values.npy is {len(good) // 2} bytes, expected {len(good)} bytes; {fix}"):
        TeacherCache(path)
    f.write_bytes(bytes(len(good)))                                            # zeroed in place, same size
    with pytest.raises(ValueError, match=rf"values.npy does not match its SHA-256 \(sampled ranges\); {fix}"):
        TeacherCache(path)
    f.write_bytes(good[:200] + bytes(len(good) - 200))                         # the data zeroed, the npy header kept
    with pytest.raises(ValueError, match=fix):
        TeacherCache(path)
    samples = meta["files"]["values"]["samples"]                               # one byte between two sampled ranges:
    off = samples[0][0] + samples[0][1] + 10                                   # the fast check cannot see it, the full one does
    assert all(not o <= off < o + n for o, n, _ in samples)
    bad = bytearray(good); bad[off] ^= 0xFF; f.write_bytes(bytes(bad))
    TeacherCache(path)
    with pytest.raises(ValueError, match=rf"values.npy does not match its SHA-256 \(whole file\); {fix}"):
        TeacherCache(path, verify="full")
    (path / "log_tail.npy").unlink()                                           # a missing file
    with pytest.raises(ValueError, match=f"log_tail.npy is missing.*{fix}"):
        TeacherCache(path)
    with pytest.raises(ValueError, match=fix):                                 # build refuses it too, and overwrite=True rebuilds
        build_teacher_cache(tiny_teacher(), blocks, path, key, progress=False)
    rebuilt = build_teacher_cache(tiny_teacher(), blocks, path, key, overwrite=True, progress=False)
    assert f.read_bytes() == good and rebuilt.arrays["values"].shape == (200, 64, 40)
    with pytest.raises(ValueError, match="verify='sizes'"):
        TeacherCache(path, verify="sizes")


def test_old_format_and_edited_key_are_refused_with_the_fix(tmp_path):
    cache, blocks, key = build(tmp_path, tiny_teacher())
    path = tmp_path / "c"
    fix = f"rebuild it: delete {path} and run again"
    with pytest.raises(ValueError, match=rf"different key \(cached, expected\): \{{'k': \(8, 4\)\}}; {fix}"):
        TeacherCache(path, expected_key={**key, "k": 4})
    meta = json.loads((path / "meta.json").read_text())
    meta["key"]["temperatures"] = [1.0, 3.0]                                   # a key edited by hand
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"different key.*temperatures.*{fix}"):
        TeacherCache(path, expected_key=key)
    meta["key"]["format"] = 3                                                  # a cache of the previous format
    del meta["files"], meta["dtypes"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"has format 3; this version reads format 4.*{fix}"):
        TeacherCache(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"unreadable meta.json.*{fix}"):
        TeacherCache(path)


def test_top_k_larger_than_vocab_is_refused_before_anything_is_created(tmp_path):
    teacher = tiny_teacher(V=40)
    out = tmp_path / "caches"
    out.mkdir()
    for k, kw in ((64, {}), (32, {"vocab_size": 30})):
        with pytest.raises(ValueError, match=f"top_k={k} is not accepted: the teacher's vocabulary has {kw.get('vocab_size', 40)} tokens"):
            build(out, teacher, k=k, **kw)
    assert list(out.iterdir()) == [] and teacher.calls == 0                    # no .partial, no lock file, no forward pass


# ---------------------------------------------------------------- issue 13: two processes, one cache
def _build_in_process(out_dir, barrier, queue):
    "Child process: a tiny random LlamaForCausalLM teacher builds the cache at out_dir (after the barrier, if any)."
    try:
        torch.set_num_threads(1)
        from stlm_nb.models import make_student
        teacher = make_student("llama-tiny", vocab_size=64, seed=3).eval()
        blocks = torch.randint(0, 64, (48, 32), generator=torch.Generator().manual_seed(0))
        key = cache_key("tiny-llama", "tok", fingerprint_blocks(blocks), 32, k=16, temperatures=(1.0, 2.0), dtype="float32")
        if barrier is not None: barrier.wait(timeout=120)
        cache = build_teacher_cache(teacher, blocks, out_dir, key, batch_size=2, chunk_blocks=4, progress=False)
        queue.put(("ok", len(cache)))
    except BaseException as e:  # reported to the parent, which fails the test with it
        queue.put(("error", f"{type(e).__name__}: {e}"))


def test_two_processes_build_the_same_cache(tmp_path):
    "Issue 13: two DDP ranks with an online teacher wrote the same .partial (EOFError); now one builds, the other opens."
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_build_in_process, args=(tmp_path / "shared", barrier, queue)) for _ in range(2)]
    for p in procs: p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs: p.join(timeout=60)
    assert results == [("ok", 48), ("ok", 48)], results
    _build_in_process(tmp_path / "single", None, queue)                        # the single-process build, here (one thread)
    assert queue.get(timeout=60) == ("ok", 48)
    shared, one = tmp_path / "shared", tmp_path / "single"
    names = sorted(p.name for p in one.glob("*.npy"))
    assert names == sorted(p.name for p in shared.glob("*.npy")) and len(names) == 4
    for name in names:
        assert (shared / name).read_bytes() == (one / name).read_bytes(), name
    files = lambda d: json.loads((d / "meta.json").read_text())["files"]
    assert files(shared) == files(one)
    assert not (tmp_path / "shared.partial").exists()
    TeacherCache(shared, verify="full")
