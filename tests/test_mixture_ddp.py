"""Dynamic batch loading under 2-process DDP on CPU (gloo): every rank holds the same weights, and the ranks' shares
of each step together are exactly the single-process global batch drawn from the same stream."""
import json
import subprocess
import sys

from conftest import BIN

SCRIPT = r'''
import json, os, sys, torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from accelerate import PartialState
from stlm_nb.models import make_student
from stlm_nb.mixture import DomainMixtureSampler, DomainWeightCallback, attach_domain_mixture

out, per_device = sys.argv[1], int(sys.argv[2])
state = PartialState(cpu=True)  # joins the torchrun process group (gloo)
g = torch.Generator().manual_seed(0)
easy = (torch.arange(9).repeat(24, 1) % 5 + 10).tolist(); hard = torch.randint(0, 50, (24, 9), generator=g).tolist()
train = Dataset.from_dict({"input_ids": easy + hard, "labels": easy + hard, "domain": ["easy"] * 24 + ["hard"] * 24,
                           "block_idx": list(range(48))})
held = train.select([0, 1, 30, 31])
seen = []
def collate(rows):
    seen.append([r["block_idx"] for r in rows])
    return {"input_ids": torch.tensor([r["input_ids"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}
args = TrainingArguments(output_dir=out, per_device_train_batch_size=per_device, max_steps=10, learning_rate=3e-3, save_strategy="no",
                         logging_steps=100, report_to="none", use_cpu=True, seed=0, remove_unused_columns=False, disable_tqdm=True)
trainer = Trainer(model=make_student("llama-tiny", vocab_size=50, seed=0), args=args, train_dataset=train, data_collator=collate)
sampler = DomainMixtureSampler(train["domain"], seed=0)
callback = DomainWeightCallback(sampler, held, {"easy": 1.0, "hard": 0.0}, update_every=2)
attach_domain_mixture(trainer, sampler, callback)
trainer.train()
with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as f:
    json.dump({"seen": seen, "history": callback.history, "world": state.num_processes}, f)
'''


def test_mixture_ddp_two_ranks_share_one_stream(tmp_path, env):
    env = dict(env, OMP_NUM_THREADS="1")
    script = tmp_path / "mixture_ddp.py"; script.write_text(SCRIPT)
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29541", str(script), str(ddp), "2"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([sys.executable, str(script), str(one), "4"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    r0, r1 = (json.loads((ddp / f"rank{k}.json").read_text()) for k in (0, 1))
    single = json.loads((one / "rank0.json").read_text())
    assert r0["world"] == r1["world"] == 2 and single["world"] == 1
    weights = lambda h: [[e[k] for k in sorted(e) if k.startswith("mixture/weight/")] for e in h]
    assert weights(r0["history"]) == weights(r1["history"])           # the same weights on every rank, bit for bit
    assert [e["step"] for e in r0["history"]] == [2, 4, 6, 8, 10]
    assert weights(r0["history"])[-1][1] > 0.5                        # the lagging domain gained weight
    # step k: rank 0 trained on global batch 2k, rank 1 on 2k+1 of the same stream; together the single-process batch
    steps = 10
    together = [sorted(a + b) for a, b in zip(r0["seen"][:steps], r1["seen"][:steps])]
    assert together == [sorted(b) for b in single["seen"][:steps]]
    for a, b in zip(weights(r0["history"]), weights(single["history"])):  # the model trains alike: the same weights within float noise
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
