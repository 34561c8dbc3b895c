"""CTC transcription (greedy, or a lexicon beam search) and its scores: WER, CER (jiwer), declared latency,
real-time factor."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import jiwer
import torch
from tqdm import tqdm

from streamssl.asr.ctc import CharVocab, GreedyDecoder, RecognitionModel
from streamssl.asr.lexicon import BeamSearchConfig, LexiconDecoder
from streamssl.streaming.engine import StreamingEngine, decoder_factory


@dataclass
class EvalResult:
    """Scores of one pass over a data set.

    ``rtf`` is compute time (model and decoder) over audio time (audio loading excluded); ``latency`` is the
    model's declared look-ahead (:meth:`~streamssl.Latency.to_dict`); ``algorithmic_latency_ms`` adds the
    chunk wait to it for a streaming pass (what ``stream`` and ``serve`` declare), ``None`` offline; ``decoder`` is ``"greedy"`` or ``"lexicon"`` (whose options ``beam`` holds);
    ``hypotheses`` holds ``(id, reference, hypothesis)``.
    """

    wer: float
    cer: float
    n_utterances: int
    audio_seconds: float
    compute_seconds: float
    rtf: float
    streaming: bool
    chunk_ms: float | None
    latency: dict
    algorithmic_latency_ms: float | None = None
    decoder: str = "greedy"
    beam: dict | None = None
    hypotheses: list[tuple[str, str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# Offline decoding holds a whole utterance's activations at once (memory grows with its length, with
# full attention quadratically); longer utterances are refused rather than cut (see evaluate_model).
MAX_OFFLINE_SECONDS = 120.0


def new_decoder(vocab: CharVocab, batch_size: int, beam: BeamSearchConfig | None = None
                ) -> GreedyDecoder | LexiconDecoder:
    """Greedy CTC decoding, or the lexicon beam search with ``beam``'s options."""
    return GreedyDecoder(vocab, batch_size) if beam is None else LexiconDecoder(vocab, batch_size, beam)


@torch.no_grad()
def transcribe_offline(model: RecognitionModel, dataset, device: torch.device, batch_seconds: float = 60.0,
                       progress: bool = False, beam: BeamSearchConfig | None = None) -> tuple[list[str], float]:
    """Whole-utterance decoding in duration-sorted batches of ``dataset`` (an
    :class:`~streamssl.data.AudioDataset`), loading one batch's audio at a time. Returns hypotheses
    (dataset order) and the compute time in seconds. ``beam``: as in :func:`new_decoder`."""
    from streamssl.data import collate

    durations = dataset.durations
    order = sorted(range(len(dataset)), key=lambda i: durations[i])
    batches, current, longest = [], [], 0.0
    for i in order:
        if current and max(longest, durations[i]) * (len(current) + 1) > batch_seconds:
            batches.append(current)
            current, longest = [], 0.0
        current.append(i)
        longest = max(longest, durations[i])
    if current:
        batches.append(current)
    hyps: list[str] = [""] * len(dataset)
    compute = 0.0
    for batch in tqdm(batches, desc="decode (offline)", disable=not progress, leave=False):
        collated = collate([dataset[i] for i in batch])
        start = time.perf_counter()
        log_probs, frame_lengths = model(collated["audio"].to(device, model.dtype),
                                         collated["lengths"].to(device))
        decoder = new_decoder(model.vocab, len(batch), beam)
        decoder.push(log_probs, frame_lengths)
        decoder.finish()
        texts = decoder.texts()
        compute += time.perf_counter() - start
        for i, text in zip(batch, texts):
            hyps[i] = text
    return hyps, compute


# Streams decoded at once by streaming evaluation: enough to amortise a step's fixed cost, few enough
# that a tick stays short on a CPU.
STREAMING_BATCH_SIZE = 16


@torch.no_grad()
def transcribe_streaming(model: RecognitionModel, dataset, chunk_ms: float, progress: bool = False,
                         beam: BeamSearchConfig | None = None,
                         batch_size: int = STREAMING_BATCH_SIZE) -> tuple[list[str], float]:
    """Decode every utterance of ``dataset`` as live audio, ``batch_size`` streams at a time, through the
    batched streaming core (:class:`~streamssl.streaming.engine.StreamingEngine`, what ``stream`` and
    ``serve`` run).

    Each tick gives every running stream its next ``chunk_ms`` of audio, as a live source would, and the
    engine steps them in one call; a stream whose audio is all in finishes (the streams ending on the
    same tick flush together) and the next utterance, loaded then, joins. Returns hypotheses (dataset
    order) and the compute time in seconds (model and decoders; audio loading excluded).
    """
    if not chunk_ms > 0 or chunk_ms == float("inf"):
        raise ValueError(f"chunk_ms must be a positive number of milliseconds, got {chunk_ms:g}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    chunk = max(1, round(chunk_ms * model.sample_rate / 1000))
    engine = StreamingEngine(model, decoder_factory(model.vocab, beam), chunk_samples=chunk)
    hyps: list[str] = [""] * len(dataset)
    compute = 0.0
    waiting = iter(range(len(dataset)))
    # Running streams: utterance index -> (stream, samples (S,), samples fed).
    running: dict[int, tuple] = {}
    bar = tqdm(total=len(dataset), desc=f"decode (streaming, {chunk_ms:g} ms chunks, {batch_size} streams)",
               disable=not progress, leave=False)
    while True:
        while len(running) < batch_size and (index := next(waiting, None)) is not None:
            running[index] = (engine.stream(), dataset[index]["audio"], 0)
        if not running:
            break
        start = time.perf_counter()
        feeds, ending = {}, []
        for index, (stream, wave, fed) in running.items():
            feeds[stream] = wave[fed:fed + chunk]
            running[index] = (stream, wave, fed + chunk)
            if fed + chunk >= wave.numel():
                ending.append(index)
        engine.accept(feeds)
        if ending:
            finished = engine.finish([running[index][0] for index in ending])
            for index in ending:
                hyps[index] = finished[running.pop(index)[0]].text
            bar.update(len(ending))
        compute += time.perf_counter() - start
    bar.close()
    return hyps, compute


def score(references: list[str], hypotheses: list[str]) -> tuple[float, float]:
    """Corpus WER and CER (fractions) with jiwer."""
    return float(jiwer.wer(references, hypotheses)), float(jiwer.cer(references, hypotheses))


def evaluate_model(model: RecognitionModel, utterances: list, streaming: bool = False, chunk_ms: float = 40.0,
                   device: torch.device | None = None, progress: bool = False,
                   max_offline_s: float = MAX_OFFLINE_SECONDS, beam: BeamSearchConfig | None = None,
                   batch_size: int = STREAMING_BATCH_SIZE) -> EvalResult:
    """Decode ``utterances`` (``streamssl.data.Utterance``) and score them against their text: greedy CTC, or
    with ``beam`` the lexicon beam search (:mod:`streamssl.asr.lexicon`).

    ``streaming`` decodes chunk by chunk, ``batch_size`` streams at a time (:func:`transcribe_streaming`);
    a model that cannot stream is a ``ValueError`` saying why.
    Offline, an utterance longer than ``max_offline_s`` seconds is a ``ValueError`` naming it, raised
    before any audio is decoded. It is refused rather than split: cutting at fixed points would split
    words and take away the whole-utterance context that offline decoding stands for, so the score
    would measure the cuts; streaming evaluation decodes any length with the model's memory bounded (the
    lexicon decoder keeps its beam history per utterance, see :mod:`streamssl.asr.lexicon`).
    """
    if streaming and model.stream_error() is not None:
        raise ValueError(model.stream_error())
    if streaming and not chunk_ms > 0:
        raise ValueError(f"chunk_ms must be positive, got {chunk_ms:g}")
    if not streaming:
        longest = max(utterances, key=lambda utt: utt.duration, default=None)
        if longest is not None and longest.duration > max_offline_s:
            raise ValueError(f"utterance {longest.id} ({longest.audio}) is {longest.duration:.0f} s long, over "
                             f"the {max_offline_s:g} s offline limit: offline decoding holds a whole utterance "
                             "in memory; evaluate it with --streaming, segment it, or raise --max-offline-s")
    from streamssl.data import AudioDataset

    device = device or model.device
    model.eval()
    dataset = AudioDataset(utterances, sample_rate=model.sample_rate)
    if streaming:
        hyps, compute = transcribe_streaming(model, dataset, chunk_ms, progress, beam=beam, batch_size=batch_size)
    else:
        hyps, compute = transcribe_offline(model, dataset, device, progress=progress, beam=beam)
    refs = [utt.text for utt in utterances]
    wer, cer = score(refs, hyps)
    latency = model.latency()
    audio_seconds = sum(utt.duration for utt in utterances)
    return EvalResult(wer=wer, cer=cer, n_utterances=len(utterances), audio_seconds=audio_seconds,
                      compute_seconds=compute, rtf=compute / audio_seconds, streaming=streaming,
                      chunk_ms=chunk_ms if streaming else None, latency=latency.to_dict(),
                      algorithmic_latency_ms=latency.total_lookahead_ms + chunk_ms if streaming else None,
                      decoder="greedy" if beam is None else "lexicon", beam=None if beam is None else beam.to_dict(),
                      hypotheses=[(utt.id, ref, hyp) for utt, ref, hyp in zip(utterances, refs, hyps)])
