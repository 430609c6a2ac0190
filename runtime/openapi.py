"""The server's OpenAPI 3 document, served at GET /openapi.json.

Written by hand to match runtime/server.py: every route, the request bodies of the two POST
routes with the fields the server reads, and the responses, errors included (every error has
OpenAI's body, `Error`). Fields the server refuses unless they are "off" (`UNSUPPORTED` there)
are not described; OpenAI clients that send them with their default values are served.
"""

from __future__ import annotations

from typing import Any

OPENAPI_VERSION = "3.0.3"

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}

_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}

# Fields both POST routes read: sampling, stopping, streaming.
_COMMON: dict[str, Any] = {
    "model": {"type": "string", "description": "The served model's id (GET /v1/models)."},
    "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "temperature": {"type": "number", "minimum": 0, "nullable": True},
    "top_p": {
        "type": "number",
        "exclusiveMinimum": True,
        "minimum": 0,
        "maximum": 1,
        "nullable": True,
    },
    "top_k": {"type": "integer", "minimum": -1, "nullable": True},
    "seed": {"type": "integer", "nullable": True},
    "n": {"type": "integer", "enum": [1], "nullable": True},
    "stop": {
        "nullable": True,
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}},
        ],
    },
    "stop_token_ids": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0},
        "nullable": True,
    },
    "ignore_eos": {"type": "boolean", "nullable": True},
    "stream": {"type": "boolean", "nullable": True},
    "stream_options": {
        "type": "object",
        "nullable": True,
        "description": "Only with stream=true.",
        "properties": {
            "include_usage": {"type": "boolean"},
            "continuous_usage_stats": {"type": "boolean"},
        },
    },
}

_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "description": "One prompt: text, token ids, or a list holding one of them.",
            "oneOf": [
                {"type": "string", "minLength": 1},
                _TOKEN_IDS,
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": {"oneOf": [{"type": "string", "minLength": 1}, _TOKEN_IDS]},
                },
            ],
        },
        **_COMMON,
    },
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"type": "string"},
                    "content": {
                        "nullable": True,
                        "oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}],
                    },
                },
            },
        },
        "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        **_COMMON,
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "timings": {
            "type": "object",
            "description": "Server-side milliseconds (runtime/server.py's docstring).",
            "properties": {
                name: {"type": "number", "nullable": True}
                for name in ("queue_ms", "prefill_ms", "decode_ms", "e2e_ms")
            },
        },
    },
}


def _completion_response(chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "type": "object",
        "required": ["index", "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            "finish_reason": {"type": "string", "enum": ["stop", "length", "abort"]},
        },
    }
    if chat:
        choice["properties"]["message"] = {
            "type": "object",
            "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
        }
    else:
        choice["properties"]["text"] = {"type": "string"}
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": {"$ref": "#/components/schemas/Usage"},
        },
    }


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _post(summary: str, request: str, response: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}
            },
        },
        "responses": {
            "200": {
                "description": "The completion, or with stream=true its server-sent events "
                "(`data: {chunk}` lines, then `data: [DONE]`).",
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            "400": _error(
                "The request is invalid (the error's `param` names the field); "
                "code context_length_exceeded: the prompt does not fit."
            ),
            "401": _error("Missing or wrong API key."),
            "404": _error("No such model (code model_not_found)."),
            "413": _error("The body is larger than the longest prompt the model takes."),
            "429": {
                **_error("Too many requests wait already; retry after Retry-After seconds."),
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            },
            "500": _error("The engine failed."),
            "503": _error("The model is loading, failed to load, or the server is shutting down."),
        },
    }


def _get(summary: str, content: dict[str, Any], errors: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "responses": {"200": {"description": summary, "content": content}, **errors},
    }


def openapi_document(model_name: str, api_key_required: bool) -> dict[str, Any]:
    """The document for a server serving `model_name`; with an API key, /v1/* requires it."""
    text = {"text/plain": {"schema": {"type": "string"}}}
    json_object = {"application/json": {"schema": {"type": "object"}}}
    paths: dict[str, Any] = {
        "/v1/completions": {"post": _post("A text completion.", "CompletionRequest", "Completion")},
        "/v1/chat/completions": {
            "post": _post("A chat completion.", "ChatCompletionRequest", "ChatCompletion")
        },
        "/v1/models": {
            "get": _get(
                "The served model.", json_object, {"401": _error("Missing or wrong API key.")}
            )
        },
        "/health": {
            "get": _get(
                "ok once the model is loaded and the engine healthy.",
                text,
                {"503": {"description": "Loading, failed, or shutting down.", "content": text}},
            )
        },
        "/metrics": {"get": _get("Prometheus metrics.", text, {})},
        "/openapi.json": {"get": _get("This document.", json_object, {})},
    }
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "llm-serving-bench runtime",
            "version": "1",
            "description": f"OpenAI-compatible completions serving {model_name!r}.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": _ERROR,
                "Usage": _USAGE,
                "CompletionRequest": _COMPLETION_REQUEST,
                "ChatCompletionRequest": _CHAT_REQUEST,
                "Completion": _completion_response(chat=False),
                "ChatCompletion": _completion_response(chat=True),
            }
        },
    }
    if api_key_required:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, item in paths.items():
            if path.startswith("/v1/"):
                for operation in item.values():
                    operation["security"] = [{"bearer": []}]
    return document
