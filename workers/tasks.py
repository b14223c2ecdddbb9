"""The task every request message names, ``proxymq.forward``.

Registered so that Celery's task consumer accepts the messages and ``inspect
registered`` lists it; its strategy hands each message to the pipeline
(``workers.pipeline``) instead of to Celery's request and tracing machinery, which cost
more than the whole rest of a request's way through a worker. Its body never runs.
"""

from __future__ import annotations

from celery import Task

from proxymq.envelope import TASK_NAME
from workers.app import app


def strategy(task: Task, app, consumer, **_):
    """Celery's hook for how a task's messages are handled (``Task.Strategy``)."""
    receive = consumer.pipeline.receive

    def on_message(message, body, ack, reject, callbacks, **__) -> None:
        receive(message)

    return on_message


@app.task(name=TASK_NAME, Strategy="workers.tasks:strategy", acks_late=True)
def forward(*_args, **_kwargs) -> None:
    raise RuntimeError(f"{TASK_NAME} is served by the ProxyMQ pipeline, not run as a task")
