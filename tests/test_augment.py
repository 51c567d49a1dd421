"""data.augment: the operations do what they say, protect what they must, depend on (seed, epoch,
example) alone, keep the global batch split-invariant and resume exact, and never touch eval data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.config.load import load_recipe
from launcher.data.augment import Augmenter, build_augmenter
from launcher.data.batches import BatchPlan
from launcher.data.formats import IGNORE
from launcher.data.loader import StepDataset, step_feed
from launcher.errors import UserError
from launcher.train.resume import changed_keys
from tests.helpers import read_jsonl, run_in_process

ROOT = Path(__file__).resolve().parents[1]
MASK, SPECIALS = 4, frozenset({0, 1, 2, 3, 4})  # e.g. [PAD] [UNK] [CLS] [SEP] [MASK]
ALL = ["data.augment.mask=0.15", "data.augment.delete=0.1", "data.augment.swap=0.1", "data.augment.insert=0.1"]


def augmenter(max_len=4096, answer_prompt_len=0, **p) -> Augmenter:
    probabilities = {"mask": 0.0, "delete": 0.0, "swap": 0.0, "insert": 0.0, **p}
    return Augmenter(**probabilities, seed=7, max_len=max_len, mask_id=MASK, keep_ids=SPECIALS,
                     answer_prompt_len=answer_prompt_len)


def classification(n: int, label: int = 1) -> dict:
    """[CLS] n distinct ordinary tokens [SEP]."""
    return {"input_ids": [2, *range(100, 100 + n), 3], "labels": label}


def instruction(prompt: int, answer: int) -> dict:
    """BOS, a prompt (with a special marker inside), an answer trained token by token, EOS."""
    prompt_ids = [1, *range(100, 100 + prompt // 2), 0, *range(500, 500 + prompt - prompt // 2 - 1)]
    answer_ids = list(range(900, 900 + answer)) + [2]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids}


# ---------------------------------------------------------------------------- the operations


def test_each_operation_happens_at_its_probability():
    example = classification(2000)
    body = example["input_ids"][1:-1]

    masked = augmenter(mask=0.3)(example, 0, 0)["input_ids"]
    assert len(masked) == len(example["input_ids"])
    assert 0.25 < sum(t == MASK for t in masked) / len(body) < 0.35
    assert all(t in (MASK, o) for t, o in zip(masked, example["input_ids"]))  # replaced in place, nothing else

    kept = augmenter(delete=0.3)(example, 0, 0)["input_ids"]
    assert 0.25 < 1 - (len(kept) - 2) / len(body) < 0.35
    assert kept[1:-1] == [t for t in body if t in set(kept)]  # a subsequence: order kept, nothing new

    swapped = augmenter(swap=0.3)(example, 0, 0)["input_ids"]
    assert sorted(swapped) == sorted(example["input_ids"])
    moved = [k for k, (t, o) in enumerate(zip(swapped, example["input_ids"])) if t != o]
    assert 0.35 < len(moved) / len(body) < 0.6  # each swap moves two tokens
    assert all(abs(swapped[k] - example["input_ids"][k]) == 1 for k in moved)  # with a neighbour only

    grown = augmenter(insert=0.3)(example, 0, 0)["input_ids"]
    assert 0.25 < (len(grown) - len(example["input_ids"])) / len(body) < 0.35
    assert set(grown) == set(example["input_ids"])  # copies of the example's own tokens


def test_a_variant_depends_on_seed_epoch_and_example_only():
    example, augment = classification(40), augmenter(mask=0.2, delete=0.1, swap=0.1, insert=0.1)
    assert augment(example, 3, 11) == augment(dict(example), 3, 11)
    variants = {tuple(augment(example, epoch, 11)["input_ids"]) for epoch in range(5)}
    assert len(variants) == 5  # a fresh variant every epoch
    assert augment(example, 3, 11) != augment(example, 3, 12)
    other_seed = Augmenter(**{**augment.__dict__, "seed": 8})
    assert other_seed(example, 3, 11) != augment(example, 3, 11)


def test_a_variant_is_the_same_in_another_process():
    augment = augmenter(mask=0.2, delete=0.1, swap=0.1, insert=0.1)
    here = [augment(classification(30), epoch, 5)["input_ids"] for epoch in range(3)]
    code = ("import json; from tests.test_augment import augmenter, classification; "
            "a = augmenter(mask=0.2, delete=0.1, swap=0.1, insert=0.1); "
            "print(json.dumps([a(classification(30), e, 5)['input_ids'] for e in range(3)]))")
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(there.stdout.strip().splitlines()[-1]) == here


def test_response_labels_stay_with_their_tokens_and_the_prompt_tail_is_kept():
    example = instruction(prompt=60, answer=20)
    augment = augmenter(answer_prompt_len=3, mask=0.3, delete=0.3, swap=0.3, insert=0.3)
    first_answer = example["labels"].index(900)
    for epoch in range(10):
        out = augment(example, epoch, 0)
        ids, labels = out["input_ids"], out["labels"]
        assert len(ids) == len(labels)
        trained = [(t, label) for t, label in zip(ids, labels) if label != IGNORE]
        assert trained == [(t, t) for t in example["input_ids"][first_answer:]]  # unchanged, aligned
        start = labels.index(900)
        assert ids[start - 3 : start] == example["input_ids"][first_answer - 3 : first_answer]  # generation prompt
        assert ids[start:] == example["input_ids"][first_answer:]
        assert ids[:start] != example["input_ids"][:first_answer]  # the prompt did change


def test_special_first_and_last_tokens_are_never_touched():
    example = instruction(prompt=40, answer=5)
    for p in ("delete", "swap", "insert"):
        out = augmenter(**{p: 0.5})(example, 1, 2)["input_ids"]
        assert [t for t in out if t in SPECIALS] == [t for t in example["input_ids"] if t in SPECIALS]
        assert out[0] == example["input_ids"][0] and out[-1] == example["input_ids"][-1]
    masked = augmenter(mask=0.9)(example, 1, 2)["input_ids"]
    for original, now in zip(example["input_ids"], masked):
        if original in SPECIALS:
            assert now == original


def test_deletion_never_empties_an_example_and_insertion_respects_max_seq_len():
    assert len(augmenter(delete=0.99)(classification(3), 0, 0)["input_ids"]) == 3  # CLS, one survivor, SEP
    full = instruction(prompt=30, answer=4)
    n = len(full["input_ids"])
    assert augmenter(max_len=n, insert=0.99)(full, 0, 0) == full  # no room: nothing inserted
    for epoch in range(5):
        grown = augmenter(max_len=n + 3, insert=0.9)(full, epoch, 0)
        assert len(grown["input_ids"]) == len(grown["labels"]) == n + 3
        assert [lab for lab in grown["labels"] if lab != IGNORE] == [lab for lab in full["labels"] if lab != IGNORE]


def test_the_feed_gives_the_same_variants_whatever_the_worker_count_or_split():
    import datasets

    rows = [classification(5 + k % 7, label=k % 2) for k in range(32)]
    train = datasets.Dataset.from_list(rows)
    augment = augmenter(max_len=16, mask=0.2, delete=0.1, swap=0.1, insert=0.2)

    def variants(micro, world, workers, first=0):
        seen = {}
        for rank in range(world):
            plan = BatchPlan(len(rows), 8, micro, world, rank, seed=3)
            dataset = StepDataset(train, plan, "none", max_seq_len=16, pad_token_id=0, total_steps=10, causal=False,
                                  augment=augment)
            for step, item in enumerate(step_feed(dataset, first, workers=workers, pin_memory=False), first):
                indices = [i for mb in plan.micro_batches(step) for i in mb]
                rows_seen = [r for b in item.batches
                             for r in zip(b["input_ids"].tolist(), b["attention_mask"].tolist())]
                for i, (ids, mask) in zip(indices, rows_seen):
                    seen[step, i] = [t for t, m in zip(ids, mask) if m]
        return seen

    reference = variants(micro=8, world=1, workers=0)
    assert variants(micro=2, world=2, workers=2) == reference
    resumed = variants(micro=4, world=1, workers=1, first=6)  # a feed started at step 6, in epoch 1
    assert resumed == {k: v for k, v in reference.items() if k[0] >= 6}
    epoch0 = {i: v for (step, i), v in reference.items() if step < 4}
    epoch1 = {i: v for (step, i), v in reference.items() if 4 <= step < 8}
    assert sum(epoch0[i] != epoch1[i] for i in epoch0) > len(epoch0) // 2  # every epoch sees fresh variants
    for (step, i), ids in reference.items():
        assert ids == augment(rows[i], step // 4, i)["input_ids"]


# ---------------------------------------------------------------------------- the recipe


def test_off_by_default_and_bad_settings_are_clear_errors():
    _, recipe = load_recipe(["recipe=classify_lora"])
    assert not recipe.data.augment.active and build_augmenter(recipe, tokenizer=None) is None
    with pytest.raises(UserError, match=r"data.augment.msk: unknown key. Did you mean data.augment.mask"):
        load_recipe(["recipe=classify_lora", "data.augment.msk=0.1"])
    with pytest.raises(UserError, match=r"data.augment.delete: Input should be less than 1"):
        load_recipe(["recipe=classify_lora", "data.augment.delete=1"])
    with pytest.raises(UserError, match=r"data.format=text trains on every token"):
        load_recipe(["recipe=lora", "data.train=data/wordnet/glosses_text.jsonl", "data.format=text",
                     "data.augment.mask=0.1"])


def test_resume_refuses_a_changed_augmentation():
    _, before = load_recipe(["recipe=classify_lora", "data.augment.mask=0.1"])
    _, after = load_recipe(["recipe=classify_lora", "data.augment.mask=0.2"])
    assert changed_keys(before.model_dump(mode="json"), after.model_dump(mode="json")) == ["data.augment.mask"]


def test_the_real_tokenizers_protect_their_markers(tiny_llama, tiny_bert):
    from transformers import AutoTokenizer

    from launcher.data.formats import alpaca_messages, tokenize_chat

    _, recipe = load_recipe(["recipe=lora", *ALL])
    llama = AutoTokenizer.from_pretrained(tiny_llama)
    augment = build_augmenter(recipe, llama)
    markers = {llama.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<s>", "</s>")}
    assert markers <= augment.keep_ids
    generation_prompt = llama("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert augment.answer_prompt_len == len(generation_prompt)
    example = tokenize_chat(llama, alpaca_messages({"instruction": "Define the noun volcano, please, in few words.",
                                                    "output": "a mountain"}), 128)
    for epoch in range(5):
        out = augment(example, epoch, 0)
        assert [t for t in out["input_ids"] if t in markers] == [t for t in example["input_ids"] if t in markers]
        start = next(k for k, lab in enumerate(out["labels"]) if lab != IGNORE)
        assert out["input_ids"][start - len(generation_prompt) : start] == generation_prompt

    _, recipe = load_recipe(["recipe=classify_lora", *ALL])
    bert = AutoTokenizer.from_pretrained(tiny_bert)
    assert build_augmenter(recipe, bert).mask_id == bert.mask_token_id


# ---------------------------------------------------------------------------- real runs

EXACT = ["peft.dropout=0", "eval.every_steps=null", "eval.at_start=false", "train.max_steps=6",
         "train.global_batch_size=8", "data.max_samples=32"]  # 4 steps per epoch: the run crosses one


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(b) == pytest.approx(losses(a), rel=1e-5)
    for key, tensor in adapter(a).items():
        torch.testing.assert_close(adapter(b)[key], tensor, atol=1e-6, rtol=1e-5)


def test_augmented_training_does_not_depend_on_the_micro_batch_split(tiny_llama, tmp_path):
    for micro in (8, 2):
        run_in_process("lora", tiny_llama, tmp_path / f"m{micro}", *EXACT, *ALL, f"train.micro_batch_size={micro}")
    run_in_process("lora", tiny_llama, tmp_path / "plain", *EXACT, "train.micro_batch_size=8")
    assert_same_run(tmp_path / "m8", tmp_path / "m2")
    assert losses(tmp_path / "plain") != pytest.approx(losses(tmp_path / "m8"), rel=1e-5)  # augmentation acted


def test_eval_data_is_never_augmented(tiny_bert, tmp_path):
    common = ["train.max_steps=2", "eval.at_start=true", "eval.every_steps=null", "peft.dropout=0",
              "train.micro_batch_size=8", "eval.early_stopping_patience=null", "data.loader_workers=0"]
    strong = ["data.augment.mask=0.5", "data.augment.delete=0.3"]
    plain, _ = run_in_process("classify_lora", tiny_bert, tmp_path / "plain", *common)
    augmented, _ = run_in_process("classify_lora", tiny_bert, tmp_path / "aug", *common, *strong)
    starts = [json.loads((tmp_path / d / "metrics.json").read_text())["eval_start"] for d in ("plain", "aug")]
    assert starts[0] == starts[1]  # the same model on the same, untouched, eval data
    assert losses(tmp_path / "plain") != losses(tmp_path / "aug")  # while training saw variants
    assert plain.data.eval["input_ids"] == augmented.data.eval["input_ids"]


def test_resume_with_augmentation_is_exact(tiny_llama, tmp_path):
    from tests.helpers import crash_after

    words = [*EXACT, *ALL, "train.micro_batch_size=4", "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    run_in_process("lora", tiny_llama, tmp_path / "straight", *words)
    run_in_process("lora", tiny_llama, tmp_path / "resumed", *words)
    crash_after(tmp_path / "resumed", 3)
    run_in_process("lora", tiny_llama, tmp_path / "resumed", *words, "train.resume=auto",
                   "train.micro_batch_size=2")  # resumed mid-epoch, with another split
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow
def test_augmented_world_size_2_matches_one_process(tiny_llama, tmp_path):
    from tests.helpers import launch

    words = [*EXACT, *ALL, "eval.sample_prompts=[]", "data.loader_workers=2"]
    run_in_process("lora", tiny_llama, tmp_path / "one", *words, "train.micro_batch_size=8")
    launch(tmp_path / "two", "lora", tiny_llama, *words, "train.micro_batch_size=2")  # 2 x accumulation 2 x world 2
    assert_same_run(tmp_path / "one", tmp_path / "two")
