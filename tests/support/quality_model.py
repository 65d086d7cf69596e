"""A small *trained* OPT for measuring what 4-bit compression costs, and the measurements.

Random-weight models say nothing about quality, and no model can be downloaded here, so this
trains a tiny OPT (transformers' OPTForCausalLM, hidden 128, head_dim 64 like every real OPT) for
about two minutes on the CPU, on text that ships with Python: the standard library's sources,
split by file into training and held-out text. The model is saved as a normal HF model directory
(fp16 safetensors + tokenizer, so the engine can load it too) and cached between runs under
`tests/.cache/` (or $FLEXJOB_QUALITY_CACHE), keyed by the training recipe and Python version.

Measurements (all on the held-out files, in float32 arithmetic over the fp16 checkpoint):
- weights: every nn.Linear weight of the decoder layers replaced by dequantize(quantize(w)) —
  what the engine computes with `compress_weight` (optionally the embeddings too);
- cache: FlexGen's decode semantics. Tokens go through the model one at a time with a
  DynamicCache; after each step the K and V just appended are replaced by their round trip
  (grouped along head_dim). So each token attends to its own K/V at full precision and to every
  earlier token through the compressed cache — perplexity is "teacher-forced decoding" (the
  pessimistic case: no token benefits from a full-precision prefill). For greedy generation the
  prompt is prefilled at full precision, then its cache is compressed, as the engine does.
Windows are at most the training length (128 tokens): later positions were never trained.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch

from engine.runtime.compression import dequantize, quantize

# The recipe: any change here retrains (it is part of the cache key).
RECIPE = dict(vocab=4096, hidden=128, layers=3, heads=2, ffn=512, positions=512, seq=128, batch=16,
              steps=450, lr=3e-3, warmup=30, weight_decay=0.1, seed=0, train_bytes=6_000_000,
              heldout_bytes=400_000, heldout_every=10)
BOS = 2  # OPT's BOS and EOS (</s>)
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache"


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXJOB_QUALITY_CACHE", DEFAULT_CACHE))


def model_dir_for(recipe: dict = RECIPE) -> Path:
    key = json.dumps({**recipe, "python": sys.version_info[:2]}, sort_keys=True)
    return cache_dir() / f"quality-opt-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def get_quality_model(*, recipe: dict = RECIPE, log=print) -> Path:
    """The trained model's directory: trained (~2 min on 2 cores) on first use, then cached."""
    out = model_dir_for(recipe)
    if (out / "meta.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _train(tmp, recipe, log)
        if not (out / "meta.json").is_file():  # another process may have finished first
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# data and training


def stdlib_split(recipe: dict = RECIPE) -> tuple[str, str]:
    """(training text, held-out text): stdlib .py files, every `heldout_every`-th (by a hash of
    the path) held out; test suites and site-packages excluded; files in hash order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for path in sorted(root.rglob("*.py"), key=lambda p: zlib.crc32(str(p.relative_to(root)).encode())):
        rel = path.relative_to(root)
        if {"site-packages", "test", "tests", "idle_test"} & set(rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        held = zlib.crc32(str(rel).encode()) % recipe["heldout_every"] == 0
        (heldout if held else train).append(text)
    return _take(train, recipe["train_bytes"]), _take(heldout, recipe["heldout_bytes"])


def _take(texts: list[str], max_chars: int) -> str:
    out, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        out.append(text)
        total += len(text)
    return "\n\n".join(out)


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """All ids of `text` (no special tokens): [N] int64. Encoded in paragraphs, in parallel."""
    encode = tokenizer.backend_tokenizer.encode_batch  # no length warning, runs in parallel
    ids = [e.ids for e in encode(text.split("\n\n"), add_special_tokens=False)]
    blank = encode(["\n\n"], add_special_tokens=False)[0].ids
    return torch.tensor([t for i, para in enumerate(ids) for t in (blank if i else []) + para],
                        dtype=torch.long)


def heldout_windows(model_dir: Path, *, count: int, length: int) -> torch.Tensor:
    """`count` disjoint windows of held-out text, each BOS + (length - 1) tokens: [count, length]."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    stream = token_stream(tokenizer, (Path(model_dir) / "heldout.txt").read_text())
    body = length - 1
    if stream.numel() < count * body:
        raise ValueError(f"held-out text has {stream.numel()} tokens, need {count * body}")
    windows = stream[: count * body].view(count, body)
    return torch.cat([torch.full((count, 1), BOS), windows], dim=1)


def _train(out: Path, recipe: dict, log) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    from engine.model.synthetic_tokenizer import train_tokenizer

    started = time.perf_counter()
    torch.manual_seed(recipe["seed"])
    tokenizer = train_tokenizer(recipe["vocab"])
    train_text, heldout_text = stdlib_split(recipe)
    stream = token_stream(tokenizer, train_text)  # [N]
    log(f"quality model: tokenizer + {stream.numel():,} training tokens in "
        f"{time.perf_counter() - started:.0f} s; training {recipe['steps']} steps")
    config = OPTConfig(vocab_size=recipe["vocab"], hidden_size=recipe["hidden"],
                       num_hidden_layers=recipe["layers"], num_attention_heads=recipe["heads"],
                       ffn_dim=recipe["ffn"], max_position_embeddings=recipe["positions"],
                       word_embed_proj_dim=recipe["hidden"], dropout=0.0, attention_dropout=0.0,
                       pad_token_id=1, bos_token_id=BOS, eos_token_id=BOS)
    model = OPTForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=recipe["lr"], betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(recipe["seed"])
    seq, steps = recipe["seq"], recipe["steps"]
    model.train()
    losses = []
    for step in range(steps):
        lr = recipe["lr"] * min(1.0, (step + 1) / recipe["warmup"]) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optim.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, stream.numel() - seq, (recipe["batch"],), generator=gen)
        batch = torch.stack([stream[s:s + seq - 1] for s in starts.tolist()])
        batch = torch.cat([torch.full((recipe["batch"], 1), BOS), batch], dim=1)  # [B, seq]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"quality model: step {step + 1}/{steps} loss {sum(losses[-50:]) / 50:.3f} "
                f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    model.half().save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "heldout.txt").write_text(heldout_text)
    meta = {"recipe": recipe, "python": list(sys.version_info[:3]), "torch": torch.__version__,
            "train_tokens": stream.numel(), "train_seconds": round(time.perf_counter() - started, 1),
            "final_train_loss": round(sum(losses[-50:]) / 50, 4)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"quality model: saved to {out} ({meta['train_seconds']} s)")


# --------------------------------------------------------------------------------------------
# measurements


def load_model(model_dir: Path, *, weight_bits: int | None = None, group_size: int = 64,
               embeddings: bool = False):
    """The HF model in float32; with weight_bits, its decoder Linear weights (and with
    `embeddings`, the token/position embeddings and the tied lm_head) round-tripped."""
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if weight_bits is not None:
        decoder = model.model.decoder
        params = [m.weight for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear)]
        if embeddings:
            params += [decoder.embed_tokens.weight, decoder.embed_positions.weight]
        with torch.no_grad():
            for w in params:  # [out, in]: groups along the input dimension
                w.copy_(dequantize(quantize(w, num_bits=weight_bits, group_size=group_size),
                                   torch.float32))
    return model


def _step(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """One forward through `cache` (transformers >= 5.x calls the argument `cache`)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(input_ids=ids, use_cache=True, **{name: cache}).logits


def _cache(bits: int | None, group_size: int):
    """A DynamicCache; with `bits`, one that stores every new K/V as its group-wise round trip and
    hands attention that stored copy, the newest position included (as the engine's compressed
    cache does: a prefill and the decode steps over the same positions then see the same numbers)."""
    from transformers import DynamicCache

    if bits is None:
        return DynamicCache()

    class RoundTripCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            def stored(x):
                return dequantize(quantize(x, num_bits=bits, group_size=group_size), x.dtype)
            return super().update(stored(key_states), stored(value_states), layer_idx, *args, **kwargs)

    return RoundTripCache()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, cache_bits: int | None = None,
               group_size: int = 64, stepwise: bool | None = None) -> float:
    """exp(mean next-token NLL) over windows [N, L]. Without cache compression one full forward
    (stepwise=True forces the token-by-token path, to check it agrees)."""
    stepwise = cache_bits is not None if stepwise is None else stepwise
    cache = _cache(cache_bits, group_size)
    if not stepwise:
        logits = _step(model, windows, cache)  # [N, L, V]
    else:
        logits = torch.cat([_step(model, windows[:, t:t + 1], cache)  # [N, 1, V] each
                            for t in range(windows.shape[1] - 1)], dim=1)
    logits = logits[:, : windows.shape[1] - 1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int, *, cache_bits: int | None = None,
           group_size: int = 64) -> torch.Tensor:
    """Greedy continuation of equal-length prompts [N, P] -> [N, new_tokens]; with cache_bits every
    K/V is attended as the compressed cache stores it."""
    cache = _cache(cache_bits, group_size)
    logits = _step(model, prompts, cache)  # [N, P, V]
    out = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)  # [N, 1]
        out.append(token)
        logits = _step(model, token, cache)
    return torch.cat(out, dim=1)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Greedy agreement of [N, T] token rows: the mean fraction of each row's leading tokens that
    match before the first difference, and the share of rows identical over all T tokens."""
    same = (reference == other).long()
    prefix = same.cumprod(dim=1).sum(dim=1).float()  # [N] tokens matched before the first miss
    return {"prefix_fraction": round((prefix / reference.shape[1]).mean().item(), 4),
            "identical_rows": round((prefix == reference.shape[1]).float().mean().item(), 4)}


VARIANTS = {  # name -> (layer weights compressed?, embeddings too?, KV cache compressed?)
    "fp16": (False, False, False),
    "weights": (True, False, False),
    "weights+embeddings": (True, True, False),
    "cache": (False, False, True),
    "weights+cache": (True, False, True),
}


def measure_quality(model_dir: Path, *, bits: int = 4, group_size: int = 64, ppl_windows: int = 64,
                    ppl_length: int = 128, prompts: int = 32, prompt_length: int = 32,
                    new_tokens: int = 16, variants=tuple(VARIANTS)) -> dict:
    """Perplexity on held-out windows and greedy agreement with the uncompressed model, per variant."""
    if max(ppl_length, prompt_length + new_tokens) > RECIPE["seq"]:
        raise ValueError(f"windows longer than the training length {RECIPE['seq']} measure untrained positions")
    windows = heldout_windows(model_dir, count=ppl_windows + prompts, length=max(ppl_length, prompt_length))
    ppl_ids, prompt_ids = windows[:ppl_windows, :ppl_length], windows[ppl_windows:, :prompt_length]
    base = load_model(model_dir)
    reference = greedy(base, prompt_ids, new_tokens)
    results = {}
    for name in variants:
        w, emb, c = VARIANTS[name]
        model = load_model(model_dir, weight_bits=bits if w else None, group_size=group_size,
                           embeddings=emb) if w else base
        cache_bits = bits if c else None
        started = time.perf_counter()
        ppl = perplexity(model, ppl_ids, cache_bits=cache_bits, group_size=group_size)
        tokens = greedy(model, prompt_ids, new_tokens, cache_bits=cache_bits, group_size=group_size)
        results[name] = {"perplexity": round(ppl, 4), **agreement(reference, tokens),
                         "seconds": round(time.perf_counter() - started, 1)}
    fp = results["fp16"]["perplexity"] if "fp16" in results else perplexity(base, ppl_ids)
    for r in results.values():
        r["perplexity_change_pct"] = round(100 * (r["perplexity"] / fp - 1), 3)
    return {"bits": bits, "group_size": group_size, "ppl_tokens": ppl_windows * (ppl_length - 1),
            "prompts": prompts, "prompt_length": prompt_length, "new_tokens": new_tokens,
            "variants": results}
