"""The one exception tree of llmserve.

Every error a user can meet is one of these. Each class carries the HTTP status, the OpenAI
error ``type`` and ``code`` it maps to; ``server/errors.py`` turns any of them into the OpenAI
envelope ``{"error": {"message", "type", "param", "code"}}`` (or, on the seed's native routes
/generate, /chat and /generate/batch, into ``{"detail": message}`` with ``detail_status``; on
Ollama's /api/* routes into ``{"error": message}``) and the CLI turns them into one line and a
non-zero exit. Nothing else maps exceptions to statuses.

    LlmserveError                      500 server_error
    ├── InvalidRequest                 400 invalid_request_error     (param names the field)
    │   ├── ContextLengthExceeded      400 context_length_exceeded   (413 on the native routes)
    │   ├── GrammarDeadEnd             400 grammar_dead_end          (the request's constraints
    │   │                                                             leave no token to sample)
    │   ├── UnsupportedParameter       400 unsupported_parameter     (a field not implemented yet)
    │   ├── WrongModelKind             400 wrong_model_kind          (chat on an embedding model,
    │   │                                                             embeddings on a chat model,
    │   │                                                             rerank without a rank head)
    │   ├── InputTooLong               400 context_length_exceeded   (an embedding input)
    │   ├── StoreDisabled              400 store_disabled            (--no-store: no data dir)
    │   ├── ModelLoadError             400 model_load_failed         (bad file, bad GGUF)
    │   └── MissingExtra               400 missing_extra             (an optional extra is not
    │                                                                 installed; names it)
    ├── AuthenticationError            401 invalid_api_key
    ├── ModelNotFound                  404 model_not_found
    ├── NotFound                       404 not_found                 (an unknown response, file or
    │                                                                 batch id)
    ├── RequestTooLarge                413 request_too_large
    ├── UnsupportedMediaType           415 unsupported_media_type
    ├── NotImplementedHere             501 not_implemented           (an API operation llmserve
    │                                                                 does not offer: pulling
    │                                                                 or deleting models)
    ├── RateLimited                    429 rate_limit_exceeded       (+ Retry-After)
    ├── ServiceUnavailable             503                           (+ Retry-After)
    │   ├── ServerBusy                 503 server_busy
    │   ├── ModelLoading               503 model_loading
    │   ├── NoModelLoaded              503 no_model
    │   ├── ModelFailed                503 model_failed              (its engine died; reloading)
    │   └── ShuttingDown               503 shutting_down
    ├── EngineError                    500 engine_error              (message is sanitised)
    │   └── InvalidToolCall            500 invalid_tool_call         (a strict tool's call
    │                                                                 broke its schema)
    ├── ConfigError                    (CLI only) a bad models.toml or --models-dir
    ├── BenchError                     (CLI only) `llmserve bench` could not run its workload
    └── ClientError                    (CLI only) a client command (ask, chat, ps) failed; it
        │                                         ends the command with ``exit_code``
        ├── ServerUnreachable          exit 2: nothing answers at the URL
        ├── ModelUnavailable           exit 2: the model asked for cannot be found or loaded
        └── ServerError                exit 3: the server answered with an error
"""

from __future__ import annotations

from typing import ClassVar


class LlmserveError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    # The status of the seed's ``{"detail": ...}`` rendering when it differs from ``status``.
    detail_status: ClassVar[int | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(LlmserveError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"
    detail_status = 413  # the seed API: "input too long"

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        if max_tokens > 0:
            message = (
                f"This model's context is {n_ctx} tokens; the request needs {prompt_tokens} "
                f"prompt tokens + {max_tokens} max_tokens = {prompt_tokens + max_tokens}. "
                "Shorten the prompt or lower max_tokens."
            )
        else:
            message = (
                f"This model's context is {n_ctx} tokens; the prompt alone is {prompt_tokens} "
                "tokens. Shorten the prompt."
            )
        super().__init__(message, param="messages")
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx


class GrammarDeadEnd(InvalidRequest):
    """The request's own constraints leave no token to sample: its grammar allows nothing more
    while ``ignore_eos`` (or its ``logit_bias``) bans the end of generation, which is all a
    complete match allows. Raised before generating where that can be known, else at the token
    where it happens (mid-stream it reaches the client as an error event)."""

    code = "grammar_dead_end"


class UnsupportedParameter(InvalidRequest):
    """A known API field whose semantics llmserve does not implement (yet): refused rather
    than silently ignored. ``param`` names it."""

    code = "unsupported_parameter"


class NoFimTokens(InvalidRequest):
    """Fill-in-the-middle (``suffix``, /infill) on a model whose vocabulary has no FIM
    tokens (tokenizer.ggml.fim_pre/suf/mid_token_id)."""

    code = "fim_not_supported"


class WrongModelKind(InvalidRequest):
    """The request needs another kind of model than the one it names; the message says which
    and how to serve one."""

    code = "wrong_model_kind"


class InputTooLong(InvalidRequest):
    """An embedding or rerank input longer than one sequence may be (and no ``truncate``)."""

    code = "context_length_exceeded"


class StoreDisabled(InvalidRequest):
    """A request that needs the data directory on a server run with ``--no-store``."""

    code = "store_disabled"


class ModelLoadError(InvalidRequest):
    code = "model_load_failed"


class MissingExtra(InvalidRequest):
    """A route needs an optional extra that is not installed; the message says which to
    install (a 400: the request is fine, this server cannot serve it)."""

    code = "missing_extra"


class AuthenticationError(LlmserveError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(LlmserveError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(LlmserveError):
    """An id (response, file, batch) this server does not know; ``param`` names the field."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class RequestTooLarge(LlmserveError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(LlmserveError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class NotImplementedHere(LlmserveError):
    """An operation of a client's API that llmserve deliberately does not offer (Ollama's
    pull, push, create, copy and delete: llmserve serves GGUF files it is given). The message
    says what to do instead."""

    status = 501
    type = "invalid_request_error"
    code = "not_implemented"


class RateLimited(LlmserveError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, retry_after: float, limit: int | None = None,
        remaining: int = 0, reset: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # the client's bucket: capacity, whole requests left, seconds until full again
        self.limit = limit
        self.remaining = remaining
        self.reset = reset


class ServiceUnavailable(LlmserveError):
    status = 503
    type = "server_error"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerBusy(ServiceUnavailable):
    code = "server_busy"


class ModelLoading(ServiceUnavailable):
    code = "model_loading"


class NoModelLoaded(ServiceUnavailable):
    code = "no_model"


class ModelFailed(ServiceUnavailable):
    """The model's engine stopped working (its worker thread died). The message never carries
    the cause (llama.cpp's text goes to the log only); the model is reloaded."""

    code = "model_failed"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class EngineError(LlmserveError):
    status = 500
    type = "server_error"
    code = "engine_error"


class InvalidToolCall(EngineError):
    """The model called a ``strict: true`` tool with arguments its schema refuses (the grammar
    cannot express every JSON Schema keyword, e.g. ``pattern`` lookarounds)."""

    code = "invalid_tool_call"


class ConfigError(LlmserveError):
    """The message names the file, the key and what was expected."""

    code = "config_error"


class BenchError(LlmserveError):
    """``llmserve bench`` could not run: a bad URL or prompt file, a server that would not start.
    Never sent over HTTP; the CLI prints it as one line."""

    code = "bench_failed"


class ClientError(LlmserveError):
    """A client command's failure, printed as one line; ``exit_code`` is how the command ends
    (the table in README's "From the shell")."""

    code = "client_error"
    exit_code: ClassVar[int] = 1


class ServerUnreachable(ClientError):
    """Nothing answers at the server URL; the message says how to start a server."""

    exit_code = 2


class ModelUnavailable(ClientError):
    """The model asked for is unknown to the server or cannot be loaded (404 model_not_found,
    400 model_load_failed), or a local GGUF that will not load."""

    exit_code = 2


class ServerError(ClientError):
    """The server answered an error. ``http_status`` and ``error_code`` are the server's (0 and
    None for an error event met mid-stream without a code)."""

    exit_code = 3

    def __init__(self, message: str, *, http_status: int = 0,
                 error_code: str | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.error_code = error_code
