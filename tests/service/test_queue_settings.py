"""The Celery settings that make jobs survive crashes (architecture.md): JSON only, late acks,
requeue on a lost worker, prefetch 1, a visibility timeout above the longest job, task routes."""
from __future__ import annotations

from core.service.queue import TASK_RUN_JOB, TASK_VALIDATE_MODEL, make_celery
from core.service.settings import Settings

DAY = 24 * 3600


def test_redis_broker_settings(tmp_path):
    conf = make_celery(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0",
                                gpu_queue="q_gpu", cpu_queue="q_cpu")).conf
    # No pickle anywhere: a message is never untrusted code.
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    # A job is acknowledged only once it has finished, and requeued if its worker dies.
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    # Redis redelivers an unacknowledged message after the visibility timeout: it must exceed a long job.
    assert conf.broker_transport_options["visibility_timeout"] >= DAY
    assert conf.task_routes[TASK_RUN_JOB] == {"queue": "q_gpu"}
    assert conf.task_routes[TASK_VALIDATE_MODEL] == {"queue": "q_cpu"}
    assert conf.task_default_queue == "q_cpu"
    assert conf.task_ignore_result is True and not conf.result_backend


def test_default_queue_names_and_the_configured_timeout(tmp_path):
    conf = make_celery(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0",
                                visibility_timeout_seconds=3 * DAY)).conf
    assert conf.task_routes[TASK_RUN_JOB]["queue"] == "gpu"
    assert conf.task_routes[TASK_VALIDATE_MODEL]["queue"] == "cpu"
    assert conf.broker_transport_options["visibility_timeout"] == 3 * DAY


def test_sqlite_broker_gets_no_visibility_timeout(tmp_path):
    settings = Settings(data_dir=tmp_path)  # the embedded default: sqla+sqlite
    assert settings.resolved_broker_url.startswith("sqla+sqlite")
    conf = make_celery(settings).conf
    # kombu's SQLAlchemy transport passes these options to create_engine, which rejects unknown ones.
    assert "visibility_timeout" not in conf.broker_transport_options
    assert conf.broker_transport_options == {"connect_args": {"timeout": 30}}
    assert conf.task_acks_late is True and list(conf.accept_content) == ["json"]


def test_sqlite_broker_options_open_a_real_channel(tmp_path):
    """The transport options are accepted by kombu's SQLAlchemy transport (a channel opens)."""
    app = make_celery(Settings(data_dir=tmp_path, cpu_queue="q_cpu"))
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        conn.default_channel.queue_declare(queue="q_cpu")
        app.send_task(TASK_VALIDATE_MODEL, args=["mdl_x"], connection=conn)
        assert conn.default_channel.queue_declare(queue="q_cpu", passive=True).message_count == 1
