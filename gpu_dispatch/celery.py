"""The Celery application: ``celery -A gpu_dispatch worker ...`` finds it here.

Settings come from ``celeryconfig.py`` (environment variables).  The GPU
worker's bootsteps add the ``--gpu N`` worker option; a worker started
without it is an ordinary worker (the central dispatcher, for instance).
"""

from celery import Celery

from workers import steps

app = Celery("gpu_dispatch")
app.config_from_object("celeryconfig")
app.conf.include = ["workers.tasks", "dispatcher.tasks"]
steps.install(app)
