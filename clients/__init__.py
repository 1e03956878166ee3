"""Python client library and the `imagesearch` CLI.

    from clients import EmbedderClient, RankerClient

Only the contracts (`imagesearch.v1`) are imported: no torch, no service code."""

from clients.channels import RetryPolicy, Security
from clients.embedder import EmbedderClient, EmbedResult, ImageSource
from clients.errors import ClientError, ServiceUnavailable, UsageError
from clients.ranker import Match, RankerClient, SearchResult

__all__ = ["ClientError", "EmbedResult", "EmbedderClient", "ImageSource", "Match", "RankerClient", "RetryPolicy",
           "SearchResult", "Security", "ServiceUnavailable", "UsageError"]
