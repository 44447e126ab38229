"""What can be wrong with a query, as exception types the server maps to gRPC status codes.

The engine raises these (and the encoders' / indexer's own errors); ``search.server`` turns each
into one status code with the exception's message, which names the field and the problem, and, for
INVALID_ARGUMENT and OUT_OF_RANGE, a ``google.rpc.BadRequest`` detail naming the field.
Codes follow gRPC's guidance: a value a request may never hold (a bad ``top_k``, audio over the
limit) is INVALID_ARGUMENT; OUT_OF_RANGE is kept for reading past an end (a speech span that starts
after the audio ends); a server that is stopping answers UNAVAILABLE, a full one RESOURCE_EXHAUSTED.
"""

from __future__ import annotations


class QueryError(ValueError):
    """A request the service cannot answer as asked; the message says what to change.

    ``field``: the request field at fault (e.g. "top_k", "audio.encoded"), when there is one.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidQuery(QueryError):
    """A value the request may not hold: undecodable, silent or over-long audio, a bad sample rate,
    top_k or candidates, a missing field (INVALID_ARGUMENT)."""


class QueryOutOfRange(QueryError):
    """Reading past an end: a speech span outside the audio (OUT_OF_RANGE)."""


class ImageNotFound(LookupError):
    """An image id that the collection does not hold (NOT_FOUND)."""


class Overloaded(RuntimeError):
    """The server's queues are full; retry later (RESOURCE_EXHAUSTED)."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no new work; retry on another replica (UNAVAILABLE)."""


class ShardUnavailable(RuntimeError):
    """A shard of a ``serve --ray`` collection did not answer in time, even asked again (UNAVAILABLE)."""


class PortUnavailable(OSError):
    """The server cannot listen where asked (the port is taken, or the address is not this machine's)."""
