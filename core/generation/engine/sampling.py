"""Choosing each sequence's next token in a batch, with its own sampling parameters.

The semantics are Hugging Face `generate`'s for the same settings, in the same order:
repetition penalty (over the prompt and the reply), no-repeat n-gram, min-new-tokens (EOS
banned), then — when sampling — temperature, top-k, top-p, and a multinomial draw; greedy rows
take the argmax after the first three. Two shortcuts keep a batch cheap without changing the
result: penalties gather/scatter only the ids a sequence has seen, and with top-k on, top-p and
the draw run over the top-k candidates instead of sorting the whole 51,200-token vocabulary
(every other token has probability 0 after top-k; a tie at the k-th score widens the
candidates so that every tied token is kept, as Hugging Face keeps them: frequent in bf16),
and the draws of all those rows are one inverse-CDF search over their candidates. On a CPU
the C++ sampler (`kobot::sample`, kernels/top_k.cpp) makes the same choice in one call for
the whole batch: penalties, bans, argmax or top-k, temperature, top-p and the draw.

Every sequence samples from its own CPU `torch.Generator`: seeded requests are reproducible
whatever else is in the batch, and no global RNG state is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain

import torch

from core.generation.base import SamplingParams, is_greedy
from core.generation.engine.kernels.top_k import FusedSample, TopK, torch_top_k

__all__ = [
    "LogitsHook",
    "NgramBans",
    "SamplerState",
    "banned_ids",
    "choose_tokens",
    "draw_rows",
    "tied_candidates",
    "top_candidates",
]

LogitsHook = Callable[[Sequence[int], torch.Tensor], torch.Tensor]
"""Test seam: `(ids so far, float32 scores [vocab]) -> scores`, after the penalties."""

NEG_INF = float("-inf")


class NgramBans:
    """Hugging Face's no-repeat n-gram rule, kept incrementally: the tokens that would repeat
    an n-gram already in the sequence."""

    def __init__(self, n: int, ids: Sequence[int]) -> None:
        self.n = n
        self._next: dict[tuple[int, ...], set[int]] = {}
        for end in range(n, len(ids) + 1):
            self._record(ids[end - n : end])

    def _record(self, ngram: Sequence[int]) -> None:
        self._next.setdefault(tuple(ngram[:-1]), set()).add(int(ngram[-1]))

    def added(self, ids: Sequence[int]) -> None:
        """Call after appending a token to `ids`."""
        if len(ids) >= self.n:
            self._record(ids[len(ids) - self.n :])

    def banned(self, ids: Sequence[int]) -> set[int]:
        if len(ids) + 1 < self.n:
            return set()
        key = tuple(ids[len(ids) - self.n + 1 :]) if self.n > 1 else ()
        return self._next.get(key, set())


@dataclass(eq=False)
class SamplerState:
    """One sequence's sampling settings and the bookkeeping its penalties need."""

    params: SamplingParams
    ids: list[int]
    prompt_len: int
    eos_id: int | None = None
    min_new_tokens: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    """Draws of this sequence only (a new `torch.Generator` starts from a fixed seed)."""
    hook: LogitsHook | None = None
    ngrams: NgramBans | None = field(init=False, default=None)
    _seen: set[int] = field(init=False, default_factory=set)
    _seen_buffer: torch.Tensor | None = field(init=False, default=None)
    _seen_count: int = field(init=False, default=0)
    _unseen_new: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.params.no_repeat_ngram_size > 0:
            self.ngrams = NgramBans(self.params.no_repeat_ngram_size, self.ids)
        self._seen = set(self.ids)
        self._unseen_new = sorted(self._seen)

    @property
    def greedy(self) -> bool:
        return is_greedy(self.params)

    @property
    def generated(self) -> int:
        return len(self.ids) - self.prompt_len

    def append(self, token: int) -> None:
        """Record the chosen token (the caller's `ids` list grows here)."""
        self.ids.append(token)
        if self.ngrams is not None:
            self.ngrams.added(self.ids)
        if token not in self._seen:
            self._seen.add(token)
            self._unseen_new.append(token)

    def seen_ids(self, device: torch.device) -> torch.Tensor:
        """The distinct ids of the sequence, as a tensor (a view of a buffer grown in place)."""
        new = self._unseen_new
        buffer = self._seen_buffer
        count = self._seen_count
        if buffer is None or count + len(new) > buffer.shape[0]:
            grown = torch.empty(max(64, 2 * (count + len(new))), dtype=torch.long, device=device)
            if buffer is not None:
                grown[:count] = buffer[:count]
            self._seen_buffer = buffer = grown
        if len(new) == 1:
            buffer[count] = new[0]
        elif new:
            buffer[count : count + len(new)] = torch.tensor(new, dtype=torch.long)
        self._seen_count = count + len(new)
        self._unseen_new = []
        return buffer[: self._seen_count]


# --- penalties (all rows) ---------------------------------------------------------------------


def apply_repetition_penalty(scores: torch.Tensor, states: Sequence[SamplerState]) -> None:
    """Scores of seen ids: negative ones times the penalty, others divided by it."""
    rows = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
    if not rows:
        return
    device = scores.device
    seen = [states[i].seen_ids(device) for i in rows]
    counts = torch.tensor([len(ids) for ids in seen], device=device)
    row_index = torch.repeat_interleave(torch.tensor(rows, device=device), counts)
    penalties = [states[i].params.repetition_penalty for i in rows]
    penalty = torch.repeat_interleave(torch.tensor(penalties, device=device), counts)
    col_index = torch.cat(seen)
    picked = scores[row_index, col_index]
    scores[row_index, col_index] = torch.where(picked < 0, picked * penalty, picked / penalty)


def banned_ids(state: SamplerState) -> set[int]:
    """The ids a sequence may not take next: its no-repeat n-gram bans, and EOS before
    `min_new_tokens`."""
    banned = set(state.ngrams.banned(state.ids)) if state.ngrams is not None else set()
    if state.eos_id is not None and state.generated < state.min_new_tokens:
        banned.add(state.eos_id)
    return banned


def apply_bans(scores: torch.Tensor, states: Sequence[SamplerState]) -> None:
    """`banned_ids` of every row set to -inf."""
    rows: list[int] = []
    cols: list[int] = []
    for row, state in enumerate(states):
        banned = banned_ids(state)
        rows.extend([row] * len(banned))
        cols.extend(banned)
    if rows:
        device = scores.device
        scores[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = NEG_INF


def apply_hooks(scores: torch.Tensor, states: Sequence[SamplerState]) -> None:
    for row, state in enumerate(states):
        if state.hook is not None:
            scores[row] = state.hook(state.ids, scores[row])


# --- warping and drawing (sampled rows) -------------------------------------------------------


def top_candidates(
    scores: torch.Tensor,
    params: Sequence[SamplingParams],
    width: int | None = None,
    top_k: TopK = torch_top_k,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """For rows with top-k on: `(probabilities [R, W], token ids [R, W], tie_rows)` after
    temperature, top-k and top-p (probability 0 outside the kept set), over each row's `W`
    best scores (`W` = the largest k + 1 unless given). Top-k keeps every score at least the
    k-th, as Hugging Face does; `tie_rows` are rows whose tie at the k-th score may reach past
    the `W` columns, so their result is not valid (`tied_candidates` widens them). `top_k`
    selects the candidates (the C++ kernel on a CPU, where the engine has it)."""
    vocab = scores.shape[-1]
    ks = [min(p.top_k, vocab) for p in params]
    width = min(width or max(ks) + 1, vocab)
    values, indices = top_k(scores, width)
    k_index = torch.tensor([k - 1 for k in ks], device=scores.device)[:, None]
    kth = values.gather(1, k_index)
    tie_rows = _tied_rows(values, kth) if width < vocab else []
    values = values.masked_fill(values < kth, NEG_INF)
    values = values / _column([p.temperature for p in params], scores)
    values = _top_p_sorted_desc(values, params)
    return values.softmax(dim=-1), indices, tie_rows


TIE_MARGIN = 2.0
"""The first top-k takes `TIE_MARGIN` × k (+ 1) candidates, so that a tie at the k-th score
(frequent with bf16 logits) rarely reaches past them and needs the second, wider pass."""


def candidate_width(params: Sequence[SamplingParams]) -> int:
    return int(max(p.top_k for p in params) * TIE_MARGIN) + 1


def tied_candidates(
    scores: torch.Tensor, params: Sequence[SamplingParams], top_k: TopK = torch_top_k
) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_candidates` wide enough for every row's tie at its k-th score (all tied kept)."""
    vocab = scores.shape[-1]
    ks = torch.tensor([min(p.top_k, vocab) for p in params], device=scores.device)
    kth = top_k(scores, int(ks.max()))[0].gather(1, (ks - 1)[:, None])
    width = int((scores >= kth).sum(dim=-1).max()) + 1
    probs, ids, _ = top_candidates(scores, params, width, top_k)
    return probs, ids


def _tied_rows(values: torch.Tensor, kth: torch.Tensor) -> list[int]:
    """Rows of descending `values` whose last column still equals their k-th score."""
    tied = (values[:, -1:] == kth)[:, 0]
    if not bool(tied.any()):
        return []
    return [int(row) for row in tied.nonzero()[:, 0].tolist()]


def _top_p_sorted_desc(values: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Hugging Face's top-p on scores already sorted in descending order."""
    top_p = [p.top_p for p in params]
    if all(p >= 1.0 for p in top_p):
        return values
    ascending = values.flip(-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - _column(top_p, values))
    remove[:, -1] = False
    remove &= _column([p < 1.0 for p in top_p], values).bool()
    return values.masked_fill(remove.flip(-1), NEG_INF)


def full_distribution(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Hugging Face's warpers on one row over the whole vocabulary: probabilities [vocab]."""
    row = scores.unsqueeze(0)
    if params.temperature != 1.0:
        row = row / params.temperature
    if params.top_k:
        kth = torch.topk(row, min(params.top_k, row.shape[-1]))[0][..., -1, None]
        row = row.masked_fill(row < kth, NEG_INF)
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(row, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[..., -1:] = False
        row = row.masked_fill(remove.scatter(1, order, remove), NEG_INF)
    return row.softmax(dim=-1)[0]


def _column(values: Sequence[float | bool], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def draw(probabilities: torch.Tensor, generator: torch.Generator) -> int:
    """One multinomial draw on the CPU with the sequence's own generator."""
    return int(torch.multinomial(probabilities.cpu(), 1, generator=generator).item())


def draw_rows(probabilities: torch.Tensor, generators: Sequence[torch.Generator]) -> list[int]:
    """One draw per row of `probabilities [R, W]` (each row's own generator supplies one
    uniform number; the column is found on the row's cumulative distribution, all rows at
    once). Never a column of probability 0."""
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    cumulative = probabilities.detach().cpu().double().cumsum(dim=-1)
    target = (uniform * cumulative[:, -1])[:, None]
    column = torch.searchsorted(cumulative, target, right=True)[:, 0]
    last_nonzero = (probabilities.detach().cpu() > 0).sum(dim=-1) - 1
    return torch.minimum(column, last_nonzero).tolist()


# --- the whole choice -------------------------------------------------------------------------


def choose_tokens(
    logits: torch.Tensor,
    states: Sequence[SamplerState],
    top_k: TopK = torch_top_k,
    fused: FusedSample | None = None,
) -> list[int]:
    """The next token of every row of float32 `logits [B, vocab]` (modified in place); `top_k`
    selects the sampled rows' candidates; with `fused` (the C++ sampler) and CPU logits, one
    call chooses them all (no logits hook in the batch)."""
    if fused is not None and logits.device.type == "cpu" and all(s.hook is None for s in states):
        return _choose_fused(logits, states, fused)
    apply_repetition_penalty(logits, states)
    apply_bans(logits, states)
    apply_hooks(logits, states)
    chosen = [0] * len(states)
    greedy = [i for i, s in enumerate(states) if s.greedy]
    if greedy:
        picked = _rows(logits, greedy).argmax(dim=-1).tolist()
        for row, token in zip(greedy, picked, strict=True):
            chosen[row] = int(token)
    sampled = [i for i, s in enumerate(states) if not s.greedy]
    for row, token in zip(sampled, _sample_rows(logits, states, sampled, top_k), strict=True):
        chosen[row] = token
    return chosen


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`tensor[rows]`, without a copy when `rows` is every row in order."""
    if rows == list(range(tensor.shape[0])):
        return tensor
    return tensor[torch.tensor(rows, device=tensor.device)]


def _sample_rows(
    logits: torch.Tensor, states: Sequence[SamplerState], rows: list[int], top_k: TopK
) -> list[int]:
    """Rows with top-k on draw among their top-k candidates, all rows in a few batched ops
    (rows tied at the k-th score among candidates wide enough for the tie); rows without
    top-k over the whole vocabulary, one by one."""
    fast = [i for i in rows if states[i].params.top_k > 0]
    tokens: dict[int, int] = {}
    if fast:
        picked = _rows(logits, fast)
        params = [states[i].params for i in fast]
        probs, ids, ties = top_candidates(picked, params, candidate_width(params), top_k)
        untied = [p for p in range(len(fast)) if p not in set(ties)]
        if untied:
            _draw_into(
                tokens, [fast[p] for p in untied], _rows(probs, untied), _rows(ids, untied), states
            )
        if ties:
            tied_params = [params[p] for p in ties]
            wide_probs, wide_ids = tied_candidates(_rows(picked, ties), tied_params, top_k)
            _draw_into(tokens, [fast[p] for p in ties], wide_probs, wide_ids, states)
    for row in rows:
        if row not in tokens:
            distribution = full_distribution(logits[row], states[row].params)
            tokens[row] = draw(distribution, states[row].generator)
    return [tokens[row] for row in rows]


def _draw_into(
    tokens: dict[int, int],
    rows: list[int],
    probs: torch.Tensor,
    ids: torch.Tensor,
    states: Sequence[SamplerState],
) -> None:
    columns = draw_rows(probs, [states[row].generator for row in rows])
    chosen = ids.cpu().gather(1, torch.tensor(columns)[:, None])[:, 0].tolist()
    for row, token in zip(rows, chosen, strict=True):
        tokens[row] = int(token)


# --- the whole choice in one kernel call (CPU) --------------------------------------------------

NO_IDS = torch.zeros(0, dtype=torch.long)
FULL_VOCAB = -1
"""The fused sampler's `top_k` for a sampled row without top-k: the kernel penalizes it and
leaves the draw over the whole vocabulary to `full_distribution`."""


def _fused_top_k(state: SamplerState, vocab: int) -> int:
    """0: greedy (argmax); k > 0: draw among the top k; FULL_VOCAB: sampled without top-k."""
    if state.greedy:
        return 0
    return min(state.params.top_k, vocab) if state.params.top_k > 0 else FULL_VOCAB


def _offsets(lengths: Iterable[int]) -> list[int]:
    """Bounds [rows + 1] of rows of these lengths laid one after another."""
    return [0, *accumulate(lengths)]


def _choose_fused(
    logits: torch.Tensor, states: Sequence[SamplerState], fused: FusedSample
) -> list[int]:
    vocab = logits.shape[-1]
    seen = [
        s.seen_ids(logits.device) if s.params.repetition_penalty != 1.0 else NO_IDS for s in states
    ]
    banned = [list(banned_ids(s)) for s in states]
    modes = [_fused_top_k(s, vocab) for s in states]
    uniform = [
        torch.rand(1, generator=s.generator, dtype=torch.float64).item() if mode > 0 else 0.0
        for s, mode in zip(states, modes, strict=True)
    ]
    tokens: list[int] = fused(
        logits,
        torch.cat(seen),
        _offsets(len(ids) for ids in seen),
        [s.params.repetition_penalty for s in states],
        list(chain.from_iterable(banned)),
        _offsets(len(ids) for ids in banned),
        modes,
        [s.params.temperature for s in states],
        [s.params.top_p for s in states],
        uniform,
    )
    for row, mode in enumerate(modes):
        if mode == FULL_VOCAB:
            distribution = full_distribution(logits[row], states[row].params)
            tokens[row] = draw(distribution, states[row].generator)
    return tokens
