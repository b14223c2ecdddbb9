"""The remote-control command that counts purged dead letters (``workers.purge_count``):
whoever may send remote control reaches it, so it takes only a count a purge can be."""

from types import SimpleNamespace

from workers import metrics
from workers.purge_count import MAX_COUNT, dead_letters_purged


def _state(*services: str) -> SimpleNamespace:
    config = SimpleNamespace(services=dict.fromkeys(services))
    controller = SimpleNamespace(proxymq=SimpleNamespace(config=config))
    return SimpleNamespace(consumer=SimpleNamespace(controller=controller))


def _counted(service: str) -> float:
    return metrics.dead_letters_purged_total.labels(service)._value.get()


def test_a_count_no_purge_could_make_is_refused_and_not_counted():
    """10**308 twice made the counter inf, and ``increase()`` useless until a restart."""
    before = _counted("purged-api")
    for count in (MAX_COUNT + 1, 10**308, -1, True, "3"):
        assert "error" in dead_letters_purged(_state("purged-api"), "purged-api", count)
    assert _counted("purged-api") == before


def test_a_purge_of_a_service_served_is_counted():
    before = _counted("purged-api")
    assert "ok" in dead_letters_purged(_state("purged-api"), "purged-api", 3)
    assert _counted("purged-api") == before + 3
    assert "error" in dead_letters_purged(_state("purged-api"), "other", 3)
