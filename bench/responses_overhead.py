"""What the Responses translation costs: sequential request latency, /v1/chat/completions vs /v1/responses,
streamed and not, same prompt and token count, against a running server.

    trioserve &                                  # the demo model, or any --model
    python -m bench.responses_overhead [URL] [N]  # default http://127.0.0.1:7088, 60 requests per row

Rounds alternate the four kinds so drift in machine load hits them alike; the median of each is printed.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import openai

TOKENS = 16
ASK = "Hello"


def main(url: str = "http://127.0.0.1:7088", n: int = 60) -> None:
    client = openai.OpenAI(api_key="-", base_url=url + "/v1", max_retries=0)
    fixed = {"ignore_eos": True}
    message = [{"role": "user", "content": ASK}]

    def chat() -> None:
        client.chat.completions.create(model="m", messages=message, max_tokens=TOKENS, extra_body=fixed)  # type: ignore[arg-type]

    def chat_stream() -> None:
        list(
            client.chat.completions.create(
                model="m", messages=message, max_tokens=TOKENS, stream=True, extra_body=fixed
            )
        )  # type: ignore[arg-type]

    def responses() -> None:
        client.responses.create(model="m", input=ASK, max_output_tokens=TOKENS, extra_body=fixed)

    def responses_stream() -> None:
        list(client.responses.create(model="m", input=ASK, max_output_tokens=TOKENS, stream=True, extra_body=fixed))

    kinds: list[Callable[[], None]] = [chat, responses, chat_stream, responses_stream]
    timings: dict[str, list[float]] = {kind.__name__: [] for kind in kinds}
    for kind in kinds:
        kind()  # warm up
    for _ in range(n):
        for kind in kinds:
            started = time.perf_counter()
            kind()
            timings[kind.__name__].append(time.perf_counter() - started)
    for name, values in timings.items():
        print(f"{name:18s} median {1000 * statistics.median(values):6.1f} ms  ({len(values)} requests)")


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(a) for a in sys.argv[2:3]))
