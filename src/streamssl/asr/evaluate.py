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


@dataclass
class EvalResult:
    """Scores of one pass over a data set.

    ``rtf`` is compute time (model and decoder) over audio time (audio loading excluded); ``latency`` is the
    model's declared latency (:meth:`~streamssl.Latency.to_dict`); ``decoder`` is ``"greedy"`` or ``"lexicon"`` (whose options ``beam`` holds);
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


@torch.no_grad()
def transcribe_streaming(model: RecognitionModel, dataset, device: torch.device, chunk_ms: float,
                         progress: bool = False, beam: BeamSearchConfig | None = None) -> tuple[list[str], float]:
    """Chunk-by-chunk decoding, one stream per utterance of ``dataset`` (loaded one at a time), through
    ``step``/``flush`` and the decoder of :func:`new_decoder`, fed as frames become final. Returns hypotheses
    and the compute time in seconds."""
    if not chunk_ms > 0:
        raise ValueError(f"chunk_ms must be positive, got {chunk_ms:g}")
    chunk = max(1, round(chunk_ms * model.sample_rate / 1000))
    hyps, compute = [], 0.0
    for index in tqdm(range(len(dataset)), desc=f"decode (streaming, {chunk_ms:g} ms chunks)",
                      disable=not progress, leave=False):
        wave = dataset[index]["audio"].to(device, model.dtype)[None]
        start = time.perf_counter()
        state = model.init_state(1)
        decoder = new_decoder(model.vocab, 1, beam)
        for piece in wave.split(chunk, dim=1):
            log_probs, state = model.step(piece, state)
            decoder.push(log_probs)
        log_probs, state = model.flush(state)
        decoder.push(log_probs)
        decoder.finish()
        compute += time.perf_counter() - start
        hyps.append(decoder.texts()[0])
    return hyps, compute


def score(references: list[str], hypotheses: list[str]) -> tuple[float, float]:
    """Corpus WER and CER (fractions) with jiwer."""
    return float(jiwer.wer(references, hypotheses)), float(jiwer.cer(references, hypotheses))


def evaluate_model(model: RecognitionModel, utterances: list, streaming: bool = False, chunk_ms: float = 40.0,
                   device: torch.device | None = None, progress: bool = False,
                   max_offline_s: float = MAX_OFFLINE_SECONDS, beam: BeamSearchConfig | None = None) -> EvalResult:
    """Decode ``utterances`` (``streamssl.data.Utterance``) and score them against their text: greedy CTC, or
    with ``beam`` the lexicon beam search (:mod:`streamssl.asr.lexicon`).

    ``streaming`` decodes chunk by chunk; a model that cannot stream is a ``ValueError`` saying why.
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
        hyps, compute = transcribe_streaming(model, dataset, device, chunk_ms, progress, beam=beam)
    else:
        hyps, compute = transcribe_offline(model, dataset, device, progress=progress, beam=beam)
    refs = [utt.text for utt in utterances]
    wer, cer = score(refs, hyps)
    audio_seconds = sum(utt.duration for utt in utterances)
    return EvalResult(wer=wer, cer=cer, n_utterances=len(utterances), audio_seconds=audio_seconds,
                      compute_seconds=compute, rtf=compute / audio_seconds, streaming=streaming,
                      chunk_ms=chunk_ms if streaming else None, latency=model.latency().to_dict(),
                      decoder="greedy" if beam is None else "lexicon", beam=None if beam is None else beam.to_dict(),
                      hypotheses=[(utt.id, ref, hyp) for utt, ref, hyp in zip(utterances, refs, hyps)])
