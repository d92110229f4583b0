"""VQA accuracy exactly as the official VQA evaluation computes it.

Ported from GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (commit c4e6a0e4,
the version with straight-quote contractions and `-`, `!`, `{`, `}` in the punctuation list):

- the prediction: newlines and tabs become spaces, it is stripped, then `process_punctuation`
  and `process_digit_article` (lower case, number words -> digits, articles dropped,
  contractions restored: "dont" -> "don't");
- the ten human answers: `process_punctuation` only, and only when they are not all the same.
  They are not lower-cased: the answers in the VQA annotation files are already normalised.
- accuracy of one question: for each of the 10 answers, leave it out and take
  min(#remaining answers equal to the prediction / 3, 1); average the 10 values.

Two quirks of the official code are kept on purpose so that numbers agree with it:
`periodStrip` is `(?!<=\\d)(\\.)(?!\\d)` (a look-ahead typo for a look-behind: it drops every
period not followed by a digit), and `re.UNICODE` is passed where `re.sub` takes `count`, so at
most 32 periods are dropped. The official loop leaves out answers by dict inequality, which with
the dataset's unique `answer_id`s leaves out exactly one answer: we leave out by position.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module docstring
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD_COUNT = re.UNICODE  # the official code passes re.UNICODE (32) as re.sub's count


def process_punctuation(text: str) -> str:
    """`processPunctuation`: a mark next to a space (or any text with a digit,digit comma) is
    deleted, otherwise replaced by a space; then periods not followed by a digit are dropped."""
    out = text
    delete = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if delete or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """`processDigitArticle`: lower case, number words -> digits, articles dropped, contractions fixed."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_prediction(text: str) -> str:
    """The official processing of a model's answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def answer_strings(answers: Sequence[str | dict]) -> list[str]:
    """VQAv2 answers come as strings or as `{"answer": ..., "answer_confidence": ..., "answer_id": ...}`."""
    return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


MIN_ANSWERS = 3  # min(#matches / 3, 1): below three answers even a correct prediction cannot score 1


def too_few_answers(count: int) -> str | None:
    """Why `count` human answers cannot be scored by VQA accuracy (None when they can)."""
    if count >= MIN_ANSWERS:
        return None
    return (
        f"{count} human answer{'s' if count != 1 else ''}: VQA accuracy is min(#matching answers / 3, 1) over "
        f"leave-one-out subsets and needs at least {MIN_ANSWERS} (VQAv2 has 10), else a correct prediction "
        "scores at most (n - 1) / 3; score such data with exact match (--benchmark vqa)"
    )


def vqa_accuracy(prediction: str, answers: Sequence[str | dict]) -> float:
    """Official VQA accuracy of one prediction against its human answers (usually 10), in 0..1.

    Raises ValueError for fewer than 3 answers (`too_few_answers`): the formula would score a
    correct prediction against a single reference 0, without a word."""
    humans = answer_strings(answers)
    problem = too_few_answers(len(humans))
    if problem:
        raise ValueError(problem)
    if len(set(humans)) > 1:
        humans = [process_punctuation(a) for a in humans]
    predicted = normalize_prediction(prediction)
    matches = [a == predicted for a in humans]
    total = sum(matches)
    # Leave answer i out: the others that match are total - matches[i].
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(humans)


def vqa_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str | dict]],
    answer_types: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """{"accuracy": mean official accuracy, "accuracy/<answer type>": ...} (types such as `yes/no`
    are written `yes_no`), the per-type means only when `answer_types` are given."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"accuracy": 0.0}
    accs = [vqa_accuracy(p, refs) for p, refs in zip(predictions, references, strict=True)]
    scores = {"accuracy": sum(accs) / len(accs)}
    if answer_types is not None:
        by_type: dict[str, list[float]] = {}
        for acc, kind in zip(accs, answer_types, strict=True):
            if kind:
                by_type.setdefault(kind.replace("/", "_").replace(" ", "_"), []).append(acc)
        for kind in sorted(by_type):
            scores[f"accuracy/{kind}"] = sum(by_type[kind]) / len(by_type[kind])
    return scores
