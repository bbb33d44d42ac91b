"""The gateway's OpenAPI 3.0 document (``GET /openapi.json``), written by hand.

Request schemas say what the gateway accepts; anything else is answered with a 4xx in
OpenAI's error shape (or Anthropic's on ``/v1/messages``), never a 5xx.
"""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: Any, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: Any) -> dict[str, Any]:
    """A required JSON request body."""
    return {"required": True, "content": {"application/json": {"schema": schema}}}


#: The 400 a virtual key gets on the chat route for a body field its operator did not allow
#: (docs/gateway.md, Security), besides a field that is invalid: an example of each.
_CHAT_400 = {
    "description": "Invalid request (`param` names the field); or, for a virtual key, a body "
    "field beyond OpenAI's chat parameters that the gateway's `extra_body_fields` does not "
    "allow: code `field_not_allowed`, `param` the field, sent nowhere",
    "content": {
        "application/json": {
            "schema": _ERROR,
            "examples": {
                "invalid_value": {
                    "value": {
                        "error": {
                            "message": "'temperature' must be a number (param: temperature)",
                            "type": "invalid_request_error",
                            "param": "temperature",
                            "code": "invalid_value",
                        }
                    }
                },
                "field_not_allowed": {
                    "value": {
                        "error": {
                            "message": "Field 'route' is not accepted by this gateway: besides "
                            "OpenAI's chat parameters, it passes on only the fields its "
                            "operator allows (extra_body_fields: top_k, min_p, top_a, "
                            "repetition_penalty, min_tokens)",
                            "type": "invalid_request_error",
                            "param": "route",
                            "code": "field_not_allowed",
                        }
                    }
                },
            },
        }
    },
}


def _errors(*statuses: int, anthropic: bool = False) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/AnthropicError"} if anthropic else _ERROR
    text = {
        400: "Invalid request (the message names the field)",
        401: "Missing, malformed, unknown or revoked key",
        403: "The key may not use this model",
        404: "Unknown model or resource",
        405: "Method not allowed",
        413: "Request body too large",
        429: "Rate limit (with Retry-After) or budget exhausted",
        502: "Every provider failed (to a virtual key, code upstream_auth_error: a provider "
        "refused the gateway's own credentials; not worth a retry)",
        504: "Provider timed out, or the request's deadline (x-lunar-timeout-ms) ran out",
    }
    return {str(s): _json(ref, text.get(s, "Error")) for s in statuses}


_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {
            "type": "string",
            "enum": ["system", "developer", "user", "assistant", "tool", "function"],
        },
        "content": {
            "nullable": True,
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {
                            "type": {
                                "type": "string",
                                "enum": ["text", "image_url", "input_audio", "file", "refusal"],
                            },
                            "text": {"type": "string"},
                            "image_url": {
                                "type": "object",
                                "properties": {"url": {"type": "string"}},
                            },
                        },
                    },
                },
            ],
        },
        "name": {"type": "string"},
        "tool_call_id": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object"}},
    },
}

_LUNAR_OPTIONS = {
    "fallbacks": {
        "type": "array",
        "items": {"type": "string"},
        "nullable": True,
        "description": "Models to try in order when the model fails (429, 5xx, timeouts).",
    },
    "provider": {
        "type": "string",
        "nullable": True,
        "description": "Force one provider of the model.",
    },
}

_SAMPLING = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "nullable": True},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
    "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "n": {"type": "integer", "minimum": 1, "nullable": True},
    "stop": {
        "nullable": True,
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}},
        ],
    },
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
    "seed": {"type": "integer", "nullable": True},
    "user": {"type": "string", "nullable": True},
    "stream": {"type": "boolean", "nullable": True},
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "example": "gpt-4o-mini"},
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        **_SAMPLING,
        "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "tools": {
            "type": "array",
            "nullable": True,
            "items": {
                "type": "object",
                "required": ["type", "function"],
                "properties": {
                    "type": {"type": "string", "enum": ["function"]},
                    "function": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "description": {"type": "string"},
                            "parameters": {"type": "object"},
                        },
                    },
                },
            },
        },
        "tool_choice": {},
        "parallel_tool_calls": {"type": "boolean", "nullable": True},
        "response_format": {
            "type": "object",
            "nullable": True,
            "required": ["type"],
            "properties": {"type": {"type": "string"}},
        },
        "stream_options": {"type": "object", "nullable": True},
        **_LUNAR_OPTIONS,
    },
}

_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["model", "prompt"],
    "additionalProperties": False,
    "properties": {
        "model": {"type": "string", "minLength": 1, "example": "gpt-4o-mini"},
        "prompt": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            ]
        },
        **_SAMPLING,
        "stream_options": {"type": "object", "nullable": True},
        **_LUNAR_OPTIONS,
    },
}

_ANTHROPIC_BLOCK = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"type": "string", "enum": ["text", "image", "tool_use", "tool_result"]},
        "text": {"type": "string"},
        "source": {"type": "object"},
        "id": {"type": "string"},
        "name": {"type": "string"},
        "input": {"type": "object"},
        "tool_use_id": {"type": "string"},
        "content": {},
        "is_error": {"type": "boolean"},
    },
}

_MESSAGES_REQUEST = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "example": "gpt-4o-mini"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": ["user", "assistant"]},
                    "content": {
                        "oneOf": [
                            {"type": "string"},
                            {"type": "array", "items": _ANTHROPIC_BLOCK},
                        ]
                    },
                },
            },
        },
        "system": {
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {
                            "type": {"type": "string", "enum": ["text"]},
                            "text": {"type": "string"},
                        },
                    },
                },
            ]
        },
        "stop_sequences": {"type": "array", "items": {"type": "string"}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {
            "type": "integer",
            "minimum": 0,
            "description": "sent to Anthropic and Gemini models and OpenAI-compatible servers "
            "that take it; left out for OpenAI's own API, which has none",
        },
        "thinking": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string"}},
            "description": "accepted, ignored",
        },
        "stream": {"type": "boolean"},
        "metadata": {"type": "object", "properties": {"user_id": {"type": "string"}}},
        "tools": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "input_schema"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "input_schema": {"type": "object"},
                },
            },
        },
        "tool_choice": {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"type": "string", "enum": ["auto", "any", "tool", "none"]},
                "name": {"type": "string"},
                "disable_parallel_tool_use": {"type": "boolean"},
            },
        },
        **_LUNAR_OPTIONS,
    },
}

_USAGE = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "cached_tokens": {"type": "integer"},
        "cache_write_tokens": {"type": "integer"},
        "cache_write_1h_tokens": {"type": "integer"},
        "input_cost_usd": {"type": "number", "nullable": True},
        "cached_input_cost_usd": {"type": "number", "nullable": True},
        "output_cost_usd": {"type": "number", "nullable": True},
        "total_cost_usd": {"type": "number", "nullable": True},
        "latency_ms": {"type": "number", "nullable": True},
        "ttft_ms": {"type": "number", "nullable": True},
    },
}

_SSE = {"text/event-stream": {"schema": {"type": "string"}}}

_SECURED: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]

# What a Lunar client tells the gateway of its retry budget and deadline (docs/gateway.md).
_HOP_HEADERS: list[dict[str, Any]] = [
    {
        "name": "x-lunar-max-retries",
        "in": "header",
        "required": False,
        "description": "Retries per model the client allows (at most the gateway's "
        "max_retries). A bad value is a 400 naming the header.",
        "schema": {"type": "integer", "minimum": 0},
    },
    {
        "name": "x-lunar-timeout-ms",
        "in": "header",
        "required": False,
        "description": "Milliseconds the gateway has to answer (a stream: its first chunk), "
        "retries and fallbacks included; past them, a 504 deadline_exceeded. A bad value "
        "is a 400 naming the header.",
        "schema": {"type": "integer", "minimum": 1},
    },
]

_KEY_FIELDS = {
    "name": {"type": "string", "minLength": 1, "maxLength": 200},
    "rpm": {"type": "integer", "minimum": 1, "nullable": True},
    "tpm": {"type": "integer", "minimum": 1, "nullable": True},
    "budget_usd": {"type": "number", "minimum": 0, "nullable": True},
    "models": {"type": "array", "items": {"type": "string"}, "minItems": 1, "nullable": True},
}


def openapi_document(version: str) -> dict[str, Any]:
    inference_errors = (400, 401, 403, 404, 413, 429, 502, 504)
    admin_errors = (400, 401)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Lunar gateway",
            "version": version,
            "description": "OpenAI- and Anthropic-compatible API over Lunar's engine, with "
            "virtual keys, limits, budgets and a usage ledger.",
        },
        "paths": {
            "/health": {
                "get": {
                    "summary": "Ready to serve",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"type": "string"}},
                            }
                        )
                    },
                }
            },
            "/v1/chat/completions": {
                "post": {
                    "summary": "Chat completion (OpenAI), streamed with stream=true",
                    "parameters": _HOP_HEADERS,
                    "security": _SECURED,
                    "requestBody": _body(_CHAT_REQUEST),
                    "responses": {
                        "200": {
                            "description": "A chat.completion, or SSE chunks when streamed",
                            "content": {
                                "application/json": {
                                    "schema": {"type": "object", "properties": {"usage": _USAGE}}
                                },
                                **_SSE,
                            },
                        },
                        **_errors(*inference_errors),
                        "400": _CHAT_400,
                    },
                }
            },
            "/v1/completions": {
                "post": {
                    "summary": "Legacy text completion (OpenAI)",
                    "parameters": _HOP_HEADERS,
                    "security": _SECURED,
                    "requestBody": _body(_COMPLETION_REQUEST),
                    "responses": {
                        "200": {
                            "description": "A text_completion, or SSE when streamed",
                            "content": {"application/json": {"schema": {"type": "object"}}, **_SSE},
                        },
                        **_errors(*inference_errors),
                    },
                }
            },
            "/v1/messages": {
                "post": {
                    "summary": "Anthropic Messages API over any Lunar model",
                    "parameters": _HOP_HEADERS,
                    "security": _SECURED,
                    "requestBody": _body(_MESSAGES_REQUEST),
                    "responses": {
                        "200": {
                            "description": "A message, or Anthropic's event stream",
                            "content": {"application/json": {"schema": {"type": "object"}}, **_SSE},
                        },
                        **_errors(*inference_errors, anthropic=True),
                    },
                }
            },
            "/v1/messages/count_tokens": {
                "post": {
                    "summary": "Anthropic's token count: an estimate (~4 characters a token), "
                    "since the model that answers may be any provider's",
                    "security": _SECURED,
                    "requestBody": _body({**_MESSAGES_REQUEST, "required": ["model", "messages"]}),
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["input_tokens"],
                                "properties": {"input_tokens": {"type": "integer", "minimum": 0}},
                            }
                        ),
                        **_errors(400, 401, 413, anthropic=True),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "Models this key may use",
                    "security": _SECURED,
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/ModelList"}),
                        **_errors(401),
                    },
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model",
                    "security": _SECURED,
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {"200": _json({"type": "object"}), **_errors(401, 404)},
                }
            },
            "/v1/pricing/models": {
                "get": {
                    "summary": "Prices of every model (public)",
                    "security": [],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["data"],
                                "properties": {"data": {"type": "array"}},
                            }
                        )
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/admin/keys": {
                "get": {
                    "summary": "List keys (master key)",
                    "security": _SECURED,
                    "responses": {"200": _json({"type": "object"}), **_errors(*admin_errors)},
                },
                "post": {
                    "summary": "Create a key (master key); the key is shown once",
                    "security": _SECURED,
                    "requestBody": _body(
                        {
                            "type": "object",
                            "required": ["name"],
                            "additionalProperties": False,
                            "properties": _KEY_FIELDS,
                        }
                    ),
                    "responses": {
                        "201": _json(
                            {
                                "type": "object",
                                "required": ["key", "id"],
                                "properties": {"key": {"type": "string"}, "id": {"type": "string"}},
                            }
                        ),
                        **_errors(*admin_errors),
                    },
                },
            },
            "/admin/keys/{key_id}": {
                "parameters": [
                    {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "get": {
                    "summary": "One key (master key)",
                    "security": _SECURED,
                    "responses": {"200": _json({"type": "object"}), **_errors(401, 404)},
                },
                "patch": {
                    "summary": "Change a key's name, limits or models (master key); its secret "
                    "and spend stay, null lifts a limit",
                    "security": _SECURED,
                    "requestBody": _body(
                        {
                            "type": "object",
                            "minProperties": 1,
                            "additionalProperties": False,
                            "properties": _KEY_FIELDS,
                        }
                    ),
                    "responses": {"200": _json({"type": "object"}), **_errors(400, 401, 404, 409)},
                },
                "delete": {
                    "summary": "Revoke a key (master key)",
                    "security": _SECURED,
                    "responses": {"200": _json({"type": "object"}), **_errors(401, 404)},
                },
            },
            "/admin/usage": {
                "get": {
                    "summary": "Usage and cost from the ledger (master key)",
                    "security": _SECURED,
                    "parameters": [
                        {
                            "name": "key",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "A key id or name",
                        },
                        {"name": "model", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "since",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "Unix seconds, ISO 8601, or a duration ago (24h, 7d)",
                        },
                        {"name": "until", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "group_by",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "none, or a comma-separated list of key, model, "
                            "served_model, provider, status, route, day, hour",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100000},
                        },
                    ],
                    "responses": {
                        "200": _json({"type": "object", "required": ["data", "totals"]}),
                        **_errors(*admin_errors),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
            "schemas": {
                "Error": {
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
                        },
                        "attempts": {"$ref": "#/components/schemas/Attempts"},
                    },
                },
                "Attempts": {
                    "description": "When the gateway tried providers and gave up (it answers "
                    "x-should-retry: false): each try, retries and fallbacks included, with "
                    "the error it would have answered for that try alone",
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["model", "provider", "status", "message", "type"],
                        "properties": {
                            "model": {"type": "string"},
                            "provider": {"type": "string"},
                            "status": {"type": "integer"},
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": "string", "nullable": True},
                            "code": {"type": "string", "nullable": True},
                        },
                    },
                },
                "AnthropicError": {
                    "type": "object",
                    "required": ["type", "error"],
                    "properties": {
                        "type": {"type": "string", "enum": ["error"]},
                        "error": {
                            "type": "object",
                            "required": ["type", "message"],
                            "properties": {
                                "type": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        },
                        "attempts": {"$ref": "#/components/schemas/Attempts"},
                    },
                },
                "ModelList": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "object": {"type": "string"},
                        "data": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["id"],
                                "properties": {"id": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    }
