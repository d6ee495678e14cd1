"""The teacher hidden-state cache (stlm_nb.cache.build_hidden_cache) from two processes at once on one directory: two
single-process jobs asking for the same cache take turns (the teacher runs once, both open the same files), and two
ranks (world_size=2) share the batches; every result is the in-process cache, byte for byte."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from stlm_nb.cache import HiddenStateCache, build_hidden_cache, fingerprint_blocks, hidden_cache_key

N_BLOCKS, T, V, BATCH = 9, 16, 40, 2   # 5 batches, the last of one block: rank 0 runs 0, 2, 4 and rank 1 runs 1, 3

TEACHER = r'''
import types
class Tiny(torch.nn.Module):
    "A seeded stand-in teacher (no transformers import: the processes start in about 2 s): hidden states 0, 1, 2 of width 32."
    def __init__(self):
        super().__init__(); g = torch.Generator().manual_seed(3)
        self.emb = torch.nn.Parameter(torch.randn(40, 32, generator=g))
        self.w = torch.nn.Parameter(torch.randn(2, 32, 32, generator=g) / 6)
        self.config = types.SimpleNamespace(num_hidden_layers=2, hidden_size=32)
    def forward(self, input_ids, output_hidden_states=False):
        h = self.emb[input_ids]; hs = [h]
        h = h + torch.tanh(h @ self.w[0]); hs.append(h)
        h = h + torch.tanh(h @ self.w[1]); hs.append(torch.nn.functional.layer_norm(h, (32,)))
        return types.SimpleNamespace(hidden_states=tuple(hs))
'''

SCRIPT = r'''
import json, pathlib, sys, time, torch
torch.set_num_threads(1)
from stlm_nb.cache import build_hidden_cache, fingerprint_blocks, hidden_cache_key
exec(sys.argv[3])                                                       # TEACHER: the class Tiny

out, me = pathlib.Path(sys.argv[1]), int(sys.argv[2])
teacher = Tiny()                                                         # the same weights in every process (seeded)
blocks = torch.randint(0, 40, (9, 16), generator=torch.Generator().manual_seed(0))
key = hidden_cache_key("tiny-stand-in", "tok", fingerprint_blocks(blocks), 16, [0, 1, 2], 2, 32, "float32")

class Counting(torch.nn.Module):
    "The teacher, counting its forward passes, a little slow so that the two processes overlap."
    def __init__(self): super().__init__(); self.m, self.config, self.calls = teacher, teacher.config, 0
    def forward(self, **kw): self.calls += 1; time.sleep(0.2); return self.m(**kw)

report = {}
for world in (1, 2):   # 1: two jobs asking for one cache (both rank 0); 2: this process is rank `me` of two
    (out / f"ready-{world}-{me}").touch()                               # start together
    t0 = time.time()
    while not (out / f"ready-{world}-{1 - me}").exists():
        if time.time() - t0 > 120: raise RuntimeError("the other process never started")
        time.sleep(0.01)
    t = Counting()
    cache = build_hidden_cache(t, blocks, out / f"world{world}", key, batch_size=2, progress=False,
                               rank=me if world == 2 else 0, world_size=world, timeout=120)
    report[world] = {"calls": t.calls, "n": len(cache), "layers": list(cache.layers)}
(out / f"report-{me}.json").write_text(json.dumps(report))
'''


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # as in each process: the same matmul splits, the same bits
    yield
    torch.set_num_threads(n)


def reference(path):
    "The same teacher, blocks, key and batch size, built by this one process."
    scope = {"torch": torch}; exec(TEACHER, scope)
    teacher = scope["Tiny"]()
    blocks = torch.randint(0, V, (N_BLOCKS, T), generator=torch.Generator().manual_seed(0))
    key = hidden_cache_key("tiny-stand-in", "tok", fingerprint_blocks(blocks), T, [0, 1, 2], 2, 32, "float32")
    return build_hidden_cache(teacher, blocks, path, key, batch_size=BATCH, progress=False)


def test_two_processes_on_one_directory(tmp_path, env):
    "World size 1: two jobs for one cache, the teacher runs once; world size 2: rank 0 and rank 1 each run their share."
    env = dict(env, OMP_NUM_THREADS="1")
    script = tmp_path / "hidden_two.py"; script.write_text(SCRIPT)
    out = tmp_path / "two"; out.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(me), TEACHER], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for me in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
    reports = [json.loads((out / f"report-{me}.json").read_text()) for me in (0, 1)]
    one = reference(tmp_path / "one")
    for world, expected_calls in ((1, [0, 5]), (2, [2, 3])):   # 5 batches, run once in all
        rep = [r[str(world)] for r in reports]
        assert all(r["n"] == N_BLOCKS and r["layers"] == [0, 1, 2] for r in rep), rep
        assert sorted(r["calls"] for r in rep) == expected_calls, rep
        both = HiddenStateCache(out / f"world{world}", expected_key=one.key, verify="full")
        for layer in (0, 1, 2):   # byte for byte: the files, and the arrays
            a, b = both.arrays[layer], one.arrays[layer]
            assert a.dtype == b.dtype == np.uint16 and a.shape == b.shape == (N_BLOCKS, T, 32) and a.tobytes() == b.tobytes(), layer
            assert (out / f"world{world}" / f"layer{layer}.npy").read_bytes() == (tmp_path / "one" / f"layer{layer}.npy").read_bytes()
        assert both.meta["files"] == one.meta["files"] and both.meta["built_by"]["world_size"] == world
        assert not (out / f"world{world}.partial").exists()
        assert sorted(p.name for p in (out / f"world{world}").iterdir()) == ["layer0.npy", "layer1.npy", "layer2.npy", "meta.json"]
