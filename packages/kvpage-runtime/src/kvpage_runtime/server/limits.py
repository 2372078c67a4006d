"""What one request may ask for: caps on its parameters, and the body-size middleware (413).

Stop strings, stop token ids and logit bias entries are processed for every generated token
(or every step) on the engine thread, so their size is capped, as is the number of sequences
one request starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException

from kvpage_runtime.server.errors import APIError, send_error


@dataclass(frozen=True)
class RequestLimits:
    max_stop_strings: int = 16
    max_stop_string_chars: int = 512
    max_stop_token_ids: int = 64
    max_logit_bias: int = 300

    def check(self, request) -> None:
        """Raises a 400 that names the field and its limit."""
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        _at_most(len(stops), self.max_stop_strings, "stop", "stop strings")
        longest = max((len(s) for s in stops), default=0)
        _at_most(longest, self.max_stop_string_chars, "stop", "characters in a stop string")
        _at_most(len(request.stop_token_ids or ()), self.max_stop_token_ids, "stop_token_ids",
                 "stop token ids")
        _at_most(len(request.logit_bias or ()), self.max_logit_bias, "logit_bias",
                 "logit_bias entries")


def _at_most(count: int, limit: int, param: str, what: str) -> None:
    if count > limit:
        raise APIError(f"{param}: at most {limit} {what} are allowed, got {count}", param=param)


def check_num_sequences(num_prompts: int, n: int, max_num_seqs: int) -> None:
    """One request may not start more sequences than the engine runs at once."""
    if num_prompts * n > max_num_seqs:
        raise APIError(
            f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} "
            f"sequences; the server runs at most {max_num_seqs} at once (max_num_seqs)",
            param="n" if num_prompts == 1 else "prompt")


def completion_budget(max_model_len: int, prompt_len: int, requested: int | None,
                      default: int | None, noun: str) -> int:
    """The max_tokens to generate: ``requested``, or ``default`` (None: the rest of the
    context) shortened to fit. A request that cannot fit gets vLLM's 400."""
    if prompt_len >= max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {prompt_len} input tokens. Please reduce the length of the {noun}.",
            param="messages" if noun == "messages" else "prompt")
    room = max_model_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested >= 1 and prompt_len + requested > max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the {noun}, "
            f"{requested} in the completion). Please reduce the length of the {noun} or "
            "completion.", param="max_tokens")
    return requested


class BodySizeLimitMiddleware:
    """Checks ``Content-Length`` up front and counts the bytes of chunked bodies as they arrive.

    A chunked body that grows past the limit raises an ``HTTPException(413)`` from ``receive``,
    which the app's error handlers turn into the OpenAI error shape.
    """

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _message(self) -> str:
        return f"request body is larger than the limit of {self.max_body_bytes} bytes"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, send) -> None:
        await send_error(send, APIError(self._message(), 413, code="request_too_large"))
