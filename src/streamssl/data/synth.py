"""A synthetic spoken English corpus made with eSpeak NG, in the LibriSpeech layout, with manifests.

eSpeak NG comes from the ``espeakng-loader`` wheel (library and voice data) and is called directly through its
C API with ctypes: synchronous output, a synth callback collecting 22.05 kHz int16 samples. Audio is resampled to
16 kHz with soxr and written as 16-bit FLAC.

Output of ``synthesize_corpus(out_dir, ...)``::

    out_dir/LibriSpeech/{train,dev,test}/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    out_dir/LibriSpeech/{train,dev,test}/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    out_dir/{train,dev,test}.jsonl      manifests, audio paths relative to out_dir
    out_dir/SPEAKERS.txt                speaker id | split | minutes | eSpeak voice | rate | pitch | range

Determinism: eSpeak NG keeps synthesis state between utterances (its output depends on what the same process
spoke before, even after re-initialising it), so each chapter is synthesised in a fresh worker process whose
whole input (voice, texts, noise) derives from the seed. The output then depends only on the seed and the
installed versions of espeakng-loader, faker, soxr and libsndfile, not on the number of workers or scheduling.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import multiprocessing
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import espeakng_loader
import numpy as np
import soundfile
from num2words import num2words
from tqdm import tqdm

from streamssl.data.audio import SAMPLE_RATE, resample
from streamssl.data.manifest import Utterance, write_manifest
from streamssl.data.prose import BigramChain
from streamssl.data.sentences import english_sentences
from streamssl.data.text import describe_characters, normalize_text, spell_out, unsupported_characters

SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}
# Nominal audio per speaker and per chapter (one worker task); a corpus has at least one speaker per split.
SPEAKER_SECONDS = 120.0
CHAPTER_SECONDS = 60.0
FIRST_SPEAKER_ID = 100
FIRST_CHAPTER_ID = 1000
# Speaker ranges: speaking rate in words per minute, base pitch and pitch range on eSpeak's 0-100 scales.
RATE_WPM = (135, 205)
PITCH = (25, 75)
PITCH_RANGE = (30, 90)
# Share of generated sentences that come from the bigram chain rather than from Faker's templates.
PROSE_FRACTION = 0.6
# Varied noise: this share of utterances gets noise of a random colour at a random SNR in this range (dB).
NOISY_FRACTION = 0.5
NOISE_SNR_DB = (5.0, 25.0)
# Spectral slope of the noise, power ~ 1 / f**colour: 0 white, 1 pink, 2 brown.
NOISE_COLOURS = (0.0, 1.0, 2.0)
# Peak level the written audio is scaled down to if it would exceed it (eSpeak output can reach full scale).
PEAK = 0.95

# eSpeak NG C API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
# espeak_TextToPhonemes: IPA output (bit 1) with this separator between phonemes (bits 8-23).
_PHONEME_SEPARATOR = "_"
_PHONEMES_IPA = 0x02 | (ord(_PHONEME_SEPARATOR) << 8)
_STRESS_MARKS = str.maketrans("", "", "ˈˌ")
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# Characters eSpeak may read aloud (or that change its reading) but a transcript would not show; the text it is
# given keeps only letters, apostrophes, spaces and sentence punctuation.
_UNSPOKEN = re.compile(r"[^A-Za-z' .,;:?!\-]+")
_ACRONYM = re.compile(r"\b[A-Z]{2,}\b")


def english_voices() -> list[str]:
    """The English eSpeak NG voices shipped with espeakng-loader (``"en-us"``, ``"en-gb-scotland"``, ...).

    en-Shaw (English in the Shavian alphabet) is left out: it expects Shavian input.
    """
    folder = Path(espeakng_loader.get_data_path()) / "lang" / "gmw"
    return sorted(p.name.lower() for p in folder.iterdir() if p.name.lower().startswith("en") and p.name != "en-Shaw")


def voice_variants() -> list[str]:
    """The voice variants (timbres) shipped with espeakng-loader (``"m3"``, ``"f2"``, ``"klatt"``, ...)."""
    return sorted(p.name for p in (Path(espeakng_loader.get_data_path()) / "voices" / "!v").iterdir())


class EspeakNG:
    """eSpeak NG in this process, through its synchronous C API.

    The library has process-global state, so create one per process (the corpus builder uses one process per
    chapter).
    """

    def __init__(self) -> None:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                 espeakng_loader.get_data_path().encode(), _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError(f"eSpeak NG failed to initialise with data from {espeakng_loader.get_data_path()}")
        self._lib = lib
        self._chunks: list[np.ndarray] = []
        # Kept as an attribute: ctypes callbacks must outlive every call that may invoke them.
        self._callback = _SYNTH_CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples, count: int, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0

    def set_voice(self, voice: str, rate_wpm: int, pitch: int, pitch_range: int) -> None:
        """Select a voice such as ``"en-us+m3"`` and its speaking rate (words/min), pitch and range (0-100)."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        for parameter, value in ((_PARAM_RATE, rate_wpm), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range)):
            self._lib.espeak_SetParameter(parameter, value, 0)

    def speak(self, text: str, seed: int) -> np.ndarray:
        """Synthesise ``text``; returns int16 samples of shape (S,) at ``self.sample_rate`` (22050 Hz)."""
        self._chunks.clear()
        self._lib.espeak_ng_SetRandSeed(seed)
        data = text.encode("utf-8")
        status = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0 or self._lib.espeak_Synchronize() != 0:
            raise RuntimeError(f"eSpeak NG failed (status {status}) on {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)

    def phonemes(self, text: str) -> list[str]:
        """How the current voice would pronounce ``text``: its IPA phonemes (``"aɪ"``, ``"tʃ"``, ``"ɜː"``), in
        order, without stress marks or word boundaries (eSpeak joins some function words to the next word).

        Its letter-to-sound rules also read made-up spellings, so ``phonemes("FOTO")`` equals
        ``phonemes("PHOTO")``: a transcript's phonemes show what it sounds like, whatever its spelling.
        """
        buffer = ctypes.create_string_buffer(text.lower().encode("utf-8"))
        pointer = ctypes.c_char_p(ctypes.addressof(buffer))
        phones: list[str] = []
        # Each call reads one clause and moves the pointer past it, to NULL at the end of the text.
        while pointer.value:
            clause = self._lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, _PHONEMES_IPA)
            ipa = (clause or b"").decode("utf-8").translate(_STRESS_MARKS)
            phones.extend(p for word in ipa.split() for p in word.split(_PHONEME_SEPARATOR) if p)
        return phones


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: an eSpeak voice+variant with its own rate, pitch and pitch range."""

    id: str
    split: str
    voice: str
    rate_wpm: int
    pitch: int
    pitch_range: int


@dataclass(frozen=True)
class ChapterTask:
    """One worker task: ``target_s`` seconds (or just over) of one speaker, written under ``split_dir``."""

    speaker: Speaker
    chapter: str
    target_s: float
    seed: int
    split_dir: str
    text_file: str | None
    noise_snr_db: float | None
    varied_noise: bool
    chain: BigramChain | None
    # This chapter's share of the coherent sentences, spoken in this order (from the start again past its end).
    sentences: tuple[str, ...] | None = None


# Faker's day_of_week() and month_name() draw a date between 1970 and now, so their draws drift with the
# clock; the templates draw from these instead.
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


class SentenceGenerator:
    """Varied English sentences: general word sequences from a :class:`BigramChain` (a fraction
    ``PROSE_FRACTION`` of them) and Faker (en_US) templates with names, places, numbers and symbols for the
    normaliser to spell out.

    Faker calls that depend on today's date are avoided so the text depends only on the seed.
    """

    def __init__(self, seed: int, chain: BigramChain | None = None) -> None:
        from faker import Faker

        self._fake = Faker("en_US")
        self._fake.seed_instance(seed)
        self._chain = chain
        self._rng = np.random.default_rng([seed, 2])

    def _sentence(self) -> str:
        if self._chain is not None and self._rng.random() < PROSE_FRACTION:
            return self._chain.sentence(self._rng)
        fake = self._fake
        kind = fake.random_int(0, 11)
        if kind == 0:
            return f"{fake.first_name()} {fake.last_name()} works as a {fake.job().lower()} in {fake.city()}."
        if kind == 1:
            return f"The {fake.color_name().lower()} {fake.word()} costs {fake.pricetag()}."
        if kind == 2:
            year = num2words(fake.random_int(1900, 2030), to="year")
            return (f"{fake.first_name()} was born on {fake.random_element(MONTHS)} "
                    f"{num2words(fake.random_int(1, 28), to='ordinal')}, {year}.")
        if kind == 3:
            return f"About {fake.random_int(2, 98)}% of the people in {fake.state()} prefer {fake.word()}."
        if kind == 4:
            return f"Please send {fake.random_int(2, 500)} boxes to {fake.building_number()} {fake.street_name()}."
        if kind == 5:
            return f"{fake.catch_phrase()}, said {fake.first_name()} on {fake.random_element(WEEKDAYS)}."
        if kind == 6:
            return f"We need to {fake.bs()} before {fake.random_element(MONTHS)}."
        if kind == 7:
            place = fake.random_int(1, 40)
            return (f"{fake.first_name()} finished {place}{_ordinal_suffix(place)} out of "
                    f"{fake.random_int(41, 3000):,} runners in {fake.city()}.")
        if kind == 8:
            a, b = fake.random_int(1, 99), fake.random_int(1, 99)
            return f"{a} + {b} = {a + b}, and {fake.first_name()} & {fake.first_name()} both knew it."
        if kind == 9:
            return (f"It was {fake.random_int(0, 40)}° in {fake.city()} and {fake.random_int(0, 99)}."
                    f"{fake.random_int(1, 9)} millimeters of rain fell.")
        return fake.sentence(nb_words=fake.random_int(5, 16))

    def __call__(self) -> str:
        """One or two sentences, about 2 to 12 seconds of speech."""
        parts = []
        for _ in range(1 + (self._fake.random_int(0, 9) < 4)):
            sentence = self._sentence()
            while _ACRONYM.search(sentence):  # eSpeak spells acronyms letter by letter; transcripts would not
                sentence = self._sentence()
            parts.append(sentence)
        return " ".join(parts)


def _ordinal_suffix(number: int) -> str:
    if 10 <= number % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")


def read_text_file(path: str | Path) -> list[str]:
    """The non-empty lines of a user text file, each an utterance's text.

    Raises:
        ValueError: the file cannot be read, has no text, or has lines that cannot be normalised (all such lines
            are listed with their numbers).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read text file: {error}") from None
    problems = []
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        bad = unsupported_characters(line)
        if bad:
            problems.append(f"{path}:{number}: unsupported characters {describe_characters(bad)}")
        elif not normalize_text(_UNSPOKEN.sub(" ", spell_out(line))):
            problems.append(f"{path}:{number}: no speakable words in {line!r}")
        else:
            texts.append(line.strip())
    if problems:
        raise ValueError(f"{path}: {len(problems)} unusable line(s):\n" + "\n".join(problems))
    if not texts:
        raise ValueError(f"{path}: no text lines")
    return texts


def plan_corpus(hours: float, seed: int) -> list[tuple[Speaker, list[tuple[str, float]]]]:
    """Choose speakers and chapters: for each speaker, a list of (chapter id, target seconds).

    Splits get 80/10/10 % of the audio and disjoint speakers, about ``SPEAKER_SECONDS`` of audio each. Voices
    are drawn without replacement from every English voice x variant pair (repeating, with other rates and
    pitches, only past that many speakers).
    """
    rng = np.random.default_rng([seed, 0])
    pairs = [f"{voice}+{variant}" for voice in english_voices() for variant in voice_variants()]
    order = rng.permutation(len(pairs))
    plan = []
    chapter_id = FIRST_CHAPTER_ID
    for split, fraction in SPLITS.items():
        split_s = hours * 3600 * fraction
        n_speakers = max(1, round(split_s / SPEAKER_SECONDS))
        n_chapters = max(1, math.ceil(split_s / n_speakers / CHAPTER_SECONDS))
        for _ in range(n_speakers):
            index = FIRST_SPEAKER_ID + len(plan)
            speaker = Speaker(id=str(index), split=split, voice=pairs[order[(index - FIRST_SPEAKER_ID) % len(pairs)]],
                              rate_wpm=int(rng.integers(*RATE_WPM, endpoint=True)),
                              pitch=int(rng.integers(*PITCH, endpoint=True)),
                              pitch_range=int(rng.integers(*PITCH_RANGE, endpoint=True)))
            chapters = [(str(chapter_id + c), split_s / n_speakers / n_chapters) for c in range(n_chapters)]
            chapter_id += n_chapters
            plan.append((speaker, chapters))
    return plan


def synthesize_chapter(task: ChapterTask) -> list[Utterance]:
    """Synthesise one chapter into ``<split_dir>/<speaker>/<chapter>/`` (FLAC files and a ``.trans.txt``).

    Runs in a fresh process (see the module docstring). Returns the chapter's utterances, audio paths absolute.
    """
    speaker = task.speaker
    seed_words = [task.seed, int(speaker.id), int(task.chapter)]
    rng = np.random.default_rng(seed_words)
    # A separate stream for noise, so a noisy corpus has the same texts and voices as the clean one of its seed.
    noise_rng = np.random.default_rng([*seed_words, 1])
    if task.sentences is not None:
        next_text = itertools.cycle(task.sentences).__next__
    elif task.text_file is None:
        next_text = SentenceGenerator(int(rng.integers(2**32)), task.chain)
    else:
        lines = read_text_file(task.text_file)

        def next_text() -> str:
            return lines[int(rng.integers(len(lines)))]
    engine = EspeakNG()
    engine.set_voice(speaker.voice, speaker.rate_wpm, speaker.pitch, speaker.pitch_range)
    folder = Path(task.split_dir) / speaker.id / task.chapter
    folder.mkdir(parents=True, exist_ok=True)
    utterances: list[Utterance] = []
    total_s = 0.0
    # Stop when the next utterance, if of average length, would end nearer past the target than we are short of it.
    while not utterances or total_s + 0.5 * total_s / len(utterances) < task.target_s:
        utt_id = f"{speaker.id}-{task.chapter}-{len(utterances):04d}"
        spoken = _UNSPOKEN.sub(" ", spell_out(next_text())).strip()
        raw = engine.speak(spoken, seed=int(rng.integers(2**31)))
        if raw.size == 0:
            raise RuntimeError(f"eSpeak NG produced no audio for {utt_id} ({speaker.voice}): {spoken!r}")
        audio = resample(raw.astype(np.float32) / 32768.0, engine.sample_rate, SAMPLE_RATE)
        if task.noise_snr_db is not None:
            audio = add_noise(audio, task.noise_snr_db, noise_rng)
        elif task.varied_noise and noise_rng.random() < NOISY_FRACTION:
            audio = add_noise(audio, float(noise_rng.uniform(*NOISE_SNR_DB)), noise_rng,
                              colour=float(noise_rng.choice(NOISE_COLOURS)))
        audio = audio / max(1.0, float(np.abs(audio).max()) / PEAK)
        path = folder / f"{utt_id}.flac"
        soundfile.write(str(path), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        duration_s = len(audio) / SAMPLE_RATE
        utterances.append(Utterance(utt_id, str(path.resolve()), duration_s, normalize_text(spoken), speaker.id))
        total_s += duration_s
    transcript = folder / f"{speaker.id}-{task.chapter}.trans.txt"
    transcript.write_text("".join(f"{utt.id} {utt.text}\n" for utt in utterances), encoding="utf-8")
    return utterances


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator, colour: float = 0.0) -> np.ndarray:
    """Add Gaussian noise at ``snr_db`` dB below the mean power of ``audio`` (shape (S,), float32), white or, with
    ``colour`` > 0, with power falling as ``1 / f**colour`` (1: pink, 2: brown)."""
    signal_power = float(np.mean(audio.astype(np.float64) ** 2))
    noise = rng.standard_normal(len(audio))
    if colour > 0:
        spectrum = np.fft.rfft(noise)
        frequencies = np.arange(len(spectrum), dtype=np.float64)
        frequencies[0] = 1.0
        noise = np.fft.irfft(spectrum / frequencies ** (colour / 2), n=len(audio))
    noise *= math.sqrt(signal_power / 10 ** (snr_db / 10) / max(float(np.mean(noise ** 2)), 1e-30))
    return (audio + noise).astype(np.float32)


def _pool_context() -> multiprocessing.context.BaseContext:
    # A fork server forks each worker from a clean process that never loaded eSpeak, cheaply and without
    # inheriting the parent's threads; preloading this module there spares every one-task worker the package's
    # import time (torch). Spawn where there is no fork server.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def deal_sentences(sentences: list[str], chapters: int, seed: int) -> list[tuple[str, ...]]:
    """Shuffle ``sentences`` by ``seed`` and deal them out to ``chapters`` chapters in turn: disjoint shares,
    so no sentence is spoken twice (nor in two splits) unless the corpus needs more utterances than there are
    sentences (with fewer sentences than chapters, each chapter gets one)."""
    if not sentences or chapters < 1:
        raise ValueError(f"cannot deal {len(sentences)} sentence(s) to {chapters} chapter(s)")
    order = np.random.default_rng([seed, 3]).permutation(len(sentences))
    dealt = max(len(sentences), chapters)
    return [tuple(sentences[order[i % len(sentences)]] for i in range(chapter, dealt, chapters))
            for chapter in range(chapters)]


def synthesize_corpus(out_dir: str | Path, hours: float, seed: int, text_file: str | Path | None = None,
                      noise_snr_db: float | None = None, varied_noise: bool = False, workers: int | None = None,
                      progress: bool = True, sentences: bool = False, splits: tuple[str, ...] | None = None
                      ) -> dict:
    """Build a synthetic spoken corpus of about ``hours`` hours (see the module docstring for the layout).

    Args:
        out_dir: output folder; it must not already hold a ``LibriSpeech`` folder.
        hours: audio to produce; each chapter stops at the utterance nearest its share, so the total is within
            about half an utterance per chapter of ``hours``.
        seed: the same seed gives byte-identical files (with the same package versions), whatever ``workers``.
        text_file: speak random lines of this UTF-8 file instead of generated sentences.
        sentences: speak coherent English sentences (:func:`~streamssl.data.sentences.english_sentences`, one
            per utterance) instead, dealt out by :func:`deal_sentences` (not with ``text_file``).
        splits: synthesise only these of ``train``, ``dev``, ``test``: the same speakers (voices, rates,
            pitches) and amounts as in the full corpus of ``hours`` and ``seed``, the others left out (their
            manifests, ``SPEAKERS.txt`` lines and summary entries too).
        noise_snr_db: add white Gaussian noise at this signal-to-noise ratio in dB to every utterance.
        varied_noise: add noise to a share ``NOISY_FRACTION`` of the utterances, of a colour drawn from
            ``NOISE_COLOURS`` at an SNR drawn from ``NOISE_SNR_DB`` (not with ``noise_snr_db``).
        workers: worker processes (default: all CPU cores).
        progress: show a progress bar (on a terminal) counting seconds of audio.

    Returns:
        A summary: ``out_dir``, ``seconds``/``utterances``/``speakers`` per split, ``hours`` in total, ``elapsed_s``.

    Raises:
        ValueError: bad arguments, an existing corpus in ``out_dir``, or an unusable ``text_file``.
    """
    if not hours > 0:
        raise ValueError(f"hours must be positive, got {hours}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if varied_noise and noise_snr_db is not None:
        raise ValueError("give noise_snr_db (one fixed SNR) or varied_noise, not both")
    if sentences and text_file is not None:
        raise ValueError("give text_file (lines of a file) or sentences (coherent English sentences), not both")
    chosen_splits = tuple(SPLITS) if splits is None else tuple(splits)
    unknown = [split for split in chosen_splits if split not in SPLITS]
    if unknown or not chosen_splits:
        raise ValueError(f"splits must be some of {', '.join(SPLITS)}, got {list(chosen_splits)}")
    out_dir = Path(out_dir)
    root = out_dir / "LibriSpeech"
    if root.exists():
        raise ValueError(f"{root} already exists; remove it or choose another output folder")
    if text_file is not None:
        read_text_file(text_file)
        text_file = str(Path(text_file).resolve())
    started = time.perf_counter()
    plan = [(speaker, chapters) for speaker, chapters in plan_corpus(hours, seed) if speaker.split in chosen_splits]
    chain = BigramChain.from_wordsegment() if text_file is None and not sentences else None
    tasks = [ChapterTask(speaker, chapter, target_s, seed, str((root / speaker.split).resolve()), text_file,
                         noise_snr_db, varied_noise, chain)
             for speaker, chapters in plan for chapter, target_s in chapters]
    if sentences:
        shares = deal_sentences(english_sentences(), len(tasks), seed)
        tasks = [replace(task, sentences=share) for task, share in zip(tasks, shares)]
    root.mkdir(parents=True)
    utterances: list[Utterance] = []
    with tqdm(total=round(hours * 3600 * sum(SPLITS[split] for split in chosen_splits)), unit="s", desc="synthesising audio", disable=None if progress else True) as bar, \
            _pool_context().Pool(min(workers, len(tasks)), maxtasksperchild=1) as pool:
        for chapter in pool.imap_unordered(synthesize_chapter, tasks):
            utterances.extend(chapter)
            bar.update(round(sum(utt.duration for utt in chapter)))
    utterances.sort(key=lambda utt: utt.id)
    split_of = {speaker.id: speaker.split for speaker, _ in plan}
    summary = {"out_dir": str(out_dir), "seconds": {}, "utterances": {}, "speakers": {}}
    for split in chosen_splits:
        chosen = [utt for utt in utterances if split_of[utt.speaker] == split]
        write_manifest(chosen, out_dir / f"{split}.jsonl")
        summary["seconds"][split] = round(sum(utt.duration for utt in chosen), 3)
        summary["utterances"][split] = len(chosen)
        summary["speakers"][split] = len({utt.speaker for utt in chosen})
    seconds_of = {speaker.id: 0.0 for speaker, _ in plan}
    for utt in utterances:
        seconds_of[utt.speaker] += utt.duration
    with (out_dir / "SPEAKERS.txt").open("w", encoding="utf-8") as out:
        out.write("; ID | SPLIT | MINUTES | VOICE | RATE_WPM | PITCH | RANGE\n")
        for speaker, _ in plan:
            out.write(f"{speaker.id} | {speaker.split} | {seconds_of[speaker.id] / 60:.2f} | {speaker.voice} | "
                      f"{speaker.rate_wpm} | {speaker.pitch} | {speaker.pitch_range}\n")
    summary["hours"] = round(sum(summary["seconds"].values()) / 3600, 4)
    summary["elapsed_s"] = round(time.perf_counter() - started, 2)
    return summary
