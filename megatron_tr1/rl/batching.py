"""Prompt + response token ids -> training tensors, micro-batch splitting, and the SFT target text.

One sequence is ``input_ids = prompt + response`` (length ``L = P + R``). Labels are next-token ids shifted
onto the position that predicts them: ``labels[t] = input_ids[t + 1]`` for the response tokens, i.e. at
``t = P - 1 .. L - 2``, and ``IGNORE_INDEX`` everywhere else (prompt, last position, padding), so the model's
per-token log-prob at ``t`` is the log-prob of response token ``t - P + 1``. ``loss_mask = labels != -100``.
Per-response-token values (the engine's log-probs, per-token advantages) are put in the same place with
``place_response``. Batches are padded ``[B, L_max]`` (right padding), or packed into one row ``[1, sum L]`` with
``cu_seqlens`` bounds for the model (``pack_batch``; ``unpack`` lays per-token model outputs back out as
``[B, L_max]`` so losses and statistics see the same layout either way).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import torch

from megatron_tr1.errors import ConfigError

IGNORE_INDEX = -100


@dataclasses.dataclass
class TokenSequence:
    """One training sequence: the prompt's token ids and the response's (ending with ``<|im_end|>`` unless
    it was truncated)."""

    prompt_ids: list[int]
    response_ids: list[int]

    def __post_init__(self):
        if not self.prompt_ids or not self.response_ids:
            raise ValueError(f"a training sequence needs a non-empty prompt and response, got "
                             f"{len(self.prompt_ids)} prompt and {len(self.response_ids)} response tokens")

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def sequence_tensors(seq: TokenSequence) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` (long ``[L]``) and ``loss_mask`` (bool ``[L]``) of one sequence."""
    ids = torch.tensor(seq.prompt_ids + seq.response_ids, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    p = len(seq.prompt_ids)
    labels[p - 1: -1] = ids[p:]
    return {"input_ids": ids, "labels": labels, "loss_mask": labels != IGNORE_INDEX}


def place_response(values: Sequence[float] | torch.Tensor, prompt_len: int, length: int,
                   fill: float = 0.0) -> torch.Tensor:
    """Per-response-token ``values`` ``[R]`` at the positions that predict those tokens, in a float ``[length]``."""
    values = torch.as_tensor(values, dtype=torch.float32)
    if prompt_len < 1 or prompt_len + values.numel() > length:
        raise ValueError(f"{values.numel()} response values after a {prompt_len}-token prompt do not fit {length}")
    out = torch.full((length,), fill, dtype=torch.float32)
    out[prompt_len - 1: prompt_len - 1 + values.numel()] = values
    return out


def pad_batch(seqs: Sequence[TokenSequence], pad_id: int, pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ``[B, L_max]`` batch (``L_max`` rounded up to ``pad_multiple``): ``input_ids``, ``labels``,
    ``loss_mask``, ``attention_mask`` (1 = token), ``lengths`` ``[B]``, ``prompt_lengths`` ``[B]``."""
    if not seqs:
        raise ValueError("pad_batch of no sequences")
    width = -(-max(len(s) for s in seqs) // pad_multiple) * pad_multiple
    out = {"input_ids": torch.full((len(seqs), width), pad_id, dtype=torch.long),
           "labels": torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long),
           "attention_mask": torch.zeros((len(seqs), width), dtype=torch.long)}
    for i, seq in enumerate(seqs):
        t = sequence_tensors(seq)
        out["input_ids"][i, : len(seq)] = t["input_ids"]
        out["labels"][i, : len(seq)] = t["labels"]
        out["attention_mask"][i, : len(seq)] = 1
    out["loss_mask"] = out["labels"] != IGNORE_INDEX
    out["lengths"] = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out["prompt_lengths"] = torch.tensor([len(s.prompt_ids) for s in seqs], dtype=torch.long)
    return out


def pack_batch(seqs: Sequence[TokenSequence]) -> dict[str, torch.Tensor]:
    """The sequences in one row: ``input_ids`` and ``labels`` ``[1, T]`` (``T = sum L``) and ``cu_seqlens``
    (long ``[B + 1]``, each sequence's bounds in the row)."""
    if not seqs:
        raise ValueError("pack_batch of no sequences")
    rows = [sequence_tensors(s) for s in seqs]
    bounds = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.long).cumsum(0)
    return {"input_ids": torch.cat([r["input_ids"] for r in rows])[None],
            "labels": torch.cat([r["labels"] for r in rows])[None], "cu_seqlens": bounds}


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """Per-token ``values`` of a packed row (``[1, T]``) as ``[B, width]``: sequence ``i`` in row ``i`` from column 0,
    zeros after it (where a padded batch has its padding)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    rows = torch.split(values.reshape(-1), lengths)
    out = values.new_zeros((len(lengths), width))
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


def split_by_count(num: int, micro_batch_size: int) -> list[list[int]]:
    """Indices ``0..num-1`` in consecutive micro-batches of ``micro_batch_size`` (the last may be shorter)."""
    return [list(range(i, min(i + micro_batch_size, num))) for i in range(0, num, micro_batch_size)]


def split_by_tokens(lengths: Sequence[int], max_tokens: int, max_seqs: int | None = None) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``max_tokens`` tokens (and ``max_seqs`` sequences).

    First-fit decreasing: longest first into the first micro-batch with room, so there are few micro-batches of
    similar size; indices within each are sorted. The loss of a micro-batch must be scaled by the token count of
    the whole global batch (not the micro-batch) for token-mean aggregation to be unchanged by the split.
    """
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i, n = too_long[0]
        raise ConfigError(f"sequence {i} has {n} tokens, more than optim.max_tokens_per_micro_batch={max_tokens}; "
                          f"raise it to at least data.max_prompt_tokens + rollout.max_tokens")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for b, free in enumerate(room):
            if lengths[i] <= free and (max_seqs is None or len(bins[b]) < max_seqs):
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def format_seconds(x: float, decimals: int = 2) -> str:
    """``x`` with ``decimals`` (1 or 2) decimals, as the answer JSON writes times."""
    if decimals not in (1, 2):
        raise ConfigError(f"decimals={decimals}: SFT targets write times with 1 or 2 decimals")
    return f"{x:.{decimals}f}"


def answer_json(start: float, end: float, decimals: int = 2) -> str:
    """``{"start_time": "s", "end_time": "e"}`` with quoted numbers (the format the reward's regex accepts)."""
    return json.dumps({"start_time": format_seconds(start, decimals), "end_time": format_seconds(end, decimals)})


def sft_target(start: float, end: float, think: bool = True, decimals: int = 2) -> str:
    """The SFT response for a ground truth in seconds: ``<think>...</think><answer>{json}</answer>``, or the
    answer alone when not ``think``. The think text is a fixed template restating the span (there is no
    human reasoning to imitate in the grounding data). It does not restate the query: the demo's 2-layer model
    cannot copy a phrase it has not been trained on, and wrote one of the base stage's queries instead (0 of 128
    right on each of 3 seeds), then placed the span after that query rather than the video's event."""
    answer = f"<answer>{answer_json(start, end, decimals)}</answer>"
    if not think:
        return answer
    s, e = format_seconds(start, decimals), format_seconds(end, decimals)
    return f"<think>The event begins at about {s} seconds and ends at about {e} seconds.</think>{answer}"


def sft_sequence(tokenizer, prompt_ids: Sequence[int], target: str, stop_token_id: int) -> TokenSequence:
    """A training sequence for SFT: the prompt, then ``target`` tokenised and ``<|im_end|>``; the loss
    (``loss_mask``) covers exactly the target and the stop token."""
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return TokenSequence(list(prompt_ids), list(ids) + [stop_token_id])
