"""One scrape of a Prometheus endpoint, summed by metric name and labels."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One scrape in Prometheus text format: ``value(name, **labels)`` sums the samples
    of ``name`` whose labels include ``labels`` (0 when none)."""

    def __init__(self, url: str) -> None:
        self.samples = [
            sample
            for family in text_string_to_metric_families(requests.get(url, timeout=5).text)
            for sample in family.samples
        ]

    @property
    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}

    def value(self, name: str, **labels: str) -> float:
        return sum(
            s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()
        )
