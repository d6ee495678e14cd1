"""Benchmark of one distillation training step, side by side in one process.

Measures, for the default main-job student (llama-7m, teacher vocabulary 49,152, batch 16 x 128):
  1. student training tokens/s (the trainer's step: loss fused with the LM head) with the cached teacher (top-k records read from a TeacherCache on disk)
     vs the online teacher (SmolLM2-135M forward every step);
  2. the KD step with the cached teacher vs the CE-only step (time ratio; target <= 1.15);
  3. the student's achieved FLOP/s (6 * matmul params * tokens per step) as a fraction of a bare fp32
     matmul's FLOP/s measured in the same process;
  4. a peer row: a Baby Llama-style step (Timiryasov & Tastet 2023, written here from the paper's description:
     the teacher runs online every step, the KD term is the full-vocabulary KL between softmax(z_t/T) and
     softmax(z_s/T) with PyTorch's `kl_div(reduction="batchmean")`, times T^2, mixed with the model's own CE
     loss, alpha = 0.5, T = 2) on the same student, teacher and batch, as a per-step ratio and a per-run ratio
     (2 epochs x 3 seeds of the KD arm over the main job's 24,576 training tokens; ours pays the teacher once,
     for the cache, whose build time per block is measured here too).

Run: `python bench/distill_step.py` (writes bench/results/distill_step.{md,json}).
"""
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stlm_nb.cache import build_teacher_cache, cache_key, fingerprint_blocks
from stlm_nb.losses import distillation_loss, fused_linear_distillation_loss
from stlm_nb.models import count_parameters, load_teacher, make_student

B, T, K, STEPS, WARMUP = 16, 128, 32, 5, 2
BL_ALPHA, BL_T = 0.5, 2.0                          # Baby Llama's mixing weight and temperature
RUN_SEEDS, RUN_EPOCHS, RUN_TOKENS = 3, 2, 24_576   # the main job's KD arm
OUT = Path(__file__).parent / "results"


def bare_matmul_flops(n=2048, seconds=2.0, dtype=torch.float32):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b; k += 1
    return 2 * n ** 3 * k / (time.perf_counter() - t0)


def time_steps(step, n=STEPS, warmup=WARMUP):
    for _ in range(warmup): step()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def main():
    torch.manual_seed(0)
    from stlm_nb.runs import resolve_precision
    precision = resolve_precision()  # fp32 on CPU unless STLM_NB_PRECISION says otherwise; recorded in the results
    print(precision)
    teacher, tok = load_teacher("smollm2-135m", dtype=precision.teacher_dtype)
    V = len(tok)
    ids = torch.randint(0, V, (B * 2, T))
    student = make_student("llama-7m", vocab_size=V, seed=0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    with tempfile.TemporaryDirectory() as d:
        key = cache_key("smollm2-135m", "smollm2-135m", fingerprint_blocks(ids), T, K, (1.0,), str(precision.teacher_dtype))
        t0 = time.perf_counter()
        cache = build_teacher_cache(teacher, ids, Path(d) / "c", key, vocab_size=V, progress=False)
        cache_s_per_block = (time.perf_counter() - t0) / len(ids)
        batches = [torch.arange(i * B, (i + 1) * B) for i in range(2)]
        state = {"i": 0}

        def step(mode):
            def run():
                rows = batches[state["i"] % 2]; state["i"] += 1
                x = ids[rows]
                if mode == "babyllama":  # the peer: online teacher, HF's own CE, full-vocabulary KL with batchmean
                    with torch.no_grad(): t_logits = teacher(input_ids=x).logits[..., :V]
                    out = student(input_ids=x, labels=x)
                    kd = F.kl_div(F.log_softmax(out.logits / BL_T, -1), F.softmax(t_logits / BL_T, -1), reduction="batchmean") * BL_T ** 2
                    (BL_ALPHA * out.loss + (1 - BL_ALPHA) * kd).backward(); opt.step(); opt.zero_grad(set_to_none=True)
                    return
                if mode in ("ce", "cached"):  # as DistillationTrainer does: the loss fused with the LM head
                    h = student(input_ids=x, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
                    out = fused_linear_distillation_loss(h, student.get_output_embeddings(), x, cache[rows] if mode == "cached" else None,
                                                         alpha=0.5 if mode == "cached" else 1.0)
                else:
                    with torch.no_grad(): teacher_signal = teacher(input_ids=x).logits
                    out = distillation_loss(student(input_ids=x).logits, x, teacher_signal, alpha=0.5)
                out["loss"].backward(); opt.step(); opt.zero_grad(set_to_none=True)
            return run

        results = {}
        for mode in ("ce", "cached", "online", "babyllama", "ce_again"):
            med, ts = time_steps(step(mode.replace("_again", "")), n=STEPS if mode not in ("online", "babyllama") else 3)
            results[mode] = {"median_s": med, "tokens_per_s": B * T / med, "all_s": ts}
            print(f"{mode:9s} {med:.3f} s/step  {B * T / med:8.0f} tokens/s", flush=True)
    ce = min(results["ce"]["median_s"], results["ce_again"]["median_s"])  # CE measured before and after: drift check
    n_mm = count_parameters(student)["non_embedding"] + student.get_output_embeddings().weight.numel()
    achieved = 6 * n_mm * B * T / ce
    peak = bare_matmul_flops()
    summary = {
        "kd_cached_over_ce_time": results["cached"]["median_s"] / ce,
        "cached_over_online_tokens_per_s": results["cached"]["tokens_per_s"] / results["online"]["tokens_per_s"],
        "student_ce_flops_per_s": achieved, "bare_matmul_fp32_flops_per_s": peak,
        "student_fraction_of_matmul": achieved / peak,
        "babyllama_over_cached_step_time": results["babyllama"]["median_s"] / results["cached"]["median_s"],
    }
    # per run: the KD arm, 3 seeds x 2 epochs over the main job's training blocks; ours builds the cache once
    steps = RUN_SEEDS * RUN_EPOCHS * (RUN_TOKENS // T) / B
    ours = (RUN_TOKENS // T) * cache_s_per_block + steps * results["cached"]["median_s"]
    peer = steps * results["babyllama"]["median_s"]
    summary.update(cache_build_s_per_block=cache_s_per_block, run_steps=steps, run_ours_s=ours, run_babyllama_s=peer,
                   babyllama_over_ours_run_time=peer / ours)
    meta = {"batch": B, "block": T, "k": K, "student": "llama-7m", "teacher": "smollm2-135m", "precision": precision.as_dict(), "vocab": V,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d %H:%M")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "distill_step.json").write_text(json.dumps({"meta": meta, "results": results, "summary": summary}, indent=1))
    lines = ["# Distillation step benchmark", "", f"`python bench/distill_step.py` — {meta}", "",
             "| step | s/step (median) | tokens/s |", "|---|---|---|"]
    lines += [f"| {m} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} |" for m, r in results.items()]
    lines += ["", "| ratio | value |", "|---|---|",
              f"| KD (cached teacher) step time / CE-only step time | {summary['kd_cached_over_ce_time']:.2f} |",
              f"| tokens/s cached teacher / online teacher | {summary['cached_over_online_tokens_per_s']:.1f} |",
              f"| student achieved FLOP/s (CE step) | {achieved / 1e9:.1f} GFLOP/s |",
              f"| bare fp32 matmul FLOP/s, same process | {peak / 1e9:.1f} GFLOP/s |",
              f"| student / bare matmul | {summary['student_fraction_of_matmul']:.2f} |",
              f"| Baby Llama-style step time / our cached KD step time | {summary['babyllama_over_cached_step_time']:.2f} |",
              f"| Baby Llama-style run time / ours (KD arm, {RUN_SEEDS} seeds x {RUN_EPOCHS} epochs x {RUN_TOKENS:,} tokens; ours incl. the cache build, "
              f"{cache_s_per_block:.3f} s/block) | {summary['babyllama_over_ours_run_time']:.2f} ({peer:.0f} s vs {ours:.0f} s) |"]
    (OUT / "distill_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
