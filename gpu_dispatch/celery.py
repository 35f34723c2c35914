"""The Celery application: ``celery -A gpu_dispatch worker ...`` finds it here.

Settings come from ``celeryconfig.py`` (environment variables).  The worker
roles are bootsteps named here by their path, so importing the app (what an
application does) loads no worker code: ``--gpu N`` makes a worker a GPU
worker (:mod:`workers.steps`), consuming ``dispatch`` makes it a dispatcher
worker (:mod:`dispatcher.steps`).
"""

from celery import Celery
from click import Option
from kombu.transport import TRANSPORT_ALIASES

# redis:// and sentinel:// URLs get kombu's transports with two faults worked around
# (gpu_dispatch/transport.py); the URLs, and what logs show of them, stay as they are.
TRANSPORT_ALIASES.update(redis="gpu_dispatch.transport:Transport", sentinel="gpu_dispatch.transport:SentinelTransport")

app = Celery("gpu_dispatch")
app.config_from_object("celeryconfig")
app.conf.include = ["workers.tasks", "dispatcher.tasks"]
app.user_options["worker"].add(Option(("--gpu",), type=int, default=None, metavar="INDEX",
                                      help="Serve this GPU: register it in Nacos and consume its queue "
                                           "(gpu-dispatch)."))
app.steps["worker"].update({"workers.steps:GpuWorkerStep", "dispatcher.steps:DispatcherStep"})
app.steps["consumer"].add("workers.steps:RefreshLane")
