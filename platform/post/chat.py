"""The chat template and conversation tokenization for supervised fine-tuning.

Template (plain-text role markers; the tokenizer's EOS ends every assistant turn):

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{assistant}<EOS><|user|>\\n...

Why plain-text markers rather than new special tokens: the pretrained tokenizer (the
curation's byte-level BPE) has exactly one special token, and a new token needs a new
embedding row, i.e. a change of `vocab_size`, a resized (tied) embedding and LM head
that LoRA does not train. Markers spelled in ordinary text cost a few tokens each and
work with any checkpoint; EOS is the one token the model already treats as "stop".
A user message that itself contains a marker can confuse the model, as with any text
template; the special EOS string inside a message is the tokenizer's EOS.

Tokenization is per segment (marker, content, EOS), so the boundary between prompt and
answer is exact; `prompt_ids` builds a generation prompt the same way, so serving sees
exactly the tokens training saw. The loss mask selects the assistant contents and their
EOS: the model learns to answer and to stop, never to predict user text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
MARKERS = {role: f"<|{role}|>\n" for role in ROLES}


@dataclass
class EncodedConversation:
    ids: list[int]
    loss_mask: list[bool]  # True where the token is a target of the loss

    def inputs_and_labels(self) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of length len(ids) - 1, labels already shifted, -100 off-loss."""
        labels = [t if m else -100 for t, m in zip(self.ids[1:], self.loss_mask[1:])]
        return self.ids[:-1], labels


def validate_messages(messages, where: str = "conversation") -> list[dict]:
    """A list of {"role", "content"} with known roles and string contents."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise ValueError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, "
                             f"got {msg!r:.120}")
    return messages


def load_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """One conversation per line: {"messages": [{"role": ..., "content": ...}, ...]}; each
    must contain at least one assistant message."""
    path = Path(path)
    conversations = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from exc
        messages = validate_messages(row.get("messages") if isinstance(row, dict) else None, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: no assistant message, nothing to learn from")
        conversations.append(messages)
    if not conversations:
        raise ValueError(f"{path} holds no conversations")
    return conversations


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text).ids


def encode_conversation(tokenizer, messages: list[dict], eos_id: int) -> EncodedConversation:
    ids: list[int] = []
    mask: list[bool] = []
    for msg in messages:
        if msg["role"] == "assistant":
            head, body = _encode(tokenizer, MARKERS["assistant"]), _encode(tokenizer, msg["content"]) + [eos_id]
            ids += head + body
            mask += [False] * len(head) + [True] * len(body)
        else:
            seg = _encode(tokenizer, MARKERS[msg["role"]] + msg["content"] + "\n")
            ids += seg
            mask += [False] * len(seg)
    return EncodedConversation(ids, mask)


def prompt_ids(tokenizer, messages: list[dict], eos_id: int) -> list[int]:
    """Token ids of `messages` followed by the assistant marker: what the model continues."""
    return encode_conversation(tokenizer, messages, eos_id).ids + _encode(tokenizer, MARKERS["assistant"])
