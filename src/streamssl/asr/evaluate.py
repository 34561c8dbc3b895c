"""Greedy CTC transcription and its scores: WER, CER (jiwer), declared latency, real-time factor."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import jiwer
import torch
from tqdm import tqdm

from streamssl.asr.ctc import GreedyDecoder, RecognitionModel, greedy_decode


@dataclass
class EvalResult:
    """Scores of one pass over a data set.

    ``rtf`` is compute time over audio time (audio loading excluded); ``latency`` is the model's declared
    latency (:meth:`~streamssl.Latency.to_dict`); ``hypotheses`` holds ``(id, reference, hypothesis)``.
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
    hypotheses: list[tuple[str, str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _load(utterances: list) -> list:
    from streamssl.data import AudioDataset

    dataset = AudioDataset(utterances)
    return [dataset[i] for i in range(len(dataset))]


@torch.no_grad()
def transcribe_offline(model: RecognitionModel, items: list, device: torch.device, batch_seconds: float = 60.0,
                       progress: bool = False) -> tuple[list[str], float]:
    """Whole-utterance decoding in duration-sorted batches. Returns hypotheses (input order) and the
    compute time in seconds."""
    from streamssl.data import collate

    order = sorted(range(len(items)), key=lambda i: items[i]["audio"].shape[0])
    batches, current, longest = [], [], 0
    for i in order:
        n = items[i]["audio"].shape[0]
        if current and max(longest, n) * (len(current) + 1) > batch_seconds * 16000:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    hyps: list[str] = [""] * len(items)
    compute = 0.0
    for batch in tqdm(batches, desc="decode (offline)", disable=not progress, leave=False):
        collated = collate([items[i] for i in batch])
        start = time.perf_counter()
        log_probs, frame_lengths = model(collated["audio"].to(device, model.dtype),
                                         collated["lengths"].to(device))
        texts = greedy_decode(log_probs, frame_lengths, model.vocab)
        compute += time.perf_counter() - start
        for i, text in zip(batch, texts):
            hyps[i] = text
    return hyps, compute


@torch.no_grad()
def transcribe_streaming(model: RecognitionModel, items: list, device: torch.device, chunk_ms: float,
                         progress: bool = False) -> tuple[list[str], float]:
    """Chunk-by-chunk decoding, one stream per utterance, through ``step``/``flush`` and
    :class:`GreedyDecoder`. Returns hypotheses and the compute time in seconds."""
    chunk = max(1, round(chunk_ms * model.sample_rate / 1000))
    hyps, compute = [], 0.0
    for item in tqdm(items, desc=f"decode (streaming, {chunk_ms:g} ms chunks)", disable=not progress,
                     leave=False):
        wave = item["audio"].to(device, model.dtype)[None]
        start = time.perf_counter()
        state = model.init_state(1)
        decoder = GreedyDecoder(model.vocab, 1)
        for piece in wave.split(chunk, dim=1):
            log_probs, state = model.step(piece, state)
            decoder.push(log_probs)
        log_probs, state = model.flush(state)
        decoder.push(log_probs)
        compute += time.perf_counter() - start
        hyps.append(decoder.texts()[0])
    return hyps, compute


def score(references: list[str], hypotheses: list[str]) -> tuple[float, float]:
    """Corpus WER and CER (fractions) with jiwer."""
    return float(jiwer.wer(references, hypotheses)), float(jiwer.cer(references, hypotheses))


def evaluate_model(model: RecognitionModel, utterances: list, streaming: bool = False, chunk_ms: float = 40.0,
                   device: torch.device | None = None, progress: bool = False) -> EvalResult:
    """Greedy-decode ``utterances`` (``streamssl.data.Utterance``) and score them against their text.

    ``streaming`` decodes chunk by chunk; a model that cannot stream is a ``ValueError`` saying why.
    """
    if streaming and model.stream_error() is not None:
        raise ValueError(model.stream_error())
    device = device or model.device
    model.eval()
    items = _load(utterances)
    if streaming:
        hyps, compute = transcribe_streaming(model, items, device, chunk_ms, progress)
    else:
        hyps, compute = transcribe_offline(model, items, device, progress=progress)
    refs = [item["text"] for item in items]
    wer, cer = score(refs, hyps)
    rate = model.sample_rate
    audio_seconds = sum(item["audio"].shape[0] for item in items) / rate
    return EvalResult(wer=wer, cer=cer, n_utterances=len(items), audio_seconds=audio_seconds,
                      compute_seconds=compute, rtf=compute / audio_seconds, streaming=streaming,
                      chunk_ms=chunk_ms if streaming else None, latency=model.latency().to_dict(),
                      hypotheses=[(item["id"], ref, hyp) for item, ref, hyp in zip(items, refs, hyps)])
