"""Logits processing and sampling: each rule checked for its effect on the chosen tokens."""

from __future__ import annotations

import torch

from trioserve.sampling import SequenceSampler, sample_rows
from trioserve.types import SamplingParams

VOCAB = 32
CPU = torch.device("cpu")


def sampler(prompt: tuple[int, ...] = (), **params: object) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**params), prompt, VOCAB, CPU)  # type: ignore[arg-type]


def draw(s: SequenceSampler, logits: torch.Tensor, n: int, eos: frozenset[int] = frozenset()) -> list[int]:
    return [sample_rows(logits.unsqueeze(0), [s], eos)[0].token_id for _ in range(n)]


def flat_logits() -> torch.Tensor:
    return torch.zeros(VOCAB)


def test_greedy_picks_argmax() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    assert draw(sampler(temperature=0.0), logits, 3) == [int(logits.argmax())] * 3


def test_same_seed_same_tokens_and_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    first = draw(sampler(seed=7), flat_logits(), 20)
    second = draw(sampler(seed=7), flat_logits(), 20)
    other = draw(sampler(seed=8), flat_logits(), 20)
    assert first == second
    assert first != other
    assert torch.equal(state, torch.get_rng_state())


def test_logit_bias_excludes_and_forces() -> None:
    assert 5 not in draw(sampler(seed=1, logit_bias={5: -100.0}), flat_logits(), 200)
    assert set(draw(sampler(seed=1, logit_bias={9: 100.0}), flat_logits(), 20)) == {9}


def test_repetition_penalty_uses_hugging_face_semantics() -> None:
    # Seen tokens: positive logits are divided, negative ones multiplied -- both become less likely.
    logits = torch.tensor([2.0, -1.0, 1.5, -3.0] + [-10.0] * (VOCAB - 4))
    processed = sampler((0, 1), repetition_penalty=2.0).process(logits, frozenset())
    assert processed[:4].tolist() == [1.0, -2.0, 1.5, -3.0]


def test_presence_and_frequency_penalties_follow_openai() -> None:
    s = sampler(presence_penalty=0.5, frequency_penalty=0.25)
    for token in (3, 3, 4):
        s.record(token)
    processed = s.process(flat_logits(), frozenset())
    assert processed[3] == -(0.5 + 2 * 0.25)
    assert processed[4] == -(0.5 + 0.25)
    assert processed[5] == 0.0


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.linspace(0, 3, VOCAB)
    assert set(draw(sampler(seed=3, top_k=2), logits, 200)) == {VOCAB - 1, VOCAB - 2}
    assert set(draw(sampler(seed=3, top_p=1e-6), logits, 50)) == {VOCAB - 1}
    assert set(draw(sampler(seed=3, min_p=0.99), logits, 50)) == {VOCAB - 1}


def test_min_tokens_blocks_eos_until_reached() -> None:
    logits = flat_logits()
    logits[1] = 50.0  # EOS is overwhelmingly likely
    s = sampler(seed=0, min_tokens=3)
    tokens = draw(s, logits, 4, eos=frozenset({1}))
    assert 1 not in tokens[:3]
    assert tokens[3] == 1


def test_top_logprobs_are_the_most_likely() -> None:
    logits = torch.linspace(0, 3, VOCAB)
    (token,) = sample_rows(logits.unsqueeze(0), [sampler(temperature=0.0, logprobs=3)], frozenset())
    assert [i for i, _ in token.top_logprobs] == [VOCAB - 1, VOCAB - 2, VOCAB - 3]
    assert token.logprob == token.top_logprobs[0][1] < 0
