"""Feeding recorded audio as if it were arriving live."""

from __future__ import annotations

import time


class PacedClock:
    """A monotonic clock (seconds) for feeding audio at real-time pace.

    Audio second ``a`` of a stream exists only from ``start() + a`` on; :meth:`wait_until` holds the
    feeder until then. With ``simulate=False`` it sleeps. With ``simulate=True`` it moves this clock
    forward instead, so a file runs as fast as the CPU allows while every reading (and so every
    emission delay) is what real-time feeding would have given: compute still takes real time on this
    clock, only idle waiting is skipped. If compute falls behind the audio, no waiting happens in
    either mode and the backlog shows up in the delays.

    ``cpu_time=True`` (simulated only) ticks with the process's CPU time instead of wall time: on a
    machine shared with other jobs it gives the delays this process would see with a core to itself.
    """

    def __init__(self, simulate: bool = False, cpu_time: bool = False):
        if cpu_time and not simulate:
            raise ValueError("a CPU-time clock cannot sleep in real time; use simulate=True")
        self.simulate = simulate
        self._source = time.process_time if cpu_time else time.perf_counter
        self._offset_s = 0.0
        self._start_s = self.now()

    def now(self) -> float:
        return self._source() + self._offset_s

    def start(self) -> None:
        """Audio time zero is now."""
        self._start_s = self.now()

    def wait_until(self, audio_s: float) -> None:
        """Return once audio second ``audio_s`` (from :meth:`start`) has arrived."""
        wait_s = self._start_s + audio_s - self.now()
        if wait_s <= 0:
            return
        if self.simulate:
            self._offset_s += wait_s
        else:
            time.sleep(wait_s)
