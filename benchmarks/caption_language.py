"""Caption language and spam rules on labelled short captions: the old langid rule against the new one.

    python benchmarks/caption_language.py [--out benchmarks/results/caption_language.json]

Input: tests/fixtures/captions_lang.tsv (309 alt-text style captions, 2-12 words, 164 English and
145 in twelve other languages; the last 69, written after the rules were settled, are also reported
apart as held_out) and tests/fixtures/captions_spam.tsv (spam captions, each with the rule that
must catch it). Each language rule decides keep / reject for every caption; English is the
allowed language. Reported per rule: recall (share of English captions kept), precision (share of
kept captions that are English), the share of foreign captions rejected, per language, the captions
it got wrong, and its time per caption.

Rules compared, in one run:
- old: the rule before issue 14 (langid over all 97 languages, judged from 3 words, reject when
  English has p <= 0.1), reproduced here from langid's probabilities;
- langid_candidates: langid restricted to LanguageConfig's default candidates, no evidence rules;
- short_skip: below short_words, keep every Latin-script caption (no function-word evidence);
- new: the shipped default (data/captions.py LanguageRule), and variants of its settings;
- lingua: lingua-language-detector restricted to the same candidates, only when it is importable
  (it is not a dependency: a 96 MB wheel, ~530 MB resident and ~7 s to load per process here).
Spam: per rule, the share of its captions caught, and the false-positive rate of all spam rules on
the labelled language set (ordinary captions).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

from deco.data.captions import LanguageConfig, LanguageRule, SpamConfig, SpamRules

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def read_tsv(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t", 1)) for line in lines if line.strip() and not line.startswith("#")]


def held_out(path: Path) -> set[str]:
    """The captions after the fixture's "# held out" line (written after the rules were settled)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next((n for n, line in enumerate(lines) if line.startswith("# held out")), len(lines))
    return {line.split("\t", 1)[1] for line in lines[start:] if line.strip() and not line.startswith("#")}


def measure(keep: Callable[[str], bool], rows: list[tuple[str, str]]) -> dict:
    start = time.perf_counter()
    kept = [keep(caption) for _, caption in rows]
    seconds = time.perf_counter() - start
    english = [k for (lang, _), k in zip(rows, kept) if lang == "en"]
    per_language: dict[str, dict] = {}
    for (lang, _), k in zip(rows, kept):
        entry = per_language.setdefault(lang, {"n": 0, "kept": 0})
        entry["n"] += 1
        entry["kept"] += int(k)
    for entry in per_language.values():
        entry["kept_share"] = round(entry["kept"] / entry["n"], 3)
    foreign = [not k for (lang, _), k in zip(rows, kept) if lang != "en"]
    return {
        "recall_en": round(sum(english) / len(english), 4),
        "precision_en": round(sum(english) / max(1, sum(kept)), 4),
        "foreign_rejected": round(sum(foreign) / len(foreign), 4),
        "per_language": per_language,
        "english_rejected": [c for (lang, c), k in zip(rows, kept) if lang == "en" and not k],
        "foreign_kept": [f"{lang}: {c}" for (lang, c), k in zip(rows, kept) if lang != "en" and k],
        "us_per_caption": round(seconds / len(rows) * 1e6, 1),
    }


def old_rule() -> Callable[[str], bool]:
    every = LanguageRule(LanguageConfig(candidates=[]))
    return lambda text: len(text.split()) < 3 or every.probabilities(text)["en"] > 0.1


class NoEvidence(LanguageRule):
    """Short Latin-script captions never carry evidence: all of them are kept."""

    def evidence(self, text: str) -> tuple[int, int]:
        return 0, 0


def lingua_rule() -> Callable[[str], bool] | None:
    try:
        from lingua import IsoCode639_1, Language, LanguageDetectorBuilder
    except ImportError:
        return None
    languages = []
    for code in LanguageConfig().candidates:
        try:
            languages.append(Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())))
        except (AttributeError, ValueError):
            pass
    detector = LanguageDetectorBuilder.from_languages(*set(languages)).with_preloaded_language_models().build()

    def keep(text: str) -> bool:
        values = detector.compute_language_confidence_values(text)
        return next(v.value for v in values if v.language == Language.ENGLISH) > 0.1
    return keep


def spam_report(spam: list[tuple[str, str]], rows: list[tuple[str, str]]) -> dict:
    rules = SpamRules(SpamConfig())
    per_rule: dict[str, dict] = {}
    for rule, caption in spam:
        hit = rules.first_match(caption)
        entry = per_rule.setdefault(rule, {"n": 0, "caught": 0, "missed": []})
        entry["n"] += 1
        if hit and hit[0] == f"caption_{rule}":
            entry["caught"] += 1
        else:
            entry["missed"].append(caption)
    hits = [(lang, caption, rules.first_match(caption)) for lang, caption in rows]
    false = [f"{lang}: {caption} -> {hit[0]} ({hit[1]})" for lang, caption, hit in hits if hit]
    english = [h for lang, _, h in hits if lang == "en"]
    return {"per_rule": per_rule,
            "false_positive_rate_en": round(sum(h is not None for h in english) / len(english), 4),
            "false_positive_rate_all": round(len(false) / len(rows), 4), "false_positives": false}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "caption_language.json"))
    args = parser.parse_args()
    rows = read_tsv(FIXTURES / "captions_lang.tsv")
    unseen = held_out(FIXTURES / "captions_lang.tsv")
    spam = read_tsv(FIXTURES / "captions_spam.tsv")
    rules: dict[str, Callable[[str], bool] | None] = {
        "old": old_rule(),
        "langid_candidates": LanguageRule(LanguageConfig(short_words=0)),
        "short_skip": NoEvidence(LanguageConfig()),
        "new": LanguageRule(LanguageConfig()),
        "new_min_words_2": LanguageRule(LanguageConfig(min_words=2)),
        "new_short_words_13": LanguageRule(LanguageConfig(short_words=13)),
        "new_all_97_candidates": LanguageRule(LanguageConfig(candidates=[])),
        "lingua": lingua_rule(),
    }
    results = {}
    for name, rule in rules.items():
        if rule is None:
            results[name] = {"skipped": "lingua-language-detector is not installed"}
            continue
        keep = rule if not isinstance(rule, LanguageRule) else (lambda r: lambda text: r.judge(text) is None)(rule)
        keep(rows[0][1])  # load langid outside the timing
        results[name] = measure(keep, rows)
        results[name]["held_out"] = {k: v for k, v in measure(keep, [r for r in rows if r[1] in unseen]).items()
                                     if k in ("recall_en", "precision_en", "foreign_rejected")}
    langs = sorted({lang for lang, _ in rows})
    report = {"captions": len(rows), "held_out": len(unseen),
              "per_language_n": {lang: sum(r[0] == lang for r in rows) for lang in langs}, "language": results, "spam": spam_report(spam, rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    columns = ("recall_en", "precision_en", "foreign_rejected", "us_per_caption", "held_out")
    summary = {name: {k: r.get(k) for k in columns} for name, r in results.items()}
    print(json.dumps({"language": summary, "spam_fp_rate_en": report["spam"]["false_positive_rate_en"],
                      "spam_caught": {k: f"{v['caught']}/{v['n']}" for k, v in report["spam"]["per_rule"].items()},
                      "out": args.out}, indent=2))


if __name__ == "__main__":
    main()
