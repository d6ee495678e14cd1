"""DistillationTrainer failure handling: a non-finite loss stops training, names the step, keeps the last good checkpoint."""
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments

from stlm_nb.losses import SparseTeacherLogits
from stlm_nb.models import make_student
from stlm_nb.data import collate_blocks
from stlm_nb.trainer import DistillationTrainer, KDConfig


class PoisonedCache:
    "Dense-equivalent teacher records that turn into NaN from the `bad_call`-th batch on."
    def __init__(self, logits, bad_call):
        self.logits, self.bad_call, self.calls = logits, bad_call, 0

    def __getitem__(self, idx):
        self.calls += 1
        rec = SparseTeacherLogits.from_dense(self.logits[idx], k=8, temperatures=(1.0,))
        if self.calls >= self.bad_call: rec.values.fill_(float("nan"))
        return rec


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (8, 16))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "block_idx": list(range(8))})
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=4, save_steps=2, learning_rate=1e-3,
                             report_to="none", use_cpu=True, remove_unused_columns=False, save_strategy="steps")
    trainer = DistillationTrainer(model=make_student("llama-tiny", vocab_size=50), args=args, train_dataset=ds,
                                  data_collator=collate_blocks, teacher_caches=[PoisonedCache(torch.randn(8, 16, 50), bad_call=3)],
                                  kd=KDConfig(alpha=0.5))
    with pytest.raises(RuntimeError, match=r"non-finite loss nan at step 2"):
        trainer.train()
    good = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2")   # the last good checkpoint loads
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert not (tmp_path / "checkpoint-4").exists()


def test_single_cached_teacher_takes_the_fused_path(tmp_path, monkeypatch):
    "One cached teacher must reach the CE + sparse-KD path fused with the LM head (a list of one would take the 3x slower autograd path)."
    import stlm_nb.trainer as trainer
    from stlm_nb.losses import SparseTeacherLogits
    calls = []
    fused = trainer.fused_linear_distillation_loss
    monkeypatch.setattr(trainer, "fused_linear_distillation_loss",
                        lambda h, head, lab, t, **k: calls.append(isinstance(t, SparseTeacherLogits) and k["alpha"] == 0.5) or fused(h, head, lab, t, **k))
    ids = torch.randint(0, 50, (4, 16))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "block_idx": list(range(4))})
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to="none", use_cpu=True,
                             remove_unused_columns=False, save_strategy="no")
    DistillationTrainer(model=make_student("llama-tiny", vocab_size=50), args=args, train_dataset=ds, data_collator=collate_blocks,
                        teacher_caches=[PoisonedCache(torch.randn(4, 16, 50), bad_call=10**9)], kd=KDConfig(alpha=0.5)).train()
    assert calls == [True, True]


def test_hint_loss_with_online_teacher_trains_projector_beside_student(tmp_path):
    "hint_weight > 0: the projector trains (its part is logged) and the exported student has exactly the preset's size."
    from stlm_nb.models import count_parameters
    from stlm_nb.trainer import DistillConfig, run_distillation
    m = run_distillation(DistillConfig.from_parameters(smoke=True, teacher_mode="online", hint_weight=0.5, hint_layers="1:10,2:30",
                                                       max_steps=2, baseline=False, out_dir=str(tmp_path)))
    logged = [h for h in m["runs"]["kd-seed0"]["log_history"] if "train_hint" in h]
    assert logged and all(h["train_hint"] > 0 for h in logged)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "kd-seed0" / "final")
    assert count_parameters(final) == m["model_parameters"]["student"]
    assert not any("hint" in n for n, _ in final.named_parameters())


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_fused_head_trains_like_the_unfused_path(tmp_path, alpha):
    "Three SGD steps (no Adam normalisation to amplify rounding) with the loss fused with the LM head end at the same weights as logits + distillation_loss."
    ids = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "block_idx": list(range(8))})
    cache = PoisonedCache(torch.randn(8, 16, 50, generator=torch.Generator().manual_seed(1)), bad_call=10**9)
    finals = []
    for fused in (True, False):
        args = TrainingArguments(str(tmp_path / str(fused)), per_device_train_batch_size=4, max_steps=3, report_to="none", use_cpu=True,
                                 remove_unused_columns=False, save_strategy="no", learning_rate=1.0, optim="sgd", seed=0, data_seed=0)
        model = make_student("llama-tiny", vocab_size=50, seed=0)
        DistillationTrainer(model=model, args=args, train_dataset=ds, data_collator=collate_blocks, teacher_caches=[cache],
                            kd=KDConfig(alpha=alpha), fused_head=fused).train()
        finals.append([p.detach().clone() for p in model.parameters()])
    start = [p.detach() for p in make_student("llama-tiny", vocab_size=50, seed=0).parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(finals[0], start)) > 1e-3  # it trained
    assert max((a - b).abs().max().item() for a, b in zip(finals[0], finals[1])) < 1e-5
