"""The trainer's data path, in the order it runs; `posttrain sft`, `inspect` and `eval` share it.

1. `records`: JSONL, JSON, Parquet or a `datasets.save_to_disk` directory -> `Record`s (a
   prompt/response pair or a chat), every user error a `ValueError` naming the file and
   line (or row), raised before any training.
2. `tokenized`: token ids and a loss mask per record (pairs through the primitives'
   `encode_prompts_and_outputs`, chats through the tokenizer's chat template), then
   `max_seq_len`, with a `DataReport` of what happened.
3. `batching`: which examples form each optimizer step (`plan_batches`, length-grouped
   and shuffled), one rank's micro-batches of a step, and `collate` into padded,
   shifted tensors via `pad_and_shift`.
"""
