"""Fine-tuning really learns: on a corpus whose audio spells its transcript (one tone per character),
a tiny model goes from emitting nothing to a low error rate, and its streamed transcripts equal the
offline ones."""

import pytest
from train_corpus import make_corpus

from streamssl.asr.evaluate import evaluate_model
from streamssl.cli import main
from streamssl.data import load_utterances
from streamssl.train.checkpoint import load_checkpoint


@pytest.mark.slow
def test_ctc_fine_tuning_learns_the_tone_corpus(tmp_path, capsys):
    manifest = str(make_corpus(tmp_path / "corpus", n=40, words=(2, 3)))
    code = main(["finetune", "--preset", "tiny", "--train", manifest, "--dev", manifest, "--out", str(tmp_path / "ft"),
                 "--steps", "200", "--lr", "0.003", "--set", "max_batch_seconds=8", "--no-progress"])
    assert code == 0
    model = load_checkpoint(tmp_path / "ft", kind="finetune").model
    utterances = load_utterances(manifest)[:10]
    offline = evaluate_model(model, utterances)
    streaming = evaluate_model(model, utterances, streaming=True, chunk_ms=40)
    assert offline.cer < 0.2, offline.hypotheses[:3]
    assert [h for _, _, h in offline.hypotheses] == [h for _, _, h in streaming.hypotheses]
    code = main(["evaluate", "--checkpoint", str(tmp_path / "ft"), "--data", manifest, "--streaming", "--json"])
    assert code == 0 and '"cer"' in capsys.readouterr().out
