"""What several commands share: subcommands whose flags are added only when they run, usage errors in one
line, the ``--threads``, ``--chunk-ms``, ``--quiet`` and decoder flags with their checks, and loading a
recogniser.

Nothing here imports torch at module level: ``streamssl --help`` and ``streamssl stream --help`` only
build parsers, and should answer at once; ``stream --model`` and ``serve --model`` never import it.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import TYPE_CHECKING, Any, Callable, NoReturn

if TYPE_CHECKING:
    from streamssl.asr.lexicon import BeamSearchConfig
    from streamssl.streaming.recognizer import Clock, Recognizer

# What ``--threads`` defaults to where a command does not say otherwise. Measured with ``streamssl
# evaluate --streaming --decoder greedy`` on 30 utterances of the demo test split with the demo model
# (a 4 x 144 LLSA encoder) on a 2-core machine other jobs shared (load average 4 to 9): 9 to 20 s on 1
# thread, 207 to 295 s on 2, since each step's threads wait for one another and one is always descheduled.
DEFAULT_THREADS = 1


class UsageError(Exception):
    """A command line that does not parse; its message is one line, ``PROG: error: WHAT``."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors raise :class:`UsageError` instead of printing the usage
    and exiting, so that :func:`streamssl.cli.main` reports them in one line and returns 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


class Subcommands(argparse._SubParsersAction):
    """Subparsers whose flags are added by an ``arguments`` function only when that subcommand is the one
    being run, so listing the commands (or one command's help) imports nothing the others need."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._arguments: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def add_parser(self, name: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                   **kwargs: Any) -> argparse.ArgumentParser:
        """``add_parser`` of argparse; ``arguments(parser)`` adds the flags, and runs when ``name`` is chosen."""
        parser = super().add_parser(name, **kwargs)
        if arguments is not None:
            self._arguments[name] = arguments
        return parser

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: list[str],
                 option_string: str | None = None) -> None:
        arguments = self._arguments.pop(values[0], None)
        if arguments is not None:
            arguments(self._name_parser_map[values[0]])
        super().__call__(parser, namespace, values, option_string)


def add_subcommands(parser: argparse.ArgumentParser, dest: str) -> Subcommands:
    """Required subcommands of ``parser``, named in ``args.<dest>``."""
    return parser.add_subparsers(dest=dest, required=True, action=Subcommands, parser_class=Parser)


class ChunkMs(argparse.Action):
    """``--chunk-ms``: a positive, finite number of milliseconds, checked while parsing (an infinite chunk
    overflows, a non-positive one never fills)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if not math.isfinite(values):
            parser.error(f"{option_string} must be a finite number of milliseconds, got {values:g}")
        if values <= 0:
            parser.error(f"{option_string} must be positive, got {values:g}")
        setattr(namespace, self.dest, values)


DEFAULT_CHUNK_MS = 40.0


def add_chunk_ms(parser: argparse.ArgumentParser, what: str = "audio per model step",
                 export_default: bool = False) -> None:
    """``--chunk-ms`` (default 40 ms; with ``export_default`` ``None``: an export's own chunk, 40 ms for a
    checkpoint); :func:`check_chunk` checks it against the model's frame hop."""
    default = "40, or an export's own chunk with --model" if export_default else "40"
    parser.add_argument("--chunk-ms", type=float, default=None if export_default else DEFAULT_CHUNK_MS,
                        action=ChunkMs,
                        help=f"{what} in milliseconds, at least one frame hop of the model (default {default})")


def check_chunk(chunk_ms: float, hop_samples: int | None, sample_rate: int) -> None:
    """Refuse a chunk of ``chunk_ms`` milliseconds shorter than one frame hop (``hop_samples`` at
    ``sample_rate`` Hz; ``None``: the model takes frames, no hop to check): every chunk is a model call,
    so chunks of a sample or two take hours over a file of seconds."""
    if hop_samples is None:
        return
    hop_ms = 1000 * hop_samples / sample_rate
    if round(chunk_ms * sample_rate / 1000) < hop_samples:
        raise ValueError(f"--chunk-ms {chunk_ms:g} is shorter than one frame hop of this model "
                         f"({hop_ms:g} ms = {hop_samples} samples); use --chunk-ms {hop_ms:g} or more")


def add_threads(parser: argparse.ArgumentParser, default: int | None = DEFAULT_THREADS) -> None:
    """``--threads N``: CPU threads for torch (and ONNX Runtime); ``default`` ``None`` keeps torch's own
    (one per physical core, or ``OMP_NUM_THREADS``)."""
    if default is None:
        shown = "torch's default: one per core, or OMP_NUM_THREADS"
    else:
        shown = f"{default}; more only help on an idle machine"
    parser.add_argument("--threads", type=int, default=default, metavar="N",
                        help=f"CPU threads for the model (default {shown})")


def check_threads(threads: int | None) -> None:
    """``ValueError`` for fewer than one thread (``None``: the library's default)."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")


def use_threads(threads: int | None) -> None:
    """Give torch ``threads`` intra-op threads (``None``: leave its default), or a ``ValueError`` for
    fewer than one."""
    check_threads(threads)
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress on stderr (errors still go there)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage lines on stderr")


def add_decoder_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """``--decoder greedy|lexicon`` (default ``default``) and the lexicon beam search's options (the
    defaults of :class:`~streamssl.asr.lexicon.BeamSearchConfig`, spelt out here so ``--help`` needs no
    import); :func:`beam_config` reads them."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--decoder", choices=("lexicon", "greedy"), default=default,
                       help="lexicon: beam search over English words with a word LM (--lm, else wordfreq "
                            f"unigrams); greedy: best path, the model's own spelling (default {default})")
    group.add_argument("--lm", metavar="ARPA", help="word n-gram LM for the lexicon decoder (streamssl lm build); "
                                                    "its words are the lexicon")
    group.add_argument("--lexicon-words", type=int, default=50_000, metavar="N",
                       help="without --lm: most frequent English words the lexicon decoder may write (default 50000)")
    group.add_argument("--lm-weight", type=float, default=0.5, help="weight of the word LM log-probability (default 0.5)")
    group.add_argument("--word-score", type=float, default=-1.0, help="score added per word (default -1)")
    group.add_argument("--beam-size", type=int, default=64, help="hypotheses kept per frame (default 64)")
    group.add_argument("--hotword-boost", type=float, default=40.0,
                       help="LM log-probability added per word of a hotword phrase (default 40)")
    group.add_argument("--stable-margin", type=float, default=math.inf, metavar="NATS",
                       help="a word is final once every hypothesis within this score of the best has it; the "
                            "search is then kept to the final words (0: as soon as the best hypothesis ends it; "
                            "sooner, a higher WER: docs/decoding.md); default inf: once every hypothesis has it")


def beam_config(args: argparse.Namespace) -> "BeamSearchConfig | None":
    """The beam search options of :func:`add_decoder_arguments`' flags; ``None`` for ``--decoder greedy``
    (``--lm`` with it is an error)."""
    from streamssl.asr.lexicon import BeamSearchConfig

    if args.decoder == "greedy":
        if args.lm is not None:
            raise ValueError("--lm needs --decoder lexicon; greedy decoding uses no language model")
        return None
    return BeamSearchConfig(lexicon_words=args.lexicon_words, lm=args.lm, lm_weight=args.lm_weight,
                            word_score=args.word_score, beam_size=args.beam_size, hotword_boost=args.hotword_boost,
                            stable_margin=args.stable_margin)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint DIR`` (PyTorch, or ``--backend onnx``: exported at start) or ``--model FILE.onnx``
    (an export run by ONNX Runtime, without PyTorch): one of them; :func:`load_recognizer` reads them."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="fine-tuned checkpoint (file or run folder); needs PyTorch")
    source.add_argument("--model", metavar="FILE.onnx",
                        help="a model exported by `streamssl export`, run by ONNX Runtime without PyTorch")
    parser.add_argument("--backend", choices=("torch", "onnx"), default=None,
                        help="with --checkpoint: run it in PyTorch (default), or export its step at --chunk-ms "
                             "at start and run that in ONNX Runtime (--model runs an export already made)")


def load_recognizer(args: argparse.Namespace, clock: "Clock" = time.perf_counter,
                    beam: "BeamSearchConfig | None" = None) -> "Recognizer":
    """The :class:`~streamssl.streaming.recognizer.Recognizer` of :func:`add_model_arguments`' flags,
    stepping in chunks of ``args.chunk_ms`` (checked by :func:`check_chunk` before any export) on
    ``args.threads`` threads, decoding greedily or, with ``beam``, with the lexicon beam search.

    ``--model`` loads the export and imports no torch; ``--checkpoint`` loads the checkpoint (torch) and
    with ``--backend onnx`` exports its step and runs that in ONNX Runtime."""
    from streamssl.streaming.engine import decoder_factory
    from streamssl.streaming.recognizer import Recognizer

    if args.model is not None:
        if args.backend is not None:
            raise ValueError("--backend applies to --checkpoint; an export (--model) runs in ONNX Runtime")
        from streamssl.runtime.model import OnnxModel

        check_threads(args.threads)
        model = OnnxModel(args.model, threads=args.threads or 1)
        chunk_ms = model.info.chunk_ms if args.chunk_ms is None else args.chunk_ms
        check_chunk(chunk_ms, model.hop_samples, model.sample_rate)
        return Recognizer(model, chunk_ms, clock=clock, decoder=decoder_factory(model.vocab, beam))
    if args.checkpoint.endswith(".onnx"):
        raise ValueError(f"--checkpoint {args.checkpoint} is an ONNX export; pass it with --model")
    use_threads(args.threads)
    from streamssl.export import export_model
    from streamssl.runtime.model import OnnxModel
    from streamssl.train.checkpoint import load_checkpoint

    chunk_ms = DEFAULT_CHUNK_MS if args.chunk_ms is None else args.chunk_ms
    model = load_checkpoint(args.checkpoint, kind="finetune").model
    check_chunk(chunk_ms, model.hop_samples, model.sample_rate)
    backend = args.backend or "torch"
    if backend == "onnx":
        import warnings

        import torch

        with warnings.catch_warnings():
            # The tracer warns at every Python branch on a shape; the step's shapes are fixed by design
            # (tests/test_export.py checks the graph against the PyTorch step), so at start they are noise.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            model = OnnxModel(export_model(model, chunk_ms)[0], threads=args.threads)
    return Recognizer(model, chunk_ms, clock=clock, backend=backend, decoder=decoder_factory(model.vocab, beam))
