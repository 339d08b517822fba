"""Schemathesis hooks for `test_server_schemathesis`: narrow the server's OpenAPI document to what a valid request
needs, so that many generated requests get past validation and reach the engine (negative cases still stray from it).
Loaded by the schemathesis CLI through `$SCHEMATHESIS_HOOKS`; the served model names come in `$SEALBOX_TEST_MODELS`
(`$SEALBOX_TEST_EMBEDDING_MODELS` for embeddings) and the policy's `max_tokens` cap in `$SEALBOX_TEST_MAX_TOKENS`."""

from __future__ import annotations

import os
from typing import Any

import schemathesis

MODELS_ENV = "SEALBOX_TEST_MODELS"
EMBEDDING_MODELS_ENV = "SEALBOX_TEST_EMBEDDING_MODELS"
MAX_TOKENS_ENV = "SEALBOX_TEST_MAX_TOKENS"


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    models = os.environ[MODELS_ENV].split(",")
    embedding_models = os.environ[EMBEDDING_MODELS_ENV].split(",")
    cap = int(os.environ[MAX_TOKENS_ENV])
    schemas = raw_schema["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[name]["properties"]["model"] = {"type": "string", "enum": models}
    embedding = schemas["EmbeddingRequest"]["properties"]
    embedding["model"] = {"type": "string", "enum": embedding_models}
    embedding["dimensions"] = {"type": "null"}  # refused whatever its value: the model's own size is returned
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            if field in properties:
                properties[field] = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": cap}, {"type": "null"}]}
    # A message's content may be null in the schema (an assistant turn that only calls tools); a user's may not.
    message = schemas["ChatMessage"]
    message["properties"]["content"] = {"type": "string"}
    message["properties"]["role"] = {"enum": ["system", "user", "assistant"]}
    message["required"] = ["role", "content"]
