#!/usr/bin/env python3
"""Trains the built-in tiny model, models/tiny-fortunes: a real Phi3ForCausalLM on English fortune cookies.

    python3 scripts/train_tiny_model.py CORPUS_DIR OUT_DIR [--no-model] [--seconds 150]

Corpus: the Debian package `fortunes` 1:1.99.1-7.3 (source package fortune-mod; `apt-get download fortunes`,
then `dpkg -x`), the %-separated text files under usr/share/games/fortunes, all of them but `ascii-art`
(pictures, not text). Licence: BSD (Copyright (c) 1991 The Regents of the University of California; see the
package's /usr/share/doc/fortunes/copyright), which allows redistributing the held-out excerpt and a model
trained on it.

Split, fixed and deterministic: each fortune (stripped of surrounding blank lines and trailing blanks) goes by
the first 8 hex digits of its SHA-256 modulo 100: 0-4 held out (the reported validation set, written to
heldout.txt), 5-7 dev (picks the best checkpoint during training), the rest trains. Identical fortunes in
several files land in the same split.

Tokenizer: byte-level BPE (tokenizers), vocabulary 3072 trained on the train split, special tokens
<|endoftext|> <|im_start|> <|im_sep|> <|im_end|> (ids 0-3). Its post-processor puts <|endoftext|> before the
text (BOS), so `tokenizer(text)` and the Rust `encode(text, true)` both begin a document the way training did.
tokenizer_config.json carries Phi-4's chat template like the test fixtures, though this model has only seen
plain text: use it raw.

A document is encode(fortune, add_special_tokens=True) = [<|endoftext|>] + tokens; the training stream and
the evaluation stream are the documents concatenated. Training takes random 256-token windows of the train
stream.

Model: Phi3ForCausalLM, hidden 256, 4 layers, 8 heads / 4 kv heads (head_dim 32), MLP 768, full rotary
(partial_rotary_factor 1.0, as Phi-4), rope_theta 10000, max_position_embeddings 512, tied embeddings,
~3.9M parameters, saved as float16 (~7.9 MB). AdamW, bf16 autocast, cosine schedule over a planned number of
epochs (18) or the time budget, whichever ends first; dropout 0.15 against the small corpus; the checkpoint with
the lowest dev loss (evaluated each epoch) is kept. The corpus is small (~0.78M training tokens): a first run
with 40 planned epochs and dropout 0.1 bottomed out at epoch 15 (dev perplexity 58.2, held out 59.1) and then
overfitted, so more training time does not help at this size.

Evaluation (perplexity.json), with the saved float16 weights loaded back as float32, TF32 off: the held-out
stream cut into consecutive non-overlapping windows of 256 tokens (the last one shorter), each window run
on its own from position 0, every token after a window's first predicted; perplexity = exp(mean NLL).
`slice` repeats that on the stream's first 512 tokens (CPU, float32 and float64) for the Rust test, and
`greedy` holds a 32-token greedy continuation (a full forward pass per step, CPU, float32) with its margins.

Writes OUT_DIR/tiny-fortunes/: config.json (published layout, top-level rope_theta), model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json, heldout.txt, perplexity.json.
--no-model writes the tokenizer and the split only (no torch needed).
"""

import copy
import hashlib
import json
import math
import os
import sys
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"]
VOCAB = 3072
SEQ = 256
SLICE = 512
GREEDY_PROMPT = "The best way to"
GREEDY_TOKENS = 32
SAMPLE_PROMPTS = ["The best way to", "A man who", "Q: What do you call", "Love is", "Computers are"]
SEED = 1234

# Phi-4's chat template as published in microsoft/phi-4's tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.15,
    "bos_token_id": 0,
    "embd_pdrop": 0.15,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 256,
    "initializer_range": 0.02,
    "intermediate_size": 768,
    "max_position_embeddings": 512,
    "model_type": "phi3",
    "num_attention_heads": 8,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "original_max_position_embeddings": 512,
    "pad_token_id": 0,
    "partial_rotary_factor": 1.0,
    "resid_pdrop": 0.15,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": VOCAB,
}


def read_fortunes(corpus):
    """Every fortune of every file but ascii-art, in file-name order, duplicates dropped."""
    seen, out = set(), []
    names = sorted(n for n in os.listdir(corpus) if n != "ascii-art" and not n.endswith((".dat", ".u8")))
    for name in names:
        with open(os.path.join(corpus, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        for block in text.split("\n%\n"):
            block = "\n".join(line.rstrip() for line in block.strip("\n").split("\n")).strip("\n")
            if block and block != "%" and block not in seen:
                seen.add(block)
                out.append(block)
    return names, out


def split(fortunes):
    parts = {"heldout": [], "dev": [], "train": []}
    for text in fortunes:
        bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100
        parts["heldout" if bucket < 5 else "dev" if bucket < 8 else "train"].append(text)
    return parts


def build_tokenizer(folder, train):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(train, trainer)
    assert tok.get_vocab_size() <= VOCAB
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    assert ids["<|endoftext|>"] == 0
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", 0)]
    )
    tok.save(os.path.join(folder, "tokenizer.json"))
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t in SPECIAL
    }
    config = {
        "added_tokens_decoder": added,
        "add_bos_token": True,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "tokenizer_class": "GPT2Tokenizer",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        # A fortune ends at <|endoftext|>; <|im_end|> ends a chat turn.
        json.dump({"bos_token_id": 0, "eos_token_id": [0, ids["<|im_end|>"]], "do_sample": False}, f, indent=2)
    return tok, ids


def stream(tok, texts):
    out = []
    for enc in tok.encode_batch(texts, add_special_tokens=True):
        out.extend(enc.ids)
    return out


def windows(ids, n):
    return [ids[i : i + n] for i in range(0, len(ids), n) if len(ids[i : i + n]) >= 2]


def nll(model, torch, ids, device):
    """Summed NLL and count of the predicted tokens of the windows of `ids`, each from position 0."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows(ids, SEQ):
            x = torch.tensor([w], device=device)
            logits = model(x).logits[0].double()
            total += float(F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum"))
            count += len(w) - 1
    return total, count


def train(model, torch, train_ids, dev_ids, seconds, epochs=18, batch=64):
    import torch.nn.functional as F

    data = torch.tensor(train_ids, device="cuda")
    steps_per_epoch = max(1, len(train_ids) // (batch * SEQ))
    planned = epochs * steps_per_epoch
    warmup = 100
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), fused=True,
    )
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    offsets = torch.arange(SEQ + 1, device="cuda")
    best = (float("inf"), None, 0)
    t0 = time.time()
    step = 0
    print(f"train: {len(train_ids)} tokens, {steps_per_epoch} steps/epoch, planned {planned} steps or {seconds}s")
    while True:
        # Progress by steps or by time, whichever is further: the cosine ends with the budget either way.
        progress = max(step / planned, (time.time() - t0) / seconds)
        if progress >= 1.0:
            break
        lr_scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = 3e-3 * (0.05 + 0.95 * lr_scale)
        starts = torch.randint(0, len(train_ids) - SEQ - 1, (batch, 1), device="cuda", generator=gen)
        chunk = data[starts + offsets]
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(chunk[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % steps_per_epoch == 0 or step == 1:
            model.eval()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                total, count = nll(model, torch, dev_ids, "cuda")
            dev = total / count
            if dev < best[0]:
                best = (dev, {k: v.detach().clone() for k, v in model.state_dict().items()}, step)
            print(
                f"step {step:5d} epoch {step / steps_per_epoch:5.1f} {time.time() - t0:6.1f}s lr {opt.param_groups[0]['lr']:.2e}"
                f" train loss {loss.item():.4f} dev loss {dev:.4f} (ppl {math.exp(dev):.2f})",
                flush=True,
            )
    elapsed = time.time() - t0
    print(f"trained {step} steps ({step / steps_per_epoch:.1f} epochs) in {elapsed:.1f}s; best dev loss {best[0]:.4f} at step {best[2]}")
    model.load_state_dict(best[1])
    return {"steps": step, "epochs": step / steps_per_epoch, "seconds": elapsed, "best_step": best[2],
            "best_dev_loss": best[0], "batch": batch, "seq": SEQ, "peak_lr": 3e-3, "warmup_steps": warmup,
            "weight_decay": 0.1, "dropout": CONFIG["resid_pdrop"], "planned_epochs": epochs}


def greedy(model, torch, prompt, n):
    seq = list(prompt)
    margins = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            seq.append(int(torch.argmax(logits)))
    return seq[len(prompt):], margins


def main():
    corpus, out = sys.argv[1], sys.argv[2]
    seconds = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 150.0
    folder = os.path.join(out, "tiny-fortunes")
    os.makedirs(folder, exist_ok=True)
    names, fortunes = read_fortunes(corpus)
    parts = split(fortunes)
    print("files:", " ".join(names))
    print({k: (len(v), sum(map(len, v))) for k, v in parts.items()}, "(fortunes, characters)")
    with open(os.path.join(folder, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n%\n" for t in parts["heldout"]))
    tok, ids = build_tokenizer(folder, parts["train"])
    print("special ids:", ids, "vocab", tok.get_vocab_size())
    train_ids, dev_ids, held_ids = (stream(tok, parts[k]) for k in ("train", "dev", "heldout"))
    print(f"tokens: train {len(train_ids)}, dev {len(dev_ids)}, held out {len(held_ids)}")
    prompt = tok.encode(GREEDY_PROMPT).ids
    print("greedy prompt ids:", prompt)
    if "--no-model" in sys.argv:
        return

    import torch
    import transformers
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
    try:
        hf_ids = AutoTokenizer.from_pretrained(folder)(GREEDY_PROMPT)["input_ids"]
        print("transformers tokenizer:", hf_ids, "agrees on the prompt:", hf_ids == prompt)
    except Exception as e:  # informative only: the data goes through `tokenizers` directly
        print("transformers tokenizer failed to load:", e)

    torch.manual_seed(SEED)
    cfg = Phi3Config(**copy.deepcopy(CONFIG))
    model = Phi3ForCausalLM(cfg).cuda()
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params} ({params / 1e6:.3f}M)")
    run = train(model, torch, train_ids, dev_ids, seconds)

    model.half().save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    gen_path = os.path.join(folder, "generation_config.json")
    with open(gen_path) as f:
        gen_cfg = json.load(f)
    with open(gen_path, "w") as f:
        # save_pretrained rewrote it from the config; put back the stop tokens.
        gen_cfg.update({"bos_token_id": 0, "eos_token_id": [0, ids["<|im_end|>"]], "do_sample": False})
        json.dump(gen_cfg, f, indent=2)

    # Everything below uses the saved float16 weights as float32: what the Rust side loads.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    ref = Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    assert torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight), "lm_head must be tied"
    total, count = nll(ref.cuda(), torch, held_ids, "cuda")
    ppl = math.exp(total / count)
    print(f"held-out perplexity {ppl:.4f} over {count} predicted tokens ({len(held_ids)} in the stream)")
    ref = ref.cpu()
    torch.set_num_threads(8)
    s32, n32 = nll(ref, torch, held_ids[:SLICE], "cpu")
    s64, n64 = nll(ref.double(), torch, held_ids[:SLICE], "cpu")
    ref = ref.float()
    cont, margins = greedy(ref, torch, prompt, GREEDY_TOKENS)
    print("greedy:", repr(tok.decode(prompt + cont)), "min margin", min(margins))
    result = {
        "model": "tiny-fortunes",
        "corpus": {"debian_package": "fortunes", "version": "1:1.99.1-7.3", "source_package": "fortune-mod",
                   "licence": "BSD (The Regents of the University of California)", "files": names,
                   "fortunes": {k: len(v) for k, v in parts.items()},
                   "split": "sha256(fortune)[:8] % 100: 0-4 held out, 5-7 dev, else train"},
        "parameters": params,
        "training": run,
        "heldout": {
            "file": "heldout.txt",
            "document": "encode(fortune, add_special_tokens=True) = [<|endoftext|>] + tokens; fortunes separated by '\\n%\\n' in the file",
            "context": SEQ, "stride": SEQ,
            "windows": "consecutive non-overlapping windows of the document stream, each from position 0; every token but a window's first is predicted",
            "weights": "model.safetensors float16 loaded as float32, eager attention, TF32 off",
            "stream_tokens": len(held_ids), "predicted_tokens": count, "mean_nll": total / count, "perplexity": ppl,
        },
        "slice": {
            "tokens": held_ids[:SLICE], "predicted_tokens": n32,
            "perplexity_f32_cpu": math.exp(s32 / n32), "perplexity_f64_cpu": math.exp(s64 / n64),
        },
        "greedy": {"prompt": GREEDY_PROMPT, "prompt_ids": prompt, "tokens": cont, "margins": margins,
                   "text": tok.decode(prompt + cont)},
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    print("slice perplexity f32", result["slice"]["perplexity_f32_cpu"], "f64", result["slice"]["perplexity_f64_cpu"])
    with open(os.path.join(folder, "perplexity.json"), "w") as f:
        json.dump(result, f, indent=1)

    ref = ref.cuda()
    torch.manual_seed(SEED)
    for p in SAMPLE_PROMPTS:
        x = torch.tensor([tok.encode(p).ids], device="cuda")
        g = ref.generate(x, max_new_tokens=60, do_sample=False, eos_token_id=0, pad_token_id=0)
        print(f"--- greedy {p!r}:\n{tok.decode(g[0].tolist())}")
        s = ref.generate(x, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40, eos_token_id=0, pad_token_id=0)
        print(f"--- sampled (T 0.8, top-k 40) {p!r}:\n{tok.decode(s[0].tolist())}")
    for name in sorted(os.listdir(folder)):
        print(f"{os.path.getsize(os.path.join(folder, name)):>9} {name}")


if __name__ == "__main__":
    main()
