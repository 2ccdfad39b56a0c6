"""Batched sampling against a simple per-row reference, seeded batch invariance, and the one host copy.

`Reference` below is the pipeline written the plain way, one row at a time with Python state (what
sampling.py did before it was batched): greedy rows must pick exactly its tokens, sampled rows must draw
from exactly its candidate set.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trioserve.model import noise, sampling
from trioserve.model.sampling import SequenceSampler, sample_rows, scores
from trioserve.types import SampledToken, SamplingParams

VOCAB = 32
CPU = torch.device("cpu")
NO_EOS: frozenset[int] = frozenset()


def sampler(prompt: tuple[int, ...] = (), **params: object) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**params), prompt, VOCAB, CPU)  # type: ignore[arg-type]


def draw(s: SequenceSampler, logits: torch.Tensor, n: int, eos: frozenset[int] = NO_EOS) -> list[int]:
    return [sample_rows(logits.unsqueeze(0), [s], eos)[0].token_id for _ in range(n)]


def flat_logits() -> torch.Tensor:
    return torch.zeros(VOCAB)


class Reference:
    """One row, the plain way: penalty state as Python sets and counters, each rule on a 1-D tensor."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int]) -> None:
        self.params = params
        self.seen = set(prompt)
        self.counts: Counter[int] = Counter()
        self.generated = 0

    def record(self, token: int) -> None:
        self.seen.add(token)
        self.counts[token] += 1
        self.generated += 1

    def penalised(self, row: torch.Tensor, eos: frozenset[int]) -> torch.Tensor:
        p = self.params
        logits = row[:VOCAB].float().clone()
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(VOCAB, dtype=torch.bool)
            seen[list(self.seen)] = True
            penalised = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.zeros(VOCAB)
            for token, n in self.counts.items():
                counts[token] = n
            logits = logits - p.frequency_penalty * counts
            logits = logits - p.presence_penalty * (counts > 0).float()
        for token, value in p.logit_bias.items():
            logits[token] += value
        if self.generated < p.min_tokens:
            logits[sorted(eos)] = float("-inf")
        return logits

    def candidates(self, row: torch.Tensor, eos: frozenset[int]) -> set[int]:
        p = self.params
        logits = self.penalised(row, eos) / p.temperature
        if 0 < p.top_k < VOCAB:
            logits = logits.masked_fill(logits < torch.topk(logits, p.top_k).values[-1], float("-inf"))
        if p.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            drop = torch.zeros(VOCAB, dtype=torch.bool).scatter(0, order, probs.cumsum(-1) - probs >= p.top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        if p.min_p > 0.0:
            probs = torch.softmax(logits, dim=-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return set(logits.isfinite().nonzero().flatten().tolist())


penalties = {
    "repetition_penalty": st.sampled_from([1.0, 1.3, 0.8]),
    "presence_penalty": st.sampled_from([0.0, 0.5, -0.4]),
    "frequency_penalty": st.sampled_from([0.0, 0.3]),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1), st.sampled_from([-100.0, -2.5, 1.5, 4.0]), max_size=3),
    "min_tokens": st.integers(0, 3),
}
greedy_params = st.builds(SamplingParams, temperature=st.just(0.0), **penalties)
sampled_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 3, 10]),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
    seed=st.integers(0, 2**40),
    **penalties,
)
prompts = st.lists(st.integers(0, VOCAB - 1), max_size=6)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.one_of(greedy_params, sampled_params), prompts), min_size=1, max_size=6))
def test_every_row_matches_the_per_row_reference(rows: list[tuple[SamplingParams, list[int]]]) -> None:
    eos = frozenset({1})
    samplers = [SequenceSampler(p, prompt, VOCAB, CPU) for p, prompt in rows]
    references = [Reference(p, prompt) for p, prompt in rows]
    generator = torch.Generator().manual_seed(len(rows))
    for _ in range(5):
        logits = torch.randn(len(rows), VOCAB, generator=generator) * 3
        penalised, filtered = scores(logits, samplers, eos)
        sampled = iter(filtered)
        tokens = sample_rows(logits, samplers, eos)
        for row, (reference, token) in enumerate(zip(references, tokens, strict=True)):
            if reference.params.greedy:
                assert torch.equal(penalised[row], reference.penalised(logits[row], eos))
                assert token.token_id == int(reference.penalised(logits[row], eos).argmax())
            else:
                allowed = set(next(sampled).isfinite().nonzero().flatten().tolist())
                assert allowed == reference.candidates(logits[row], eos)
                assert token.token_id in allowed
            reference.record(token.token_id)


def test_draws_follow_the_filtered_distribution() -> None:
    # 4000 sequences with their own seeds, one step each: the frequencies are the softmax of the candidates.
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -9.0] + [-30.0] * (VOCAB - 8))
    for params, kept in ((SamplingParams(temperature=0.7), 8), (SamplingParams(top_k=4, temperature=1.3), 4)):
        samplers = [
            SequenceSampler(SamplingParams(**{**_fields(params), "seed": i}), (), VOCAB, CPU) for i in range(4000)
        ]
        tokens = [t.token_id for t in sample_rows(logits.expand(4000, VOCAB), samplers, NO_EOS)]
        expected = torch.softmax(logits[:kept] / params.temperature, dim=-1)
        counts = Counter(tokens)
        assert set(counts) <= set(range(kept))
        for token, p in enumerate(expected.tolist()):
            assert abs(counts[token] / 4000 - p) < 0.03, (token, counts[token], p)


def _fields(params: SamplingParams) -> dict[str, object]:
    return {name: getattr(params, name) for name in SamplingParams.__dataclass_fields__}


def _model(history: tuple[int, ...]) -> torch.Tensor:
    """Logits that depend only on a sequence's own tokens, as a model's would."""
    seed = zlib.crc32(repr(history).encode())
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def _generate(batch: list[SamplingParams], steps: int) -> list[list[int]]:
    samplers = [SequenceSampler(p, (3, 4), VOCAB, CPU) for p in batch]
    histories: list[list[int]] = [[] for _ in batch]
    for _ in range(steps):
        logits = torch.stack([_model(tuple(h)) for h in histories])
        for history, token in zip(histories, sample_rows(logits, samplers, frozenset({1})), strict=True):
            history.append(token.token_id)
    return histories


def test_a_seeded_sequence_draws_the_same_tokens_in_any_batch_at_any_row() -> None:
    mine = SamplingParams(seed=1234, temperature=0.9, top_p=0.95, repetition_penalty=1.2, presence_penalty=0.3)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=5, top_k=3, min_p=0.1, logprobs=2),
        SamplingParams(),  # unseeded
        SamplingParams(temperature=1.5, frequency_penalty=0.5, logit_bias={7: 3.0}, min_tokens=4),
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(seed=1234, temperature=0.9),  # my seed, other parameters
    ]
    alone = _generate([mine], 24)[0]
    assert len(set(alone)) > 5  # really sampled
    for batch, row in (([*others[:3], mine], 3), ([mine, *others], 0), ([*others[3:], mine, *others[:3]], 3)):
        assert batch[row] is mine
        assert _generate(batch, 24)[row] == alone
    assert _generate([SamplingParams(**{**_fields(mine), "seed": 1235})], 24)[0] != alone


MINE = SamplingParams(seed=99, temperature=1.1, top_k=12, min_p=0.02, frequency_penalty=0.4, logprobs=1)


@settings(max_examples=15, deadline=None)
@given(others=st.lists(st.one_of(greedy_params, sampled_params), max_size=6), position=st.integers(0, 6))
def test_seeded_tokens_do_not_depend_on_the_batch(others: list[SamplingParams], position: int) -> None:
    row = min(position, len(others))
    batch = [*others[:row], MINE, *others[row:]]
    assert _generate(batch, 12)[row] == _generate([MINE], 12)[0]


def test_same_seed_same_tokens_and_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    first = draw(sampler(seed=7), flat_logits(), 20)
    second = draw(sampler(seed=7), flat_logits(), 20)
    other = draw(sampler(seed=8), flat_logits(), 20)
    unseeded = draw(sampler(), flat_logits(), 20), draw(sampler(), flat_logits(), 20)
    assert first == second
    assert first != other
    assert unseeded[0] != unseeded[1]
    assert torch.equal(state, torch.get_rng_state())


def test_noise_is_splitmix64_of_seed_index_and_vocabulary_entry() -> None:
    # The device hash, in int64 tensor arithmetic, against SplitMix64 in Python integers.
    mask = (1 << 64) - 1

    def splitmix64(state: int) -> int:
        z = state & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    keys = [noise.key(seed, index) for seed, index in ((0, 0), (7, 3), (2**62, 10**6), (-5, 1))]
    uniforms = noise.uniforms(torch.tensor(keys), 1000)
    for row, key in enumerate(keys):
        for v in (0, 1, 2, 511, 999):
            expected = ((splitmix64(key + (v + 1) * 0x9E3779B97F4A7C15) >> 41) + 0.5) / 2**23
            assert uniforms[row, v].item() == expected
    assert float(uniforms.min()) > 0.0 and float(uniforms.max()) < 1.0
    assert abs(float(uniforms.mean()) - 0.5) < 0.01


def _mixed_batch(device: torch.device) -> list[SequenceSampler]:
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=1, top_k=5, top_p=0.8, logprobs=3),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, logit_bias={2: 1.0}, logprobs=0),
        SamplingParams(min_p=0.2, presence_penalty=0.5, frequency_penalty=0.1, min_tokens=2),
        SamplingParams(top_p=0.5),
    ]
    return [SequenceSampler(p, (1, 2, 3), VOCAB, device) for p in params]


def test_one_host_copy_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[int] = []
    real = sampling._to_host

    def counted(packed: torch.Tensor) -> list[float]:
        copies.append(packed.numel())
        return real(packed)

    monkeypatch.setattr(sampling, "_to_host", counted)
    samplers = _mixed_batch(CPU)
    for step in range(3):
        sample_rows(torch.randn(len(samplers), VOCAB + 3), samplers, frozenset({1}))
        assert len(copies) == step + 1
    # what came back: 5 token ids, 2 chosen logprobs, 2 x 3 top values and ids
    assert copies == [5 + 2 + 2 * 3 * 2] * 3
    plain = [sampler(temperature=0.0) for _ in range(4)]
    sample_rows(torch.randn(4, VOCAB), plain, NO_EOS)
    assert copies[-1] == 4


def test_nothing_but_the_one_copy_reads_device_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # On the "meta" device tensors have shapes but no data: any other read back (`.item()`, `int(t)`,
    # `nonzero`, a boolean test, a data-dependent shape) raises. So the whole pass, penalty state
    # included, runs without the host waiting on the device, except in `_to_host`.
    # What this does not cover: guides (their bitmask is filled on the host and copied up).
    meta = torch.device("meta")
    returned: list[int] = []

    def fake_copy(packed: torch.Tensor) -> list[float]:
        assert packed.device == meta
        returned.append(packed.numel())
        return [0.0] * packed.numel()

    monkeypatch.setattr(sampling, "_to_host", fake_copy)
    samplers = _mixed_batch(meta)
    for _ in range(2):
        tokens = sample_rows(torch.empty(len(samplers), VOCAB, device=meta), samplers, frozenset({1}))
    assert len(returned) == 2 and len(tokens) == len(samplers)
    assert all(s.generated == 2 for s in samplers)


def test_logprobs_only_for_rows_that_asked_from_the_raw_distribution() -> None:
    samplers = _mixed_batch(CPU)
    logits = torch.randn(len(samplers), VOCAB + 3, dtype=torch.float64)
    logits[:, VOCAB:] = 50.0  # columns past the vocabulary (padding): never picked nor reported
    before = logits.clone()
    tokens = sample_rows(logits, samplers, frozenset({1}))
    assert torch.equal(logits, before)  # the caller's logits are not touched
    raw = torch.log_softmax(logits[:, :VOCAB].float(), dim=-1)
    for row, (s, token) in enumerate(zip(samplers, tokens, strict=True)):
        assert token.token_id < VOCAB
        if s.params.logprobs is None:
            assert token == SampledToken(token.token_id)
            continue
        assert token.logprob == pytest.approx(float(raw[row, token.token_id]), abs=1e-6)
        values, ids = raw[row].topk(s.params.logprobs)
        assert [i for i, _ in token.top_logprobs] == ids.tolist()
        assert [lp for _, lp in token.top_logprobs] == pytest.approx(values.tolist(), abs=1e-6)


def test_a_plain_greedy_batch_is_the_argmax_of_any_float_dtype() -> None:
    logits = torch.randn(6, VOCAB + 5).to(torch.bfloat16)
    logits[:, VOCAB:] = 100.0
    tokens = sample_rows(logits, [sampler(temperature=0.0) for _ in range(6)], NO_EOS)
    assert [t.token_id for t in tokens] == logits[:, :VOCAB].float().argmax(dim=1).tolist()


def test_greedy_picks_argmax() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    assert draw(sampler(temperature=0.0), logits, 3) == [int(logits.argmax())] * 3


def test_logit_bias_excludes_and_forces() -> None:
    assert 5 not in draw(sampler(seed=1, logit_bias={5: -100.0}), flat_logits(), 200)
    assert set(draw(sampler(seed=1, logit_bias={9: 100.0}), flat_logits(), 20)) == {9}


def test_repetition_penalty_uses_hugging_face_semantics() -> None:
    # Seen tokens: positive logits are divided, negative ones multiplied -- both become less likely.
    logits = torch.tensor([2.0, -1.0, 1.5, -3.0] + [-10.0] * (VOCAB - 4))
    penalised, _ = scores(logits.unsqueeze(0), [sampler((0, 1), repetition_penalty=2.0)], NO_EOS)
    assert penalised[0, :4].tolist() == [1.0, -2.0, 1.5, -3.0]


def test_presence_and_frequency_penalties_follow_openai() -> None:
    s = sampler(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    for token in (3, 3, 4):  # make the sampler pick these
        forced = torch.full((1, VOCAB), -5.0)
        forced[0, token] = 5.0
        sample_rows(forced, [s], NO_EOS)
    penalised, _ = scores(flat_logits().unsqueeze(0), [s], NO_EOS)
    assert penalised[0, 3] == -(0.5 + 2 * 0.25)
    assert penalised[0, 4] == -(0.5 + 0.25)
    assert penalised[0, 5] == 0.0


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
    (token,) = sample_rows(logits.unsqueeze(0), [sampler(temperature=0.0, logprobs=3)], NO_EOS)
    assert [i for i, _ in token.top_logprobs] == [VOCAB - 1, VOCAB - 2, VOCAB - 3]
    assert token.logprob == token.top_logprobs[0][1] < 0


def test_the_callers_float32_logits_are_never_written() -> None:
    # Without penalties the pass works on the caller's tensor itself (no copy): every step must read it only.
    logits = torch.randn(5, VOCAB)
    before = logits.clone()
    batch = [sampler(top_k=3), sampler(top_p=0.5), sampler(min_p=0.2), sampler(), sampler(temperature=0.0)]
    for _ in range(3):
        sample_rows(logits, batch, NO_EOS)
        scores(logits, batch, NO_EOS)
    assert torch.equal(logits, before)
