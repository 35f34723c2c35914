"""``gpu-dispatch demo``: real dispatch over four simulated GPUs, from nothing to a summary.

Brings up Redis and Nacos (if they are not already answering), four GPU
workers whose simulated GPUs carry different loads from other tenants (one
nearly full, one bursty, two nearly idle), celery beat, a central dispatcher
worker and Flower; sends prompts through ``dispatch_inference.delay`` with a
progress bar; prints requests per GPU, latency percentiles and how the share
of requests tracked free memory (a text chart, and a plot saved to a file);
then stops everything it started (``--keep`` leaves it running).

``--real-model``: three GPU workers, each fronting its own llama.cpp server
(llama-cpp-python, Gemma 3 270M, on loopback at the instance's port
GPU_DISPATCH_BASE_PORT + GPU index) with ``GPU_DISPATCH_BACKEND=openai``; about
30 real prompts; the summary also prints answers from several workers.  Needs
the ``real-model`` extra.

Exit status 1 if any request was lost (no result and no error on its
AsyncResult), 2 if the set-up failed.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from gpu_dispatch.celery import app
from gpu_dispatch.contract import gpu_queue
from gpu_dispatch_tools.processes import DISPATCHER_ENV, Supervisor, beat_argv, dispatcher_argv, flower_argv, flower_env, gpu_worker_argv
from gpu_dispatch.registry import Registry, RegistryError
from gpu_dispatch_tools.servers import local_servers

#: The simulated cluster: (GPU index, other tenants' profile).
GPUS = ((0, "nearly-full"), (1, "bursty"), (2, "idle"), (3, "idle"))
#: Settings the demo's processes run with: quick refreshes and requests long enough to build load.
DEMO_ENV = {"GPU_DISPATCH_REFRESH_INTERVAL": "1", "GPU_DISPATCH_SIM_MS_PER_TOKEN": "8",
            "GPU_DISPATCH_GPU_SOURCE": "simulated", "GPU_DISPATCH_WORKER_IP": "127.0.0.1"}
#: Inference slots per simulated GPU.
SLOTS = 4
#: Seconds to wait for every GPU to register.
REGISTER_TIMEOUT = 90.0

#: --real-model: fewer GPUs, each with a llama.cpp server (they share this machine's cores).
REAL_GPUS = ((0, "idle"), (1, "bursty"), (2, "idle"))
#: --real-model: inference slots per worker.  llama-cpp-python's server runs one request at a time,
#: so a second slot only queues at the server; two keep it busy without hiding load from the scoring.
REAL_SLOTS = 2
REAL_ENV = {"GPU_DISPATCH_BACKEND": "openai", "GPU_DISPATCH_MODEL_NAME": "gemma-3-270m"}
#: --real-model prompts (cycled).
REAL_PROMPTS = (
    "Explain in one sentence what a GPU does.",
    "Write a haiku about a queue of requests.",
    "What is the capital of Italy?",
    "Give two tips for writing clear error messages.",
    "Describe weighted random choice to a child.",
    "Name three planets of the solar system.",
    "What does a load balancer do?",
    "Complete the sentence: The best thing about caches is",
    "Translate 'good morning' into French.",
    "Why do servers keep logs?",
)

#: The settings (celeryconfig.py), as every part of gpu-dispatch reads them.
conf = app.conf


@dataclass
class Outcome:
    sent: int = 0
    answers: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lost: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    #: (seconds since start, {queue: free MiB}) samples of what Nacos said.
    free_memory: list[tuple[float, dict[str, int]]] = field(default_factory=list)


def run(prompts: int, rate: float, keep: bool, flower_port: int, plot: Path | None, console,
        real_model: bool = False) -> int:
    home = Path(conf.home)
    logs = home / "demo"
    supervisor = Supervisor(logs)
    started_servers = []
    model_servers: list = []
    gpus, slots = (REAL_GPUS, REAL_SLOTS) if real_model else (GPUS, SLOTS)
    console.print(f"[bold]gpu-dispatch demo[/bold]{' --real-model' if real_model else ''} — logs in {logs}")
    try:
        env = dict(DEMO_ENV)
        if real_model:
            env.update(REAL_ENV)
            model_servers = _start_model_servers(gpus, home, console)
        for server in local_servers(conf):
            already_up = server.answering()
            console.print(f"  {server.start(timeout=120)}")
            if not already_up:  # stop afterwards only what this run started
                started_servers.append(server)
        for gpu, tenants in gpus:
            supervisor.start(f"gpu{gpu}", gpu_worker_argv(gpu, slots, node=f"demo-gpu{gpu}@%h"),
                             {**env, "GPU_DISPATCH_SIM_TENANTS": tenants, "GPU_DISPATCH_SIM_SEED": str(gpu)})
        supervisor.start("beat", beat_argv(str(logs / "celerybeat-schedule")), env)
        supervisor.start("dispatcher", dispatcher_argv(node="demo-dispatcher@%h"), {**env, **DISPATCHER_ENV})
        supervisor.start("flower", flower_argv(flower_port), {**env, **flower_env("127.0.0.1")})
        console.print(f"  {len(gpus)} GPU workers ({', '.join(f'gpu{g}: {t}' for g, t in gpus)}), beat, a "
                      f"dispatcher worker and Flower (http://127.0.0.1:{flower_port}) starting ...")
        registry = Registry.from_config(conf)
        try:
            _wait_for_gpus(registry, supervisor, console, len(gpus))
            if real_model:
                outcome = _send(prompts, rate, registry, console,
                                prompt=lambda n: REAL_PROMPTS[n % len(REAL_PROMPTS)],
                                max_tokens=lambda n: 24, options={"temperature": 0.7}, timeout=300)
            else:
                outcome = _send(prompts, rate, registry, console)
        finally:
            registry.close()
        _summarise(outcome, console, plot, gpus)
        if real_model:
            _print_answers(outcome, console)
        if keep:
            console.print(f"\nStill running (--keep). Flower: http://127.0.0.1:{flower_port}  — stop with "
                          "Ctrl-C.")
            _wait_for_interrupt()
        return 1 if outcome.lost else 0
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 2
    finally:
        console.print("stopping the demo's processes ...")
        supervisor.stop_all()
        for model_server in model_servers:
            model_server.stop()
        if model_servers:
            console.print(f"  {len(model_servers)} model servers stopped")
        for server in started_servers:
            console.print(f"  {server.stop()}")


class DemoError(RuntimeError):
    pass


def _start_model_servers(gpus, home: Path, console) -> list:
    """One llama.cpp server per GPU worker, at the worker's instance port, on loopback; started in turn."""
    from gpu_dispatch_tools.model_server import ModelServer, ModelServerError, ensure_model, missing_extra

    problem = missing_extra()
    if problem:
        raise DemoError(problem)
    servers = []
    try:
        with console.status("assembling the model (first run only) ..."):
            model = ensure_model(home)
        for gpu, _ in gpus:
            server = ModelServer(conf.base_port + gpu, model, home, name=f"demo-gpu{gpu}",
                                 share=len(gpus), n_ctx=1024)
            servers.append(server)
            with console.status(f"starting the model server of gpu{gpu} on port {server.port} ..."):
                seconds = server.start()
            console.print(f"  model server of gpu{gpu}: {server.url} (Gemma 3 270M, llama.cpp, "
                          f"{server.n_threads} thread(s)) answered after {seconds:.1f} s; log {server.log_path}")
    except ModelServerError as exc:
        for server in servers:
            server.stop()
        raise DemoError(str(exc)) from None
    return servers


def _print_answers(outcome: "Outcome", console, per_gpu: int = 2) -> None:
    from rich.markup import escape

    console.print("\nanswers from the model servers (Gemma 3 270M; small, so not always sensible):")
    shown: Counter = Counter()
    for answer in outcome.answers:
        queue = answer["gpu"]["queue"]
        if shown[queue] >= per_gpu:
            continue
        shown[queue] += 1
        usage = answer.get("usage") or {}
        text = " ".join(answer["text"].split())
        console.print(f"  [bold]{queue}[/bold] ({usage.get('completion_tokens', '?')} tokens, first after "
                      f"{usage.get('ttft_ms', 0):.0f} ms): {escape(answer.get('prompt', ''))}")
        console.print(f"      → {escape(text[:160])}")


def _wait_for_gpus(registry: Registry, supervisor: Supervisor, console, count: int = len(GPUS)) -> None:
    deadline = time.monotonic() + REGISTER_TIMEOUT
    with console.status(f"waiting for the {count} GPUs to register in Nacos ..."):
        while time.monotonic() < deadline:
            if supervisor.dead():
                raise DemoError(f"{', '.join(supervisor.dead())} exited; see its log in {supervisor.log_dir}")
            try:
                if len(registry.list_instances()) >= count:
                    return
            except RegistryError:  # a Nacos that has just started may not take calls yet
                pass
            time.sleep(0.5)
    raise DemoError(f"the GPUs did not all register within {REGISTER_TIMEOUT:.0f} s; "
                    f"see the gpu*.log files in {supervisor.log_dir}")


def _send(prompts: int, rate: float, registry: Registry, console, prompt=None, max_tokens=None,
          options: dict | None = None, timeout: float = 120) -> Outcome:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dispatcher import dispatch_inference

    outcome = Outcome()
    start = time.time()
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.5):
            try:
                view = {i.metadata.get("queue", i.key): int(i.metadata.get("memory_free_mb", 0))
                        for i in registry.list_instances()}
            except Exception:  # a missed sample only thins the plot
                continue
            outcome.free_memory.append((time.time() - start, view))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    pending = []
    with Progress(*columns, console=console) as progress:
        sending = progress.add_task("sending ", total=prompts)
        answered = progress.add_task("answered", total=prompts)
        for n in range(prompts):
            sent_at = time.time()
            text = prompt(n) if prompt else f"demo prompt {n}: explain GPU dispatch"
            tokens = max_tokens(n) if max_tokens else 24 + n % 16
            pending.append((sent_at, text, dispatch_inference.delay(text, max_tokens=tokens, **(options or {}))))
            outcome.sent += 1
            progress.advance(sending)
            time.sleep(max(0.0, start + (n + 1) / rate - time.time()))
        for sent_at, text, result in pending:
            try:
                answer = result.get(timeout=timeout)
            except Exception as exc:  # an error on the AsyncResult is an answer, not a loss
                if type(exc).__name__ == "TimeoutError":
                    outcome.lost += 1
                else:
                    outcome.errors.append(f"{type(exc).__name__}: {exc}")
            else:
                answer["sent_s"] = sent_at - start
                answer["prompt"] = text
                outcome.answers.append(answer)
                outcome.latencies_ms.append((answer["timings"]["finished_at"] - sent_at) * 1000)
            progress.advance(answered)
    stop_sampling.set()
    sampler.join(2)
    return outcome


def _summarise(outcome: Outcome, console, plot: Path | None, gpus=GPUS) -> None:
    from rich.table import Table

    per_gpu = Counter(a["gpu"]["queue"] for a in outcome.answers)
    queues = sorted({q for _, view in outcome.free_memory for q in view} | set(per_gpu))
    mean_free = {q: statistics.fmean(view.get(q, 0) for _, view in outcome.free_memory) if outcome.free_memory
                 else 0.0 for q in queues}
    total_free = sum(mean_free.values()) or 1.0
    latency = defaultdict(list)
    for answer, ms in zip(outcome.answers, outcome.latencies_ms):
        latency[answer["gpu"]["queue"]].append(ms)
    tenants = {gpu_queue(DEMO_ENV["GPU_DISPATCH_WORKER_IP"], conf.base_port + g): t for g, t in gpus}

    table = Table(title=f"{len(outcome.answers)} answered, {len(outcome.errors)} errors, {outcome.lost} lost "
                        f"of {outcome.sent} sent")
    for column in ("GPU queue", "tenants", "requests", "share", "mean free MiB", "free share", "p50 ms",
                   "p99 ms"):
        table.add_column(column, justify="left" if column in {"GPU queue", "tenants"} else "right")
    answered = max(1, len(outcome.answers))
    for q in queues:
        table.add_row(q, tenants.get(q, "?"), str(per_gpu[q]), f"{per_gpu[q] / answered:.1%}",
                      f"{mean_free[q]:.0f}", f"{mean_free[q] / total_free:.1%}", _pct(latency[q], 50),
                      _pct(latency[q], 99))
    table.add_row("all", "", str(len(outcome.answers)), "100%", "", "", _pct(outcome.latencies_ms, 50),
                  _pct(outcome.latencies_ms, 99), style="bold")
    console.print(table)

    console.print("\nshare of requests (█) against share of free memory (░), per GPU:")
    for q in queues:
        share, free = per_gpu[q] / answered, mean_free[q] / total_free
        console.print(f"  {q:<20} {'█' * round(share * 50):<50} {share:6.1%}")
        console.print(f"  {'':<20} {'░' * round(free * 50):<50} {free:6.1%}")
    for error in outcome.errors[:5]:
        console.print(f"[red]error:[/red] {error}")
    if plot is not None:
        _plot(outcome, queues, tenants, plot, console)


def _pct(values: list[float], pct: int) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]:.0f}"


def _plot(outcome: Outcome, queues: list[str], tenants: dict[str, str], path: Path, console) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("(no plot: matplotlib is not installed; pip install 'gpu-dispatch[bench]')")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for q in queues:
        label = f"{q} ({tenants.get(q, '?')})"
        top.plot([t for t, _ in outcome.free_memory], [v.get(q, 0) / 1024 for _, v in outcome.free_memory],
                 label=label)
        times = sorted(a["sent_s"] for a in outcome.answers if a["gpu"]["queue"] == q)
        bottom.plot(times, range(1, len(times) + 1), label=label)
    top.set_ylabel("free memory in Nacos (GiB)")
    bottom.set_ylabel("requests sent there (cumulative)")
    bottom.set_xlabel("seconds since the first request")
    top.legend(fontsize="small")
    top.set_title("gpu-dispatch demo: requests follow free memory")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    console.print(f"plot saved to {path}")


def _wait_for_interrupt() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def default_plot_path() -> Path:
    return Path(os.path.join(conf.home, "demo", "demo.png"))
