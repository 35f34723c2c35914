"""Shared-prefix workload over real llama.cpp servers: how much placement matters to TTFT.

    python -m bench.real_model [--servers 3] [--requests 48] [--rate 0.5] [--rounds 2] [--policies all]

Starts ``--servers`` llama.cpp servers (llama-cpp-python, Gemma 3 270M; the
``real-model`` extra) on loopback at GPU_DISPATCH_BASE_PORT + i, and sends the
same workload through each policy, every server restarted (cold caches) before
each policy:

- a **workload** of ``--requests`` requests at seeded Poisson arrivals of
  ``--rate`` per second; each is one of 8 system prompts of ~500 tokens (picked
  at random, seeded) followed by a short user turn, ``--max-tokens`` answered;
- **round-robin**: request i goes to server i mod N at its arrival (straight to
  the servers, no Celery);
- **shared-queue**: one queue; each server pulls the next request when it is
  free (one in flight per server; straight to the servers);
- **default**: ``dispatch_inference.delay(prompt)`` through real gpu-dispatch:
  Redis, Nacos, beat, one GPU worker per server with GPU_DISPATCH_BACKEND=openai;
- **affinity**: the same with ``affinity_key=<system prompt id>``.  If dispatch
  refuses the option, the policy is reported as unavailable; if it accepts it
  but does not keep a key on one GPU, the stickiness column shows it.

TTFT and total latency are measured from each request's arrival (a wait in a
queue, the broker's or the server's, counts).  "prefix hits" is the share of
requests whose system prompt was already in their server's KV state or prompt
cache (from the servers' own log lines: ``Llama.generate: N prefix-match hit``
with N of at least 400 tokens), which depends on placement only, not on how busy
the machine is.  Each policy runs ``--rounds`` times, interleaved, and the round
with the lowest TTFT p50 is kept (least disturbed by the rest of the machine).  Through gpu-dispatch, TTFT is
the total latency less the backend's own time after its first token
(``total_ms - ttft_ms`` of the usage it returns).  Results go to
docs/real-model.md by hand.  Redis and Nacos: GPU_DISPATCH_BROKER_URL,
GPU_DISPATCH_RESULT_BACKEND and GPU_DISPATCH_NACOS_SERVER (bench ports by default);
``--policies round-robin,shared-queue`` needs neither.
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import random
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# Servers of our own, away from a developer's (6379/8848) and the tests' (16399/18848).
os.environ.setdefault("GPU_DISPATCH_BROKER_URL", "redis://127.0.0.1:16599/0")
os.environ.setdefault("GPU_DISPATCH_RESULT_BACKEND", "redis://127.0.0.1:16599/1")
os.environ.setdefault("GPU_DISPATCH_NACOS_SERVER", "127.0.0.1:18868")
os.environ.setdefault("GPU_DISPATCH_NACOS_SERVICE", "gpu-inference-bench-real")

import celeryconfig  # noqa: E402
from gpu_dispatch_tools.model_server import ModelServer, ensure_model, missing_extra  # noqa: E402
from workers.backends import BackendError, OpenAIBackend  # noqa: E402

POLICIES = ("round-robin", "shared-queue", "default", "affinity")
SYSTEM_PROMPTS = 8
_TOPICS = ("GPU scheduling", "database tuning", "network security", "compiler design", "gardening",
           "astronomy", "cooking", "music theory")
_RULES = ("Answer briefly and precisely.", "Prefer plain words over jargon.", "Say when you are unsure.",
          "Give one example when it helps.", "Never invent facts or figures.", "Keep a friendly tone.",
          "Use the metric system.", "Mention safety concerns first.", "Quote units with every number.",
          "End with a one-line summary.")


def system_prompt(k: int, target_words: int = 315) -> str:
    """System prompt ``k`` of about 500 Gemma tokens (~315 words), distinct from the first word on."""
    rng = random.Random(1000 + k)
    words = [f"System prompt {k}. You are the assistant of team {k}, expert in {_TOPICS[k % len(_TOPICS)]}."]
    count = len(words[0].split())
    while count < target_words:
        sentence = f"Rule {len(words)}: {rng.choice(_RULES)} Topic note: {_TOPICS[rng.randrange(len(_TOPICS))]} " \
                   f"case {rng.randrange(1000)} is handled with care."
        words.append(sentence)
        count += len(sentence.split())
    return " ".join(words)


@dataclass
class Request:
    n: int
    at: float      #: seconds after the start
    key: int       #: system prompt index
    prompt: str


def workload(requests: int, rate: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    prompts = [system_prompt(k) for k in range(SYSTEM_PROMPTS)]
    t, out = 0.0, []
    for n in range(requests):
        key = rng.randrange(SYSTEM_PROMPTS)
        out.append(Request(n, t, key, f"{prompts[key]}\n\nUser: question {n}: what should I check first?\n"
                                      "Assistant:"))
        t += rng.expovariate(rate)
    return out


@dataclass
class Result:
    policy: str
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    placement: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))
    note: str = ""
    wall_s: float = 0.0
    prefix_hits: int = 0

    def spread(self) -> str:
        """Requests per server, e.g. ``17/16/15``."""
        per_server = Counter()
        for counts in self.placement.values():
            per_server.update(counts)
        return "/".join(str(per_server[i]) for i in sorted(per_server))

    def stickiness(self) -> float:
        """Share of requests that went to their system prompt's most used server."""
        total = sum(sum(c.values()) for c in self.placement.values())
        return sum(max(c.values()) for c in self.placement.values()) / total if total else 0.0


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else float("nan")


# -- policies straight to the servers --------------------------------------------------------------


def run_direct(policy: str, reqs: list[Request], servers: list[ModelServer], max_tokens: int) -> Result:
    result = Result(policy)
    backends = [OpenAIBackend(s.completions_url, s.alias, 3.0, 600.0) for s in servers]
    lock = threading.Lock()
    start = time.monotonic() + 0.5

    def serve(req: Request, index: int) -> None:
        try:
            _, usage = backends[index].complete(req.prompt, max_tokens=max_tokens, temperature=0.0)
        except BackendError as exc:
            with lock:
                result.errors.append(str(exc))
            return
        done = time.monotonic()
        arrival = start + req.at
        with lock:
            result.total_ms.append((done - arrival) * 1000)
            result.ttft_ms.append((done - arrival) * 1000 - (usage["total_ms"] - usage.get("ttft_ms", 0)))
            result.placement[req.key][index] += 1

    threads = []
    if policy == "round-robin":
        for req in reqs:
            _sleep_until(start + req.at)
            thread = threading.Thread(target=serve, args=(req, req.n % len(servers)))
            thread.start()
            threads.append(thread)
    else:  # shared-queue: arrivals go into one queue; each server's puller takes the next when free
        pending: queue.Queue = queue.Queue()

        def puller(index: int) -> None:
            while (req := pending.get()) is not None:
                serve(req, index)

        threads = [threading.Thread(target=puller, args=(i,)) for i in range(len(servers))]
        for thread in threads:
            thread.start()
        for req in reqs:
            _sleep_until(start + req.at)
            pending.put(req)
        for _ in servers:
            pending.put(None)
    for thread in threads:
        thread.join()
    result.wall_s = time.monotonic() - start
    for backend in backends:
        backend.close()
    return result


# -- policies through gpu-dispatch ------------------------------------------------------------------


def run_dispatch(policy: str, reqs: list[Request], servers: list[ModelServer], max_tokens: int) -> Result:
    from dispatcher import dispatch_inference

    result = Result(policy)
    ports = {s.port: i for i, s in enumerate(servers)}
    pending = []
    start = time.monotonic() + 0.5
    wall_start = time.time() + (start - time.monotonic())
    for req in reqs:
        _sleep_until(start + req.at)
        options = {"max_tokens": max_tokens, "temperature": 0.0}
        if policy == "affinity":
            options["affinity_key"] = f"system-{req.key}"
        try:
            pending.append((req, dispatch_inference.delay(req.prompt, **options)))
        except Exception as exc:  # dispatch refused the option: the policy is not there yet
            if policy == "affinity":
                result.note = f"unavailable: dispatch_inference refused affinity_key ({type(exc).__name__}: {exc})"
                return result
            raise
    for req, async_result in pending:
        try:
            answer = async_result.get(timeout=900)
        except Exception as exc:
            if policy == "affinity" and "affinity" in str(exc) and not result.total_ms:
                result.note = f"unavailable: {type(exc).__name__}: {exc}"
                return result
            result.errors.append(f"{type(exc).__name__}: {exc}")
            continue
        usage = answer.get("usage") or {}
        total = (answer["timings"]["finished_at"] - (wall_start + req.at)) * 1000
        result.total_ms.append(total)
        result.ttft_ms.append(total - (usage.get("total_ms", 0) - usage.get("ttft_ms", 0)))
        result.placement[req.key][ports.get(answer["gpu"]["port"], -1)] += 1
    result.wall_s = time.monotonic() - start
    if policy == "affinity" and result.total_ms and result.stickiness() < 0.9:
        result.note = (f"affinity_key accepted but not honoured: only {result.stickiness():.0%} of requests "
                       "went to their system prompt's usual GPU")
    return result


class Cluster:
    """Redis, Nacos, beat and one GPU worker per model server, for the gpu-dispatch policies."""

    def __init__(self, gpus: int, slots: int, log_dir: Path) -> None:
        from gpu_dispatch_tools.processes import Supervisor
        from gpu_dispatch_tools.servers import local_servers

        self.gpus, self.slots = gpus, slots
        self.supervisor = Supervisor(log_dir)
        self.servers = local_servers(celeryconfig)
        self.started: list = []

    def start(self) -> None:
        from gpu_dispatch_tools.processes import beat_argv, gpu_worker_argv
        from gpu_dispatch.registry import Registry, RegistryError

        for server in self.servers:
            if not server.answering():
                print(f"  {server.start(timeout=120)}")
                self.started.append(server)
        env = {"GPU_DISPATCH_GPU_SOURCE": "simulated", "GPU_DISPATCH_WORKER_IP": "127.0.0.1",
               "GPU_DISPATCH_BACKEND": "openai", "GPU_DISPATCH_MODEL_NAME": "gemma-3-270m",
               "GPU_DISPATCH_REFRESH_INTERVAL": "1", "GPU_DISPATCH_METRICS_PORT": "0",
               "GPU_DISPATCH_OPENAI_READ_TIMEOUT": "600"}
        for gpu in range(self.gpus):
            self.supervisor.start(f"gpu{gpu}", gpu_worker_argv(gpu, self.slots, node=f"bench-real-gpu{gpu}@%h",
                                                               loglevel="warning"), env)
        self.supervisor.start("beat", beat_argv(str(self.supervisor.log_dir / "celerybeat-schedule"),
                                                loglevel="warning"), env)
        registry = Registry.from_config(celeryconfig)
        try:
            deadline = time.monotonic() + 90
            while True:
                if self.supervisor.dead() or time.monotonic() > deadline:
                    raise SystemExit(f"GPU workers did not register; see {self.supervisor.log_dir}")
                try:
                    if len(registry.list_instances()) >= self.gpus:
                        break
                except RegistryError:  # a Nacos that has just started may not take calls yet
                    pass
                time.sleep(0.5)
        finally:
            registry.close()

    def stop(self) -> None:
        self.supervisor.stop_all()
        for server in self.started:
            print(f"  {server.stop()}")


_PREFIX_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit")
#: Tokens of reused prefix that make a hit: a system prompt is ~500, a user turn ~15.
HIT_TOKENS = 400


def log_offsets(servers: list[ModelServer]) -> list[int]:
    return [s.log_path.stat().st_size if s.log_path.exists() else 0 for s in servers]


def prefix_hits(servers: list[ModelServer], offsets: list[int]) -> int:
    hits = 0
    for server, offset in zip(servers, offsets):
        with open(server.log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        hits += sum(int(n) >= HIT_TOKENS for n in _PREFIX_HIT.findall(text))
    return hits


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=3, help="llama.cpp servers (default 3)")
    parser.add_argument("--requests", type=int, default=48, help="requests per policy (default 48)")
    parser.add_argument("--rate", type=float, default=0.5, help="arrivals per second (default 0.5)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--slots", type=int, default=2, help="inference slots per GPU worker (default 2)")
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per server (default: cores / servers, at least 1)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the best kept per policy (default 2)")
    parser.add_argument("--policies", default="all", help=f"comma-separated of {', '.join(POLICIES)} (default all)")
    args = parser.parse_args()
    policies = POLICIES if args.policies == "all" else tuple(p.strip() for p in args.policies.split(","))
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies: {', '.join(sorted(unknown))}")
    problem = missing_extra()
    if problem:
        sys.exit(problem)

    home = Path(celeryconfig.home)
    model = ensure_model(home)
    reqs = workload(args.requests, args.rate, args.seed)
    servers = [ModelServer(celeryconfig.base_port + i, model, home, name=f"bench-gpu{i}", share=args.servers,
                           n_threads=args.threads, n_ctx=args.n_ctx) for i in range(args.servers)]
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}; {args.servers} "
          f"servers on ports {servers[0].port}-{servers[-1].port}, {servers[0].n_threads} thread(s) each; "
          f"{args.requests} requests at {args.rate}/s, {SYSTEM_PROMPTS} system prompts, "
          f"max_tokens {args.max_tokens}, seed {args.seed}")
    cluster = None
    best: dict[str, Result] = {}
    try:
        if any(p in ("default", "affinity") for p in policies):
            cluster = Cluster(args.servers, args.slots, home / "bench-real-model")
        for round_ in range(1, args.rounds + 1):
            for policy in policies:
                for server in servers:  # cold caches for every policy
                    server.stop()
                    server.start()
                offsets = log_offsets(servers)
                if policy in ("default", "affinity"):
                    if not cluster.supervisor.procs:
                        cluster.start()
                    result = run_dispatch(policy, reqs, servers, args.max_tokens)
                else:
                    result = run_direct(policy, reqs, servers, args.max_tokens)
                result.prefix_hits = prefix_hits(servers, offsets)
                print(f"round {round_}: {_row(result)}", flush=True)
                kept = best.get(policy)
                if kept is None or not kept.ttft_ms or (result.ttft_ms and pct(result.ttft_ms, 50) < pct(kept.ttft_ms, 50)):
                    best[policy] = result
    finally:
        if cluster is not None:
            cluster.stop()
        for server in servers:
            server.stop()
    print(f"\nbest of {args.rounds} round(s):\n")
    print("| policy | requests | per server | prefix hits | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms "
          "| wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for policy in policies:
        print(_row(best[policy]))
    for policy in policies:
        if best[policy].note:
            print(f"\n{policy}: {best[policy].note}")


def _row(r: Result) -> str:
    if not r.total_ms:
        return f"| {r.policy} | 0 | {r.note or '; '.join(r.errors[:1]) or 'no result'} | | | | | | |"
    note = " (see below)" if r.note else ""
    errors = f", {len(r.errors)} errors" if r.errors else ""
    return (f"| {r.policy}{note} | {len(r.total_ms)}{errors} | {r.spread()} | {r.prefix_hits / len(r.total_ms):.0%} | "
            f"{pct(r.ttft_ms, 50):.0f} | {pct(r.ttft_ms, 99):.0f} | {pct(r.total_ms, 50):.0f} | "
            f"{pct(r.total_ms, 99):.0f} | {r.wall_s:.0f} |")


if __name__ == "__main__":
    main()
