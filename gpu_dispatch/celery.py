"""The Celery application: ``celery -A gpu_dispatch worker ...`` finds it here.

Settings come from ``celeryconfig.py`` (environment variables); the task
modules of the dispatcher and the GPU workers are included by name, so the
app can be imported anywhere without importing NVML, model code or Nacos.
"""

from celery import Celery

app = Celery("gpu_dispatch")
app.config_from_object("celeryconfig")
app.conf.include = []
