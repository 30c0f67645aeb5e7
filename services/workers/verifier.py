"""Celery entry point: ``celery -A services.workers.verifier worker -Q verifier -P solo``.

Settings come from the ``DATAENGINE_*`` environment; the core is built on the first task.
"""

from services.common.settings import get_settings
from services.app.serve import make_worker_app

app = make_worker_app("verifier", get_settings())
