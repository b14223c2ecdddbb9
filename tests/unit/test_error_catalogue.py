"""The gateway's error catalogue (``gateway.errors``) is the reference's table of codes."""

import re
from pathlib import Path

from gateway import errors

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
ROW = re.compile(r"^\| (\d{3}) \| `([a-z-]+)` \|")


def documented_codes() -> dict[str, int]:
    """The "Statuses and error codes" table: code -> status."""
    section = REFERENCE.read_text().split("## Statuses and error codes", 1)[1].split("\n## ", 1)[0]
    rows = [ROW.match(line) for line in section.splitlines()]
    return {row.group(2): int(row.group(1)) for row in rows if row}


def test_every_code_of_the_catalogue_is_documented_with_its_status_and_no_other():
    catalogue = {code: entry.status for code, entry in errors.CATALOGUE.items()}
    assert len(documented_codes()) >= 20  # the table was found and read
    assert catalogue == documented_codes()


def test_the_retry_after_of_the_catalogue_is_the_documented_one():
    section = REFERENCE.read_text().split("## Statuses and error codes", 1)[1]
    for code, entry in errors.CATALOGUE.items():
        row = next(line for line in section.splitlines() if f"| `{code}` |" in line)
        documented = re.search(r"`Retry-After: (\d+)`", row)
        assert entry.retry_after == (int(documented.group(1)) if documented else None), code


def test_the_worker_made_codes_are_in_the_catalogue():
    assert set(errors.CATALOGUE) >= errors.MADE_BY_WORKER


def test_an_entry_makes_its_error_with_its_status_unless_told_another():
    error = errors.QUEUE_FULL("full")
    assert (error.status, error.code, error.message, error.retry_after) == (
        503,
        "queue-full",
        "full",
        1,
    )
    assert errors.BAD_REQUEST("too long", 414).status == 414
