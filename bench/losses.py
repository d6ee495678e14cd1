"""Plain vs chunked KD loss: forward + backward time and peak memory, side by side in one run.

plain   : logits = hidden @ W.T (the student's LM head), then `kd_loss_sum_count(logits, teacher)`.
chunked : `chunked_kd_loss_sum_count(hidden, W, teacher)` (fused with the LM head, default chunk size).
Both: sum / count, then backward to the hidden states and the LM head weight.

Each (method, B*T, V) runs in a fresh process. Peak memory = the process's peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) minus its resident set size once the inputs exist (hidden
states, LM head, teacher); so it counts everything the loss allocates (intermediates and the gradients of
the hidden states and LM head), not the inputs nor the fixed cost of the first call (a step on 8 positions
runs before the baseline is taken). CPU has no allocator statistics like `torch.cuda.max_memory_allocated`,
so the memory step runs with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_): every tensor
of 1 MiB or more is mapped on allocation and unmapped on free, and RSS follows the live tensors. (With the
default dynamic threshold, freed blocks below 32 MiB stay in the heap and the RSS peak depends on
fragmentation: the chunked path's 32 MiB chunks then read ~2x higher.)
Time: after the memory step, the same process switches malloc to the steady state glibc's dynamic threshold
reaches (mmap threshold 32 MiB, trim threshold 64 MiB, via mallopt), so blocks below 32 MiB are reused
instead of faulted in afresh, as in a training loop; then the fastest of REPEATS forward+backward passes.

Run from the repository root:  python bench/losses.py  (about 5 minutes on 2 busy cores)
Writes bench/results/losses.md and bench/results/losses.json.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# configurations: (B*T positions, vocabulary size, teacher format)
CONFIGS = [(n, v, "dense") for v in (8192, 49152) for n in (512, 2048, 4096)] + [(2048, 49152, "sparse")]
METHODS = ("plain", "chunked")
HIDDEN = 256        # student width D (LM head V x D)
KIND = "fkl"
TEMPERATURE = 2.0
TOP_K = 32          # sparse teacher: top-32 + per-temperature log-normaliser (the teacher cache format)
REPEATS = 5         # timed forward+backward passes; the fastest is reported (shared CPUs; 2 left +-20% noise on the small sizes)
MMAP_THRESHOLD = 1 << 20  # bytes: during the memory step glibc maps every allocation at least this large


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_steady_state():
    "glibc's dynamic thresholds after large blocks were freed: mmap 32 MiB (its maximum), trim 2x that."
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 64 << 20))


def worker(n: int, vocab: int, teacher_format: str, method: str) -> dict:
    import torch
    import torch.nn.functional as F
    from stlm_nb.losses import SparseTeacherLogits, _auto_chunk_size, chunked_kd_loss_sum_count, kd_loss_sum_count

    torch.manual_seed(0)
    hidden = torch.randn(n, HIDDEN).requires_grad_()
    weight = torch.randn(vocab, HIDDEN).div_(HIDDEN**0.5).requires_grad_()   # in place: no transient copy before
    if teacher_format == "dense":                                             # the baseline is taken
        teacher = torch.randn(n, vocab).mul_(2)
    else:  # built 256 rows at a time, so no dense (n, V) tensor ever exists in this process
        parts = [SparseTeacherLogits.from_dense(2 * torch.randn(min(256, n - i), vocab), k=TOP_K, temperatures=(TEMPERATURE,))
                 for i in range(0, n, 256)]
        teacher = SparseTeacherLogits(torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts]),
                                      {TEMPERATURE: torch.cat([p.log_normalizers[TEMPERATURE] for p in parts])},
                                      {TEMPERATURE: torch.cat([p.log_tails[TEMPERATURE] for p in parts])})  # exact tails (cache format 3)
        del parts

    def step(rows=n):
        h, t = (hidden, teacher) if rows == n else (hidden[:rows], teacher[:rows])
        if method == "plain":
            total, count = kd_loss_sum_count(F.linear(h, weight), t, kind=KIND, temperature=TEMPERATURE)
        else:
            total, count = chunked_kd_loss_sum_count(h, weight, t, kind=KIND, temperature=TEMPERATURE)
        loss = total / count
        loss.backward()
        value = loss.item()
        hidden.grad, weight.grad = None, None
        return value

    step(rows=8)   # loads the libraries' lazy buffers and threads, so the baseline below excludes them
    base_rss = rss_bytes()
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    values = [step()]                                                # the memory step
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steady = malloc_steady_state()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        values.append(step())
        times.append(time.perf_counter() - t0)
    return dict(n=n, vocab=vocab, teacher=teacher_format, method=method, time_s=min(times), times_s=times,
                chunk_size=_auto_chunk_size(vocab) if method == "chunked" else None,
                peak_growth_bytes=peak - base_rss, baseline_rss_bytes=base_rss, peak_before_bytes=base_peak,
                peak_measured_cleanly=peak > base_peak, malloc_steady_state_for_timing=steady, loss=values[-1])


def machine_info() -> dict:
    import torch
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = next((int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), None)
    return dict(cpu=cpu, cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), memory_bytes=mem,
                python=platform.python_version(), torch=torch.__version__, platform=platform.platform())


def main():
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows, t_start, load_at_start = [], time.time(), os.getloadavg()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    for n, vocab, teacher_format in CONFIGS:
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, "--worker", str(n), str(vocab), teacher_format, method],
                                 capture_output=True, text=True, env=env, cwd=ROOT)
            if out.returncode:
                sys.exit(f"worker {n} {vocab} {teacher_format} {method} failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{method:8s} B*T={n:5d} V={vocab:6d} teacher={teacher_format:6s} "
                  f"{r['time_s']:7.3f} s  peak +{r['peak_growth_bytes'] / 2**20:8.1f} MiB  loss {r['loss']:.5f}", flush=True)
    by = {(r["n"], r["vocab"], r["teacher"], r["method"]): r for r in rows}
    table = []
    for n, vocab, teacher_format in CONFIGS:
        p, c = by[(n, vocab, teacher_format, "plain")], by[(n, vocab, teacher_format, "chunked")]
        table.append(dict(n=n, vocab=vocab, teacher=teacher_format, logits_mib=n * vocab * 4 / 2**20,
                          plain_s=p["time_s"], chunked_s=c["time_s"], time_ratio=c["time_s"] / p["time_s"],
                          plain_peak_mib=p["peak_growth_bytes"] / 2**20, chunked_peak_mib=c["peak_growth_bytes"] / 2**20,
                          memory_ratio=c["peak_growth_bytes"] / p["peak_growth_bytes"],
                          loss_abs_diff=abs(p["loss"] - c["loss"])))
    info = machine_info()
    params = dict(hidden=HIDDEN, kind=KIND, temperature=TEMPERATURE, top_k=TOP_K, repeats=REPEATS, configs=CONFIGS,
                  methods=METHODS, chunk_size="library default: max(32, 2**23 // V) positions (per run: runs[i].chunk_size)",
                  memory_measure="peak RSS (getrusage ru_maxrss) minus RSS after creating the inputs and one 8-position step, "
                                 f"fresh process per run, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}",
                  time_measure=f"fastest of {REPEATS} forward+backward passes after the memory step, "
                               "malloc switched to mmap threshold 32 MiB / trim threshold 64 MiB (glibc's dynamic steady state)",
                  load_average_at_start=load_at_start, load_average_at_end=os.getloadavg())
    (RESULTS / "losses.json").write_text(json.dumps(dict(machine=info, parameters=params, runs=rows, table=table,
                                                         wall_s=time.time() - t_start), indent=1) + "\n")
    lines = [
        "# KD loss: plain vs chunked (fused with the LM head)",
        "",
        f"Forward + backward of `fkl` at T={TEMPERATURE}, LM head {HIDDEN} -> V, float32, default chunk size "
        f"(max(32, 2**23 // V) positions); peak = growth of the process's peak RSS (`resource.getrusage` ru_maxrss) over "
        "the inputs, in a fresh process per run, with glibc's mmap threshold fixed at 1 MiB so that RSS follows the live "
        f"tensors; time = fastest of the {REPEATS} passes that follow, with malloc in glibc's usual steady state "
        "(see the docstring of bench/losses.py). `logits` = size of one float32 [B·T, V] tensor. "
        f"Machine: {info['cpu']}, {info['torch_threads']} torch threads, torch {info['torch']}; load average "
        f"{load_at_start[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (other jobs shared the CPUs, so times are noisy). "
        "Produced by `python bench/losses.py`; raw runs and machine info in `losses.json`.",
        "",
        "| B·T | V | teacher | logits MiB | plain s | chunked s | time chunked/plain | plain peak MiB | chunked peak MiB | memory chunked/plain |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        teacher = "dense" if t["teacher"] == "dense" else f"top-{TOP_K}"
        lines.append(f"| {t['n']} | {t['vocab']} | {teacher} | {t['logits_mib']:.0f} | {t['plain_s']:.3f} | {t['chunked_s']:.3f} | "
                     f"{t['time_ratio']:.2f} | {t['plain_peak_mib']:.0f} | {t['chunked_peak_mib']:.0f} | {t['memory_ratio']:.2f} |")
    (RESULTS / "losses.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'losses.md'} and losses.json in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=4, metavar=("N", "V", "TEACHER", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        n, vocab, teacher_format, method = args.worker
        print(json.dumps(worker(int(n), int(vocab), teacher_format, method)))
    else:
        main()
