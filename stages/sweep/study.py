"""The sweep's Optuna study: where trials are claimed, leased, told and listed.

Every ``pipe sweep`` process on one study (one host or several) goes through here, and
the study's storage is the only thing they share:

- **Claims.** A trial is started by one process: it takes a ``WAITING`` trial (one that
  was interrupted) or creates a new one, and only while the study has fewer than
  ``trials`` trials; a trial created beyond that by a race between processes is put back
  as ``WAITING`` (a later, larger ``--trials`` runs it). With a storage in a file (the
  default SQLite ``study.db``, or a journal file) these steps run under an ``flock`` beside
  the file; a database server's row locks serialise them otherwise.
- **Leases.** The process that runs a trial records itself on it (host, pid, start time)
  and renews a heartbeat every quarter of the lease (``--lease-s``, ``$PIPE_CLAIM_LEASE_S``,
  120 s). A trial whose process is gone (seen on this host) or whose heartbeat is older
  than the lease (another host) is put back as ``WAITING``, with the reason, and re-run
  with the same parameters, in the same run folder, where the training resumes from its
  last checkpoint. A process that finds its trial taken over does not tell it.
- **Ctrl-C** puts this process's running trials back the same way: they resume next time.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cache.claims import lease_seconds
from core.errors import PipeError
from core.locks import locked
from core.processes import process_alive, this_process
from stages.sweep.space import KINDS, Param
from stages.sweep.spec import SEARCHES, SweepSpec

OWNER, BEAT, INTERRUPTED, REASON = "pipe:owner", "pipe:beat", "pipe:interrupted", "pipe:reason"
OPEN_TIMEOUT_S = 15.0     # an unreachable storage fails within this


class StudyStorageError(PipeError):
    """A study storage that cannot be opened or reached; the message names it."""


def storage_url(spec: SweepSpec) -> str:
    """The study's storage: the file's ``storage:``, else ``study.db`` (SQLite) in the sweep folder."""
    return spec.storage or f"sqlite:///{Path(spec.out).resolve() / 'study.db'}"


def lock_path(url: str) -> Path | None:
    """Where the claims of a storage in a file are serialised (None: a database server's own locks)."""
    for scheme in ("sqlite:///", "journal:"):  # not <file>.lock: Optuna's journal takes that name for its own lock
        if url.startswith(scheme):
            return Path(url[len(scheme):] + ".claims.lock")
    return None


def _make_storage(url: str):
    import optuna  # lazy: optuna and SQLAlchemy take a second to import

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend  # lazy: as above

        path = Path(url[len("journal:"):])
        if not path.parent.is_dir():
            raise FileNotFoundError(f"no folder {path.parent}")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    engine = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "mysql")):
        engine["connect_args"] = {"connect_timeout": int(OPEN_TIMEOUT_S) - 5}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def open_storage(url: str, timeout: float = OPEN_TIMEOUT_S):
    """The Optuna storage at ``url``, reached within ``timeout`` seconds or a :class:`StudyStorageError`."""
    box: dict[str, Any] = {}

    def attempt() -> None:
        try:
            box["storage"] = _make_storage(url)
        except BaseException as e:  # noqa: BLE001 - any failure is reported, naming the storage
            box["error"] = e

    worker = threading.Thread(target=attempt, name="open-study-storage", daemon=True)
    worker.start()
    worker.join(timeout)
    if "storage" in box:
        return box["storage"]
    why = f"no answer within {timeout:.0f} s" if worker.is_alive() else f"{type(box['error']).__name__}: {box['error']}"
    raise StudyStorageError(f"cannot open the study storage {redacted(url)} ({why}). Check the URL (an Optuna "
                            "storage: sqlite:///PATH, postgresql://..., mysql://..., or journal:PATH on a shared "
                            "file system) and that its server is up, or leave storage: out to use study.db in "
                            "the sweep folder.")


def redacted(url: str) -> str:
    """A URL without its password."""
    head, sep, tail = url.partition("://")
    if sep and "@" in tail:
        creds, _, host = tail.rpartition("@")
        return f"{head}://{creds.split(':')[0]}:***@{host}"
    return url


def make_sampler(spec: SweepSpec, number: int):
    """The sampler that draws trial ``number``'s values, seeded by the sweep's seed and that number,
    so a trial's values do not depend on which process draws them."""
    import optuna  # lazy: optuna takes a second to import

    seed = spec.seed * 1_000_003 + number
    if spec.search == "optuna":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.trials // 3)),
                                          constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: SweepSpec):
    import optuna  # lazy: optuna takes a second to import

    return {"none": optuna.pruners.NopPruner,
            "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
            "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
            }[spec.prune]()


def suggest(trial, p: Param) -> Any:
    """Trial ``trial``'s value of ``p``: drawn by the sampler, or the one it already has."""
    v = p.value
    return {"log": lambda: trial.suggest_float(p.key, v[0], v[1], log=True),
            "float": lambda: trial.suggest_float(p.key, v[0], v[1]),
            "int": lambda: trial.suggest_int(p.key, v[0], v[1]),
            "choice": lambda: trial.suggest_categorical(p.key, list(v))}[p.kind]()


assert set(KINDS) == {"log", "float", "int", "choice"}


@dataclass
class Claimed:
    """A trial this process runs."""

    number: int
    trial_id: int
    params: dict
    resumed: str | None = None     # why it was interrupted before, when it is a re-run


class Study:
    """One study, opened by one ``pipe sweep`` process."""

    def __init__(self, spec: SweepSpec, url: str | None = None, lease_s: float | None = None):
        import optuna  # lazy: optuna takes a second to import

        self.spec, self.url = spec, url or storage_url(spec)
        self.lease = lease_seconds(lease_s)
        self.me = this_process()
        self._lock_file = lock_path(self.url)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with self.locked():  # two processes creating one SQLite file's tables at once would collide
            storage = open_storage(self.url)
            self.study = optuna.create_study(study_name=spec.study, storage=storage, load_if_exists=True,
                                             direction=spec.objective.direction, pruner=make_pruner(spec))
        self.storage = self.study._storage
        self._check_same_sweep()
        self._held: dict[int, Claimed] = {}
        self._stop = threading.Event()
        self._keeper = threading.Thread(target=self._beat_loop, name="trial-heartbeat", daemon=True)
        self._keeper.start()

    def close(self) -> None:
        self._stop.set()
        self._keeper.join(timeout=5)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if self._lock_file is None:
            yield
            return
        if self.url.startswith("sqlite:///"):
            self._lock_file.parent.mkdir(parents=True, exist_ok=True)  # the database's folder, as SQLite needs it
        elif not self._lock_file.parent.is_dir():  # a journal on a shared file system: its folder must be there
            raise StudyStorageError(f"cannot open the study storage {redacted(self.url)} (no folder "
                                    f"{self._lock_file.parent}). Create it on a file system every host sees, or "
                                    "leave storage: out to use study.db in the sweep folder.")
        with locked(self._lock_file):
            yield

    def _check_same_sweep(self) -> None:
        """A study keeps the objective and the space it was started with: another one is refused."""
        import optuna  # lazy: optuna takes a second to import

        mine = {"objective": self.spec.objective.text, "space": {p.key: [p.kind, p.value] for p in self.spec.space},
                "search": self.spec.search, "dataset": self.spec.dataset}
        attrs = self.study.user_attrs
        if "pipe:sweep" not in attrs:
            self.study.set_user_attr("pipe:sweep", mine)
            return
        if attrs["pipe:sweep"] != mine or self.study.direction != optuna.study.StudyDirection[
                self.spec.objective.direction.upper()]:
            raise StudyStorageError(
                f"study {self.spec.study!r} in {redacted(self.url)} was started by another sweep "
                f"({attrs['pipe:sweep']}); this file asks for {mine}. Give this sweep its own study: (a name) or "
                "out: (a folder), or delete the study to start over.")

    # ------------------------------------------------------------------ claims
    def start_next(self) -> Claimed | None:
        """Claim the next trial to run (an interrupted one first), or None when none is left to start."""
        import optuna  # lazy: optuna takes a second to import

        with self.locked():
            self.reap_stale()
            trials = self.study.get_trials(deepcopy=False)
            waiting = sorted((t for t in trials if t.state == optuna.trial.TrialState.WAITING
                              and t.number < self.spec.trials), key=lambda t: t.number)
            got = next((t for t in waiting if self.storage.set_trial_state_values(
                t._trial_id, optuna.trial.TrialState.RUNNING)), None)
            if got is None and len(trials) >= self.spec.trials:
                return None
            trial_id = got._trial_id if got else self.storage.create_new_trial(self.study._study_id)
            number = self.storage.get_trial_number_from_id(trial_id)
            if number >= self.spec.trials:  # another process created the last one at the same time
                self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.WAITING)
                return None
            self._own(trial_id)
            params = self._params(trial_id, number)
            claimed = Claimed(number, trial_id, params, got.system_attrs.get(INTERRUPTED) if got else None)
            self._held[trial_id] = claimed
            return claimed

    def _own(self, trial_id: int) -> None:
        self.storage.set_trial_system_attr(trial_id, OWNER, self.me)
        self.storage.set_trial_system_attr(trial_id, BEAT, time.time())

    def _params(self, trial_id: int, number: int) -> dict:
        """The trial's values: the grid's point ``number``, or drawn by the sampler (kept when it has them)."""
        import optuna  # lazy: optuna takes a second to import

        self.study.sampler = make_sampler(self.spec, number)
        if SEARCHES[self.spec.search].grid:
            have = self.storage.get_trial(trial_id).params
            for p in self.spec.space:
                if p.key not in have:
                    dist = p.distribution
                    value = self.spec.grid[number][p.key]
                    self.storage.set_trial_param(trial_id, p.key, dist.to_internal_repr(value), dist)
        self.study.sampler.before_trial(self.study, self.storage.get_trial(trial_id))
        trial = optuna.trial.Trial(self.study, trial_id)
        return {p.key: suggest(trial, p) for p in self.spec.space}

    def reap_stale(self) -> list[int]:
        """Put back every running trial whose process is gone or whose heartbeat lapsed (call locked)."""
        import optuna  # lazy: optuna takes a second to import

        now, back = time.time(), []
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            owner, beat = t.system_attrs.get(OWNER), t.system_attrs.get(BEAT)
            if t._trial_id in self._held:
                continue
            if owner is not None and not process_alive(owner):
                why = f"its process {owner.get('pid')} on {owner.get('host')} is gone"
            elif beat is None or now - float(beat) > self.lease:
                why = f"no heartbeat for {now - float(beat or 0):.0f} s (lease {self.lease:.0f} s)"
            else:
                continue
            self._put_back(t._trial_id, why)
            back.append(t.number)
        return back

    def _put_back(self, trial_id: int, why: str) -> None:
        import optuna  # lazy: optuna takes a second to import

        self.storage.set_trial_system_attr(trial_id, INTERRUPTED, why)
        self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.WAITING)

    def release(self, claimed: Claimed, why: str) -> None:
        """Put a trial of ours back (interrupted): the next run takes it up."""
        with self.locked():
            if self._still_ours(claimed):
                self._put_back(claimed.trial_id, why)
        self._held.pop(claimed.trial_id, None)

    def _still_ours(self, claimed: Claimed) -> bool:
        import optuna  # lazy: optuna takes a second to import

        t = self.storage.get_trial(claimed.trial_id)
        owner = t.system_attrs.get(OWNER) or {}
        return t.state == optuna.trial.TrialState.RUNNING and owner.get("writer") == self.me["writer"]

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.lease / 4):
            for trial_id in list(self._held):
                with contextlib.suppress(Exception):  # a missed beat is retried; the lease allows three
                    self.storage.set_trial_system_attr(trial_id, BEAT, time.time())

    # ------------------------------------------------------------------ results
    def finish(self, claimed: Claimed, outcome: dict) -> bool:
        """Tell the study how trial ``claimed`` ended; False if another process took it over meanwhile."""
        import optuna  # lazy: optuna takes a second to import

        states = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
                  "failed": optuna.trial.TrialState.FAIL}
        self._held.pop(claimed.trial_id, None)
        with self.locked():
            if not self._still_ours(claimed):
                return False
            for key, value in outcome.get("attrs", {}).items():
                self.storage.set_trial_user_attr(claimed.trial_id, key, value)
            if outcome.get("reason"):
                self.storage.set_trial_system_attr(claimed.trial_id, REASON, outcome["reason"])
            value, state = outcome.get("value"), outcome["state"]
            if state == "complete" and (value is None or not math.isfinite(value)):
                state = "failed"
            self.study.tell(claimed.number, values=[value] if state == "complete" else None, state=states[state],
                            skip_if_finished=True)
        return True

    def trials(self) -> list:
        return self.study.get_trials(deepcopy=False)

    def pending(self) -> int:
        """Trials below the target that are not finished yet (running anywhere, or waiting)."""
        return sum(1 for t in self.trials() if t.number < self.spec.trials and not t.state.is_finished())
