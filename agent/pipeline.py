"""The daemon's threads around the engine: sources in, results out to the sinks.

Threading: every source runs in its own thread (agent/source_runner.py) and hands `Batch`es
to a bounded queue (agent/inbox.py: a full queue blocks the source, back-pressure,
not data loss).  One pipeline thread drains the queue, calls `Engine.step` once per
drain, and hands the results to the sinks (`jobs.deliver`).  The engine itself has no
threads.

A reload hands the sources of unchanged streams, still reading, and the queue to the
next pipeline (`stop(keep=...)` -> `Handover`): closing and reopening a serial port
would lose what the device sent in between and any half-received line.  When the
model and the detection settings are unchanged, the engine itself is handed over
too, so rings, baselines and open alerts carry on.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .commands import Command, execute, idle, parse
from .config import AgentConfig
from .departures import Departures
from .engine import Engine
from .health import health_snapshot, stream_presence
from .inbox import Inbox
from .jobs import deliver
from .shelves import ShelfBook
from .sinks.base import Sink
from .source_runner import SourceRunner
from .sources import build_source
from .sources.base import Batch, Undecoded, decode_items

log = logging.getLogger("tsad.pipeline")

DRAIN_MAX = 8192         # queue items per engine step; this many waiting end a batch wait
# a step's samples are copied together with their results: this bounds that copy when
# large payloads queue up (24 back-to-back 4 MiB payloads: 313 -> 224 MB peak, DLinear_ad)
DRAIN_SAMPLES = 1 << 16
QUEUE_MAX = 16384        # queue items before sources block (back-pressure), ~0.5 KB each
DECODE_BYTES = 1 << 16   # undecoded payload bytes decoded together within a drain
WAIT_FACTOR = 9.0        # batch_wait_s "auto": this x a step's cost outside inference ...
STEP_SAMPLES = 8         # ... or until the streams bring about this many samples each ...
WAIT_MAX_S = 1.0         # ... at most this long
SAVE_INTERVAL_S = 300.0  # adapted baselines reach the disk at least this often
PRESENCE_S = 1.0         # how often streams' online/shelved status is compared for changes


def _decode(raw: list[Undecoded], batch: list[Batch]) -> int:
    """Decode `raw` onto the end of `batch` and empty it; the samples added."""
    if not raw:
        return 0
    got = decode_items(raw)
    raw.clear()
    batch += got
    return sum(map(len, got))


def auto_wait(overhead: float, held: float, span: float, took: float) -> float:
    """batch_wait_s "auto" under load: how long the next step waits, given the last
    step's cost outside inference (`overhead`), the samples it held per stream (`held`),
    the time since the step before it started (`span`: those samples arrived over it)
    and its duration (`took`).

    Waiting amortizes a step's fixed cost per stream (bookkeeping, copies, numpy calls:
    about a dozen samples' work, bench_engine_step.py), not its inference.  The wait is
    the longer of two: WAIT_FACTOR x the overhead, so that it stays about a tenth of
    the thread's time on a slow machine; and the time the streams take, at the rate they
    just came, to bring STEP_SAMPLES samples each, so that on a fast one cheap steps do
    not keep the next ones small (quiet streams at 50 x 100 Hz, one sample a message,
    got 1.8 samples a step, and the agent cost 2.0x a bare subscriber; docs/RESULTS.md,
    eighth session).  STEP_SAMPLES is 8, not more: streams that send 10 samples a message
    once a second then bring enough in one message, where 16 held every step for a full
    second to gather all of them at once, and 500 such streams cost the daemon 0.5-1.6 KB
    a stream more (soak.py).  Never over WAIT_MAX_S: that bounds the latency it adds."""
    fill = STEP_SAMPLES * span / held - took if held > 0 and span > 0 else 0.0
    return min(max(WAIT_FACTOR * overhead, fill), WAIT_MAX_S)


@dataclass
class Handover:
    """What a stopping pipeline passes to the next one: the shared queue, the runners
    that keep reading (`ended`: those whose end marker it already took) and, when the
    detection carries on unchanged, the engine."""
    queue: Inbox
    runners: dict[str, SourceRunner]
    ended: set[str]
    engine: Engine | None = None
    shelves: ShelfBook | None = None
    departures: Departures | None = None


class Pipeline:
    def __init__(self, cfg: AgentConfig, engine: Engine, sinks: list[Sink],
                 handover: Handover | None = None):
        self.cfg, self.engine, self.sinks = cfg, engine, sinks
        self.metrics = engine.metrics
        self.queue: Inbox = handover.queue if handover else Inbox(QUEUE_MAX)
        kept = handover.runners if handover else {}
        self.runners = [kept.get(s.id) or SourceRunner(
            s, build_source(s, engine.meta.channels, self.metrics, cfg.mqtt, cfg.node),
            self.queue, self.metrics) for s in cfg.streams]
        self._ended = set(handover.ended) if handover else set()
        if handover and handover.shelves:   # over a reload (without a state_dir, the only copy)
            self.shelves = handover.shelves
            self.shelves.keep_in(cfg.state_dir)
        else:
            self.shelves = ShelfBook(cfg.state_dir)
        self._restore_shelves = not (handover and handover.engine is engine)
        self.departures = Departures.carried(handover.departures if handover else None, cfg)
        self.stop_event = threading.Event()
        self._last_health = 0.0
        self._last_presence = 0.0
        self._presence: dict[str, dict] = {}
        self._last_save = time.monotonic()
        self._next_step = 0.0
        self._last_step: float | None = None     # when the last step started
        self._sink_errors = 0
        #: called once per main-loop iteration (the systemd watchdog hooks in here)
        self.on_tick = None

    # ------------------------------------------------------------ processing
    def process(self, batches: list[Batch]) -> None:
        """One engine step and its delivery; sets when the next step may start."""
        t, inferred = time.monotonic(), self.metrics.infer_total_s
        n0, s0 = self.metrics.samples_in, self.metrics.stream_steps
        if self.shelves.waiting:
            self.shelves.catch_up(self.engine, batches)
        deliver(self.engine.step(batches), self.sinks, self._sink_failed)
        now = time.monotonic()
        wait = self.cfg.model.batch_wait_s
        if wait == "auto":
            # Under load (work arrived while this step ran) the next step waits; otherwise
            # it starts at once: a lone sample after a quiet spell is not held back.
            held = (self.metrics.samples_in - n0) / max(self.metrics.stream_steps - s0, 1)
            span = t - self._last_step if self._last_step is not None else 0.0
            overhead = max(0.0, now - t - (self.metrics.infer_total_s - inferred))
            wait = auto_wait(overhead, held, span, now - t) if self.queue.qsize() else 0.0
        self._last_step = t
        self._next_step = now + wait

    def _sink_failed(self, sink: Sink) -> None:
        # one broken sink must not stop detection or the others
        self._sink_errors += 1
        self.metrics.errors["sink"] += 1
        if self._sink_errors <= 5 or self._sink_errors % 1000 == 0:
            log.exception("sink %s failed (%d failures so far)", type(sink).__name__,
                          self._sink_errors)

    def submit(self, command: Command) -> None:
        """Queue an operator command (any thread): the pipeline thread carries it out between
        steps, so the engine is never touched by two threads."""
        self.queue.put(command)

    def command(self, payload: bytes, reply) -> None:
        """An operator command as received (any thread, e.g. the MQTT sink's): parsed, then
        queued; `reply(result)` gets its one result, an error for a malformed one."""
        c = parse(payload)
        c.reply = reply
        self.submit(c)

    def _idle(self, sid: str) -> bool:
        """A stream the agent knows but does not run: one a sink shows (a topic-named one
        after a restart, one dropped while silent) or whose shelve waits for it."""
        e = self.engine
        return sid not in e.streams and sid not in e.admission.named and (
            sid in self.shelves or any(s.shows(sid) for s in self.sinks))

    def _command(self, c: Command) -> None:
        sid = None if c.error or c.cmd == "ack" else c.args["stream"]
        if sid is not None and self._idle(sid):
            result, events = idle(c, self.engine, self.shelves), []
            if c.cmd != "recalibrate":      # shown now, not at the stream's first sample
                self._show_idle(sid, result["shelved_until"])
        else:
            result, events = execute(c, self.engine)
            if c.cmd in ("shelve", "unshelve") and result["ok"]:
                self.shelves.record(sid, c.args.get("for_s", 0.0))
        states = self.engine.take_entered()
        for sink in self.sinks:
            try:
                for ev in events:
                    sink.alert(ev)
                for sid, state in states:
                    sink.state(sid, state)
            except Exception:
                self._sink_failed(sink)
        if c.reply is not None:
            try:
                c.reply(result)
            except Exception:
                log.exception("command %s: its result could not be sent", c.request_id)

    def _show_idle(self, sid: str, shelved_until: str | None) -> None:
        status = {"state": "warming_up", "online": False, "shelved_until": shelved_until}
        for sink in self.sinks:
            try:
                sink.stream_status(sid, status)
            except Exception:
                self._sink_failed(sink)

    def deliver_events(self, events: list[dict], state: str = "normal") -> None:
        """End events produced outside a step (a stop, a reload), each followed by its
        stream's `state`: after a reload, "warming_up" (its stream is built anew)."""
        for sink in self.sinks:
            try:
                for ev in events:
                    sink.alert(ev)
                    sink.state(ev["stream"], state)
            except Exception:
                self._sink_failed(sink)

    # ------------------------------------------------------------ health
    def health(self) -> dict:
        return health_snapshot(self.cfg, self.engine, self.runners)

    def _stream_status(self, now: float) -> None:
        """Hand the sinks each stream whose status (health.stream_presence) changed; a stream
        gone from the engine (evicted) is reported offline once."""
        self._last_presence = now
        new = stream_presence(self.engine, self.runners, self.cfg.mqtt.stale_after_s, now)
        changed = {sid: v for sid, v in new.items() if self._presence.get(sid) != v}
        changed.update({sid: {**v, "online": False} for sid, v in self._presence.items()
                        if sid not in new and v["online"]})
        self._presence = new
        for sink in self.sinks:
            try:
                for sid, status in changed.items():
                    sink.stream_status(sid, status)
            except Exception:
                self._sink_failed(sink)

    def _gone(self, evicted: list[str], forgotten: list[str]) -> None:
        for sid in forgotten:       # no "offline" for it later: that would bring it back
            self._presence.pop(sid, None)
        for sink in self.sinks:
            try:
                sink.evicted(evicted)
                sink.forget(forgotten)
            except Exception:
                self._sink_failed(sink)

    def _housekeeping(self, force: bool = False) -> None:
        now = time.monotonic()
        if now - self._last_presence >= PRESENCE_S:
            self._stream_status(now)
        if not force and now - self._last_health < self.cfg.mqtt.health_interval_s:
            return
        self._last_health = now
        store = self.engine.store
        if store is not None:
            store.retry()
            if now - self._last_save >= SAVE_INTERVAL_S:
                self._last_save = now
                self.engine.saves.due_all(self.engine.streams)   # a few a step (saving.py)
        self.departures.note(self.engine.streams)     # before eviction takes them
        evicted = self.engine.evict_idle(now)
        self.shelves.evicted(evicted)
        forgotten = self.departures.sweep(self.engine, self.shelves, force)
        if evicted or forgotten:
            self._gone(evicted, forgotten)
        h = self.health()
        for sink in self.sinks:
            try:
                sink.health(h)
            except Exception:
                log.exception("sink %s failed on health", type(sink).__name__)

    # ------------------------------------------------------------ lifecycle
    def _drain(self) -> list:
        items = []
        while (item := self.queue.pop()) is not None:
            items.append(item)
        return items

    def start(self, start_sinks: bool = True) -> None:
        if self._restore_shelves:       # streams built anew: an operator's shelve stands
            self.shelves.restore(self.engine)
        for sink in self.sinks:     # kept sinks too: commands now go to this pipeline
            sink.attach(self.cfg, self.command, self.departures)
        if start_sinks:             # after attach: a command may wait for them in the broker
            for sink in self.sinks:
                sink.start()
        for r in self.runners:
            r.start()   # a runner handed over by a reload is already running

    def run(self, until_exhausted: bool = False, interrupted=None) -> None:
        """Drain the queue until stopped, `interrupted()` is true, or (replay) every source ended."""
        ended = self._ended
        while not self.stop_event.is_set() and not (interrupted and interrupted()):
            if self.on_tick:
                self.on_tick()
            if self.queue.wait(0.0 if self.engine.held_back else 0.2):
                self._batch_wait(interrupted)
                self._step_drained(ended)
            elif self.engine.held_back:     # fits that waited for room (agent/fit_budget.py)
                self.process([])
            else:
                self.engine.saves.run(self.engine.save)     # due while no step runs them
            self._housekeeping()
            if until_exhausted and len(ended) >= len(self.runners) and not self.engine.held_back:
                break

    def _step_drained(self, ended: set[str]) -> None:
        """Step what waits, in order: at most DRAIN_MAX items, fewer once DRAIN_SAMPLES
        samples are among them.  Undecoded messages are decoded DECODE_BYTES at a time
        (so the sample bound is checked per such chunk); a command acts after the
        samples queued before it."""
        batch: list[Batch] = []
        raw: list[Undecoded] = []
        taken = samples = raw_bytes = 0
        while (item := self.queue.pop()) is not None:
            taken += 1
            if type(item) is Undecoded:
                raw.append(item)
                raw_bytes += len(item.payload)
                if raw_bytes >= DECODE_BYTES:
                    samples += _decode(raw, batch)
                    raw_bytes = 0
            elif isinstance(item, SourceRunner):
                ended.add(item.stream.id)
            elif isinstance(item, Command):
                _decode(raw, batch)
                if batch:
                    self.process(batch)
                    batch, samples = [], 0
                self._command(item)
            else:
                samples += _decode(raw, batch) + len(item)
                batch.append(item)
            if taken >= DRAIN_MAX or samples >= DRAIN_SAMPLES:
                break
        _decode(raw, batch)
        if batch:
            self.process(batch)

    def _batch_wait(self, interrupted) -> None:
        """model.batch_wait_s: wait until the next step is due, unless DRAIN_MAX items
        already wait or the pipeline stops."""
        now = time.monotonic()
        while now < self._next_step and self.queue.qsize() < DRAIN_MAX \
                and not self.stop_event.is_set() and not (interrupted and interrupted()):
            time.sleep(min(self._next_step - now, 0.005))
            now = time.monotonic()

    def close_alerts(self, reason: str) -> None:
        """End every open alert (the next pipeline or process could never close them)."""
        self.deliver_events(self.engine.close_alerts(reason),
                            "normal" if reason == "stopped" else "warming_up")

    def reusable_sources(self, cfg: AgentConfig, channels: list[str]) -> set[str]:
        """Ids of the streams whose running source can serve a pipeline for `cfg` and a
        model with `channels`: same source settings, same channel order (the decoders
        map fields onto it) and, for MQTT sources, the same broker settings and node.
        A source that has ended (a crash, a replay at its end) is rebuilt instead."""
        if list(channels) != list(self.engine.meta.channels):
            return set()
        new = {s.id: s for s in cfg.streams}
        same_broker = (cfg.mqtt, cfg.node) == (self.cfg.mqtt, self.cfg.node)
        return {r.stream.id for r in self.runners
                if r.running and new.get(r.stream.id) == r.stream
                and (r.stream.source.type != "mqtt" or same_broker)}

    def stop(self, stop_sinks: bool = True, close_alerts: str | None = None,
             keep: set[str] = frozenset(), keep_engine: bool = False) -> Handover:
        """Stop the sources (but those of the streams in `keep`) and process what they
        delivered; with `close_alerts` (the reason), end the open alerts; with
        `stop_sinks`, stop the sinks.  Returns what the next pipeline takes over."""
        self.stop_event.set()
        going = [r for r in self.runners if r.stream.id not in keep]
        for r in going:
            r.stop()
        for r in going:
            r.join(timeout=3)
        # What arrived before this point is processed here, the rest by the next
        # pipeline: every sample exactly once, in order.
        rest = self._drain()
        ended = self._ended | {r.stream.id for r in rest if isinstance(r, SourceRunner)}
        for c in [c for c in rest if isinstance(c, Command)]:
            self._command(c)
        rest = decode_items([b for b in rest if isinstance(b, (Batch, Undecoded))])
        if rest:
            self.process(rest)
        while self.engine.held_back:
            self.process([])
        if close_alerts:
            self.close_alerts(close_alerts)
        self.engine.save_baselines()
        self._housekeeping(force=True)
        if stop_sinks:
            for sink in self.sinks:
                try:
                    sink.stop()
                except Exception:
                    log.exception("sink %s failed to stop cleanly", type(sink).__name__)
        kept = {r.stream.id: r for r in self.runners if r.stream.id in keep}
        return Handover(self.queue, kept, ended & set(kept),
                        self.engine if keep_engine else None, self.shelves, self.departures)
