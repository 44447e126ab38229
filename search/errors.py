"""What can be wrong with a query, as exception types the server maps to gRPC status codes.

The engine raises these (and the encoders' / indexer's own errors); ``search.server`` turns each
into one status code with the exception's message, which names the field and the problem.
"""

from __future__ import annotations


class QueryError(ValueError):
    """A request the service cannot answer as asked; the message says what to change."""


class InvalidQuery(QueryError):
    """Malformed input: undecodable or silent audio, a bad sample rate, a missing field (INVALID_ARGUMENT)."""


class QueryOutOfRange(QueryError):
    """A value outside its allowed range: audio too long, top_k, candidates, a span (OUT_OF_RANGE)."""


class ImageNotFound(LookupError):
    """An image id that the collection does not hold (NOT_FOUND)."""


class Overloaded(RuntimeError):
    """The server's queue is full; retry later (RESOURCE_EXHAUSTED)."""
