"""Validation of OpenAI chat and completion request bodies.

Turns a decoded JSON body into a `CompletionRequest` or raises `ApiError` (400)
naming the offending field. Tokenization and context-length checks need the
backend and happen in `completions.py`; this module knows only JSON.

Every number is range-checked here before anything reaches torch: sampling values
against their ranges, `seed` within 0..2**63-1 (torch's generator takes no more);
a temperature too small to divide by safely means greedy, as in vLLM, and a top_p
too small for float32 keeps the most likely token, as any tiny top_p does. Every
string must be valid Unicode (no unpaired surrogates, which tokenizers reject).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from edgecluster.api.backend import SamplingParams
from edgecluster.api.errors import ApiError, bad_request, shorten

MAX_STOP_STRINGS = 4
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-5  # below this, logits / temperature can overflow: greedy instead
MIN_TOP_P = 1e-6  # a smaller top_p is 0 in float32 and keeps no token; this keeps the top one

Prompt = str | list[int]


@dataclass(frozen=True, kw_only=True)
class CompletionRequest:
    """One validated chat or completion request; exactly one of messages/prompt is set."""

    kind: Literal["chat", "completion"]
    model: str | None
    messages: list[dict[str, str]] | None = None
    prompt: Prompt | None = None
    max_tokens: int | None  # None: as much as the context allows, up to the server's cap
    sampling: SamplingParams  # its max_tokens is a placeholder until the prompt is tokenized
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _is_neutral(value: Any, *neutral: Any) -> bool:
    """True when value is None or one of neutral (bools never equal ints here)."""
    if value is None:
        return True
    return any(type(value) is type(n) and value == n for n in neutral)


# Fields whose only supported values are the neutral ones; anything else is a 400.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: _is_neutral(v, 1),
    "best_of": lambda v: _is_neutral(v, 1),
    "logprobs": lambda v: _is_neutral(v, False),
    "top_logprobs": lambda v: _is_neutral(v, 0),
    "echo": lambda v: _is_neutral(v, False),
    "suffix": lambda v: _is_neutral(v, ""),
    "presence_penalty": lambda v: _is_neutral(v, 0, 0.0),
    "frequency_penalty": lambda v: _is_neutral(v, 0, 0.0),
    "logit_bias": lambda v: _is_neutral(v, {}),
    "tools": lambda v: _is_neutral(v, []),
    "functions": lambda v: _is_neutral(v, []),
    "tool_choice": lambda v: _is_neutral(v, "none", "auto"),
    "response_format": lambda v: _is_neutral(v, {"type": "text"}),
}


def _check_unsupported(body: dict[str, Any]) -> None:
    for name, is_supported in _UNSUPPORTED.items():
        if name in body and not is_supported(body[name]):
            hint = " (only n=1 is supported)" if name in ("n", "best_of") else ""
            raise bad_request(
                f"'{name}' = {shorten(body[name])} is not supported by this server{hint}; "
                f"omit it or use its default",
                param=name,
                code="unsupported_parameter",
            )


def _type_error(name: str, expected: str, value: Any) -> ApiError:
    return bad_request(
        f"'{name}' must be {expected}, got {type(value).__name__} {shorten(value)}",
        param=name,
        code="invalid_type",
    )


def _opt_int(
    body: dict[str, Any], name: str, low: int = -MAX_SEED - 1, high: int = MAX_SEED
) -> int | None:
    """An optional integer within low..high (by default: what a 64-bit integer holds)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if not low <= value <= high:
        raise bad_request(
            f"'{name}' must be between {low} and {high}, got {shorten(value, 40)}", param=name
        )
    return value


def _opt_float(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(name, "a number", value)
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float
        raise bad_request(f"'{name}' = {shorten(value, 40)} is out of range", param=name) from None


def check_text(text: str, param: str) -> str:
    """text, if it is valid Unicode (JSON can carry unpaired surrogates; tokenizers fail)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(
            f"'{param}' contains an unpaired surrogate (\\u{ord(text[exc.start]):04x} at "
            f"character {exc.start}); send valid Unicode text",
            param=param,
        ) from None
    return text


def _parse_temperature(body: dict[str, Any]) -> float:
    temperature = _opt_float(body, "temperature", 1.0)
    return 0.0 if 0.0 <= temperature < MIN_TEMPERATURE else temperature


def _parse_top_p(body: dict[str, Any]) -> float:
    top_p = _opt_float(body, "top_p", 1.0)
    return MIN_TOP_P if 0.0 < top_p < MIN_TOP_P else top_p


def _opt_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _type_error(name, "true or false", value)
    return value


def _parse_model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    return None if model is None else check_text(model, "model")


def _parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or a list of strings", value)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(
            f"'stop' has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed",
            param="stop",
        )
    if any(s == "" for s in stops):
        raise bad_request("'stop' strings must not be empty", param="stop")
    return tuple(check_text(s, "stop") for s in stops)


def _parse_stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _opt_bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad_request(
            "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    if not isinstance(options, dict):
        raise _type_error("stream_options", "an object", options)
    return stream, _opt_bool(options, "include_usage")


def _parse_sampling(body: dict[str, Any], max_tokens: int | None) -> SamplingParams:
    top_k = _opt_int(body, "top_k")
    try:
        return SamplingParams(
            max_tokens=1 if max_tokens is None else max_tokens,
            temperature=_parse_temperature(body),
            top_p=_parse_top_p(body),
            top_k=0 if top_k is None or top_k == -1 else top_k,  # -1: off, as in vLLM
            seed=_opt_int(body, "seed", 0, MAX_SEED),  # what torch's generator takes
        )
    except ValueError as exc:
        message = str(exc)
        param = message.split(" ", 1)[0]
        raise bad_request(message, param=param if param in SAMPLING_FIELDS else None) from exc


def _text_of_content(content: Any, index: int, role: str) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return check_text(content, param)
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise _type_error(param, "a string or a list of text parts", content)
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise bad_request(
                f"{param}: only parts of type 'text' are supported, got {shorten(part)}",
                param=param,
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _type_error(f"{param}.text", "a string", text)
        texts.append(check_text(text, f"{param}.text"))
    return "\n".join(texts)


def parse_messages(value: Any) -> list[dict[str, str]]:
    """Chat messages as [{role, content}] with content flattened to one string."""
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list of messages", param="messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise _type_error(f"messages[{index}]", "an object", message)
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad_request(
                f"messages[{index}].role must be one of system, user, assistant; "
                f"got {shorten(role)}",
                param=f"messages[{index}].role",
            )
        content = _text_of_content(message.get("content"), index, role)
        messages.append({"role": CHAT_ROLES[role], "content": content})
    return messages


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def parse_prompt(value: Any) -> Prompt:
    """A completion prompt: a string or a list of token ids (a batch of one is unwrapped)."""
    if isinstance(value, str):
        return check_text(value, "prompt")
    if not isinstance(value, list) or not value:
        raise bad_request(
            "'prompt' must be a string or a non-empty list of token ids", param="prompt"
        )
    if _is_token_list(value):
        if any(t < 0 for t in value):
            raise bad_request("'prompt' token ids must not be negative", param="prompt")
        return list(value)
    if len(value) == 1 and (isinstance(value[0], str) or _is_token_list(value[0])):
        return parse_prompt(value[0])
    if all(isinstance(p, str) or _is_token_list(p) for p in value):
        raise bad_request(
            f"batch prompts are not supported ({len(value)} prompts); send one prompt per request",
            param="prompt",
            code="unsupported_parameter",
        )
    raise bad_request(
        "'prompt' must be a string, a list of token ids, or a list holding one of those",
        param="prompt",
    )


def _parse_common(body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    _check_unsupported(body)
    stream, include_usage = _parse_stream(body)
    return {
        "model": _parse_model(body),
        "max_tokens": max_tokens,
        "sampling": _parse_sampling(body, max_tokens),
        "stop": _parse_stop(body.get("stop")),
        "stream": stream,
        "include_usage": include_usage,
    }


def parse_chat_request(body: dict[str, Any]) -> CompletionRequest:
    """POST /v1/chat/completions body; `max_completion_tokens` wins over `max_tokens`."""
    messages = parse_messages(body.get("messages"))
    max_tokens = _opt_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens")
    return CompletionRequest(kind="chat", messages=messages, **_parse_common(body, max_tokens))


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    """POST /v1/completions body."""
    if "prompt" not in body:
        raise bad_request("'prompt' is required", param="prompt", code="missing_field")
    prompt = parse_prompt(body["prompt"])
    max_tokens = _opt_int(body, "max_tokens")
    return CompletionRequest(kind="completion", prompt=prompt, **_parse_common(body, max_tokens))


def resolve_max_tokens(
    requested: int | None,
    *,
    prompt_tokens: int,
    context_length: int,
    default_cap: int,
    prompt_param: str = "prompt",
) -> int:
    """The completion budget: the request's, or what the context allows (up to default_cap).

    Raises a 400 that states the lengths when the prompt, or prompt plus the requested
    completion, does not fit the context.
    """
    room = context_length - prompt_tokens
    if room <= 0:
        raise bad_request(
            f"This model's maximum context length is {context_length} tokens, but the "
            f"prompt has {prompt_tokens} tokens, leaving no room for a completion. "
            "Shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return min(room, default_cap)
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
            f"{requested} for the completion). Reduce the prompt or max_tokens "
            f"(at most {room} here).",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested
