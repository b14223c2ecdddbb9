"""Which headers cross a proxy.

RFC 9110 §7.6.1: hop-by-hop headers describe one connection, so a proxy drops them,
together with any header the ``Connection`` header names. Everything else passes on in
order and with its repetitions.
"""

from collections.abc import Iterable

Headers = list[tuple[str, str]]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def end_to_end(headers: Iterable[tuple[str, str]], also_drop: Iterable[str] = ()) -> Headers:
    """Return ``headers`` without hop-by-hop ones, the ones ``Connection`` names and ``also_drop``.

    Names in ``also_drop`` are lower case.
    """
    pairs = list(headers)
    drop = set(HOP_BY_HOP)
    drop.update(also_drop)
    for name, value in pairs:
        if name.lower() == "connection":
            drop.update(token.strip().lower() for token in value.split(","))
    return [(name, value) for name, value in pairs if name.lower() not in drop]
