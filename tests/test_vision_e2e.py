"""Images end to end, on a real tiny vision-language model: a random-weight LLaVA saved to disk and loaded
through the real path (`load_runner`: `AutoModelForImageTextToText` with its `AutoProcessor`), behind a real
Hypercorn on loopback, driven by the clients users run: the `openai` SDK (chat completions streamed and not,
the Responses API) and langchain-openai.

Greedy decoding makes every answer a function of its prompt, so the checks are exact: the streamed answer
is the whole one, chat and Responses agree, the same image gives the same answer whether its request runs
alone or batched with others (with and without images), and another image gives another answer (the
image reaches the model: the tiny model is built so that it does, `tests/test_vision_runner.py`).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.imageserver import data_url, encoded
from tests.servers import Served
from tests.test_vision_runner import picture
from tests.threaded import served_in_thread
from trioserve.cli import build_app
from trioserve.config import Settings
from trioserve.model.tinyvision import save_tiny_vision

pytestmark = [pytest.mark.socket, pytest.mark.slow]

TOKENS = 8
# Random pixels: a picture a random-weight model cannot confuse with another one.
PICTURES = [encoded(picture(seed)) for seed in (1, 2)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model_dir = save_tiny_vision(tmp_path_factory.mktemp("vlm") / "tiny-llava", "llava")
    settings = Settings(model=str(model_dir), torch_dtype="float32", max_concurrent=4, hotload=True)
    with served_in_thread(lambda: build_app(settings)) as served:
        yield served


def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0, timeout=120)


def ask(picture: bytes | None, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if picture is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_url(picture)}})
    return [{"role": "user", "content": parts}]


def answer(served: Served, messages: list[dict[str, Any]]) -> tuple[str, int]:
    completion = client(served).chat.completions.create(
        model="m", messages=messages, max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.usage is not None
    return completion.choices[0].message.content or "", completion.usage.prompt_tokens


def test_the_sdk_sends_a_base64_image_to_chat_streamed_and_not(served: Served) -> None:
    text, prompt_tokens = answer(served, ask(PICTURES[0]))
    _, text_only_tokens = answer(served, ask(None))
    assert text and prompt_tokens > text_only_tokens + 4  # the image's tokens count in usage
    stream = client(served).chat.completions.create(
        model="m",
        messages=ask(PICTURES[0]),  # type: ignore[arg-type]
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == prompt_tokens


def test_the_image_decides_the_answer(served: Served) -> None:
    assert answer(served, ask(PICTURES[0]))[0] != answer(served, ask(PICTURES[1]))[0]


def test_the_responses_api_takes_input_image(served: Served) -> None:
    response = client(served).responses.create(
        model="m",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in this picture?"},
                    {"type": "input_image", "image_url": data_url(PICTURES[0]), "detail": "auto"},
                ],
            }
        ],
        max_output_tokens=TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text, prompt_tokens = answer(served, ask(PICTURES[0]))
    assert response.output_text == text
    assert response.usage is not None and response.usage.input_tokens == prompt_tokens


def test_langchain_openai_image_message(served: Served) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="m",
        base_url=served.url + "/v1",
        api_key="-",  # type: ignore[arg-type]
        max_retries=0,
        temperature=0,
        max_completion_tokens=TOKENS,
        extra_body={"ignore_eos": True},
    )
    message = llm.invoke([HumanMessage(content=ask(PICTURES[1])[0]["content"])])
    assert message.content == answer(served, ask(PICTURES[1]))[0]


def test_requests_with_images_batched_with_text_equal_each_alone(served: Served) -> None:
    prompts = [ask(PICTURES[0]), ask(None, "Say something."), ask(PICTURES[1], "And this one?"), ask(None)]
    alone = [answer(served, messages) for messages in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts) * 2) as pool:
        together = list(pool.map(lambda messages: answer(served, messages), prompts * 2))
    assert together == alone * 2


def test_the_model_is_listed_by_its_directory_name(served: Served) -> None:
    assert [model.id for model in client(served).models.list().data] == ["tiny-llava"]
