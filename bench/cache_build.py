"""Teacher-cache build throughput with 1 and 2 processes (ranks) on one machine, and the cache's bytes per token.

Teacher: a RANDOM LlamaForCausalLM with SmolLM2-135M's width (hidden 576, MLP 1536, 9 heads / 3 KV heads,
vocabulary 49,152, tied embeddings) but 8 layers instead of 30 (~56M parameters), seeded so every rank holds the
same weights. It is not the packaged 135M teacher (loading and running that would not fit this benchmark's two
minutes on a shared 2-core machine); the cache's per-token work outside the network (top-k and the exact tail over
49,152 logits per temperature) is the real one.
Each world size runs under `torchrun --standalone --nproc_per_node W` (gloo process group, OMP_NUM_THREADS=1 and
torch.set_num_threads(1) in every process, as in the 1-process case). Timed: `build_teacher_cache` on every rank,
from a barrier after the model is built to the return of the cache on every rank (teacher forwards, records, the
merge, checksums, the atomic rename, and opening); not timed: imports and model construction. Build tokens/s =
blocks x block length / that time (the slowest rank's). The two caches are compared file by file (SHA-256).

Run from the repository root:  python bench/cache_build.py  (about a minute on a quiet 2-core machine)
Writes bench/results/cache_build.md and bench/results/cache_build.json.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent

N_BLOCKS, BLOCK, BATCH, TOP_K, TEMPERATURES = 32, 128, 4, 32, (1.0,)   # 4,096 tokens, 8 batches (4 per rank at W = 2)
TEACHER = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048)
WORLD_SIZES = (1, 2)


def load_average() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def free_cores(seconds: float = 3.0) -> float:
    "CPUs left idle by other work right now: the idle share of /proc/stat's CPU time over `seconds`, times the CPUs."
    def times():
        with open("/proc/stat") as f: v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)   # idle + iowait, total
    (i0, t0), _ = times(), time.sleep(seconds)
    i1, t1 = times()
    return (os.cpu_count() or 1) * (i1 - i0) / max(1, t1 - t0)


def worker(out_dir: str, report: str):
    "One rank: build the teacher, wait for the others, time the cache build."
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from stlm_nb.cache import build_teacher_cache, cache_key, fingerprint_blocks
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**TEACHER)).eval().requires_grad_(False)
    blocks = torch.randint(0, TEACHER["vocab_size"], (N_BLOCKS, BLOCK), generator=torch.Generator().manual_seed(1))
    key = cache_key("random-llama-8x576", "random", fingerprint_blocks(blocks), BLOCK, TOP_K, TEMPERATURES, "float32")
    with torch.no_grad(): teacher(input_ids=blocks[:1, :8])                     # first-call overheads, untimed
    dist.barrier()
    t0 = time.perf_counter()
    cache = build_teacher_cache(teacher, blocks, out_dir, key, batch_size=BATCH, progress=False, rank=rank, world_size=world)
    seconds = time.perf_counter() - t0
    times = [None] * world
    dist.all_gather_object(times, seconds)
    if rank == 0:
        Path(report).write_text(json.dumps({"world_size": world, "seconds": max(times), "per_rank_seconds": times,
                                            "bytes_per_token": cache.bytes_per_token, "files": cache.meta["files"],
                                            "parameters": sum(p.numel() for p in teacher.parameters())}))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=2, metavar=("OUT_DIR", "REPORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker: return worker(*args.worker)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    load_before, free, start = load_average(), free_cores(), time.time()
    runs, tmp = {}, Path(tempfile.mkdtemp(prefix="cache_build_"))
    try:
        for w in WORLD_SIZES:
            report = tmp / f"w{w}.json"
            cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(w), __file__, "--worker", str(tmp / f"cache-w{w}"), str(report)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if r.returncode != 0: sys.exit(f"world_size={w} failed:\n{r.stderr[-3000:]}")
            runs[w] = json.loads(report.read_text())
    finally: shutil.rmtree(tmp, ignore_errors=True)
    load_after, tokens = load_average(), N_BLOCKS * BLOCK
    identical = runs[1]["files"] == runs[2]["files"]
    for w, r in runs.items(): r["tokens_per_s"] = tokens / r["seconds"]; del r["files"]
    cpus = os.cpu_count()
    busy = free < max(WORLD_SIZES) - 0.25   # measured over 3 s before the run (load averages lag by minutes)
    result = {"teacher": {**TEACHER, "parameters": runs[1]["parameters"], "weights": "random (seed 0), not the packaged teacher"},
              "blocks": N_BLOCKS, "block_size": BLOCK, "tokens": tokens, "batch_size": BATCH, "top_k": TOP_K,
              "temperatures": list(TEMPERATURES), "threads_per_process": 1, "runs": {str(w): r for w, r in runs.items()},
              "speedup_2_vs_1": runs[1]["seconds"] / runs[2]["seconds"], "caches_identical": identical,
              "bytes_per_token": runs[1]["bytes_per_token"],
              "bytes_per_token_format3": TOP_K * (4 + 4) + len(TEMPERATURES) * (8 + 4) + 4,
              "machine": {"cpus": cpus, "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "load_average_before": load_before, "load_average_after": load_after, "free_cores_before": round(free, 2),
                          "busy": busy},
              "wall_s": round(time.time() - start, 1), "date": time.strftime("%Y-%m-%d %H:%M")}
    import torch
    result["machine"]["torch"] = torch.__version__
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cache_build.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| {w} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {', '.join(f'{s:.1f}' for s in r['per_rank_seconds'])} |"
                     for w, r in runs.items())
    state = (f"{free:.1f} of {cpus} CPUs idle over the 3 s before the run (`uptime` 1/5/15-minute load averages "
             f"{'/'.join(map(str, load_before))} before, {'/'.join(map(str, load_after))} after, this benchmark's own processes included)")
    note = (f"**The machine was busy**: {state}. Other work shared the cores, so these timings, and above all the "
            f"{max(WORLD_SIZES)}-process speedup, understate what a quiet machine gives." if busy else f"The machine was quiet: {state}.")
    md = f"""# Teacher cache build: 1 vs 2 processes

`python bench/cache_build.py` ({result['date']}, {cpus} CPUs, torch {result['machine']['torch']}, one thread per process).
Teacher: a **random** LLaMA with SmolLM2-135M's width (hidden 576, MLP 1536, 9/3 heads, vocabulary 49,152, tied
embeddings) and {TEACHER['num_hidden_layers']} layers ({runs[1]['parameters'] / 1e6:.0f}M parameters), **not** the packaged 135M teacher.
{N_BLOCKS} blocks x {BLOCK} tokens = {tokens} tokens, batch {BATCH}, top-{TOP_K}, T = {', '.join(map(str, TEMPERATURES))}.
Timed: `build_teacher_cache` from a barrier after model construction to the open cache on every rank (forwards,
records, merge, checksums, rename).

{note}

| processes | build s | build tokens/s | per-rank s |
|---|---|---|---|
{rows}

Speedup with 2 processes: {result['speedup_2_vs_1']:.2f}x. Caches of 1 and 2 processes identical (SHA-256 of every file): {identical}.

Bytes per token (format 4, top-{TOP_K}, one temperature): {result['bytes_per_token']:.0f}; format 3: {result['bytes_per_token_format3']}.
With two temperatures: 140 (format 3: 284).
"""
    (RESULTS / "cache_build.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
