"""Token-level augmentation of training examples, a fresh variant every epoch (data.augment).

Which variant an example gets is a function of (train.seed, epoch, example index) alone: every
random draw comes from a generator seeded by those three numbers, never from shared state. So a
variant does not depend on which rank, micro batch, loader worker or process builds it: the global
batch stays the same whatever its split, and a resumed run sees the variants the uninterrupted one
saw. It runs where batches are built (launcher.data.loader), off the training thread; evaluation
data never passes through here.

What may change ("changeable" tokens): classification text, and the prompt tokens (label -100) of
instruction data. Never changed: a trained response token, the first and last token, any special
token of the tokenizer (BOS/EOS, [CLS]/[SEP], chat-template markers such as <|im_start|>), and the
generation prompt right before each answer ("<|im_start|>assistant\\n", "### Response:\\n"), so the
model still learns to answer after the exact text it will see at inference. Labels travel with
their tokens: a deleted prompt token takes its -100 along, an inserted token gets -100, response
labels are unchanged and stay aligned with their tokens.

The operations, in this order, each decided per changeable token with its own probability:
- delete: drop the token (one changeable token always survives, so no example is emptied);
- swap: trade places with the next changeable token (a local reordering);
- mask: replace it with the mask token: the tokenizer's mask token, else its unk, else its pad;
- insert: after it, insert a copy of a changeable token drawn from the same example, while the
  example is shorter than data.max_seq_len. A copy stays within the example's own words; a random
  vocabulary id would mostly be a rare sub-word or an unused slot.

Lengths: data.packing=group_by_length sorts by the original lengths (the plan is made before any
epoch's variants exist) and a variant is never longer than data.max_seq_len, so packing (which
reads the actual lengths) always fits it. Either way which examples, and which variants, make up
a global batch never depends on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from launcher.data.formats import ALPACA_PROMPT, IGNORE, uses_chat_template

# Mixed into every seed so augmentation draws differ from any other use of (seed, epoch, index).
STREAM = 0x61756720  # "aug "


@dataclass(frozen=True)
class Augmenter:
    """Makes an example's variant for an epoch; small and picklable for the loader's workers."""

    mask: float
    delete: float
    swap: float
    insert: float
    seed: int
    max_len: int
    mask_id: int
    keep_ids: frozenset[int]  # special tokens, never changed wherever they appear
    answer_prompt_len: int = 0  # instruction data: prompt tokens kept before each trained span

    def __call__(self, example: dict, epoch: int, index: int) -> dict:
        ids, labels = list(example["input_ids"]), example["labels"]
        per_token = not isinstance(labels, int)
        token_labels = list(labels) if per_token else [None] * len(ids)
        changeable = self.changeable(ids, labels)
        # One draw per operation and original position whatever the outcomes, so one operation's
        # result never shifts another's draws.
        draws = np.random.default_rng([STREAM, self.seed % 2**64, epoch, index]).random((5, len(ids)))
        # Items: [token, label, changeable, original position].
        items = [[t, lab, c, k] for k, (t, lab, c) in enumerate(zip(ids, token_labels, changeable))]
        items = self._delete(items, draws[0])
        self._swap(items, draws[1])
        for item in items:
            if item[2] and draws[2][item[3]] < self.mask:
                item[0] = self.mask_id
        items = self._insert(items, draws[3], draws[4], [t for t, c in zip(ids, changeable) if c])
        out_ids = [item[0] for item in items]
        return {"input_ids": out_ids, "labels": [item[1] for item in items] if per_token else labels}

    def changeable(self, ids: list[int], labels) -> list[bool]:
        """Which positions may change: see the module docstring."""
        n = len(ids)
        ok = [0 < k < n - 1 and token not in self.keep_ids for k, token in enumerate(ids)]
        if isinstance(labels, int):
            return ok
        for k, label in enumerate(labels):
            if label != IGNORE:
                ok[k] = False
                if k == 0 or labels[k - 1] == IGNORE:  # an answer starts: keep its generation prompt
                    for j in range(max(0, k - self.answer_prompt_len), k):
                        ok[j] = False
        return ok

    def _delete(self, items: list, draws: np.ndarray) -> list:
        candidates = [item[3] for item in items if item[2]]
        dropped = {k for k in candidates if draws[k] < self.delete}
        if candidates and len(dropped) == len(candidates):
            dropped.discard(max(candidates, key=lambda k: draws[k]))  # the least likely to go stays
        return [item for item in items if item[3] not in dropped]

    def _swap(self, items: list, draws: np.ndarray) -> None:
        where = [j for j, item in enumerate(items) if item[2]]
        i = 0
        while i < len(where) - 1:
            a, b = where[i], where[i + 1]
            if draws[items[a][3]] < self.swap:
                items[a], items[b] = items[b], items[a]
                i += 2  # a swapped token does not travel further
            else:
                i += 1

    def _insert(self, items: list, draws: np.ndarray, picks: np.ndarray, sources: list[int]) -> list:
        room = self.max_len - len(items)
        if room <= 0 or not sources or not self.insert:
            return items
        out = []
        for item in items:
            out.append(item)
            if room > 0 and item[2] and draws[item[3]] < self.insert:
                copy = sources[int(picks[item[3]] * len(sources))]
                out.append([copy, IGNORE if item[1] is not None else None, False, item[3]])
                room -= 1
        return out


def special_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's special tokens, including added ones flagged special (chat-template markers)."""
    added = {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return frozenset(tokenizer.all_special_ids) | added


def mask_id(tokenizer) -> int:
    for candidate in (tokenizer.mask_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return candidate
    raise ValueError("the tokenizer has no mask, unk or pad token")  # the launcher always sets a pad token


def generation_prompt_len(tokenizer, prompt_template: str) -> int:
    """Tokens of the text that introduces an answer: the chat template's generation prompt, or Alpaca's."""
    if uses_chat_template(tokenizer, prompt_template):
        turn = [{"role": "user", "content": "x"}]
        full = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        bare = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
        text = full[len(bare):] if full.startswith(bare) else ""
    else:
        text = ALPACA_PROMPT[ALPACA_PROMPT.rindex("### Response:"):]
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def build_augmenter(recipe, tokenizer) -> Augmenter | None:
    """The run's augmenter, or None when every probability in data.augment is 0."""
    settings = recipe.data.augment
    if not settings.active:
        return None
    causal = recipe.model.task == "causal_lm"
    return Augmenter(
        mask=settings.mask, delete=settings.delete, swap=settings.swap, insert=settings.insert,
        seed=recipe.train.seed, max_len=recipe.data.max_seq_len, mask_id=mask_id(tokenizer),
        keep_ids=special_ids(tokenizer),
        answer_prompt_len=generation_prompt_len(tokenizer, recipe.data.prompt_template) if causal else 0,
    )
