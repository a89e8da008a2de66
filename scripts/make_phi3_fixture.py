#!/usr/bin/env python3
"""Builds the tiny Phi-3 test fixtures with Hugging Face transformers and writes reference outputs.

    python3 scripts/make_phi3_fixture.py OUT_DIR [--no-model]

Writes OUT_DIR/fixture.tar holding two folders, to be unpacked into tests/fixtures/:

phi3-tiny/            Phi3ForCausalLM, hidden 128, 2 layers, 4 heads / 2 kv heads, partial_rotary_factor 0.75,
                      default RoPE, untied lm_head, one model.safetensors (f32). Also:
  config.json                 published layout: top-level rope_theta and rope_scaling (as microsoft/phi-4 ships)
  config_transformers5.json   what transformers 5 itself writes (RoPE settings under rope_parameters)
  tokenizer.json, tokenizer_config.json (chat template inside, Phi-4 style), generation_config.json
  reference.safetensors       tokens, full-sequence fp32 logits, fp64 logits, greedy continuation
  chat_reference.json         apply_chat_template output (text and ids) and an encode/decode sample
phi3-tiny-longrope/   hidden 64, 4 heads / 2 kv heads, partial 0.75, longrope (original_max_position_embeddings
                      32, max_position_embeddings 128), sliding_window 20, tied embeddings, saved in two shards
                      with model.safetensors.index.json. reference.safetensors holds a 12-token sequence (short
                      factors), a 40-token sequence (long factors) and a greedy run that crosses position 32.

The greedy continuations are computed with a full forward pass per step, which is what HF generate computes for
Phi-3 (its prepare_inputs_for_generation recomputes the cache when the sequence crosses the longrope switch).
--no-model writes only the tokenizer files (no torch needed), to check that part without a GPU machine.
"""

import copy
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import traceback

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = """
The little robot woke up early in the morning and looked out of the window. The sun was rising over the hills,
and the birds were singing in the tall trees near the river. It was a good day to learn something new.
The robot walked to the library and opened a book about the stars. Each star is a sun, far away, and some of
them have planets of their own. The robot wondered whether any of those planets had robots too, and whether
they also liked to read books in the morning.
In the afternoon the robot helped the farmer carry apples to the market. The apples were red and green, and
the market was full of people who wanted to buy fresh fruit, warm bread, cheese and honey. The farmer smiled
and said thank you, and the robot said that helping was the best part of the day.
When the evening came, the robot sat by the river and counted the lights of the town: one, two, three, four,
five, six, seven, eight, nine, ten. Then it wrote a short story about a fox, a cat and a clever old owl who
lived together in a house at the edge of the forest. The quick brown fox jumps over the lazy dog.
Hello, how are you? I am fine, thank you. What is your name? My name is Robot. Can you help me, please?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Punctuation: commas, periods. Questions? Answers!
"""

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|end|>", "<|dummy_pad|>"]

# Phi-4's chat template as published in microsoft/phi-4's tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

MESSAGES = [
    {"role": "system", "content": "You are a tiny test model."},
    {"role": "user", "content": "Say hello to the robot, please."},
    {"role": "assistant", "content": "Hello, robot!"},
    {"role": "user", "content": "What is 2 + 2?"},
]

VOCAB = 384  # model vocabulary; the tokenizer has fewer entries, as real checkpoints pad theirs


def build_tokenizer(folder):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 3, trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(os.path.join(folder, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    # tokenizer_config.json as published checkpoints have it: chat template inside, special tokens named.
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t in SPECIAL
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|dummy_pad|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "tokenizer_class": "GPT2Tokenizer",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return ids


def chat_reference(folder):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    no_prompt = hf.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=False)
    sample = "The quick brown fox jumps over the lazy dog. Robots read books! 42 \u00e9t\u00e9 \u2603"
    enc = hf(sample)["input_ids"]
    ref = {
        "messages": MESSAGES,
        "text": text,
        "ids": list(map(int, ids)),
        "messages_no_generation_prompt": MESSAGES[:2],
        "text_no_generation_prompt": no_prompt,
        "sample": sample,
        "sample_ids": list(map(int, enc)),
        "sample_decoded": hf.decode(enc),
    }
    with open(os.path.join(folder, "chat_reference.json"), "w") as f:
        json.dump(ref, f, indent=2, ensure_ascii=False)
    print("chat template:", repr(text))
    print("ids:", ref["ids"])
    return hf


def init_weights(model, torch, seed):
    # HF's default init (std 0.02) gives near-uniform logits and attention; scale the weights so attention
    # patterns, RoPE and the norms' weights all matter and greedy choices have clear margins.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1]
                gain = 2.0 if "qkv_proj" in name else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(fan_in))


def run_logits(model, torch, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def greedy(model, torch, prompt, n):
    seq = list(prompt)
    margins = []
    for _ in range(n):
        logits = run_logits(model, torch, seq)[-1]
        top = torch.topk(logits, 2).values
        margins.append(float(top[0] - top[1]))
        seq.append(int(torch.argmax(logits)))
    return seq[len(prompt):], min(margins)


def make_model(folder, cfg_dict, seed, torch, shard=None):
    from transformers import Phi3Config, Phi3ForCausalLM

    # Phi3Config turns the rope_scaling dict it is given into rope_parameters in place: pass a copy.
    cfg = Phi3Config(**copy.deepcopy(cfg_dict))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(cfg).float().eval()
    init_weights(model, torch, seed)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    # Keep what transformers 5 wrote, then write the published layout as config.json.
    os.replace(os.path.join(folder, "config.json"), os.path.join(folder, "config_transformers5.json"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    gen = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    # The published config must give the same model as the one built here.
    reloaded = Phi3ForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    rot = reloaded.model.rotary_emb
    print(folder, "rope:", rot.rope_type, "inv_freq", rot.inv_freq.tolist(), "attention_scaling", rot.attention_scaling)
    print("config rope_parameters:", reloaded.config.rope_parameters, "sliding_window", reloaded.config.sliding_window)
    return model, reloaded


def check_same(a, b, torch, tokens, what):
    la, lb = run_logits(a, torch, tokens), run_logits(b, torch, tokens)
    d = float((la - lb).abs().max())
    print(f"{what}: reloaded-from-published-config max diff {d}")
    assert d <= 1e-6, f"{what}: the published config.json does not rebuild the same model"


def tiny(out, ids, tokens, torch):
    from safetensors.torch import save_file

    folder = os.path.join(out, "phi3-tiny")
    cfg = {
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "embd_pdrop": 0.0,
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": 128,
        "initializer_range": 0.02,
        "intermediate_size": 256,
        "max_position_embeddings": 256,
        "model_type": "phi3",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "original_max_position_embeddings": 256,
        "pad_token_id": ids["<|dummy_pad|>"],
        "partial_rotary_factor": 0.75,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB,
    }
    model, reloaded = make_model(folder, cfg, 1234, torch)
    rot = reloaded.model.rotary_emb
    assert rot.inv_freq.numel() == 12, "partial_rotary_factor 0.75 of head_dim 32 must rotate 24 dims"
    check_same(model, reloaded, torch, tokens, "phi3-tiny")
    logits = run_logits(model, torch, tokens)
    with torch.no_grad():
        hidden = torch.stack(model(torch.tensor([tokens]), output_hidden_states=True).hidden_states)[:, 0]
    logits64 = run_logits(model.double(), torch, tokens)
    model.float()
    print("phi3-tiny fp32 vs fp64 logits: max abs diff", float((logits.double() - logits64).abs().max()))
    cont, margin = greedy(model, torch, tokens, 8)
    print("phi3-tiny greedy", cont, "min top1-top2 margin", margin)
    save_file(
        {
            "tokens": torch.tensor(tokens, dtype=torch.int64),
            "logits": logits.contiguous(),
            "logits_f64": logits64.contiguous(),
            "greedy": torch.tensor(cont, dtype=torch.int64),
            # HF's hidden_states: the embeddings, then each layer's output (for debugging a mismatch).
            "hidden_states": hidden.contiguous(),
        },
        os.path.join(folder, "reference.safetensors"),
        metadata={"greedy_min_margin": str(margin), "transformers": __import__("transformers").__version__},
    )
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(
            {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|end|>"]], "do_sample": False},
            f,
            indent=2,
        )


def longrope(out, tokens, torch):
    from safetensors.torch import save_file

    folder = os.path.join(out, "phi3-tiny-longrope")
    cfg = {
        "architectures": ["Phi3ForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": [3, 4],
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
        "model_type": "phi3",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "original_max_position_embeddings": 32,
        "pad_token_id": 5,
        "partial_rotary_factor": 0.75,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "type": "longrope",
        },
        "rope_theta": 10000.0,
        "sliding_window": 20,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "vocab_size": VOCAB,
    }
    model, reloaded = make_model(folder, cfg, 99, torch, shard="200KB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json")), "expected a sharded save"
    assert reloaded.model.rotary_emb.inv_freq.numel() == 6
    assert torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight), "lm_head must be tied"
    short, long = tokens[:12], tokens[:40]
    assert len(long) == 40
    check_same(model, reloaded, torch, long, "phi3-tiny-longrope")
    ls, ll = run_logits(model, torch, short), run_logits(model, torch, long)
    scaling = model.model.rotary_emb.attention_scaling
    print("longrope attention_scaling", scaling, "expected", math.sqrt(1 + math.log(4) / math.log(32)))
    # The long-factor logits of the first 12 positions must differ from the short-factor ones: the fixture
    # really distinguishes the two factor sets.
    print("short vs long factors at the same positions: max diff", float((ls - ll[:12]).abs().max()))
    cont, margin = greedy(model, torch, tokens[:28], 10)
    print("longrope greedy (crossing 32)", cont, "min margin", margin)
    save_file(
        {
            "short_tokens": torch.tensor(short, dtype=torch.int64),
            "short_logits": ls.contiguous(),
            "long_tokens": torch.tensor(long, dtype=torch.int64),
            "long_logits": ll.contiguous(),
            "cross_prompt": torch.tensor(tokens[:28], dtype=torch.int64),
            "cross_greedy": torch.tensor(cont, dtype=torch.int64),
        },
        os.path.join(folder, "reference.safetensors"),
        metadata={"greedy_min_margin": str(margin), "transformers": __import__("transformers").__version__},
    )


def main():
    out = sys.argv[1]
    with_model = "--no-model" not in sys.argv
    work = tempfile.mkdtemp()
    tiny_dir = os.path.join(work, "phi3-tiny")
    os.makedirs(tiny_dir)
    ids = build_tokenizer(tiny_dir)
    print("special ids:", ids)
    hf = chat_reference(tiny_dir)
    tokens = hf("The robot walked to the library and opened a book about the stars, and the farmer smiled and said"
                " thank you to the little robot by the river in the evening.")["input_ids"]
    print("test tokens:", len(tokens), tokens)
    assert len(tokens) >= 40, "need 40 tokens for the longrope sequence"
    if with_model:
        import torch

        import transformers

        print("torch", torch.__version__, "transformers", transformers.__version__)
        torch.set_num_threads(8)
        # Each variant on its own: a failure in one still returns the other (and the traceback).
        for make in (lambda: tiny(work, ids, tokens[:12], torch), lambda: longrope(work, tokens, torch)):
            try:
                make()
            except Exception:
                traceback.print_exc()
    os.makedirs(out, exist_ok=True)
    with tarfile.open(os.path.join(out, "fixture.tar"), "w") as tar:
        for name in sorted(os.listdir(work)):
            tar.add(os.path.join(work, name), arcname=name)
    for root, _, files in os.walk(work):
        for f in sorted(files):
            p = os.path.join(root, f)
            print(f"{os.path.getsize(p):>9} {os.path.relpath(p, work)}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
