"""Celery tasks that other systems call directly (``embedder.embed``, ``decoder.generate_masks``,
``concepts.propose``, ``verifier.verify``): JSON arguments in, a ``TaskOutcome`` out.

One wrapper for all of them, so every service treats errors alike:
- bad input (``InvalidInput``, ``NotFound``, ``FailedPrecondition``) is an outcome with
  ``ok=False``, the reason and the gRPC status name; no retry, since it would fail the same way;
- ``TransientError`` (storage, network, a model endpoint) is retried by Celery with exponential
  backoff (1, 2, 4 ... 60 s) up to ``settings.max_attempts`` tries, then becomes a failure outcome
  saying it gave up;
- anything else is a bug: an ``INTERNAL`` outcome with the exception's text, logged with its trace.
The worker keeps running in every case. Pipeline steps (``<service>.step``) have their own
wrapper, ``steps.register_step_task``, which reports to the orchestrator instead of returning.
"""

from __future__ import annotations

import logging
from typing import Callable

from celery import Celery

from services.common.errors import DataEngineError, InvalidInput, TransientError
from services.common.queues import TaskOutcome
from services.common.steps import retry_later

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # as settings.max_attempts: tries of a task failing with storage or network trouble


def register_core_task(app: Celery, name: str, run: Callable[..., dict], max_attempts: int = MAX_ATTEMPTS) -> None:
    """Register the task ``name`` on ``app``: it calls ``run(*args, **kwargs)``, which returns the
    outputs (JSON: object keys and small facts, never bytes) or raises a ``DataEngineError``.
    max_attempts: tries of a ``TransientError`` before the failure outcome (at least 1)."""
    max_retries = max(1, max_attempts) - 1

    # shared=False: the task closes over this app's core; it must not join apps created later in
    # the process (tests, embedded mode).
    @app.task(name=name, bind=True, max_retries=max_retries, shared=False)
    def task(self, *args, **kwargs) -> dict:
        try:
            outputs = run(*args, **kwargs)
        except TransientError as exc:
            if self.request.retries >= max_retries:
                return TaskOutcome(ok=False, reason=f"{exc} (gave up after {max_retries + 1} attempts)",
                                   code=exc.code.name).to_json()
            retry_later(self, exc, self.request.retries + 1)
            return TaskOutcome(ok=False, reason=f"{exc} (retry not queued: broker unreachable)",
                               code=exc.code.name).to_json()
        except DataEngineError as exc:
            log.info("task rejected", extra={"task": name, "code": exc.code.name})
            return TaskOutcome(ok=False, reason=str(exc), code=exc.code.name).to_json()
        except TypeError as exc:  # arguments that do not fit the task's signature
            if _is_call_error(exc, run):
                return TaskOutcome(ok=False, reason=f"{name}: {exc}", code=InvalidInput.code.name).to_json()
            log.exception("task failed", extra={"task": name})
            return TaskOutcome(ok=False, reason=f"TypeError: {exc}", code="INTERNAL").to_json()
        except Exception as exc:  # noqa: BLE001 - record the failure; the worker keeps running
            log.exception("task failed", extra={"task": name})
            return TaskOutcome(ok=False, reason=f"{type(exc).__name__}: {exc}", code="INTERNAL").to_json()
        return TaskOutcome(ok=True, outputs=outputs).to_json()


def _is_call_error(exc: TypeError, run: Callable) -> bool:
    """True when the TypeError is Python refusing the call itself (a missing or unexpected
    argument in the message), not one raised inside ``run``."""
    return exc.__traceback__ is not None and exc.__traceback__.tb_next is None and \
        getattr(run, "__name__", "") in str(exc)
