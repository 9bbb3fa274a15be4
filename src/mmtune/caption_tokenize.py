"""The COCO caption scorer's tokenisation in pure Python: Stanford PTBTokenizer (CoreNLP 3.4.1,
`-preserveLines -lowerCase`, as pycocoevalcap runs it) followed by pycocoevalcap's removal of
punctuation tokens.

Written from the tokenizer's observed behaviour on captions: contractions split (`do n't`,
`it 's`, `ca n't`, `gon na`), possessive apostrophes split (`dogs '`), hyphenated words, numbers
with `.`/`,`/`:`/`/` and acronyms kept whole, known abbreviations keep their period, brackets
become `-lrb-`/`-rrb-`… (lower-cased, so the scorer's upper-case list keeps them), `“”‘’«»`
become quotes, dashes `--`, `…` `...`, `½` `1/2`, `€` `$` and `£` `#`. Rare constructs the PTB
lexer special-cases (URLs, e-mail addresses, smileys, phone numbers) may split differently.
"""

from __future__ import annotations

import re

# pycocoevalcap's list; compared after lower-casing, so "-LRB-" never matches "-lrb-"
PUNCTUATIONS = frozenset(
    [
        "''",
        "'",
        "``",
        "`",
        "-LRB-",
        "-RRB-",
        "-LCB-",
        "-RCB-",
        ".",
        "?",
        "!",
        ",",
        ":",
        "-",
        "--",
        "...",
        ";",
    ]
)

# abbreviations that keep their period whatever their case (titles, months, days, companies)
_ANY_CASE = """mr mrs ms dr drs prof profs sen sens rep reps gen gov govs lt col adm rev maj sgt cpl pvt
    mt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det messrs attys atty
    jr sr bros blvd rd esq inc co cos corp ltd plc dept univ intl assn bancorp bhd sys
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    etc al seq vs v ft calif fla"""
_ABBREV_ANY_CASE = frozenset(_ANY_CASE.split())
# abbreviations that keep their period only when capitalised (US states: "Ore." but "ore .")
_CAPITALISED = """Ala Ariz Ark Colo Conn Del Ga Ill Ind Kan Kans Ky La Md Mass Mich Minn Miss Mo Mont Neb
    Nev Okla Ore Pa Penn Tenn Tex Va Vt Wash Wis Wisc Wyo"""
_ABBREV_CAPITALISED = frozenset(_CAPITALISED.split())
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
    "y'all": ("y'", "all"),
}
_CHAR_MAP = str.maketrans(
    {
        "“": '"',
        "”": '"',
        "«": '"',
        "»": '"',
        "‘": "'",
        "’": "'",
        "—": " -- ",
        "–": " -- ",
        "…": " ... ",
        "½": " 1/2 ",
        "¼": " 1/4 ",
        "¾": " 3/4 ",
        "€": " $ ",
        "£": " # ",
    }
)

_ABBREV_BEFORE_DIGIT = frozenset(["no", "fig", "ca", "nos", "figs", "p", "pp"])
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

_W = r"[^\W_]+"  # letters and digits, any script
_WORD = rf"{_W}(?:'{_W})*'?"  # apostrophes kept for now: don't, o'clock, dogs'
_TOKEN = re.compile(
    r"<\/?[A-Za-z!][^<>]*>"  # SGML tag
    r"|'(?:t(?=is|was)|n'|em\b|cause\b|til\b|till\b|\d0s\b)"  # 't(is), 'n', 'em, '90s
    r"|(?i:'(?:s|d|ll|re|ve|m)\b)"  # a detached contraction: the 80 's
    rf"|[-+]?\.?\d[^\W_]*(?:[.,:/]\d+)*(?:-{_WORD})*(?:'{_W})?"  # 3.5 1,000 -5 .5 3.5-inch 80's
    r"|[A-Z]+&[A-Z]+|@[A-Za-z_]\w*"  # AT&T, @name
    rf"|{_WORD}(?:[-/.]{_WORD})*"  # well-known and/or j.k u.s.a
    r"|\.{2,}|-{2,}|[?!]+|\S"  # dots, dashes, ?! runs; any other single character
)
_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'d|'ll|'re|'ve|'m)$")
_APO_WORD = re.compile(
    r"(?i)^(?:[a-hj-xz]'[^\W_]{2,}|[^\W_]*[aeiouy]'[aeiou][^\W_]*|n't|nor'easter|s'mores|ev'ry|e'er|c'mon|li'l|ol'|somethin')$"
)


def _split_contraction(tok: str) -> list[str]:
    """`don't` → do n't, `dog's` → dog 's, `cannot` → can not, `dogs'` → dogs '."""
    low = tok.lower()
    if low in _SPLIT_WORDS:
        a, _ = _SPLIT_WORDS[low]
        return [tok[: len(a)], tok[len(a) :]]
    if not tok:
        return []
    if "'" not in tok or _APO_WORD.match(tok):
        return [tok]
    if "'n'" in low:  # rock'n'roll → rock 'n' roll
        i = low.index("'n'")
        return [*_split_contraction(tok[:i]), tok[i : i + 3], *_split_contraction(tok[i + 3 :])]
    m = _CONTRACTION.match(tok)
    if m:
        return [*_split_contraction(m.group(1)), m.group(2)]
    out: list[str] = []
    for i, part in enumerate(tok.split("'")):  # p'q → p ' q ; dogs' → dogs '
        out.extend(["'"] * (i > 0) + [part] * bool(part))
    return out


def _keeps_period(word: str, rest: str) -> bool:
    """Whether `word.` is one token: an initial, an acronym or a known abbreviation."""
    if "." in word:
        return True
    if len(word) == 1:  # an initial, unless a sentence ends: "c. The" → c . the
        # the lexer looks past the line into the next caption, which in COCO starts upper-case
        ends = r"\s*$" if word.isupper() else r"\s*$|\s+[A-Z]"
        return word.isalpha() and re.match(ends, rest) is None
    if word.lower() in _ABBREV_ANY_CASE or word in _ABBREV_CAPITALISED:
        return True
    return word.lower() in _ABBREV_BEFORE_DIGIT and re.match(r" ?\d", rest) is not None


def _normalise(tok: str) -> list[str]:
    """One matched token → its PTB form(s): contractions split, brackets and runs renamed."""
    if tok[0] == "'" and len(tok) > 1 or tok[0] == "<" and len(tok) > 1:
        return [tok]  # 'em 'cause '90s 'n' and SGML tags stay whole
    if "'" in tok or tok.lower() in _SPLIT_WORDS:
        return _split_contraction(tok)
    if tok[0] == "." and len(tok) > 1 and not tok[1].isdigit():
        return ["..."]  # the scorer drops "...", as it drops "." and "--"
    if tok[0] == "-" and len(tok) > 1 and tok[1] == "-":
        return ["--"]
    return [{'"': "''", **_BRACKETS}.get(tok, tok)]


def _ptb_tokens(text: str) -> list[str]:
    """PTB tokens of one line, before lower-casing and punctuation removal."""
    text = text.translate(_CHAR_MAP)
    out: list[str] = []
    pos = 0
    while m := _TOKEN.search(text, pos):
        tok, pos = m.group(0), m.end()
        if tok[0].isalpha() and text.startswith(".", pos) and _keeps_period(tok, text[pos + 1 :]):
            tok, pos = tok + ".", pos + 1
        out.extend(_normalise(tok))
    return out


def tokenize(text: str) -> list[str]:
    """Caption → the tokens pycocoevalcap scores: PTB tokens, lower-cased, punctuation dropped."""
    toks = _ptb_tokens(text.replace("\n", " "))
    return [t for t in (t.lower() for t in toks) if t not in PUNCTUATIONS]
