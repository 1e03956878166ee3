"""Python client library and the `imagesearch` CLI.

    from clients import EmbedderClient, RankerClient

Callers see typed values (clients.types), never protobuf. Only the contracts
(`imagesearch.v1`) are imported: no torch, no service code."""

from clients.channels import RetryPolicy, Security
from clients.embedder import EmbedderClient, ImageSource, file_source
from clients.errors import ClientError, ServiceUnavailable, UsageError
from clients.ranker import RankerClient
from clients.types import (
    AliasInfo,
    CollectionStats,
    DeleteResult,
    Embedding,
    Failure,
    KReciprocal,
    Match,
    Matches,
    ModelInfo,
    QueryExpansion,
    SearchResult,
    Stats,
    UpsertResult,
)

__all__ = ["AliasInfo", "ClientError", "CollectionStats", "DeleteResult", "EmbedderClient", "Embedding",
           "Failure", "ImageSource", "KReciprocal", "Match", "Matches", "ModelInfo", "QueryExpansion", "RankerClient",
           "RetryPolicy", "SearchResult", "Security", "ServiceUnavailable", "Stats", "UpsertResult", "UsageError",
           "file_source"]
