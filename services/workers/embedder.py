"""Celery entry point: ``celery -A services.workers.embedder worker -Q embedder -P solo``.

Settings come from the ``DATAENGINE_*`` environment; the model is loaded on the first task.
"""

from services.common.settings import get_settings
from services.app.serve import make_worker_app

app = make_worker_app("embedder", get_settings())
