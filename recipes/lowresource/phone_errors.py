"""How much of a model's error is spelling: its transcripts scored on how they sound, as eSpeak NG reads them.

Greedy CTC writes what it hears, and a small model hears better than it spells ("FOTO" for "PHOTO"). Reading
the reference and the hypothesis aloud with one eSpeak NG voice turns both into phonemes; the phone error rate
(PER) between them counts only errors that change the sound. Two more columns: the share of substituted words
that sound the same as the reference word (pure misspellings), and each run's relative CER and PER gains over
the first run given (the baseline, e.g. scratch).

Usage, with `streamssl evaluate --decoder greedy --json --hypotheses > RUN.json` outputs::

    python recipes/lowresource/phone_errors.py scratch.json wav2vec2.json bestrq.json [--voice en-us]

eSpeak's letter-to-sound rules are a model of English reading, not a listener: a hypothesis can sound right
to them and still be no English word. The PER is a measure of what the acoustic model got right, not a
substitute for the CER.
"""

import argparse
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jiwer

from streamssl.data.synth import EspeakNG


@dataclass
class PhoneScores:
    """``cer``/``wer`` as evaluate reports them; ``per`` over eSpeak phonemes; ``homophone_share``: the
    fraction of substituted words whose eSpeak phonemes equal the reference word's."""

    name: str
    cer: float
    wer: float
    per: float
    homophone_share: float
    substitutions: int


class Reader:
    """Text to eSpeak phonemes with one voice, remembering each text (references repeat across runs)."""

    def __init__(self, voice: str = "en-us"):
        self.tts = EspeakNG()
        self.tts.set_voice(voice, 170, 50, 50)
        self.phonemes = lru_cache(maxsize=None)(lambda text: tuple(self.tts.phonemes(text)))


def phone_scores(name: str, hypotheses: list[tuple[str, str, str]], reader: Reader) -> PhoneScores:
    """Score ``(id, reference, hypothesis)`` triples (evaluate's ``hypotheses``) by characters, words and
    phonemes."""
    refs = [ref for _, ref, _ in hypotheses]
    hyps = [hyp for _, _, hyp in hypotheses]
    ref_phones = [" ".join(reader.phonemes(r)) for r in refs]
    hyp_phones = [" ".join(reader.phonemes(h)) for h in hyps]
    words = jiwer.process_words(refs, hyps)
    substituted = homophones = 0
    for ref_words, hyp_words, chunks in zip(words.references, words.hypotheses, words.alignments):
        for chunk in chunks:
            if chunk.type != "substitute":
                continue
            for r, h in zip(ref_words[chunk.ref_start_idx:chunk.ref_end_idx],
                            hyp_words[chunk.hyp_start_idx:chunk.hyp_end_idx]):
                substituted += 1
                homophones += reader.phonemes(r) == reader.phonemes(h)
    return PhoneScores(name, float(jiwer.cer(refs, hyps)), float(words.wer), float(jiwer.wer(ref_phones, hyp_phones)),
                       homophones / substituted if substituted else 0.0, substituted)


def table(scores: list[PhoneScores]) -> str:
    """A Markdown table, gains relative to the first row."""
    base = scores[0]
    lines = ["| run | test CER % | CER gain | test PER % (eSpeak reading) | PER gain | substituted words that "
             "sound right |", "|---|---|---|---|---|---|"]
    for s in scores:
        gains = ("-", "-") if s is base else (f"{(base.cer - s.cer) / base.cer:+.1%}",
                                              f"{(base.per - s.per) / base.per:+.1%}")
        lines.append(f"| {s.name} | {100 * s.cer:.1f} | {gains[0]} | {100 * s.per:.1f} | {gains[1]} | "
                     f"{s.homophone_share:.1%} of {s.substitutions} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path,
                        help="`streamssl evaluate --json --hypotheses` outputs; the first is the baseline")
    parser.add_argument("--voice", default="en-us", help="the eSpeak NG voice that reads both sides")
    args = parser.parse_args(argv)
    reader = Reader(args.voice)
    scores = []
    for path in args.results:
        result = json.loads(path.read_text())
        if not result.get("hypotheses"):
            raise SystemExit(f"{path}: no hypotheses; run `streamssl evaluate` with --json --hypotheses")
        if result.get("decoder") != "greedy":
            print(f"note: {path} was decoded with {result.get('decoder')!r}, not greedy")
        scores.append(phone_scores(path.stem, result["hypotheses"], reader))
    print(table(scores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
