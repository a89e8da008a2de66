"""Writes models/tiny-fortunes/calibration.txt: calibration text for activation-aware pruning (Wanda),
taken from the TRAIN side of the built-in model's split, never from the held-out fortunes.

Corpus and split exactly as scripts/train_tiny_model.py defines them (its read_fortunes and split are
restated here so this script needs neither torch nor tokenizers): the Debian package `fortunes`
1:1.99.1-7.3 unpacked with `apt-get download fortunes && dpkg -x fortunes_*.deb x`, every file under
usr/share/games/fortunes but ascii-art, duplicates dropped; a fortune goes to the held-out split when
sha256(fortune)[:8] % 100 < 5, to dev when < 8, else to train.

The slice: every STRIDE-th train fortune in corpus order, so every file of the corpus contributes.
Written like heldout.txt: each fortune followed by a line holding only '%'.

    python3 scripts/make_calibration.py x/usr/share/games/fortunes models/tiny-fortunes/calibration.txt
"""

import hashlib
import os
import sys

STRIDE = 32


def read_fortunes(corpus):
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
    return out


def bucket(text):
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100


def main():
    corpus, out = sys.argv[1], sys.argv[2]
    train = [t for t in read_fortunes(corpus) if bucket(t) >= 8]
    chosen = train[::STRIDE]
    with open(out, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n%\n" for t in chosen))
    print(f"{len(train)} train fortunes, {len(chosen)} written to {out}")


if __name__ == "__main__":
    main()
