"Bits per byte of the spelled initialisation before any training (same held-out text as the canonical run)."
import json, time
import torch
from stlm_nb.adapt import adapt_vocabulary
from stlm_nb.eval import bits_per_byte, heldout_documents
from stlm_nb.models import load_teacher
from stlm_nb.tokenizer import load_tokenizer
m = json.load(open("figures/adapt/metrics.json")); p = m.get("config") or m["params"]  # "params": metrics.json written before the common header
def _cap(ds, max_bytes):
    have, keep = {}, []
    for r in ds:
        room = max_bytes - have.get(r["domain"], 0)
        text = r["text"].encode("utf-8")[:room].decode("utf-8", "ignore")
        if text: keep.append({**r, "text": text}); have[r["domain"]] = have.get(r["domain"], 0) + len(text.encode("utf-8"))
    return keep
t0 = time.time()
held = _cap(heldout_documents(max_bytes_per_domain=p["bpb_bytes_per_domain"]), p["bpb_bytes_per_domain"])
teacher, ttok = load_teacher(p["teacher"], dtype=torch.float32)  # the canonical run's precision (fp32 on CPU)
stok = load_tokenizer("figures/adapt/student_tokenizer")
model = adapt_vocabulary(teacher, ttok, stok, init="spelled").eval()
r = bits_per_byte(model, stok, held, block_size=min(256, 4 * p["block_size"]))
out = {"what": "adapted-spelled at step 0 (initialisation only, no training)", "bpb": r, "dtype": "float32", "wall_s": time.time() - t0,
       "command": "OMP_NUM_THREADS=2 .venv/bin/python bench/adapt_step0.py"}
json.dump(out, open("figures/adapt/spelled_step0_bpb.json", "w"), indent=1)
print({d: round(v["bpb"], 3) for d, v in r.items()})
