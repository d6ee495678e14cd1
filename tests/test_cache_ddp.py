"""The teacher cache built by every rank (issue 15 item 3): under 2-process DDP on CPU (torchrun, gloo) each rank runs
the teacher on its share of the batches (batch j on rank j mod 2), one rank merges, and the cache equals the
single-process one bit for bit; an interrupted 2-rank build resumes each shard where its progress record left it."""
import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import BIN
from stlm_nb.cache import TeacherCache, build_teacher_cache, cache_key, fingerprint_blocks

N_BLOCKS, T, V, K, BATCH = 47, 32, 64, 16, 2   # 24 batches, the last of one block: 12 per rank
FIELDS = ("values", "indices", "log_tail", "target_logprob")

SCRIPT = r'''
import json, pathlib, sys, time, torch, torch.distributed as dist
torch.set_num_threads(1)
from stlm_nb.models import make_student
from stlm_nb.cache import build_teacher_cache, cache_key, fingerprint_blocks

out = sys.argv[1]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
teacher = make_student("llama-tiny", vocab_size=64, seed=3).eval()     # the same weights on every rank (seeded)
blocks = torch.randint(0, 64, (47, 32), generator=torch.Generator().manual_seed(0))
key = cache_key("tiny-llama", "tok", fingerprint_blocks(blocks), 32, k=16, temperatures=(1.0, 2.0), dtype="float32")

class Counting(torch.nn.Module):
    "The teacher, counting its forward passes; raises KeyboardInterrupt (a kill) after `fail_after` of them."
    def __init__(self, fail_after=10**9, together=False):
        super().__init__(); self.m, self.config, self.calls, self.fail_after = teacher, teacher.config, 0, fail_after
        self.together = together
    def forward(self, **kw):
        self.calls += 1
        if self.calls > self.fail_after: raise KeyboardInterrupt("simulated kill")
        if self.together and self.calls == 1:   # the ranks build at once: each waits in its first batch for the other's first
            pathlib.Path(f"{out}/rank{rank}-running").touch()
            other, t0 = pathlib.Path(f"{out}/rank{1 - rank}-running"), time.time()
            while not other.exists():
                if time.time() - t0 > 120: raise RuntimeError(f"rank {1 - rank} never ran while rank {rank} was building: serialised")
                time.sleep(0.01)
        return self.m(**kw)

def build(path, t):
    return build_teacher_cache(t, blocks, path, key, batch_size=2, chunk_blocks=4, progress=False, rank=rank, world_size=world,
                               timeout=300)

report = {}
t = Counting(fail_after=3)            # killed in its 4th batch: the progress record holds 2 batches (chunk_blocks=4)
try: build(f"{out}/resumed", t); report["interrupted"] = False
except KeyboardInterrupt: report["interrupted"] = True
dist.barrier()
report["final_dir_after_kill"] = __import__("os").path.exists(f"{out}/resumed")
t = Counting()
cache = build(f"{out}/resumed", t)
report["resume_calls"], report["resume_len"] = t.calls, len(cache)
dist.barrier()
t = Counting(together=True)
cache = build(f"{out}/fresh", t)
report["fresh_calls"], report["fresh_len"] = t.calls, len(cache)
with open(f"{out}/rank{rank}.json", "w") as f: json.dump(report, f)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # as each rank: the same matmul splits, the same bits
    yield
    torch.set_num_threads(n)


def single_process_cache(path):
    "The reference: the same teacher, blocks, key and batch size, built by this one process (world_size=1)."
    from stlm_nb.models import make_student
    teacher = make_student("llama-tiny", vocab_size=V, seed=3).eval()
    blocks = torch.randint(0, V, (N_BLOCKS, T), generator=torch.Generator().manual_seed(0))
    key = cache_key("tiny-llama", "tok", fingerprint_blocks(blocks), T, k=K, temperatures=(1.0, 2.0), dtype="float32")
    return build_teacher_cache(teacher, blocks, path, key, batch_size=BATCH, progress=False)


def test_two_ranks_build_the_single_process_cache_bit_for_bit_and_resume(tmp_path, env):
    env = dict(env, OMP_NUM_THREADS="1")
    script = tmp_path / "cache_ddp.py"; script.write_text(SCRIPT)
    out = tmp_path / "ddp"; out.mkdir()
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    reports = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
    for rep in reports:
        assert rep["interrupted"] and not rep["final_dir_after_kill"], rep   # a kill leaves no cache under the final name
        assert rep["resume_calls"] == 12 - 2 and rep["resume_len"] == N_BLOCKS, rep   # each rank: its batches after the record
        assert rep["fresh_calls"] == 12 and rep["fresh_len"] == N_BLOCKS, rep         # each rank: half of the 24 batches, once,
    assert (out / "rank0-running").exists() and (out / "rank1-running").exists()      # at the same time as the other
    one = single_process_cache(tmp_path / "one")
    for name in ("resumed", "fresh"):
        ddp = TeacherCache(out / name, verify="full")
        for field in FIELDS:   # bit for bit: dtype, shape and bytes, and the files' SHA-256 in meta.json
            a, b = ddp.arrays[field], one.arrays[field]
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (name, field)
            assert (out / name / f"{field}.npy").read_bytes() == (tmp_path / "one" / f"{field}.npy").read_bytes(), (name, field)
        assert ddp.meta["key"] == one.meta["key"] and ddp.meta["files"] == one.meta["files"] and ddp.meta["dtypes"] == one.meta["dtypes"]
        assert ddp.meta["built_by"] == {"world_size": 2, "batch_size": BATCH} and one.meta["built_by"]["world_size"] == 1
        assert not (out / f"{name}.partial").exists()
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(["meta.json"] + [f"{f}.npy" for f in FIELDS])
    assert np.isnan(one.arrays["target_logprob"][:, -1]).all() and one.arrays["indices"].dtype == np.uint16
