"""Where the student's training step spends its time, and how close it gets to its limits (issue: the student near
its matmul limits). One process, side by side, for the default student (llama-7m) at two vocabularies (49,152: the
teacher's; 16,000: a Baby Llama-sized one), batch 16 x 128, float32, CE only (the KD step with a cached teacher
costs the same: bench/distill_step.py):

  limits   1. the bare 2048 x 2048 x 2048 float32 matmul's FLOP/s;
           2. the matmuls of the student's own shapes, back to back without the model: for every linear layer
              (attention q/k/v/o, MLP gate/up/down, the LM head) the forward product and the two backward products
              of a training step, at (B*T) rows — what a step would cost if nothing but its matmuls ran;
  steps    3. the unfused step (logits (B*T, V), then the loss: `distillation_loss`);
           4. the fused step (the loss fused with the LM head: `fused_linear_distillation_loss`, what
              `DistillationTrainer` runs);
  profile  5. torch.profiler's top operators of both steps.

FLOPs of a step = 6 * matmul parameters * tokens (Kaplan et al. 2020). Run: `python bench/student_step.py`
(writes bench/results/student_step.{md,json}); a few minutes on 2 cores. Times: the median of STEPS after WARMUP.
"""
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from stlm_nb.losses import distillation_loss, fused_linear_distillation_loss
from stlm_nb.models import make_student
from stlm_nb.runs import matmul_parameters

B, T, STEPS, WARMUP = 16, 128, 5, 2
VOCABS = (49_152, 16_000)
OUT = Path(__file__).parent / "results"


def median_time(fn, n=STEPS, warmup=WARMUP):
    for _ in range(warmup): fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bare_matmul_flops(n=2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_time(lambda: a @ b, n=10)


def shape_matmuls(model, rows):
    "One training step's matmuls of every nn.Linear (and the tied LM head) at `rows` tokens: forward, input grad, weight grad."
    mats = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear): mats.append(m.weight.shape)  # (out, in); the LM head included
    work = []
    for out_f, in_f in mats:
        x, w, g = torch.randn(rows, in_f), torch.randn(out_f, in_f), torch.randn(rows, out_f)
        work.append((x, w, g))
    def run():
        for x, w, g in work:
            x @ w.T; g @ w; g.T @ x
    flops = sum(6 * rows * o * i for o, i in mats)
    return run, flops


def main():
    torch.manual_seed(0)
    peak = bare_matmul_flops()
    print(f"bare 2048^3 fp32 matmul: {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows_out, profiles = [], {}
    for V in VOCABS:
        student = make_student("llama-7m", vocab_size=V, seed=0)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        x = torch.randint(0, V, (B, T))
        flops = 6 * matmul_parameters(student) * B * T

        def unfused():
            distillation_loss(student(input_ids=x).logits, x, None, alpha=1.0)["loss"].backward(); opt.step(); opt.zero_grad(set_to_none=True)

        def fused():
            h = student(input_ids=x, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            fused_linear_distillation_loss(h, student.get_output_embeddings(), x, None, alpha=1.0)["loss"].backward()
            opt.step(); opt.zero_grad(set_to_none=True)

        run_shapes, shape_flops = shape_matmuls(student, B * T)
        t_shapes = median_time(run_shapes)
        t_unfused, t_fused = median_time(unfused), median_time(fused)
        t_unfused2 = median_time(unfused)  # drift check: the unfused step again, after the fused one
        t_unfused = min(t_unfused, t_unfused2)
        row = {"vocab": V, "matmul_params": matmul_parameters(student), "step_flops": flops,
               "shapes_s": t_shapes, "shapes_flops_per_s": shape_flops / t_shapes,
               "unfused_s": t_unfused, "fused_s": t_fused, "unfused_again_s": t_unfused2,
               "fused_flops_per_s": flops / t_fused, "unfused_flops_per_s": flops / t_unfused,
               "fused_over_bare": flops / t_fused / peak, "unfused_over_bare": flops / t_unfused / peak,
               "shapes_over_fused_time": t_shapes / t_fused, "shapes_over_unfused_time": t_shapes / t_unfused,
               "fused_speedup": t_unfused / t_fused}
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        for name, fn in (("unfused", unfused), ("fused", fused)):
            with profile(activities=[ProfilerActivity.CPU]) as prof: fn()
            ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in ev)
            profiles[f"{V}/{name}"] = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                                        "calls": e.count} for e in ev[:10]]
    meta = {"batch": B, "block": T, "student": "llama-7m", "precision": "fp32", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine()),
            "load_avg_at_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "commit": os.popen("git rev-parse --short HEAD").read().strip()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "student_step.json").write_text(json.dumps({"meta": meta, "bare_matmul_flops_per_s": peak, "rows": rows_out,
                                                       "profiles": profiles}, indent=1))
    L = ["# Student step: limits, fused vs unfused, where the time goes", "", f"`python bench/student_step.py` — {meta}", "",
         f"Bare 2048³ float32 matmul, same process: **{peak / 1e9:.1f} GFLOP/s**.", "",
         "| vocab | step GFLOP | own-shape matmuls s | unfused step s | fused step s | fused speed-up | fused GFLOP/s | fused / bare matmul | own shapes / fused step time |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows_out:
        L.append(f"| {r['vocab']:,} | {r['step_flops'] / 1e9:.1f} | {r['shapes_s']:.3f} | {r['unfused_s']:.3f} | {r['fused_s']:.3f} | "
                 f"{r['fused_speedup']:.2f}x | {r['fused_flops_per_s'] / 1e9:.1f} | {r['fused_over_bare']:.2f} | {r['shapes_over_fused_time']:.2f} |")
    for key, ops in profiles.items():
        L += ["", f"**Profile, vocab {key.split('/')[0]}, {key.split('/')[1]} step** (self CPU time, top 10)", "",
              "| op | self ms | share | calls |", "|---|---:|---:|---:|"]
        L += [f"| `{o['op']}` | {o['self_ms']:.1f} | {o['share']:.0%} | {o['calls']} |" for o in ops]
    (OUT / "student_step.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    sys.exit(main())
