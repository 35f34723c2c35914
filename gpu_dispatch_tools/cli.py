"""``gpu-dispatch``: the command-line tool.

Follows Celery's own conventions (click, one sub-command per role, ``--help``
everywhere).  Settings come from environment variables (see ``gpu-dispatch
config``).
"""

from __future__ import annotations

import os
import sys
import time

import click

import celeryconfig
from gpu_dispatch.celery import app
from gpu_dispatch.contract import SIMULATED_TENANTS
from gpu_dispatch_tools.processes import DISPATCHER_ENV, beat_argv, dispatcher_argv, flower_argv, flower_env, gpu_worker_argv
from gpu_dispatch_tools.servers import ServerError, local_ha_servers, local_servers
from scoring import PROFILES

#: The settings (celeryconfig.py), as every part of gpu-dispatch reads them.
conf = app.conf


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """GPU-aware dispatch of inference work over Celery, with Nacos as the live registry of GPUs."""


@main.group()
def servers() -> None:
    """Start, stop and report the local Redis and Nacos servers."""


_HA = click.option("--ha", is_flag=True,
                   help="The highly available topology instead: Redis with Sentinel (a primary, a replica, three "
                        "sentinels; GPU_DISPATCH_BROKER_URL's sentinel:// URL, else the default one) and Nacos as a "
                        "3-node cluster (the three addresses of GPU_DISPATCH_NACOS_SERVER, or its one port and the "
                        "next two 20 apart).")


def _local_servers(ha: bool):
    try:
        return local_ha_servers(conf) if ha else local_servers(conf)
    except ServerError as exc:
        raise click.ClickException(str(exc)) from None


@servers.command("up")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for each server to answer.")
@_HA
def servers_up(timeout: float, ha: bool) -> None:
    """Start Redis and Nacos on this machine unless they already answer (installs them the first time).

    Nacos runs with auth on, its admin being GPU_DISPATCH_NACOS_USERNAME / GPU_DISPATCH_NACOS_PASSWORD,
    when those are set; with auth off otherwise.
    """
    try:
        for server in _local_servers(ha):
            click.echo(server.start(timeout=timeout))
    except ServerError as exc:
        raise click.ClickException(str(exc)) from None
    if ha:
        _ha_client_hint()


def _ha_client_hint() -> None:
    """What clients must be told when the settings do not name the Sentinel set yet."""
    from gpu_dispatch_tools.servers import ha_redis

    if not celeryconfig.broker_url.startswith("sentinel://"):
        redis_set = ha_redis(celeryconfig)
        click.echo("clients reach it with:\n"
                   f"  export GPU_DISPATCH_BROKER_URL='{celeryconfig.sanitize(redis_set.url(0))}'\n"
                   f"  export GPU_DISPATCH_RESULT_BACKEND='{celeryconfig.sanitize(redis_set.url(1))}'\n"
                   f"  export GPU_DISPATCH_SENTINEL_MASTER={redis_set.master_name}")


@servers.command("install")
def servers_install() -> None:
    """Install the servers' programs if missing (redis-server with apt-get; the Nacos server with Maven)."""
    try:
        for server in _local_servers(False):
            server.ensure_installed()
            click.echo(f"{server.name}: {server.installed_as()}")
    except ServerError as exc:
        raise click.ClickException(str(exc)) from None


@servers.command("down")
@_HA
def servers_down(ha: bool) -> None:
    """Stop the servers that `gpu-dispatch servers up` started; others are left alone."""
    for server in _local_servers(ha):
        click.echo(server.stop())


@servers.command("status")
@_HA
def servers_status(ha: bool) -> None:
    """Say whether each server answers, and whether gpu-dispatch started it."""
    statuses = []
    for server in _local_servers(ha):
        status = server.status()
        statuses.extend(status if isinstance(status, list) else [status])
    for status in statuses:
        click.echo(status.line())
    sys.exit(0 if all(s.answering for s in statuses) else 1)


@main.command("worker", context_settings={"ignore_unknown_options": True})
@click.option("--gpu", "gpu", type=click.IntRange(min=0), required=True, help="Index of the GPU this worker serves.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=None,
              help="Inference slots [default: GPU_DISPATCH_MAX_CONCURRENCY].")
@click.option("--tenants", type=click.Choice(list(SIMULATED_TENANTS)), default=None,
              help="Other tenants' load on a simulated GPU [default: GPU_DISPATCH_SIM_TENANTS].")
@click.option("--simulated", is_flag=True, help="Use a simulated GPU even where NVML answers.")
@click.option("--real-model", is_flag=True,
              help="Serve with the local llama.cpp server of this GPU (`gpu-dispatch model-server --gpu N`): "
                   "GPU_DISPATCH_BACKEND=openai, GPU_DISPATCH_MODEL_NAME=gemma-3-270m.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(gpu: int, concurrency: int | None, tenants: str | None, simulated: bool, real_model: bool,
           celery_args) -> None:
    """Run the Celery worker of one GPU (extra arguments go to `celery worker`).

    The same as: celery -A gpu_dispatch worker --gpu N --pool threads --concurrency C -n gpuN@%h
    """
    env = {}
    if tenants:
        env["GPU_DISPATCH_SIM_TENANTS"] = tenants
    if simulated:
        env["GPU_DISPATCH_GPU_SOURCE"] = "simulated"
    if real_model:
        from gpu_dispatch_tools.model_server import MODEL_ALIAS

        env.update(GPU_DISPATCH_BACKEND="openai", GPU_DISPATCH_MODEL_NAME=MODEL_ALIAS)
        port = conf.base_port + gpu
        url = conf.openai_url or f"http://{conf.worker_ip or '127.0.0.1'}:{port}/v1/completions"
        from workers.backends import OpenAIBackend

        probe = OpenAIBackend(url, MODEL_ALIAS, conf.openai_connect_timeout, 5.0)
        problem = probe.health()
        probe.close()
        if problem:
            click.echo(f"warning: {problem}\n  start it with: gpu-dispatch model-server --gpu {gpu}", err=True)
    argv = gpu_worker_argv(gpu, concurrency or conf.max_concurrency) + list(celery_args)
    _exec(argv, env)


@main.command("dispatcher", context_settings={"ignore_unknown_options": True})
@click.option("--concurrency", "-c", type=int, default=4, show_default=True, help="Dispatch threads.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def dispatcher(concurrency: int, celery_args) -> None:
    """Run a central dispatcher worker: the dispatch queue, no-GPU retries, orphan rescue, /metrics.

    The same as: celery -A gpu_dispatch worker -Q dispatch --pool threads -c 4 --prefetch-multiplier 8
    """
    _exec(dispatcher_argv(concurrency) + list(celery_args), DISPATCHER_ENV)


@main.command("beat")
def beat() -> None:
    """Run celery beat, which sends refresh_gpu_metadata to every GPU worker each refresh interval."""
    _exec(beat_argv(conf.beat_schedule_filename), {})


@main.command("flower")
@click.option("--port", default=5555, show_default=True, help="Port of Flower's web UI.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address Flower listens on.")
def flower(port: int, address: str) -> None:
    """Run Flower to watch dispatch and inference tasks (task events are on)."""
    _exec(flower_argv(port, address), flower_env(address))


def _exec(argv: list[str], env: dict[str, str]) -> None:
    """Replace this process with ``argv``: Ctrl-C and signals reach Celery itself, nothing is left behind."""
    os.environ.update(env)
    os.execv(argv[0], argv)


@main.command("status")
@click.option("--once", is_flag=True, help="Print one snapshot and exit instead of refreshing.")
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as JSON (for scripts) and exit.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--profile", type=click.Choice(sorted(PROFILES)), default=conf.dispatch_profile,
              show_default=True, help="Scoring profile to score with (default: GPU_DISPATCH_PROFILE).")
def status(once: bool, as_json: bool, interval: float, profile: str) -> None:
    """Every registry entry: reading, ledger load (running, queued, held memory), age, score, probability,
    and why an entry is excluded.

    Scored as the dispatcher scores a request that does not say its memory
    (GPU_DISPATCH_REQUEST_MEMORY_MB), with its reading age limit (GPU_DISPATCH_MAX_READING_AGE).
    """
    import json

    from rich.console import Console
    from rich.live import Live

    from dispatcher.view import RegistryView
    from gpu_dispatch.registry import RegistryError
    from gpu_dispatch_tools.status import render, snapshot
    from scoring import Request, get_profile

    scoring_profile = get_profile(profile, conf.max_reading_age)
    request = Request(memory_mb=conf.request_memory_mb)
    view = RegistryView.from_config(conf, dispatch_profile=profile)
    try:
        registry = view.open_registry()
    except RegistryError as exc:
        raise click.ClickException(f"{exc}\nIs Nacos up? (gpu-dispatch servers status)") from None

    def take():
        view.apply(registry.list_instances(healthy_only=False), "list")
        view.refresh()
        return snapshot(view, scoring_profile, request)

    try:
        if as_json:
            click.echo(json.dumps(take(), indent=2))
            return
        console = Console()
        if once:
            console.print(render(take()))
            return
        with Live(render(take()), console=console) as live:
            while True:
                time.sleep(interval)
                live.update(render(take()))
    except KeyboardInterrupt:
        pass
    finally:
        view.close()


@main.command("demo")
@click.option("--prompts", type=int, default=None,
              help="Prompts to send [default: 300; 30 with --real-model].")
@click.option("--rate", type=float, default=None,
              help="Prompts sent per second [default: 20, which the 4 GPUs serve at about 25; 1 with --real-model].")
@click.option("--keep", is_flag=True, help="Leave everything running afterwards (Ctrl-C stops it).")
@click.option("--flower-port", default=5555, show_default=True, help="Port of Flower's web UI.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Where to save the plot [default: <GPU_DISPATCH_HOME>/demo/demo.png].")
@click.option("--real-model", is_flag=True,
              help="Three GPU workers, each fronting its own llama.cpp server with Gemma 3 270M "
                   "(needs the real-model extra).")
def demo(prompts: int | None, rate: float | None, keep: bool, flower_port: int, plot: str | None,
         real_model: bool) -> None:
    """Real dispatch over four simulated GPUs: servers, workers, beat, dispatcher, Flower, prompts, summary."""
    from pathlib import Path

    from rich.console import Console

    from gpu_dispatch_tools.demo import default_plot_path, run

    prompts = prompts if prompts is not None else 30 if real_model else 300
    rate = rate if rate is not None else 1.0 if real_model else 20.0
    if prompts < 1 or rate <= 0:
        raise click.BadParameter("--prompts must be at least 1 and --rate above 0")
    sys.exit(run(prompts, rate, keep, flower_port, Path(plot) if plot else default_plot_path(), Console(),
                 real_model=real_model))


@main.command("model-server")
@click.option("--gpu", "gpu", type=int, required=True,
              help="GPU index of the worker it serves: it listens on GPU_DISPATCH_BASE_PORT + this.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Listen address (its API has no auth: keep it on loopback unless the network is trusted).")
@click.option("--port", type=int, default=None, help="Port [default: GPU_DISPATCH_BASE_PORT + --gpu].")
@click.option("--n-ctx", default=2048, show_default=True, help="Context size in tokens.")
@click.option("--threads", type=int, default=None, help="CPU threads [default: half this machine's cores].")
@click.option("--gpu-layers", default=0, show_default=True,
              help="Layers offloaded to the GPU (-1: all; needs llama-cpp-python built with CUDA).")
@click.option("--cache-mb", default=512, show_default=True, help="RAM prompt cache (--cache); 0 turns it off.")
def model_server(gpu: int, host: str, port: int | None, n_ctx: int, threads: int | None, gpu_layers: int,
                 cache_mb: int) -> None:
    """Run the llama.cpp server (llama-cpp-python, Gemma 3 270M) of one GPU worker, in the foreground.

    Pair it with `gpu-dispatch worker --gpu N --real-model`. The same as:
    python -m llama_cpp.server --model <GPU_DISPATCH_HOME>/models/gemma-3-270m-q4_k_m.gguf --port P ...
    """
    from gpu_dispatch_tools.model_server import ModelServer, ModelServerError, ensure_model

    try:
        model = ensure_model(conf.home)
    except ModelServerError as exc:
        raise click.ClickException(str(exc)) from None
    server = ModelServer(port or conf.base_port + gpu, model, conf.home, host=host,
                         n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers, cache_bytes=cache_mb << 20)
    click.echo(f"model server of gpu{gpu}: {server.completions_url} (Ctrl-C stops it)", err=True)
    _exec(server.argv(), {})


@main.command("dead-letters")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON lines.")
@click.option("--clear", is_flag=True, help="Empty the list after printing it.")
@click.option("--limit", default=50, show_default=True, help="Newest entries to print.")
def dead_letters(as_json: bool, clear: bool, limit: int) -> None:
    """Messages a worker could not read (injected, malformed, pickled), set aside with why."""
    import json

    from gpu_dispatch import broker
    from gpu_dispatch.transport import DEAD_LETTER_KEY

    client = broker.client(conf.broker_url, conf.broker_transport_options)
    entries = [json.loads(raw) for raw in client.lrange(DEAD_LETTER_KEY, 0, limit - 1)]
    for entry in entries:
        if as_json:
            click.echo(json.dumps(entry))
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["at"]))
            click.echo(f"{when}  {entry['queue']}: {entry['reason']}\n    {entry['message'][:200]}")
    total = client.llen(DEAD_LETTER_KEY)
    if not as_json:
        click.echo(f"{total} set aside in {DEAD_LETTER_KEY}" + (f" (newest {len(entries)} shown)" if total > limit
                                                               else ""))
    if clear:
        client.delete(DEAD_LETTER_KEY)


@main.command("config")
@click.option("--markdown", is_flag=True, help="Print the reference table of docs/configuration.md instead.")
@click.option("--metadata", is_flag=True, help="Print the instance metadata table of docs/metadata.md instead.")
def config(markdown: bool, metadata: bool) -> None:
    """Print every setting: environment variable, value in force, default, unit and meaning."""
    if markdown:
        click.echo(config_reference())
        return
    if metadata:
        click.echo(metadata_reference())
        return
    for setting in celeryconfig.SETTINGS.values():
        value = os.environ.get(setting.env, setting.default)
        value = "***" if "PASSWORD" in setting.env and value else celeryconfig.sanitize(value)
        click.echo(f"{setting.env}={value}")
        click.echo(f"    {setting.meaning} [{setting.unit}; default {celeryconfig.sanitize(setting.default)!r}]")


def metadata_reference() -> str:
    """The instance metadata contract as Markdown tables (docs/metadata.md embeds them; a test keeps them equal)."""
    from gpu_dispatch import contract

    lines = ["| key | example | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | `{example}` | {meaning} |" for key, (example, meaning) in contract.METADATA_KEYS.items()]
    lines += ["", "Published only when there is something to say:", "", "| key | example | meaning |",
              "| --- | --- | --- |"]
    lines += [f"| `{key}` | `{example}` | {meaning} |"
              for key, (example, meaning) in contract.OPTIONAL_METADATA_KEYS.items()]
    return "\n".join(lines)


def config_reference() -> str:
    """The settings as a Markdown table (docs/configuration.md embeds it; a test keeps the two equal)."""
    home_default = celeryconfig.SETTINGS["GPU_DISPATCH_HOME"].default
    lines = ["| variable | default | unit | meaning |", "| --- | --- | --- | --- |"]
    for s in celeryconfig.SETTINGS.values():
        default = "`.local/` beside conf.py" if s.default == home_default else f"`{s.default}`"
        if s.env == "GPU_DISPATCH_RESULT_BACKEND":
            default = "the broker URL"
        lines.append(f"| `{s.env}` | {default or '(empty)'} | {s.unit} | {s.meaning.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
