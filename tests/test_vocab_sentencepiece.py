"""Subword units: a sentencepiece vocabulary trained on the training transcripts, saved in the checkpoint,
decoded by greedy CTC, the streaming engine's words and the lexicon search exactly as characters are."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from train_corpus import WORDS, make_corpus

from streamssl import EncoderConfig
from streamssl.asr.ctc import CharVocab, CTCModel, greedy_decode
from streamssl.asr.lexicon import BeamSearchConfig, LexiconDecoder
from streamssl.asr.vocab import PIECE_BOUNDARY, SentencePieceVocab, make_vocab, split_word_start, train_sentencepiece
from streamssl.export import export_model
from streamssl.runtime.model import ExportInfo, OnnxModel
from streamssl.streaming.engine import GreedyStreamDecoder, Token, words_of
from streamssl.train.api import build_config, run_training
from streamssl.train.checkpoint import load_checkpoint

TEXTS = ["THE CAT SAT ON THE MAT", "A DOG SAT ON A LOG", "THE SUN IS OUT", "IT'S A RED TREE",
         "GO ON THE BLUE MAT", "THE DOG AND THE CAT", "ON AND ON IT GOES", "A LOG IS A TREE"] * 4


@pytest.fixture(scope="module")
def vocab():
    return SentencePieceVocab(model_proto=train_sentencepiece(TEXTS, 30))


def test_training_is_deterministic_and_every_transcript_round_trips(vocab):
    assert train_sentencepiece(TEXTS, 30) == vocab.model_proto
    assert len(vocab) == 31 and vocab.symbols[:2] == ["<blank>", "<unk>"] and vocab.blank == 0
    for text in TEXTS:
        ids = vocab.encode(text)
        assert 0 not in ids and vocab.decode(ids) == text
        assert len(ids) < len(text)  # pieces are longer than characters
    # bpe too, and another size gives other pieces
    assert train_sentencepiece(TEXTS, 28, "bpe") != train_sentencepiece(TEXTS, 28)


def test_symbols_alone_decode_but_do_not_encode(vocab):
    ids = vocab.encode("THE CAT SAT")
    decoder_only = make_vocab("sentencepiece", vocab.symbols)
    assert decoder_only.decode([0, *ids, 0, 0]) == "THE CAT SAT"
    with pytest.raises(ValueError, match="only decodes"):
        decoder_only.encode("THE CAT")
    with pytest.raises(ValueError, match=r"characters \['Z'\]"):
        vocab.encode("THE ZOO")
    with pytest.raises(ValueError, match="kinds"):
        make_vocab("words", vocab.symbols)


def test_a_word_starts_at_a_boundary_piece_as_at_a_space():
    assert split_word_start(" ", CharVocab.word_boundary) == (True, "")
    assert split_word_start("A", CharVocab.word_boundary) == (False, "A")
    assert split_word_start(PIECE_BOUNDARY + "THE", PIECE_BOUNDARY) == (True, "THE")
    assert split_word_start("ING", PIECE_BOUNDARY) == (False, "ING")


def tokens_of(vocab, ids):
    return [Token(vocab.symbols[i], i, frame, 0.04 * frame, 0.04 * frame + 0.04, 0.0) for frame, i in enumerate(ids)]


@pytest.mark.parametrize("kind", ["characters", "sentencepiece"])
def test_engine_words_and_greedy_text_equal_decode(kind, vocab):
    v = CharVocab() if kind == "characters" else vocab
    ids = v.encode("THE CAT SAT ON THE MAT")
    words = words_of(tokens_of(v, ids), v.word_boundary)
    assert [w.text for w in words] == ["THE", "CAT", "SAT", "ON", "THE", "MAT"]
    # a word starts with its first letter's token: after the space, or at the boundary piece
    first = len(v.encode("THE")) + (1 if kind == "characters" else 0)
    assert words[1].start_s == pytest.approx(0.04 * first)
    assert words[0].end_s == pytest.approx(0.04 * len(v.encode("THE")))
    one_hot = torch.full((2 * len(ids), len(v)), -30.0)
    for frame, i in enumerate(ids):
        one_hot[2 * frame, i] = 0.0
        one_hot[2 * frame + 1, v.blank] = 0.0
    stream = GreedyStreamDecoder(v)
    for start in range(0, one_hot.shape[0], 3):
        stream.push(one_hot[start:start + 3])
    whole = greedy_decode(one_hot[None], torch.tensor([one_hot.shape[0]]), v)[0]
    assert stream.text() == whole == "THE CAT SAT ON THE MAT"


def spelt(vocab, text):
    """Log-probabilities ``(1, T, V)``: each piece of ``text`` then a blank, each at 0.8 against 1e-4 for
    every other token (a word of one piece has one frame of evidence to pay its LM cost with)."""
    ids = vocab.encode(text)
    probs = torch.full((2 * len(ids), len(vocab)), 1e-4)
    for frame, i in enumerate(ids):
        probs[2 * frame, i] = 0.8
        probs[2 * frame + 1, vocab.blank] = 0.8
    return (probs / probs.sum(-1, keepdim=True)).log()[None]


def test_the_lexicon_search_spells_words_in_pieces(vocab):
    decoder = LexiconDecoder(vocab, 1, BeamSearchConfig(lexicon_words=5000))
    log_probs = spelt(vocab, "THE DOG SAT ON A LOG")
    decoder.push(log_probs[:, :5])
    assert decoder.spelling(0) and PIECE_BOUNDARY not in decoder.spelling(0)
    decoder.push(log_probs[:, 5:])
    decoder.finish()
    words, stable = decoder.hypothesis(0)
    assert decoder.texts() == ["THE DOG SAT ON A LOG"] and stable == 6
    assert [w.first_frame for w in words][:2] == [0, 2 * len(vocab.encode("THE"))]
    with pytest.raises(ValueError, match="only decodes"):
        LexiconDecoder(make_vocab("sentencepiece", vocab.symbols), 1, BeamSearchConfig(lexicon_words=1000))


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(0, 50), max_size=6), seed=st.integers(0, 3))
def test_lexicon_chunked_equals_whole_with_pieces(vocab, cuts, seed):
    generator = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(2, 50, len(vocab), generator=generator).mul(3).log_softmax(-1)
    config = BeamSearchConfig(lexicon_words=2000)
    whole = LexiconDecoder(vocab, 2, config)
    whole.push(log_probs)
    whole.finish()
    chunked = LexiconDecoder(vocab, 2, config)
    edges = [0, *sorted(cuts), 50]
    for a, b in zip(edges, edges[1:]):
        chunked.push(log_probs[:, a:b])
    chunked.finish()
    assert chunked.texts() == whole.texts()
    assert all(set(t.split()) <= set(whole.words) for t in whole.texts())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(make_corpus(tmp_path_factory.mktemp("corpus"), n=8))


def sp_config(corpus, steps, size=20):
    sets = [("vocab.kind", "sentencepiece"), ("vocab.size", size), ("max_batch_seconds", 2.5), ("log_every", 1),
            ("save_every", 100), ("augment", {"speed_factors": [0.9, 1.0, 1.1]})]
    return build_config("finetune", "tiny", None, sets, train_data=corpus, steps=steps)


def test_a_run_trains_its_pieces_saves_them_and_resumes_exactly(corpus, tmp_path):
    straight = run_training("finetune", sp_config(corpus, 5), str(tmp_path / "straight"), progress=False)
    run_training("finetune", sp_config(corpus, 5), str(tmp_path / "resumed"), stop_after=2, progress=False)
    resumed = run_training("finetune", sp_config(corpus, 5), str(tmp_path / "resumed"), progress=False)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert straight == resumed
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name
    # the checkpoint alone holds the pieces: the model proto's bytes, no path
    assert a.payload["vocab_kind"] == "sentencepiece" and isinstance(a.payload["vocab_model"], bytes)
    vocab = a.model.vocab
    assert isinstance(vocab, SentencePieceVocab) and len(vocab) == 21
    assert a.model.output.out_features == 21
    assert vocab.decode(vocab.encode("IT'S A RED TREE")) == "IT'S A RED TREE"
    assert set(vocab.letters) == set("".join(WORDS))


def test_characters_stay_the_default_and_bad_vocab_settings_are_named(corpus, tmp_path):
    assert build_config("finetune", "tiny", None, [], train_data=corpus).vocab_options().kind == "characters"
    with pytest.raises(ValueError, match="vocab.kind"):
        build_config("finetune", "tiny", None, [("vocab.kind", "words")], train_data=corpus)
    with pytest.raises(ValueError, match="vocab has unknown keys"):
        build_config("finetune", "tiny", None, [("vocab.pieces", 3)], train_data=corpus)
    with pytest.raises(ValueError, match="could not train 5000 pieces"):
        run_training("finetune", sp_config(corpus, 1, size=5000), str(tmp_path / "ft"), progress=False)


def test_an_export_carries_the_pieces_and_an_older_one_reads_as_characters(vocab):
    torch.manual_seed(0)
    model = CTCModel(EncoderConfig.tiny(mixer="llsa"), vocab=vocab).eval()
    data, info = export_model(model, 40)
    assert info.vocabulary_kind == "sentencepiece" and info.vocabulary == vocab.symbols
    runtime = OnnxModel(data)
    assert isinstance(runtime.vocab, SentencePieceVocab) and runtime.vocab.model_proto == vocab.model_proto
    assert runtime.vocab.encode("THE CAT") == vocab.encode("THE CAT")
    record = {k: v for k, v in info.__dict__.items() if k not in ("vocabulary_kind", "vocabulary_model")}
    older = ExportInfo.from_json(json.dumps(record))
    assert older.vocabulary_kind == "characters" and older.vocabulary_model is None
