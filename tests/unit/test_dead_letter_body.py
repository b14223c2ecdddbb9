"""The dead letter's body is the message's as it was published, whatever Kombu made of it.

Through the broker the consumer's channel hands over bytes (tests/integration); these
are the shapes a body could still take if a channel decoded it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from workers.poison import as_sent


@pytest.mark.parametrize(
    ("body", "encoding", "sent"),
    [
        (b"\xff\xfe raw", "utf-8", b"\xff\xfe raw"),
        ("caf\u00e9 {", "utf-8", "caf\u00e9 {".encode()),
        ("caf\u00e9", "latin-1", b"caf\xe9"),
        ("caf\u00e9", "no-such-encoding", "caf\u00e9".encode()),
        ("\udcff", "ascii", b"\xff"),
        ("", "utf-8", b""),
        (None, None, b""),
        (bytearray(b"x"), None, b"x"),
    ],
)
def test_a_body_is_dead_lettered_as_it_was_published(body, encoding, sent):
    assert as_sent(SimpleNamespace(body=body, content_encoding=encoding)) == sent
