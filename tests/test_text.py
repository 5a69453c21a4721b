from mpolab.text import everyday_sentences, reference_sentences, train_eval_sentences


def test_sentence_sources_are_real_prose():
    ref, every = reference_sentences(), everyday_sentences()
    assert len(ref) > 500 and len(every) == 80
    assert all(40 <= len(s) <= 200 and s.endswith(".") for s in ref)
    assert len(set(ref)) == len(ref)


def test_train_and_held_out_are_disjoint_and_mixed():
    train, held_out = train_eval_sentences(400, 60)
    assert len(train) == 400 and len(held_out) == 60
    assert not set(train) & set(held_out)
    assert sum(s in set(everyday_sentences()) for s in held_out) == 30
    assert train_eval_sentences(400, 60) == (train, held_out)  # deterministic


def test_all_sentences_not_held_out_train():
    train, held_out = train_eval_sentences(None, 60)
    assert len(train) + len(held_out) == len(reference_sentences()) + len(everyday_sentences())
    assert not set(train) & set(held_out)
    assert train[:400] == train_eval_sentences(400, 60)[0]
