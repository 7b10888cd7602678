#!/usr/bin/env python3
"""make_tokenizer_fixture.py - writes tests/fixtures/tokenizer_cases.txt, the reference token ids
that tests/test_tokenizer.c compares model/tokenizer.c against. The reference is llama.cpp's
tokenizer, reached through llama-cpp-python (pip install llama-cpp-python), on the SmolLM2 GGUF.

usage: tools/make_tokenizer_fixture.py [--model M.gguf] [--corpus eval.txt] [--chars 20000] [--out F]
"""
import argparse
import hashlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

C_SNIPPET = """#include <stdio.h>
#include <string.h>

/* Count the words in a line. */
static int count_words(const char *s)
{
    int n = 0, in_word = 0;
\tfor (; *s; s++) {
\t\tif (*s == ' ' || *s == '\\t' || *s == '\\n') {
\t\t\tin_word = 0;
\t\t} else if (!in_word) {
\t\t\tin_word = 1;
\t\t\tn++;
\t\t}
\t}
    return n; // done
}

int main(int argc, char **argv)
{
    if (argc < 2) { fprintf(stderr, "usage: %s TEXT\\n", argv[0]); return 1; }
    printf("%d words, %zu bytes\\n", count_words(argv[1]), strlen(argv[1]));
    return 0;
}
"""

PY_SNIPPET = """import os
from dataclasses import dataclass


@dataclass
class Item:
    name: str
    price: float = 0.0

    def total(self, qty: int = 1) -> float:
        \"\"\"Price for qty items.\"\"\"
        return self.price * qty


def main():
    items = {"apple": Item("apple", 1.25), "pear": Item("pear", 2.5)}
    for key, it in sorted(items.items()):
        if it.price > 2:
            print(f"{key:>8}: {it.total(3):.2f}")  # expensive
        else:
            pass
    return [x**2 for x in range(10) if x % 2 == 0]


if __name__ == "__main__":
    main()
"""

CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat's 2+2? Answer in one word.<|im_end|>\n"
        "<|im_start|>assistant\nFour.<|im_end|>\n<|im_start|>assistant\n")

# Characters whose class PCRE2 10.42 (Unicode 14) and llama.cpp (Unicode 15.1) disagree on,
# patched in model/tokenizer.c: one letter or digit from each range new in Unicode 15/15.1, and
# U+180E (whitespace to PCRE2, not to llama.cpp). Each sits in contexts where its class decides
# the pre-token boundaries ("x's", " x1", "x  y", ...), so a wrong class changes the ids.
UNICODE15_CPS = [0x1123F, 0x11F04, 0x11F50, 0x1342F, 0x13441, 0x1B132, 0x1B155, 0x1D2C0, 0x1DF25,
                 0x1E030, 0x1E4D0, 0x1E4F0, 0x2B739, 0x2EBF0, 0x31350, 0x180E]
UNICODE15 = "".join("a%s%s %s1%s b%s\n%s's%s  x" % ((chr(c),) * 7) for c in UNICODE15_CPS)

# (name, parse_special, text)
CASES = [
    ("empty", 0, ""),
    ("one-letter", 0, "a"),
    ("one-space", 0, " "),
    ("one-newline", 0, "\n"),
    ("one-digit", 0, "7"),
    ("ascii-sentence", 0, "Hello world! The quick brown fox jumps over the lazy dog."),
    ("accents-fr", 0, "Le café était très naïf à Noël ; l'élève a dit « déjà vu ». Ça va ? Où ?"),
    ("accents-de", 0, "Straße, Größe, übermäßig – ÄÖÜ äöü ß ẞ; Fußgängerübergänge."),
    ("accents-misc", 0, "Señor Muñoz, São Paulo, Kraków, Čeština, Ærø, Øresund, İstanbul, ǅemal."),
    ("combining-marks", 0, "e\u0301te\u0301 n\u0303 A\u030a o\u0308\u0304 Z\u0335\u0321\u0300a"),
    ("cyrillic", 0, "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю. ЁЖИК"),
    ("greek", 0, "Καλημέρα κόσμε· ΑΒΓΔ αβγδ ς."),
    ("cjk", 0, "日本語のテキストと中文文本，还有한국어 텍스트。東京都（とうきょうと）"),
    ("rtl-and-indic", 0, "مرحبا بالعالم שלום עולם नमस्ते दुनिया สวัสดีชาวโลก"),
    ("emoji", 0, "I ❤️ emoji 😀😁😂 👍🏽 👋🏿 🇫🇷🇯🇵 ✅ ☕ 🐍🦀"),
    ("emoji-zwj", 0, "family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 coder 👩‍💻 astronaut 🧑🏾‍🚀 eye 👁️‍🗨️ kiss 💏🏻"),
    ("numbers", 0, "123 4567 3.14159 -2.5e10 1,234 1,234,567.89 0x1F 007 +33 2024-01-15 12:30:45"),
    ("numbers-long", 0, "31415926535897932384626433832795028841971693993751058209749445923078"),
    ("numbers-unicode", 0, "½ ¾ x² y³ Ⅻ ⅷ ١٢٣ ०१२ ௧௨ 𝟘𝟙 ①② 一二三 10km 5th v2.0.1"),
    ("whitespace-runs", 0, "a  b   c    d\t\te\t \tf \n g\n\n\nh   \n\n  i  j\r\nk\r\n\r\nl"),
    ("whitespace-trailing", 0, "trailing spaces   "),
    ("whitespace-space-newline", 0, " \n"),
    ("whitespace-only", 0, "   \t\n\n   "),
    ("whitespace-leading", 0, "  two leading, then\n    indented\n\tand tabbed"),
    ("whitespace-unicode", 0, "no\u00a0break\u3000ideo\u2028line\x85nel\x0bvt\x0cff\u200bzw\u202fnn"),
    ("contractions", 0, "don't won't I'm you're they're we've he'll she'd it's"),
    ("contractions-upper", 0, "DON'T I'LL THEY'RE WE'VE I'M SHE'D IT'S Don'T"),
    ("contractions-odd", 0, "it’s ’twas 'tis o'clock rock'n'roll '' 's 'ss ' s l'll"),
    ("code-c", 0, C_SNIPPET),
    ("code-python", 0, PY_SNIPPET),
    ("punctuation", 0, "Wait... what?!?! (yes) [no] {maybe} <tag/> a--b a—b «x» ‘y’ “z” §1 ¶2 "
                       "@user #tag $5 100% a&b a*b a_b ~/.bashrc C:\\path\\to |pipe| ^c `t` ==> <=>"),
    ("url-and-mail", 0, "See https://example.com/a/b?q=1&r=two#frag or mailto:someone@example.org."),
    ("long-runs", 0, "=" * 300 + "\n" + " " * 200 + "x" + "-" * 50 + "\n" + "a" * 120),
    ("unicode15", 0, UNICODE15),
    ("chat-special", 1, CHAT),
    ("chat-as-text", 0, CHAT),
    ("special-adjacent", 1, "<|im_end|><|im_start|><|endoftext|>x<|im_start|<|im_start|>"
                            "<reponame><repo_name> <file_sep>\n"),
    ("special-partial", 1, "<|im_start <|im_end |> <|endoftext|"),
    # Bytes the SmolLM2 vocabulary has no token for: the reference drops them, so the ids do
    # not decode back to the text (roundtrip field 0).
    ("unencodable-bytes", 0, "a\x04b\x06c\x13d\x1d e \U00040000 f \U000A1234 g"),
]


def sha256_file(path):
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def detokenize(llm, ids):
    """The bytes ids stand for, control tokens as their text. Llama.detokenize is not used: it
    gives nothing for a token longer than 32 bytes (e.g. 28909, 64 '=')."""
    import ctypes
    import llama_cpp
    buf = ctypes.create_string_buffer(4096)
    out = b""
    for i in ids:
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, i, buf, len(buf), 0, True)
        if n < 0:
            sys.exit("token %d has a piece longer than %d bytes" % (i, len(buf)))
        out += buf.raw[:n]
    return out


def main():
    """Tokenizes every case with the reference and writes the fixture."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--corpus", default=os.path.join(ROOT, "data/corpora/eval-debian-handbook.txt"))
    ap.add_argument("--chars", type=int, default=20000, help="corpus prefix length in characters")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/tokenizer_cases.txt"))
    args = ap.parse_args()

    try:
        import llama_cpp
    except ImportError:
        sys.exit("needs llama-cpp-python: pip install llama-cpp-python")
    llm = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)

    with open(args.corpus, encoding="utf-8") as f:
        corpus = f.read()
    cases = CASES + [("corpus-%d" % args.chars, 0, corpus[: args.chars])]

    lines = [
        "# tokenizer_cases.txt - reference token ids for tests/test_tokenizer.c. Do not edit by hand:",
        "# regenerate with tools/make_tokenizer_fixture.py.",
        "# reference: llama-cpp-python %s, Llama(vocab_only=True).tokenize(text, add_bos=False, special=S)"
        % llama_cpp.__version__,
        "# gguf: %s sha256 %s" % (os.path.basename(args.model), sha256_file(args.model)),
        "# corpus: %s (sha256 %s), first %d characters" % (os.path.basename(args.corpus),
                                                          sha256_file(args.corpus), args.chars),
        "# format: one case per line, five tab-separated fields:",
        "#   name, S (1: parse special tokens), R (1: the ids decode back to the text),",
        "#   the text as lowercase hex of its UTF-8 bytes, the token ids separated by spaces.",
    ]
    for name, special, text in cases:
        data = text.encode("utf-8")
        ids = llm.tokenize(data, add_bos=False, special=bool(special))
        roundtrip = int(detokenize(llm, ids) == data)
        lines.append("\t".join([name, str(special), str(roundtrip), data.hex(), " ".join(map(str, ids))]))
        if not roundtrip and name != "unencodable-bytes":
            print("warning: %s does not round-trip through the reference" % name, file=sys.stderr)
    with open(args.out, "w", encoding="ascii", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote %s: %d cases, %d bytes" % (args.out, len(cases), os.path.getsize(args.out)))


if __name__ == "__main__":
    main()
