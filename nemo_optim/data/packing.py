"""Tokenize documents and pack them into fixed-length sequences."""

from __future__ import annotations

import torch

from nemo_optim.data.corpus import DataConfig, DataError, Split, split_documents


def pack_tokens(token_ids: list[list[int]], seq_length: int, eos_id: int | None) -> torch.Tensor:
    """Concatenates documents (each followed by EOS) and cuts `[N, seq_length + 1]` rows.

    Each row gives inputs `row[:-1]` and next-token labels `row[1:]`; the tail that does not
    fill a row is dropped.
    """
    stream: list[int] = []
    for ids in token_ids:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    row = seq_length + 1
    num_rows = len(stream) // row
    return torch.tensor(stream[: num_rows * row], dtype=torch.long).view(num_rows, row)


def packed_sequences(
    config: DataConfig,
    split: Split,
    tokenizer,
    num_sequences: int | None = None,
) -> torch.Tensor:
    """`[N, seq_length + 1]` token rows of one split; the first `num_sequences` if given.

    The calibration split is followed by the train split: calibration (PTQ, importance
    estimation) may reuse training text when it needs more, but never validation text.
    """
    documents = split_documents(config, split)
    if split == "calibration":
        documents += split_documents(config, "train")
    token_ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    rows = pack_tokens(token_ids, config.seq_length, tokenizer.eos_token_id)
    if num_sequences is not None:
        if len(rows) < num_sequences:
            raise DataError(
                f"{split} split of source={config.source!r} gives {len(rows)} sequences of "
                f"{config.seq_length} tokens, {num_sequences} requested; lower the count or "
                f"seq_length, or add text."
            )
        rows = rows[:num_sequences]
    if len(rows) == 0:
        raise DataError(
            f"{split} split of source={config.source!r} is shorter than one sequence of "
            f"{config.seq_length} tokens; lower seq_length or add text."
        )
    return rows
