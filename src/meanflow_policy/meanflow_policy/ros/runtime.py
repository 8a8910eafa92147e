"""Plain-Python core of the policy node (no rclpy): observation assembly, staleness, chunk post-processing, stats.

The node only converts messages and moves data between threads; every decision that matters at runtime (is the
observation complete and fresh, which trajectory points go out, where they are clamped) is made here, so it can
be tested without DDS and reused by tools that replay bags.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from so101_common.handoff import DEFAULT_RTC_CORRECTION, HANDOFF_MODES, hand_off, rtc_guide
from so101_common.joints import JointLimits

from so101_common.stamps import ns_to_s

# How far a header stamp may lie ahead of this node's clock (clock jitter between processes or well-synchronised
# machines) before the message is refused as coming from a skewed clock.
DEFAULT_MAX_FUTURE_STAMP_S = 0.1
# Clamping that goes on this many chunks in a row is reported: one clamped point is an overshoot, a run of them
# is a model (or checkpoint) that wants the arm outside its limits.
CLAMP_SUSTAINED_CHUNKS = 3
# Share of clamped values in such a run above which the report is an error rather than a warning.
CLAMP_ERROR_FRACTION = 0.25


class ObservationNotReady(RuntimeError):
    """Some input has never arrived (a camera, some joints): the node waits and says what it waits for.

    `reason` is "missing" (never arrived) or "used" (no new camera frame since the last chunk), so that a log can
    say a new kind of wait at once and throttle repeats of the same kind.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ObservationStale(RuntimeError):
    """An input is older than the allowed age: inference on it would act on the past."""


class FutureStamp(ValueError):
    """A header stamp too far ahead of this node's clock: with it, staleness could not be judged from the stamp."""


class ChunkError(ValueError):
    """A model output that must not be sent to the arm (wrong shape, NaN/inf, nothing left after compensation)."""


@dataclass(frozen=True)
class Observation:
    """One consistent observation, taken under the store's lock, with the stamps it was built from."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    oldest_stamp_ns: int
    newest_image_stamp_ns: int
    instruction: str

    def as_policy_input(self) -> dict:
        """The dict ``MeanFlowPolicy.sample`` takes."""
        return {"images": self.images, "state": self.state.astype(np.float32), "instruction": self.instruction}


def age_s(now_ns: int, stamp_ns: int) -> float:
    """Age of a stamp; a stamp slightly in the future (clock jitter between processes) counts as age 0.

    Stamps further ahead are refused on arrival (``ObservationStore``), and staleness is also judged by receive
    time, so this clipping cannot hide a stopped source."""
    return max(0.0, ns_to_s(now_ns - stamp_ns))


def check_stamp(what: str, stamp_ns: int, received_ns: int, max_future_s: float) -> None:
    """Raise FutureStamp when ``stamp_ns`` lies more than ``max_future_s`` after its receive time."""
    ahead = ns_to_s(stamp_ns - received_ns)
    if ahead > max_future_s:
        raise FutureStamp(f"{what} is stamped {ahead:.3f} s ahead of this node's clock (max_future_stamp_s "
                          f"{max_future_s:g}): refused; is the sender's clock skewed?")


class ObservationStore:
    """Latest image per camera and latest position per joint, shared between callbacks and the inference thread.

    Joint states are merged by name, so a driver that publishes joints in several messages, or in another
    order, still yields the full vector in ``joint_names`` order. Non-finite values are refused, never stored, and
    so are messages stamped more than ``max_future_stamp_s`` ahead of their receive time. Each input keeps its
    header stamp and its receive time (this node's clock): it is stale when either is too old, so a sender's
    clock running ahead cannot make a stopped stream look fresh.
    """

    def __init__(self, camera_keys: Sequence[str], joint_names: Sequence[str],
                 max_future_stamp_s: float = DEFAULT_MAX_FUTURE_STAMP_S) -> None:
        if not camera_keys:
            raise ValueError("at least one camera key is needed")
        self.camera_keys = tuple(camera_keys)
        self.joint_names = tuple(joint_names)
        self._joint_index = {n: i for i, n in enumerate(self.joint_names)}
        self._cond = threading.Condition()
        self.max_future_stamp_s = float(max_future_stamp_s)  # set by the node when its parameter changes
        # camera -> (rgb, stamp_ns, received_ns, sequence)
        self._images: dict[str, tuple[np.ndarray, int, int, int]] = {}
        self._used_seq: dict[str, int] = {k: 0 for k in self.camera_keys}
        self._seq = 0
        self._positions = np.full(len(self.joint_names), np.nan)
        self._joint_stamps = np.zeros(len(self.joint_names), dtype=np.int64)
        self._joint_received = np.zeros(len(self.joint_names), dtype=np.int64)

    def put_image(self, camera: str, rgb: np.ndarray, stamp_ns: int, received_ns: int) -> None:
        """Store a camera's latest frame; raises ValueError (FutureStamp for a skewed clock) and keeps the old one."""
        if camera not in self.camera_keys:
            raise ValueError(f"unknown camera {camera!r}; this policy uses {list(self.camera_keys)}")
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"camera {camera!r}: expected an (H, W, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
        check_stamp(f"camera {camera} image", int(stamp_ns), int(received_ns), self.max_future_stamp_s)
        with self._cond:
            self._seq += 1
            self._images[camera] = (rgb, int(stamp_ns), int(received_ns), self._seq)
            self._cond.notify_all()

    def put_joint_state(self, names: Sequence[str], positions: Sequence[float], stamp_ns: int,
                        received_ns: int) -> list[str]:
        """Store the known joints of one JointState; returns the names it ignored (not joints of this arm)."""
        names = list(names)
        values = np.asarray(positions, dtype=np.float64)
        if values.ndim != 1 or len(names) != values.shape[0]:
            raise ValueError(f"joint state has {len(names)} names but {values.size} positions")
        bad = [n for n, v in zip(names, values) if not np.isfinite(v)]
        if bad:
            raise ValueError(f"joint state has non-finite positions for {bad}")
        check_stamp("joint state", int(stamp_ns), int(received_ns), self.max_future_stamp_s)
        ignored = [n for n in names if n not in self._joint_index]
        with self._cond:
            for name, value in zip(names, values):
                i = self._joint_index.get(name)
                if i is not None:
                    self._positions[i] = value
                    self._joint_stamps[i] = int(stamp_ns)
                    self._joint_received[i] = int(received_ns)
        return ignored

    def current_positions(self) -> np.ndarray | None:
        """Latest measured position of every joint, or None while some joint was never received."""
        with self._cond:
            if np.any(np.isnan(self._positions)):
                return None
            return self._positions.copy()

    def missing(self) -> list[str]:
        """What has never arrived: ``camera:<key>`` entries and joint names."""
        with self._cond:
            cams = [f"camera:{k}" for k in self.camera_keys if k not in self._images]
            joints = [n for n, v in zip(self.joint_names, self._positions) if np.isnan(v)]
        return cams + joints

    def wait_for_new_images(self, timeout_s: float, cancel: threading.Event | None = None) -> bool:
        """Block until every camera delivered a frame not used by the last observation.

        Returns False on timeout or when ``cancel`` is set (wake the waiter with ``notify`` after setting it).
        """
        def fresh() -> bool:
            return all(k in self._images and self._images[k][3] > self._used_seq[k] for k in self.camera_keys)

        with self._cond:
            self._cond.wait_for(lambda: fresh() or (cancel is not None and cancel.is_set()),
                                timeout=max(0.0, timeout_s))
            return fresh() and not (cancel is not None and cancel.is_set())

    def notify(self) -> None:
        """Wake a thread blocked in ``wait_for_new_images`` so it re-checks its cancel event."""
        with self._cond:
            self._cond.notify_all()

    def take(self, now_ns: int, max_age_s: float, instruction: str) -> Observation:
        """A complete, fresh observation built only from frames no earlier observation used.

        Raises ObservationNotReady (naming what never arrived, or the cameras without a new frame since the last
        observation) or ObservationStale (naming each input whose stamp or receive time is older than allowed).
        """
        missing = self.missing()
        if missing:
            raise ObservationNotReady("missing", f"waiting for {', '.join(missing)}")
        with self._cond:
            images = {k: self._images[k] for k in self.camera_keys}
            positions = self._positions.copy()
            joint_stamps = self._joint_stamps.copy()
            joint_received = self._joint_received.copy()
            stale = [_staleness(f"camera {k} image", now_ns, s, r, max_age_s) for k, (_, s, r, _) in images.items()]
            stale += [_staleness(f"joint {n}", now_ns, int(s), int(r), max_age_s)
                      for n, s, r in zip(self.joint_names, joint_stamps, joint_received)]
            stale = [text for text in stale if text]
            if stale:
                raise ObservationStale("; ".join(stale) + f" (max_obs_age_s {max_age_s:g})")
            used = [k for k, (_, _, _, seq) in images.items() if seq <= self._used_seq[k]]
            if used:
                raise ObservationNotReady("used", f"no new frame from camera {', '.join(used)} since the last chunk")
            for k, (_, _, _, seq) in images.items():
                self._used_seq[k] = seq
        stamps = [s for _, s, _, _ in images.values()] + [int(s) for s in joint_stamps]
        return Observation(
            images={k: rgb for k, (rgb, _, _, _) in images.items()},
            state=positions,
            oldest_stamp_ns=min(stamps),
            newest_image_stamp_ns=max(s for _, s, _, _ in images.values()),
            instruction=instruction,
        )


def _staleness(what: str, now_ns: int, stamp_ns: int, received_ns: int, max_age_s: float) -> str:
    """Why an input is stale ('' when it is not): its stamp, or its receive time, is older than ``max_age_s``."""
    stamp_age, received_age = age_s(now_ns, stamp_ns), age_s(now_ns, received_ns)
    if stamp_age > max_age_s:
        return f"{what} is {stamp_age:.3f} s old"
    if received_age > max_age_s:
        return f"{what} was received {received_age:.3f} s ago (its stamp says {stamp_age:.3f} s old)"
    return ""


@dataclass(frozen=True)
class TrajectoryPlan:
    """What goes into one JointTrajectory: times relative to the header stamp (= publish time) and positions."""

    times_s: np.ndarray
    positions: np.ndarray
    dropped: int
    clamped: int
    clamped_by_joint: dict[str, int] = field(default_factory=dict)  # joints with clamped values only


def chunk_to_plan(chunk: np.ndarray, limits: JointLimits, dt_s: float, elapsed_s: float = 0.0,
                  compensate_latency: bool = False) -> TrajectoryPlan:
    """Turn a model chunk (T, J) into trajectory points: action k is due (k+1)*dt after the observation.

    Without compensation the chunk starts at publish time: time_from_start = (k+1)*dt. With compensation the
    ``elapsed_s`` between observation and publish is taken into account: points already due are dropped and the
    rest keep their place on the observation's time line (time_from_start = (k+1)*dt - elapsed).
    """
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or chunk.shape[1] != len(limits.names) or chunk.shape[0] == 0:
        raise ChunkError(f"chunk must be (steps, {len(limits.names)}), got shape {chunk.shape}")
    if not np.all(np.isfinite(chunk)):
        bad = sorted({limits.names[j] for j in np.nonzero(~np.isfinite(chunk))[1]})
        raise ChunkError(f"chunk contains NaN or inf for joints {bad}")
    if not dt_s > 0:
        raise ValueError(f"dt must be positive, got {dt_s}")
    positions = limits.clamp(chunk)
    changed = positions != chunk.astype(np.float64)
    clamped = int(np.count_nonzero(changed))
    by_joint = {name: int(n) for name, n in zip(limits.names, changed.sum(axis=0)) if n}
    times = (np.arange(chunk.shape[0]) + 1) * dt_s
    dropped = 0
    if compensate_latency and elapsed_s > 0:
        keep = times > elapsed_s + 1e-6
        dropped = int(np.count_nonzero(~keep))
        if not np.any(keep):
            raise ChunkError(f"latency {elapsed_s * 1e3:.1f} ms exceeds the chunk horizon "
                             f"{times[-1] * 1e3:.1f} ms: every point is already in the past")
        times, positions = times[keep] - elapsed_s, positions[keep]
    return TrajectoryPlan(times_s=times, positions=positions, dropped=dropped, clamped=clamped,
                          clamped_by_joint=by_joint)


def hold_plan(current: np.ndarray, limits: JointLimits, dt_s: float) -> TrajectoryPlan:
    """A one-point trajectory that stops the arm where it is (reached one control step from now)."""
    return TrajectoryPlan(times_s=np.array([dt_s]), positions=limits.clamp(np.asarray(current)[None, :]),
                          dropped=0, clamped=0)


HANDOFF_OFF = "off"
HANDOFF_CHOICES = (HANDOFF_OFF, *HANDOFF_MODES)


@dataclass(frozen=True)
class HandoffPlan:
    """A hand-off's trajectory (times relative to the publish stamp) and what the hand-off did."""

    plan: TrajectoryPlan
    start: np.ndarray  # the arm's target at the publish instant, where the trajectory starts from
    delay_steps: int
    limited: int
    stale: bool


class Handoffs:
    """Asynchronous chunk hand-off in the node (so101_common.handoff, as in the sim's real-time evaluation).

    Remembers the trajectory last published (stamp, the target at that instant, points). A new chunk, computed
    from an observation ``elapsed`` ago, takes over on the chunk's own time line: its rows already due are
    skipped and the rest are published at ``(i + 1) * dt - frac`` after now (``frac`` = elapsed modulo dt: the
    first point is at most one dt ahead and never in the past). The old trajectory is sampled on that same grid
    up to its end, the way the controller interpolates it; the target now (the old trajectory at this instant,
    or the measured position when nothing was published since the last reset) is where the first step starts
    from, at most ``max_step`` away.
    """

    def __init__(self, limits: JointLimits, dt_s: float, rtc_exempt: Sequence[int] = ()) -> None:
        self.limits = limits
        self.dt_s = dt_s
        self.rtc_exempt = tuple(rtc_exempt)  # joints rtc switches without correction (the gripper)
        self._published: tuple[int, np.ndarray, np.ndarray] | None = None  # stamp ns, times s, positions

    def reset(self) -> None:
        """Forget the published trajectory (disable): the next chunk starts from the measured position."""
        self._published = None

    def remember(self, stamp_ns: int, handoff: HandoffPlan) -> None:
        """The trajectory went out with header stamp ``stamp_ns`` (the ``now_ns`` it was planned for)."""
        self._published = (int(stamp_ns), np.concatenate([[0.0], handoff.plan.times_s]),
                           np.vstack([handoff.start[None, :], handoff.plan.positions]))

    def end_ns(self) -> int | None:
        """When the published trajectory runs out (None: nothing published)."""
        if self._published is None:
            return None
        stamp_ns, times, _ = self._published
        return stamp_ns + int(round(times[-1] * 1e9))

    def _sample(self, t_s: np.ndarray) -> np.ndarray:
        """The published trajectory at times ``t_s`` after its stamp (linear, holding its last point)."""
        _, times, positions = self._published
        return np.stack([np.interp(t_s, times, positions[:, j]) for j in range(positions.shape[1])], axis=1)

    def guide(self, observed_ns: int, latency_s: float, chunk_size: int, execute: int,
              commit_rows: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
        """rtc guidance for a chunk computed from an observation stamped ``observed_ns`` (None: nothing
        published yet): the published trajectory on that chunk's time line (row k due at observed + (k + 1) dt),
        committed over the ``latency_s`` the chunk is expected to take, and at least ``commit_rows`` rows
        (so101_common.handoff.rtc_guide)."""
        if self._published is None:
            return None
        grid = (observed_ns - self._published[0]) * 1e-9 + (np.arange(chunk_size) + 1) * self.dt_s
        delay = max(int(np.floor(max(0.0, latency_s) / self.dt_s + 1e-9)), commit_rows)
        return rtc_guide(self._sample(grid), 0, delay, chunk_size, execute, self.rtc_exempt)

    def plan(self, mode: str, chunk: np.ndarray, elapsed_s: float, now_ns: int, measured: np.ndarray | None,
             max_step: float, committed: int = 0, rtc_correct: bool = DEFAULT_RTC_CORRECTION) -> HandoffPlan:
        """The trajectory to publish at ``now_ns`` for ``chunk`` (observation ``elapsed_s`` ago; ``committed``:
        its first rows were given as committed; ``rtc_correct``: see so101_common.handoff.hand_off)."""
        base = chunk_to_plan(chunk, self.limits, self.dt_s)  # shape, NaN and joint-limit checks, clamping
        dt = self.dt_s
        elapsed = max(0.0, float(elapsed_s))
        delay = int(np.floor(elapsed / dt + 1e-9))
        frac = elapsed - delay * dt
        if self._published is None:
            if measured is None:
                raise ChunkError("no joint state known: nothing to hand off from")
            last = self.limits.clamp(np.asarray(measured, dtype=np.float64))
            current, reached = last[None, :], 1
        else:
            _, times, _ = self._published
            since = (now_ns - self._published[0]) * 1e-9
            last = self._sample(np.array([since]))[0]
            grid = since + (np.arange(len(times)) + 1) * dt - frac
            grid = grid[grid <= times[-1] + 1e-9]
            current, reached = (self._sample(grid), 0) if len(grid) else (last[None, :], 1)
        result = hand_off(mode, current, reached, base.positions, delay, last, max_step,
                          rtc_exempt=self.rtc_exempt, committed=committed, rtc_correct=rtc_correct)
        positions = self.limits.clamp(result.commands)
        plan = TrajectoryPlan(times_s=(np.arange(len(positions)) + 1) * dt - frac, positions=positions,
                              dropped=result.skipped, clamped=base.clamped, clamped_by_joint=base.clamped_by_joint)
        return HandoffPlan(plan=plan, start=last, delay_steps=delay, limited=result.limited, stale=result.stale)


@dataclass(frozen=True)
class ClampReport:
    """Sustained clamping worth telling the operator: ``error`` when a large share of the values was clamped."""

    error: bool
    message: str


class ClampMonitor:
    """Follows clamping over consecutive chunks; a run of ``sustained_chunks`` clamped chunks gives a report.

    A single clamped point is an overshoot the limits are there for; chunk after chunk of them means the model
    (or a corrupt checkpoint) drives joints into their limits, which the operator must hear about.
    """

    def __init__(self, sustained_chunks: int = CLAMP_SUSTAINED_CHUNKS,
                 error_fraction: float = CLAMP_ERROR_FRACTION) -> None:
        self.sustained_chunks = sustained_chunks
        self.error_fraction = error_fraction
        self._chunks = 0
        self._values = 0
        self._clamped: dict[str, int] = {}

    def observe(self, plan: TrajectoryPlan, chunk_values: int) -> ClampReport | None:
        """Account one chunk of ``chunk_values`` model values; a report while clamping is sustained, else None."""
        if not plan.clamped:
            self._chunks, self._values, self._clamped = 0, 0, {}
            return None
        self._chunks += 1
        self._values += chunk_values
        for name, n in plan.clamped_by_joint.items():
            self._clamped[name] = self._clamped.get(name, 0) + n
        if self._chunks < self.sustained_chunks:
            return None
        total = sum(self._clamped.values())
        share = total / self._values
        joints = ", ".join(f"{name} {n}" for name, n in sorted(self._clamped.items(), key=lambda kv: -kv[1]))
        return ClampReport(error=share > self.error_fraction,
                           message=f"model output clamped to the joint limits in {self._chunks} chunks in a row: "
                                   f"{total} of {self._values} values ({100 * share:.0f} %; {joints}); the "
                                   "checkpoint may be corrupt, untrained or made for another arm")


@dataclass
class ChunkStats:
    """Timings and counters of one log period (reset by ``summary``) plus counters since start (``totals``)."""

    total_ms: list[float] = field(default_factory=list)
    expert_ms: list[float] = field(default_factory=list)
    obs_age_ms: list[float] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    since: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # callbacks and worker both count

    def add_chunk(self, total_ms: float, expert_ms: float, obs_age_ms: float) -> None:
        with self._lock:
            self.total_ms.append(total_ms)
            self.expert_ms.append(expert_ms)
            self.obs_age_ms.append(obs_age_ms)
        self.count("chunks")

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counters[what] = self.counters.get(what, 0) + n
            self.totals[what] = self.totals.get(what, 0) + n

    def totals_snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.totals)

    def summary(self, reset: bool = True) -> str:
        with self._lock:
            return self._summary(reset)

    def _summary(self, reset: bool) -> str:
        period = time.monotonic() - self.since

        def med(values: list[float]) -> str:
            return f"{np.median(values):.1f}" if values else "-"

        parts = [f"{self.counters.get('chunks', 0)} chunks in {period:.1f} s",
                 f"total ms median {med(self.total_ms)} max {max(self.total_ms, default=0.0):.1f}",
                 f"expert ms median {med(self.expert_ms)}", f"obs age ms median {med(self.obs_age_ms)}"]
        others = {k: v for k, v in sorted(self.counters.items()) if k != "chunks"}
        if others:
            parts.append(", ".join(f"{k} {v}" for k, v in others.items()))
        if reset:
            self.total_ms.clear()
            self.expert_ms.clear()
            self.obs_age_ms.clear()
            self.counters.clear()
            self.since = time.monotonic()
        return "; ".join(parts)
