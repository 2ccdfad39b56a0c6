"""``POST /tokenize`` and ``/detokenize`` (vLLM's shapes) against a real server: the counts agree with what
the generation routes count for the same input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.servers import Served
from tests.threaded import served_in_thread
from trioserve.model.tinymodel import build_tokenizer

pytestmark = pytest.mark.socket

HF = build_tokenizer()
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with served_in_thread() as served:
        yield served


def post(served: Served, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(served.url + path, json=body, timeout=60)


def test_a_prompt_is_counted_as_legacy_completions_count_it(served: Served) -> None:
    reply = post(served, "/tokenize", {"model": "m", "prompt": "héllo wörld", "return_token_strs": True})
    assert reply.status_code == 200
    body = reply.json()
    assert body["tokens"] == HF.encode("héllo wörld") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 2048
    # Byte-level tokens: "é" is two tokens, each half a character (shown as U+FFFD).
    assert "".join(body["token_strs"]).count("\ufffd") == 4
    with openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0) as client:
        completion = client.completions.create(model="m", prompt="héllo wörld", max_tokens=1)
    assert completion.usage is not None and completion.usage.prompt_tokens == body["count"]
    plain = post(served, "/tokenize", {"prompt": "héllo wörld", "add_special_tokens": False}).json()
    assert plain["tokens"] == body["tokens"] and plain["token_strs"] is None  # this tokenizer adds no BOS


def test_messages_are_counted_as_chat_completions_count_them(served: Served) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = post(served, "/tokenize", {"messages": messages, "tools": [TOOL]}).json()
    with openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0) as client:
        completion = client.chat.completions.create(
            model="m",
            messages=messages,
            tools=[TOOL],
            tool_choice="required",
            max_tokens=1,  # type: ignore[arg-type,list-item]
        )
    assert completion.usage is not None and completion.usage.prompt_tokens == body["count"]
    without_tools = post(served, "/tokenize", {"messages": messages}).json()
    assert without_tools["count"] < body["count"]


def test_detokenize_inverts_tokenize(served: Served) -> None:
    tokens = post(served, "/tokenize", {"prompt": "Grüße, 世界"}).json()["tokens"]
    assert post(served, "/detokenize", {"tokens": tokens}).json() == {"prompt": "Grüße, 世界"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens.1"),
        ("/detokenize", {"tokens": [-1]}, "tokens.0"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": False},
            "add_generation_prompt",
        ),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ x }}"}, "chat_template"),
    ],
)
def test_bad_bodies_are_400s(served: Served, path: str, body: dict[str, Any], param: str) -> None:
    reply = post(served, path, body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
