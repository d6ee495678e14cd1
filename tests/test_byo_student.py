"""Bring your own student: a save_pretrained directory (here, a model shrunk by stlm_nb.pruning, the Sheared-LLaMA /
Minitron recipe "prune, then distil") and a config.json go through the whole recipe; a student whose vocabulary
differs from the teacher's is refused before any weights load, naming both sizes."""
import json

import pytest
import torch

from stlm_nb.models import load_student
from stlm_nb.pruning import PruningMasks, TargetShape, prune_model
from stlm_nb.trainer import DistillConfig, run_distillation


def _small(tmp_path, teacher, **kw):
    "The smoke sizes with the tiny trained teacher and its 512-token tokenizer; one seed, a few steps."
    return DistillConfig.from_parameters({**DistillConfig.SMOKE, "seeds": [0], "teachers": [str(teacher)], "tokenizer": str(teacher),
                                          "max_steps": 3, "eval_steps": 3, "out_dir": str(tmp_path / "run"), **kw})


@pytest.fixture
def pruned_dir(tmp_path, tiny_teacher):
    "The tiny teacher shrunk by the pruning module (hidden 32 -> 24, intermediate 64 -> 32), saved with save_pretrained."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    c = source.config
    masks = PruningMasks(c, TargetShape(24, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, 32))
    small = prune_model(source, masks)
    d = tmp_path / "pruned"
    small.save_pretrained(d); AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(d)
    return d


def test_distil_into_a_pruned_model(tmp_path, tiny_teacher, pruned_dir, one_thread):
    start = load_student(str(pruned_dir))
    m = run_distillation(_small(tmp_path, tiny_teacher, student=str(pruned_dir)))
    assert set(m["runs"]) == {"kd-seed0", "ce-seed0"}
    assert m["config"]["run"]["student"] == str(pruned_dir)
    n = sum(p.numel() for p in start.parameters())
    assert m["model_parameters"]["student"]["total"] == n  # the pruned shape, not a preset's
    for arm in ("kd", "ce"):  # both arms started from the pruned weights and trained away from them
        final = load_student(str(tmp_path / "run" / f"{arm}-seed0" / "final"))
        assert (final.config.hidden_size, final.config.intermediate_size) == (24, 32)
        assert any(not torch.equal(a, b) for a, b in zip(final.parameters(), start.parameters()))
        assert max((a - b).abs().max().item() for a, b in zip(final.parameters(), start.parameters())) < 0.5  # fine-tuned, not re-initialised
    # the same architecture from its config.json alone (a directory without weights: freshly initialised) ends far worse
    (tmp_path / "config_only").mkdir(); (tmp_path / "config_only" / "config.json").write_text((pruned_dir / "config.json").read_text())
    fresh = run_distillation(_small(tmp_path, tiny_teacher, student=str(tmp_path / "config_only"), baseline=False, out_dir=str(tmp_path / "fresh")))
    assert fresh["model_parameters"]["student"]["total"] == n
    assert m["runs"]["kd-seed0"]["eval"]["all"]["bpb"] < fresh["runs"]["kd-seed0"]["eval"]["all"]["bpb"] - 0.3
    assert m["untrained_floor"]  # scored on an untrained model of the pruned architecture


def test_config_json_student_and_vocab_mismatch(tmp_path, tiny_teacher, one_thread):
    from stlm_nb.models import student_config
    cfg = student_config("llama-tiny", vocab_size=512, num_hidden_layers=1)
    cfg.to_json_file(tmp_path / "student.json")
    m = run_distillation(_small(tmp_path, tiny_teacher, student=str(tmp_path / "student.json"), baseline=False))
    assert m["model_parameters"]["student"]["total"] == sum(p.numel() for p in load_student(cfg).parameters())
    bad = student_config("llama-tiny", vocab_size=300); bad.to_json_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"its vocabulary has 300 tokens, the teacher\(s\) .* and their tokenizer 512.*stlm_nb.adapt"):
        run_distillation(_small(tmp_path, tiny_teacher, student=str(tmp_path / "bad.json"), out_dir=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()  # refused before anything is written
