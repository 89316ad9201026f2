#!/usr/bin/env python3
"""Builds the text data of the bundled tiny model from the King James Bible of Debian's bible-kjv-text package
(public domain; dumped by `bible -f -l100000 gen1:1-rev22:21`, one `Ref text` verse per line). Standard library only.

    python3 scripts/tiny_kjv_data.py KJV_DUMP OUT_DIR

writes, all deterministic:
  OUT_DIR/corpus.txt        one verse per line (the sentencepiece training text)
  OUT_DIR/pretrain.jsonl    {"text": ...} passages of consecutive verses of one chapter (about 120 words each)
  OUT_DIR/verses.jsonl      alpaca-format verse completions: the first half of a verse -> the rest (every 97th verse,
                            none of which is held out)
  OUT_DIR/heldout.jsonl     verse completions of other verses, for showing generations the fine-tune never saw
"""

import json
import re
import sys

BOOKS = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers", "Deu": "Deuteronomy", "Josh": "Joshua",
    "Jdgs": "Judges", "Ruth": "Ruth", "1Sm": "1 Samuel", "2Sm": "2 Samuel", "1Ki": "1 Kings", "2Ki": "2 Kings",
    "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra", "Neh": "Nehemiah", "Est": "Esther", "Job": "Job",
    "Psa": "Psalms", "Prv": "Proverbs", "Eccl": "Ecclesiastes", "SSol": "Song of Solomon", "Isa": "Isaiah",
    "Jer": "Jeremiah", "Lam": "Lamentations", "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel",
    "Amos": "Amos", "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah", "Nahum": "Nahum", "Hab": "Habakkuk",
    "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah", "Mal": "Malachi", "Mat": "Matthew", "Mark": "Mark",
    "Luke": "Luke", "John": "John", "Acts": "Acts", "Rom": "Romans", "1Cor": "1 Corinthians", "2Cor": "2 Corinthians",
    "Gal": "Galatians", "Eph": "Ephesians", "Phi": "Philippians", "Col": "Colossians", "1Th": "1 Thessalonians",
    "2Th": "2 Thessalonians", "1Tim": "1 Timothy", "2Tim": "2 Timothy", "Titus": "Titus", "Phmn": "Philemon",
    "Heb": "Hebrews", "Jas": "James", "1Pet": "1 Peter", "2Pet": "2 Peter", "1Jn": "1 John", "2Jn": "2 John",
    "3Jn": "3 John", "Jude": "Jude", "Rev": "Revelation",
}
REF = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)$")
INSTRUCTION = "Complete the verse from the King James Bible."


def read_verses(path):
    verses = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            ref, _, text = line.partition(" ")
            m = REF.match(ref)
            if not m or m.group(1) not in BOOKS or not text.strip():
                sys.exit(f"{path}:{n}: not a 'Ref text' verse line: {line[:60]!r}")
            verses.append((BOOKS[m.group(1)], int(m.group(2)), int(m.group(3)), " ".join(text.split())))
    if len(verses) != 31102:
        sys.exit(f"{path}: expected the 31102 verses of the KJV, found {len(verses)}")
    return verses


def completion(verse):
    words = verse[3].split()
    if len(words) < 8:
        return None
    cut = len(words) // 2
    return {"instruction": INSTRUCTION, "input": " ".join(words[:cut]), "output": " ".join(words[cut:])}


def main():
    src, out = sys.argv[1], sys.argv[2]
    verses = read_verses(src)
    with open(f"{out}/corpus.txt", "w", encoding="utf-8") as f:
        for v in verses:
            f.write(v[3] + "\n")
    with open(f"{out}/pretrain.jsonl", "w", encoding="utf-8") as f:
        passage, key = [], None
        for v in verses:
            if passage and ((v[0], v[1]) != key or sum(len(p.split()) for p in passage) >= 120):
                f.write(json.dumps({"text": " ".join(passage)}) + "\n")
                passage = []
            key = (v[0], v[1])
            passage.append(v[3])
        f.write(json.dumps({"text": " ".join(passage)}) + "\n")
    train, heldout = [], []
    for i, v in enumerate(verses):
        c = completion(v)
        if c is None:
            continue
        if i % 97 == 0:
            train.append(c)
        elif i % 97 == 48 and len(heldout) < 40:
            heldout.append(c)
    for name, rows in (("verses.jsonl", train), ("heldout.jsonl", heldout)):
        with open(f"{out}/{name}", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"{len(verses)} verses; {len(train)} training and {len(heldout)} held-out completions")


if __name__ == "__main__":
    main()
