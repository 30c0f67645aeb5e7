"""Celery entry points, one module per service: ``celery -A services.workers.<service> worker -Q
<service>``. They sit at the top (beside serve.py, whose ``make_worker_app`` wires a service's core
to its queue), so no service imports the top-level face."""
