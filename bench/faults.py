"""The fault matrix: a steady load over real workers, one fault at a time, every request counted.

    python -m bench.faults             # every fault, full length (docs/reliability.md)
    python -m bench.faults --short     # the CI run: the same faults, shorter load
    python -m bench.faults --only redis-kill nacos-down
    python -m bench.faults --ha --short # the highly available topology's faults (below)

Starts its own Redis and Nacos (bench ports, unless the GPU_DISPATCH_* server
settings say otherwise), four simulated GPU workers, beat and a dispatcher
worker; this process dispatches on the producer path.  For each fault, it
sends ``--rate`` requests a second before, during and after the fault, then
waits for every accepted request's outcome and reports, per fault:

- **sent** — ``delay()`` calls; **refused** — raised at ``delay()`` (never
  accepted: the caller knows); **answered**; **errors** by type (a
  ``NoGpuAvailable`` while GPUs are healthy is a failure of ours);
- **lost** — accepted, and no outcome within the deadline;
- **duplicates** — requests whose outcome was stored more than once
  (read from the workers' logs);
- **exited** — worker processes that died without being killed by the fault;
- **stall** — the longest time no request was answered, and **recovery** — how
  long after the fault ended answers flowed again.

With ``--ha`` the topology is the highly available one, from real parts on
this machine: Redis with Sentinel (a primary, a replica, three sentinels:
:class:`gpu_dispatch_tools.servers.RedisSentinelSet`) reached through
``sentinel://`` URLs, and, where ``ip netns`` is permitted, two of the four
GPU workers on hosts of their own (network namespaces on a bridge,
:mod:`gpu_dispatch_tools.testhosts`), each registering its own address; Redis and
Nacos then listen on the bridge address too.  Its faults:

- **sentinel-failover** — the Redis primary killed (kill -9) mid-load;
  Sentinel promotes the replica, clients follow it; the old primary comes
  back as a replica.  Lost requests are reported with their reason;
- **host-cut** — one host's link taken down (inside its namespace) mid-load:
  its worker's lease runs out (``GPU_DISPATCH_LEASE_SECONDS``) and what it
  held is re-dispatched; every such request must be answered by another
  GPU, as attempt 2 or later;
- **nacos-node-kill** — one node of the 3-node Nacos cluster killed (kill -9)
  mid-load, started again 30 s later (it rejoins).  It runs wherever
  GPU_DISPATCH_NACOS_SERVER names three addresses (``--ha``'s default; the
  plain topology too), and is skipped, saying so, with one.

``--json PATH`` writes the rows, with each fault's details, for tests.

Exit status 1 if any row has a lost request, a duplicate, an exited worker or
(for a fault that leaves GPUs healthy) a NoGpuAvailable.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpu_dispatch_tools import testhosts

#: The topology is chosen before celeryconfig reads the settings (at its import): ``--ha`` on the command line.
HA = "--ha" in sys.argv[1:] and __name__ == "__main__"
#: Why the HA topology runs without separate hosts here (``None``: with them).
NO_HOSTS = testhosts.unavailable() if HA else "not the --ha topology"
#: Where the HA topology's servers listen: the hosts' bridge, or loopback without hosts.
HA_ADDRESS = testhosts.BRIDGE_ADDRESS if NO_HOSTS is None else "127.0.0.1"

if HA:
    _first = int(os.environ.get("GPU_DISPATCH_FAULTS_SENTINEL_PORT", 16899))
    _auth = ":" + os.environ.get("GPU_DISPATCH_FAULTS_REDIS_PASSWORD", "faults-" + secrets.token_hex(8)) + "@"
    _sentinels = ";".join(f"sentinel://{_auth}{HA_ADDRESS}:{_first + n}" for n in range(3))
    os.environ.setdefault("GPU_DISPATCH_BROKER_URL", _sentinels + "/0")
    os.environ.setdefault("GPU_DISPATCH_RESULT_BACKEND", _sentinels + "/1")
    os.environ.setdefault("GPU_DISPATCH_SENTINEL_MASTER", "gpu-dispatch-faults")
    _nacos = int(os.environ.get("GPU_DISPATCH_FAULTS_NACOS_PORT", 18868))
    os.environ.setdefault("GPU_DISPATCH_NACOS_SERVER", ",".join(f"{HA_ADDRESS}:{_nacos + 20 * n}" for n in range(3)))
os.environ.setdefault("GPU_DISPATCH_BROKER_URL", "redis://127.0.0.1:16699/0")
os.environ.setdefault("GPU_DISPATCH_RESULT_BACKEND", "redis://127.0.0.1:16699/1")
os.environ.setdefault("GPU_DISPATCH_NACOS_SERVER", "127.0.0.1:18868")
os.environ.setdefault("GPU_DISPATCH_NACOS_SERVICE", "gpu-inference-faults")

import celeryconfig  # noqa: E402
from gpu_dispatch.contract import gpu_queue  # noqa: E402
from gpu_dispatch_tools.processes import Supervisor, beat_argv, dispatcher_argv, gpu_worker_argv  # noqa: E402
from gpu_dispatch_tools.servers import NacosCluster, RedisSentinelSet, ServerError, local_nacos, local_servers  # noqa: E402

#: Settings of every process: fast refreshes and sweeps, requests of about half a second.
PROCESS_ENV = {"GPU_DISPATCH_GPU_SOURCE": "simulated", "GPU_DISPATCH_WORKER_IP": "127.0.0.1",
               "GPU_DISPATCH_SIM_MS_PER_TOKEN": "10", "GPU_DISPATCH_REFRESH_INTERVAL": "1",
               "GPU_DISPATCH_RECONCILE_INTERVAL": "2", "GPU_DISPATCH_METRICS_PORT": "0"}
GPUS = 4
#: Seconds without an answer that count as a stall (at 12 requests/s, answers come every ~0.1 s).
STALL_S = 2.0
#: Faults after which every GPU is healthy: a NoGpuAvailable there is a failure of ours.
GPUS_HEALTHY = {"redis-term", "redis-kill", "nacos-down", "gpu-restart", "sentinel-failover", "nacos-node-kill"}
#: Seconds after the load stops within which every accepted request must have its outcome.
OUTCOME_DEADLINE_S = 180.0


@dataclass
class Row:
    fault: str
    sent: int = 0
    refused: int = 0
    answered: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    lost: int = 0
    duplicates: int = 0
    exited: list[str] = field(default_factory=list)
    stall_s: float = 0.0
    recovery_s: float = 0.0
    #: What a fault measures besides (failover time, requests re-dispatched, why requests were lost, ...).
    details: dict = field(default_factory=dict)
    #: Why the fault was not run here (its row counts nothing).
    skipped: str = ""

    @property
    def ok(self) -> bool:
        if self.skipped:
            return True
        no_gpu = self.errors.get("NoGpuAvailable", 0) if self.fault in GPUS_HEALTHY else 0
        return not (self.lost or self.duplicates or self.exited or no_gpu or self.details.get("not_rescued"))


class Load:
    """Sends ``rate`` requests a second from a thread of its own until stopped."""

    def __init__(self, rate: float) -> None:
        from dispatcher import dispatch_inference

        self.rate = rate
        self.accepted: list[tuple[float, object]] = []
        self.refused: list[tuple[float, str]] = []
        self._send = dispatch_inference.delay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Load":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        n, begun = 0, time.monotonic()
        while not self._stop.is_set():
            try:
                self.accepted.append((time.time(), self._send(f"fault load {n}", max_tokens=40)))
            except Exception as exc:  # refused at delay(): the caller knows, nothing was accepted
                self.refused.append((time.time(), f"{type(exc).__name__}: {exc}"))
            n += 1
            self._stop.wait(max(0.0, begun + n / self.rate - time.monotonic()))


class Rig:
    """The servers and processes a fault is injected into.

    :param ha: the highly available topology (module docstring): Redis with Sentinel, and GPU workers on
        hosts of their own where network namespaces are permitted.
    """

    def __init__(self, log_dir: Path, ha: bool = False) -> None:
        self.ha = ha
        #: The separate hosts (``None``: every worker on this one); created here unless already there.
        self.hosts = testhosts.Hosts(2, adopt=True) if ha and NO_HOSTS is None else None
        if self.hosts is not None:
            self.hosts.create()
        # One Nacos address: a single node; three (--ha's default): a 3-node cluster, for nacos-node-kill.
        cluster = len(_nacos_addresses()) > 1
        if ha:
            if not celeryconfig.broker_url.startswith("sentinel://"):
                sys.exit("--ha needs a sentinel:// GPU_DISPATCH_BROKER_URL (or leave it unset)")
            self.redis = RedisSentinelSet.from_url(celeryconfig.broker_url, celeryconfig.sentinel_master,
                                                   celeryconfig.home)
            self.nacos = local_nacos(celeryconfig, cluster=cluster)
        else:
            self.redis, self.nacos = local_servers(celeryconfig, ha=cluster)
        #: The 3-node Nacos cluster (kill_node, start_node), else ``None``.
        self.nacos_cluster = self.nacos if isinstance(self.nacos, NacosCluster) else None
        self.started = [s for s in (self.redis, self.nacos) if not s.answering()]
        self.supervisor = Supervisor(log_dir)
        self.log_dir = log_dir
        self.generation = 0

    def gpu_workers(self) -> list[tuple[str, "testhosts.Host | None", int]]:
        """(name, host or ``None`` for this one, GPU index) of each GPU worker: two on this host and one on
        each separate host when there are hosts, else all four here."""
        if self.hosts is None:
            return [(f"gpu{gpu}", None, gpu) for gpu in range(GPUS)]
        return [("gpu0", None, 0), ("gpu1", None, 1), *((f"gpu-{h.name}", h, 0) for h in self.hosts)]

    def queue_of(self, host: "testhosts.Host") -> str:
        return gpu_queue(host.address, celeryconfig.base_port)

    def up(self) -> None:
        for server in self.started:
            print(server.start(timeout=120))
        self.generation += 1
        for name, host, gpu in self.gpu_workers():
            argv = gpu_worker_argv(gpu, 2, f"faults-{name}@%h", "info")
            env = dict(PROCESS_ENV)
            if host is not None:
                argv, env["GPU_DISPATCH_WORKER_IP"] = host.argv(argv), host.address
            self.supervisor.start(self.gpu_log(name), argv, env)
        self.supervisor.start(f"beat-{self.generation}",
                              beat_argv(str(self.log_dir / "beat.schedule"), "warning"), PROCESS_ENV)
        self.supervisor.start(f"dispatcher-{self.generation}", dispatcher_argv(node="faults-dispatcher@%h"),
                              PROCESS_ENV)

    def gpu_log(self, gpu: "int | str", restart: int = 0) -> str:
        name = gpu if isinstance(gpu, str) else f"gpu{gpu}"
        return f"{name}-{self.generation}" + (f"-restart{restart}" if restart else "")

    def down(self) -> None:
        self.supervisor.stop_all()
        for host in self.hosts or ():
            if not host.link_up():
                host.restore()

    def close(self) -> None:
        try:
            self.down()
            for server in reversed(self.started):
                print(server.stop())
        finally:
            if self.hosts is not None:
                self.hosts.remove()


def _nacos_addresses() -> list[str]:
    return [a for a in celeryconfig.nacos_server_addresses.split(",") if a.strip()]


def wait_for_gpus(view, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while len(view.candidates()) < count:
        if time.monotonic() > deadline:
            sys.exit(f"the {count} GPUs did not come up; logs in {celeryconfig.home}/faults-logs")
        time.sleep(0.2)


# -- the faults -----------------------------------------------------------------------------------

def redis_term(rig: Rig, outage_s: float) -> None:
    print(f"  {rig.redis.stop()}")
    time.sleep(outage_s)  # the fault itself: Redis away this long
    print(f"  {rig.redis.start(timeout=60)}")


def redis_kill(rig: Rig, outage_s: float) -> None:
    print(f"  {rig.redis.kill()}")
    time.sleep(outage_s)
    print(f"  {rig.redis.start(timeout=60)}")


def nacos_down(rig: Rig, outage_s: float) -> None:
    print(f"  {rig.nacos.stop()}")
    time.sleep(outage_s)
    print(f"  {rig.nacos.start(timeout=120)}")


def gpu_restart(rig: Rig, outage_s: float) -> None:
    name = rig.gpu_log(0)
    for label, proc in rig.supervisor.procs:
        if label == name:
            os.killpg(proc.pid, signal.SIGKILL)
    rig.supervisor.procs = [(label, p) for label, p in rig.supervisor.procs if label != name]
    rig.supervisor.start(rig.gpu_log(0, restart=1), gpu_worker_argv(0, 2, "faults-gpu0@%h", "info"), PROCESS_ENV)


# -- the highly available topology's faults (--ha) ---------------------------------------------------

class FaultUnavailable(RuntimeError):
    """The fault cannot be injected in this topology (the message says what it needs)."""


def sentinel_failover(rig: Rig, outage_s: float, notes: dict) -> float:
    """kill -9 of the Redis primary; Sentinel promotes the replica; the old primary returns as a replica
    after ``outage_s``.  Returns the kill's time: recovery is counted from it (nobody repairs anything)."""
    if not isinstance(rig.redis, RedisSentinelSet):
        raise FaultUnavailable("needs Redis with Sentinel (--ha)")
    killed_at = time.time()
    old = rig.redis.kill_primary()
    print(f"  primary {old.address} killed (kill -9)")
    new = rig.redis.wait_for_failover(old, timeout=60)
    notes["failover_s"] = round(time.time() - killed_at, 2)
    notes["primary"] = f"{old.address} -> {new.address}"
    print(f"  sentinels promoted {new.address} {notes['failover_s']} s after the kill")
    time.sleep(outage_s)
    print(f"  {rig.redis.start_node(old, timeout=60)} (as a replica of {new.address})")
    return killed_at


def host_cut(rig: Rig, outage_s: float, notes: dict) -> float:
    """One separate host's link taken down for ``outage_s``; every request that was waiting or running
    there meanwhile (read from the ledger every 0.2 s) is recorded, to be checked once answered."""
    if not rig.hosts:
        raise FaultUnavailable(f"needs separate hosts (network namespaces): {NO_HOSTS}")
    from gpu_dispatch import broker
    from gpu_dispatch.ledger import Ledger

    host = rig.hosts[0]
    queue = rig.queue_of(host)
    client = broker.client(celeryconfig.broker_url, celeryconfig.broker_transport_options)
    ledger = Ledger(client)
    stranded: set[str] = set()

    def there() -> set[str]:
        return {r.id for r in ledger.records(ledger.targeted(queue)) if r.state in ("queued", "started", "running")}

    cut_at = time.time()
    host.cut()
    print(f"  link of {host.name} ({host.address}, queue {queue}) down")
    end = time.monotonic() + outage_s
    while time.monotonic() < end:
        stranded |= there()
        time.sleep(0.2)
    host.restore()
    print(f"  link of {host.name} up again after {outage_s:g} s")
    client.close()
    notes.update(cut_queue=queue, stranded_ids=sorted(stranded), lease_s=celeryconfig.lease_seconds)
    return cut_at


def nacos_node_kill(rig: Rig, outage_s: float, notes: dict) -> None:
    """kill -9 one Nacos node of three mid-load, start it again after ``outage_s`` (it rejoins)."""
    cluster = rig.nacos_cluster
    if cluster is None:
        raise FaultUnavailable("needs three Nacos addresses in GPU_DISPATCH_NACOS_SERVER (a 3-node cluster; --ha's default)")
    node = cluster.kill_node(1)
    notes["killed"] = node.address
    time.sleep(outage_s)
    print(f"  {cluster.start_node(node)}")


def unavailable(rig: Rig, name: str) -> str | None:
    """Why fault ``name`` cannot be injected in this rig's topology (``None``: it can)."""
    if name == "sentinel-failover" and not isinstance(rig.redis, RedisSentinelSet):
        return "needs Redis with Sentinel (--ha)"
    if name == "host-cut" and not rig.hosts:
        return f"needs separate hosts (network namespaces): {NO_HOSTS}"
    if name == "nacos-node-kill" and rig.nacos_cluster is None:
        return "needs three Nacos addresses in GPU_DISPATCH_NACOS_SERVER (a 3-node cluster; --ha's default)"
    return None


FAULTS = {"redis-term": (redis_term, 5.0), "redis-kill": (redis_kill, 5.0), "nacos-down": (nacos_down, 60.0),
          "gpu-restart": (gpu_restart, 0.0), "sentinel-failover": (sentinel_failover, 5.0),
          "host-cut": (host_cut, 15.0), "nacos-node-kill": (nacos_node_kill, 30.0)}
#: The faults of each topology, run when --only does not say.
PLAIN_FAULTS = ["redis-term", "redis-kill", "nacos-down", "gpu-restart"]
HA_FAULTS = ["sentinel-failover", "host-cut", "nacos-node-kill"]
#: Faults whose injection takes the notes dict (and may return when recovery is counted from).
_NOTED = {"sentinel-failover", "host-cut", "nacos-node-kill"}


def run_fault(rig: Rig, view, name: str, rate: float, before_s: float, after_s: float) -> Row:
    inject, outage_s = FAULTS[name]
    print(f"fault {name}: {rate:g} requests/s, {before_s:g} s before, then the fault, then {after_s:g} s")
    notes: dict = {}
    load = Load(rate).start()
    time.sleep(before_s)  # steady load before the fault
    fault_at = time.time()
    counted_from = inject(rig, outage_s, notes) if name in _NOTED else inject(rig, outage_s)
    fault_end = counted_from or time.time()
    time.sleep(after_s)  # and after it
    load.stop()
    row = Row(name, sent=len(load.accepted) + len(load.refused), refused=len(load.refused))
    finished, answers, lost_ids = [], {}, []
    deadline = time.monotonic() + OUTCOME_DEADLINE_S
    for _sent_at, result in load.accepted:
        try:
            answer = result.get(timeout=max(0.5, deadline - time.monotonic()))
        except Exception as exc:  # an error on the AsyncResult is an answer, not a loss
            if type(exc).__name__ == "TimeoutError":
                row.lost += 1
                lost_ids.append(result.id)
            else:
                row.errors[type(exc).__name__] += 1
        else:
            row.answered += 1
            answers[result.id] = answer
            finished.append(answer["timings"]["finished_at"])
    finished.sort()
    gaps = [(b - a, b) for a, b in zip(finished, finished[1:]) if b > fault_at]
    if gaps:
        row.stall_s, resumed_at = max(gaps)
        # A stall no longer than the load's own spacing between answers is no stall: nothing to recover.
        row.recovery_s = max(0.0, resumed_at - fault_end) if row.stall_s > STALL_S else 0.0
    row.duplicates = _duplicates(rig.log_dir)
    row.exited = [n for n in rig.supervisor.dead() if n.startswith(("gpu", "dispatcher", "beat"))]
    if lost_ids:
        notes["lost_why"] = _why_lost(lost_ids)
    if "stranded_ids" in notes:
        _check_rescued(notes, answers, fault_end)
    row.details = notes
    print(f"  {row}")
    return row


def _why_lost(ids: list[str]) -> dict[str, int]:
    """What the ledger (on the primary now) says of each lost request: the reason it had no outcome."""
    from gpu_dispatch import broker
    from gpu_dispatch.ledger import Ledger

    client = broker.client(celeryconfig.broker_url, celeryconfig.broker_transport_options)
    try:
        records = {r.id: r for r in Ledger(client).records(ids)}
    finally:
        client.close()
    why = collections.Counter()
    for task_id in ids:
        record = records.get(task_id)
        why["no ledger record (its write never reached the new primary)" if record is None
            else f"ledger state {record.state}, attempt {record.attempt}, queue {record.queue}"] += 1
    return dict(why)


def _check_rescued(notes: dict, answers: dict, cut_at: float) -> None:
    """Each request stranded on the cut host must be answered by another GPU as attempt 2 or later."""
    stranded = notes.pop("stranded_ids")
    rescued = [answers[i] for i in stranded if i in answers and answers[i]["gpu"]["queue"] != notes["cut_queue"]
               and answers[i]["delivery"]["attempt"] > 1]
    notes["stranded"] = len(stranded)
    notes["rescued"] = len(rescued)
    notes["not_rescued"] = sorted(set(stranded) - {a["task_id"] for a in rescued})
    if rescued:
        done = sorted(a["timings"]["finished_at"] - cut_at for a in rescued)
        notes["first_rescued_s"], notes["all_rescued_s"] = round(done[0], 2), round(done[-1], 2)


def _duplicates(log_dir: Path) -> int:
    """Requests whose outcome a worker stored more than once (Celery logs each stored outcome)."""
    stored = collections.Counter()
    for path in log_dir.glob("gpu*.log"):
        stored.update(re.findall(r"Task run_inference\[([0-9a-f-]+)\] (?:succeeded|raised)", path.read_text()))
    return sum(1 for count in stored.values() if count > 1)


def table(rows: list[Row]) -> str:
    lines = ["| fault | sent | refused at delay() | answered | errors | lost | duplicates | workers exited | "
             "longest stall s | recovery s | notes |", "|---|--:|--:|--:|---|--:|--:|---|--:|--:|---|"]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.fault} | skipped: {r.skipped} |||||||||")
            continue
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "0"
        lines.append(f"| {r.fault} | {r.sent} | {r.refused} | {r.answered} | {errors} | {r.lost} | {r.duplicates} | "
                     f"{', '.join(r.exited) or 0} | {r.stall_s:.1f} | {r.recovery_s:.1f} | {_notes(r.details)} |")
    return "\n".join(lines)


def _notes(details: dict) -> str:
    shown = {k: v for k, v in details.items() if k not in ("not_rescued", "cut_queue") or v}
    return "; ".join(f"{k} {v}" for k, v in shown.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="shorter load around each fault (CI)")
    parser.add_argument("--only", nargs="+", choices=sorted(FAULTS), help="run only these faults")
    parser.add_argument("--rate", type=float, default=12.0, help="requests per second (default 12)")
    parser.add_argument("--ha", action="store_true",
                        help="the highly available topology: Redis with Sentinel, GPU workers on separate hosts "
                             "(network namespaces) where permitted; runs its faults unless --only says")
    parser.add_argument("--json", type=Path, help="also write the rows, with each fault's details, here")
    options = parser.parse_args()
    # SIGTERM (a test's deadline, Ctrl-C's cousin) ends the run through its finally: workers stopped,
    # servers it started stopped, the hosts it created removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if options.ha and not HA:
        sys.exit("--ha is read before the settings: run this module as a program (python -m bench.faults --ha)")
    before_s, after_s = (5.0, 10.0) if options.short else (15.0, 30.0)
    if options.ha:
        print(f"topology: Redis with Sentinel at {celeryconfig.sanitize(celeryconfig.broker_url)}, Nacos at "
              f"{celeryconfig.nacos_server_addresses}; "
              + ("GPU workers on this host and on separate hosts (network namespaces)" if NO_HOSTS is None
                 else f"every GPU worker on this host (no separate hosts: {NO_HOSTS})"), flush=True)

    from dispatcher import view as views
    from gpu_dispatch.celery import app

    log_dir = Path(os.environ.get("GPU_DISPATCH_FAULTS_LOGS") or Path(celeryconfig.home) / "faults-logs")
    for old in log_dir.glob("*.log"):
        old.unlink()
    rows = []
    rig = None
    try:
        rig = Rig(log_dir, ha=options.ha)
        for name in options.only or (HA_FAULTS if options.ha else PLAIN_FAULTS):
            why_not = unavailable(rig, name)
            if why_not:
                print(f"fault {name}: skipped: {why_not}")
                rows.append(Row(name, skipped=why_not))
                continue
            rig.up()
            wait_for_gpus(views.current_view(app, wait=60) or views.process_view(app), GPUS)
            rows.append(run_fault(rig, views.process_view(app), name, options.rate, before_s, after_s))
            rig.down()
    except ServerError as exc:
        sys.exit(f"a server could not start: {exc}")
    finally:
        if rig is not None:
            rig.close()
        app.backend.result_consumer.stop() if hasattr(app.backend, "result_consumer") else None
    print()
    print(table(rows))
    if options.json:
        options.json.write_text(json.dumps([{**asdict(r), "errors": dict(r.errors), "ok": r.ok} for r in rows],
                                           indent=2))
    sys.exit(0 if all(r.ok for r in rows) else 1)


if __name__ == "__main__":
    main()
