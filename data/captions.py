"""Caption language and spam rules: what the `caption_language` and caption spam rejects decide on.

Plain text in, a verdict out (no Reject here: data/filters.py wraps these rules as filter units
with their reason codes, so this module stays free of the filter machinery).

Language. langid alone misjudges short alt-text: measured on tests/fixtures/captions_lang.tsv (see
benchmarks/caption_language.py) it rejected 15% of short English captions ("Vintage car at sunset"
as Danish, "Modern kitchen design ideas 2021" as German at p=0.9999), and no confidence threshold
separates those from short foreign captions. So a short caption in Latin script is judged by
evidence first: function words of the allowed languages against those of other languages, and
letters outside the allowed languages' alphabets (ä, ñ, ł, ...). It is rejected only when foreign
evidence outweighs allowed evidence and langid, restricted to a set of plausible candidate
languages, agrees. Longer captions, and captions mostly in another script (where the script
itself is the evidence), are judged by langid alone.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

# langid.py 1.1.6's languages (its model's nb_classes): the codes `allowed` and `candidates` take.
LANGID_CODES = frozenset(
    "af am an ar as az be bg bn br bs ca cs cy da de dz el en eo es et eu fa fi fo fr ga gl gu he hi hr ht hu "
    "hy id is it ja jv ka kk km kn ko ku ky la lb lo lt lv mg mk ml mn mr ms mt nb ne nl nn no oc or pa pl ps "
    "pt qu ro ru rw se si sk sl sq sr sv sw ta te th tl tr ug uk ur vi vo wa xh zh zu".split())

# The languages of most web alt-text. Out of all 97, langid on short text often picks a rare
# neighbour (Danish for English, Esperanto for Spanish); a language missing here is judged as
# its nearest candidate.
DEFAULT_CANDIDATES = ("en de fr es it pt nl pl ru uk cs sk sv da no nb fi hu ro tr el bg ca "
                      "ja zh ko vi id th ar fa he hi").split()

# Closed-class words (articles, prepositions, conjunctions, common pronouns and verbs) per language.
# A word listed for an allowed language and for another one ("in", "a", "de") is evidence for
# neither. Content words that double as common English words are left out on purpose: German
# "die" (die-cut), Dutch "door", French "son".
FUNCTION_WORDS: dict[str, frozenset[str]] = {lang: frozenset(words.split()) for lang, words in {
    "en": "the a an of and or with without for at by from on in into onto to is are was were be been its his "
          "her their our your my this that these those how what who which while under over near next during "
          "before after has have it as up out off about above below between through across around behind "
          "inside outside along against among beside than not no per via i",
    "de": "der das den dem des ein eine einer einem einen und oder mit ohne von vom für auf aus bei beim nach "
          "zu zum zur im in am an ins über unter vor hinter neben zwischen durch ist sind wie auch nicht mein "
          "meine dein unser",
    "fr": "le la les un une des du de et ou avec sans pour sur sous dans en au aux par chez est sont à qui que "
          "mon mes sa ses leur nos vos ce cette ces",
    "es": "el la los las un una uno unos unas de del al y o con sin para por en sobre entre desde hasta es su "
          "sus mi mis tu que muy",
    "it": "il lo la gli i le un una uno di del della dello dei degli delle da dal dalla in nel nella nei sul "
          "sulla al alla allo ai e ed con per tra fra che è",
    "pt": "o a os as um uma uns umas de do da dos das no na nos nas ao aos em com sem para por e é que pelo "
          "pela seu sua",
    "nl": "de het een en of met zonder voor van op in aan bij uit naar over te om is zijn mijn je jouw ons onze",
    "pl": "i w z ze na do od dla po przy pod nad się jest oraz lub",
    "sv": "och med på av för till en ett det som är i om från",
    "da": "og med på af for til en et det som er i fra",
    "no": "og med på av for til en et det som er i fra",
}.items()}
# Elided articles and prepositions ("d'été", "dell'acqua") and the English possessive.
FUNCTION_PREFIXES = {"fr": ("d'", "l'", "qu'", "j'", "n'", "s'", "c'"),
                     "it": ("d'", "l'", "dell'", "dall'", "nell'", "sull'", "all'", "un'")}
FUNCTION_SUFFIXES = {"en": ("'s", "n't")}
# Letters each language writes beyond a-z. A caption with other letters carries foreign evidence
# (counted once: English captions name "São Paulo" or "Pokémon" too).
EXTRA_LETTERS = {"en": "", "de": "äöüß", "fr": "àâæçéèêëîïôœùûüÿ", "es": "áéíñóúü", "it": "àèéìíîòóù",
                 "pt": "áâãàçéêíóôõú", "nl": "éèëïöüáó", "pl": "ąćęłńóśźż", "sv": "åäöé", "da": "æøåé",
                 "no": "æøåéèóòô", "nb": "æøåéèóòô"}
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*'?")


@dataclass(kw_only=True)
class LanguageConfig:
    enabled: bool = True
    allowed: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes langid knows
    # langid chooses among these (and the allowed ones); [] = all 97 of langid's languages.
    candidates: list[str] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    # Latin-script captions with fewer words are never judged (too little to go on).
    min_words: int = 3
    # Latin-script captions with fewer words are rejected only when foreign function words and
    # letters outweigh those of the allowed languages (and langid agrees): langid alone errs on them.
    # 0 judges every caption by langid alone.
    short_words: int = 8
    # Reject only when langid gives the allowed languages together at most 1 - min_confidence.
    min_confidence: float = 0.9

    def validate(self) -> None:
        unknown = sorted(set(self.allowed) - LANGID_CODES) + sorted(set(self.candidates) - LANGID_CODES)
        if unknown:
            raise ValueError(f"captions.language: unknown language codes {unknown} "
                             f"(langid knows {' '.join(sorted(LANGID_CODES))})")
        if not 0.0 <= self.min_confidence < 1.0:
            raise ValueError(f"captions.language.min_confidence must be in [0, 1), got {self.min_confidence}")


@functools.lru_cache(maxsize=1)
def _langid():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def non_latin_share(text: str) -> float:
    """Share of the letters that are not Latin script (Cyrillic, Han, kana, Arabic, ...)."""
    letters = [ch for ch in text if ch.isalpha()]
    return sum("LATIN" not in unicodedata.name(ch, "") for ch in letters) / len(letters) if letters else 0.0


class LanguageRule:
    """`judge(text)`: None when the caption may be in an allowed language, else why not."""

    def __init__(self, cfg: LanguageConfig):
        cfg.validate()
        self.cfg = cfg
        self.allowed = set(cfg.allowed)
        self.candidates = sorted(set(cfg.candidates) | self.allowed) if cfg.candidates else sorted(LANGID_CODES)
        allowed_words = frozenset().union(*(FUNCTION_WORDS.get(lang, ()) for lang in self.allowed))
        other_words = frozenset().union(*(w for lang, w in FUNCTION_WORDS.items() if lang not in self.allowed))
        self.allowed_words, self.foreign_words = allowed_words - other_words, other_words - allowed_words
        allowed_affixes = self._affixes(lambda lang: lang in self.allowed)
        other_affixes = self._affixes(lambda lang: lang not in self.allowed)
        self.allowed_affixes = tuple(tuple(a for a in mine if a not in theirs)
                                     for mine, theirs in zip(allowed_affixes, other_affixes))
        self.foreign_affixes = tuple(tuple(a for a in mine if a not in theirs)
                                     for mine, theirs in zip(other_affixes, allowed_affixes))
        # Unknown alphabets (an allowed language not in EXTRA_LETTERS) turn the letter evidence off.
        known = all(lang in EXTRA_LETTERS for lang in self.allowed)
        self.alphabet = set("abcdefghijklmnopqrstuvwxyz").union(*(EXTRA_LETTERS[lang] for lang in self.allowed)) \
            if known else None

    @staticmethod
    def _affixes(keep) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (tuple(p for lang, ps in FUNCTION_PREFIXES.items() if keep(lang) for p in ps),
                tuple(s for lang, ss in FUNCTION_SUFFIXES.items() if keep(lang) for s in ss))

    @functools.cached_property
    def _model(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        identifier = _langid()
        classes = list(map(str, identifier.nb_classes))
        columns = [classes.index(lang) for lang in self.candidates]
        return np.ascontiguousarray(identifier.nb_ptc[:, columns]), identifier.nb_pc[columns], self.candidates

    def probabilities(self, text: str) -> dict[str, float]:
        """langid's normalised probability per candidate language (its naive Bayes, computed sparsely;
        the same as langid's own after `set_languages(candidates)`)."""
        identifier = _langid()
        ptc, pc, classes = self._model
        counts = identifier.instance2fv(text)
        # langid's own rank() multiplies the whole uint32 feature vector into the (features x
        # languages) table, converting the table on every call; a caption touches a few features.
        active = np.flatnonzero(counts)
        log_probs = counts[active].astype(np.float64) @ ptc[active] + pc
        return dict(zip(classes, map(float, identifier.norm_probs(log_probs))))

    def evidence(self, text: str) -> tuple[int, int]:
        """(allowed, foreign): function words of the allowed languages and of others, plus 1 on the
        foreign side for letters outside the allowed alphabets."""
        words = _WORD.findall(text.replace("\u2019", "'").casefold())
        allowed = sum(w in self.allowed_words or self._affixed(w, self.allowed_affixes) for w in words)
        foreign = sum(w in self.foreign_words or self._affixed(w, self.foreign_affixes) for w in words)
        if self.alphabet is not None and any(ch not in self.alphabet for w in words for ch in w if ch != "'"):
            foreign += 1
        return allowed, foreign

    @staticmethod
    def _affixed(word: str, affixes: tuple[tuple[str, ...], tuple[str, ...]]) -> bool:
        prefixes, suffixes = affixes  # str.startswith(()) is False
        return (word.startswith(prefixes) and len(word) > 2) or word.endswith(suffixes)

    def judge(self, text: str) -> str | None:
        if not self.cfg.enabled:
            return None
        note = ""
        if non_latin_share(text) <= 0.5:
            words = len(text.split())
            if words < self.cfg.min_words:
                return None
            if words < self.cfg.short_words:
                allowed, foreign = self.evidence(text)
                if foreign <= allowed:
                    return None
                note = f", markers {foreign} > {allowed}"
        probabilities = self.probabilities(text)
        if sum(probabilities.get(lang, 0.0) for lang in self.allowed) > 1.0 - self.cfg.min_confidence:
            return None
        top = max(probabilities, key=probabilities.get)
        return f"{top} p={probabilities[top]:.3f}{note}"


# Spam rules: rule name -> patterns (case-insensitive); a match rejects with reason caption_<rule>.
# In the order tried: the most specific first, so a caption gets the reason that explains it best.
SPAM_PATTERNS: dict[str, tuple[str, ...]] = {
    # Operating-system screenshot names: "Screenshot 2021-03-04 at 10.22.11", "Screen Shot 2019-...",
    # "Screenshot_20210304-102211", and the same in a few other UI languages.
    "screenshot": (r"^(screen\s?shot|capture d'écran|bildschirmfoto|captura de pantalla|schermafbeelding|"
                   r"schermata|zrzut ekranu)[\s_(-]*\d.*",),
    # Camera and image file names anywhere (a whole-caption file name is caption_boilerplate).
    "filename": (r"(?<![\w.])(img|dsc[nf]?|dcim|pxl|gopr|mvimg|vid)[_-]?\d{3,}",
                 r"[\w-]+\.(jpe?g|png|gif|webp|bmp|tiff?|heic)(?!\w)"),
    "url": (r"(https?://|www\.)\S+", r"(?<![\w.@-])[a-z0-9-]+\.(com|net|org|info|biz|shop|store|co\.uk)(?![\w-])"),
    # Stock-photo agencies and their phrases: the image is usually a watermarked preview.
    "stock_photo": (r"(?<!\w)stock\s+(photos?|images?|pictures?|photography|footage|vectors?)(?!\w)",
                    r"(?<!\w)royalty[\s-]free(?!\w)",
                    r"(?<!\w)(shutterstock|alamy|getty\s?images|istock(photo)?|depositphotos|dreamstime|123rf|"
                    r"adobe\s?stock|bigstock(photo)?|fotolia|pond5|can\s?stock\s?photo)(?!\w)"),
    # Shop calls to action and discounts.
    "shopping": (r"(?<!\w)(click|tap)\s+here(?!\w)",
                 r"(?<!\w)(buy|shop|order|book)\s+(it\s+|yours\s+)?now(?!\w)",
                 r"(?<!\w)add\s+to\s+(cart|basket|bag|wish\s?list)(?!\w)",
                 r"(?<!\w)free\s+(shipping|delivery|returns)(?!\w)",
                 r"(?<!\w)(limited[\s-]time|special)\s+offer(?!\w)",
                 r"(?<!\w)(promo|discount|coupon)\s+code(?!\w)",
                 r"(?<![\d.])\d+\s?%\s+off(?!\w)"),
    # A price: product listings. Also "a $100 bill": drop "price" from the rules where that matters.
    "price": (r"[$€£]\s?\d[\d,]*(\.\d\d)?(?!\w)|(?<![\w.])\d[\d,]*([.,]\d\d)?\s?(€|usd|eur|gbp)(?!\w)",),
}
SPAM_RULES = (*SPAM_PATTERNS, "shouting")  # shouting: every cased letter upper case (SpamConfig)


@dataclass(kw_only=True)
class SpamConfig:
    # The rules to run, each rejecting with reason caption_<rule> (data/filters.py REASONS says what each catches).
    rules: list[str] = field(default_factory=lambda: list(SPAM_RULES))
    # "shouting" rejects captions with at least this many words holding letters, none of them lower case.
    shouting_min_words: int = 4

    def validate(self) -> None:
        unknown = sorted(set(self.rules) - set(SPAM_RULES))
        if unknown:
            raise ValueError(f"captions.spam.rules: unknown rules {unknown} (known: {list(SPAM_RULES)})")


def is_shouting(text: str, min_words: int) -> bool:
    cased = [w for w in text.split() if any(ch.isupper() or ch.islower() for ch in w)]
    return len(cased) >= min_words and not any(ch.islower() for w in cased for ch in w)


class SpamRules:
    """`first_match(text)`: (reason code, what matched) for the first rule that applies, else None."""

    def __init__(self, cfg: SpamConfig):
        cfg.validate()
        self.cfg = cfg
        self.patterns = [(rule, re.compile("|".join(f"(?:{p})" for p in SPAM_PATTERNS[rule]), re.IGNORECASE))
                         for rule in SPAM_PATTERNS if rule in cfg.rules]

    def first_match(self, text: str) -> tuple[str, str] | None:
        # Typographic apostrophes (Capture d’écran) and full-width forms read as their plain forms.
        plain = unicodedata.normalize("NFKC", text).replace("\u2019", "'")
        for rule, pattern in self.patterns:
            match = pattern.search(plain)
            if match:
                return f"caption_{rule}", match.group(0)[:60]
        if "shouting" in self.cfg.rules and is_shouting(plain, self.cfg.shouting_min_words):
            return "caption_shouting", f"{len(plain.split())} words in capitals"
        return None
