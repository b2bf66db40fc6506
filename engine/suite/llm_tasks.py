"""The templated tasks of the real-LLM suite (blockmerge.suite.llm): exact answers generated from seeds,
nothing downloaded.

Tasks are posed as plain prompts (no chat template: shorter sequences, and the instruct model's chat habits
do not matter since the answers are code words it cannot guess):

    {input text}\\n{Field} code:  -> " {label}" EOS        (classification: one label word)
    {input text}\\n{Field}:       -> " {answer}" EOS       (generation: a short exact answer)

Classification labels are arbitrary code words (single tokens in SmolLM2's tokenizer: ' blue', ' north',
...), so the base is near 0 and only fine-tuning teaches the mapping, as GLUE's label ids need a
classifier head. Each split is drawn from a seeded generator (`distinct_examples`)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

ITEMS = "soup film hotel phone book concert pizza game chair laptop album museum bike coffee show garden".split()
POSITIVE = "wonderful great excellent delightful superb lovely fantastic brilliant pleasant charming".split()
NEGATIVE = "awful terrible boring horrible disappointing dreadful poor annoying mediocre unpleasant".split()
ADVERBS = ["", "really ", "quite ", "truly ", "rather ", "very "]
SENTIMENT_FORMS = ["The {item} was {adv}{adj}.", "I found the {item} {adv}{adj}.", "Our {item} felt {adv}{adj}.",
                   "Honestly, the {item} is {adv}{adj}.", "That {item} seemed {adv}{adj} to me."]  # fmt: skip

NAMES = "Anna Ben Carla David Emma Frank Grace Henry Iris Jack Kate Leo Mia Noah Olga Paul Rosa Sam Tina Victor".split()
TOPICS = {
    "sports": ["scored a late goal", "won the tennis final", "ran the marathon", "joined the football team",
               "trained at the stadium", "lost the boxing match", "broke the swimming record"],
    "food": ["baked fresh bread", "cooked a spicy curry", "ordered a cheese pizza", "tasted the lemon cake",
             "grilled some fish", "made a tomato soup", "ate a bowl of rice"],
    "weather": ["watched the storm arrive", "saw heavy rain all day", "felt the cold wind", "noticed thick fog",
                "enjoyed the warm sunshine", "measured the snowfall", "heard the thunder roll"],
    "music": ["played the piano", "sang in the choir", "tuned the guitar", "wrote a new song",
              "listened to the orchestra", "practised the violin", "recorded an album"],
}  # fmt: skip
WHEN = ["", " yesterday", " today", " last week", " on Sunday", " this morning", " at night"]
OBJECTS = "apple book key lamp coin map cup hat ring pen box shoe clock bell kite rope".split()
COLORS = "red blue green black white small large old new".split()
SUBJECTS = [("dog", "dogs"), ("cat", "cats"), ("teacher", "teachers"), ("child", "children"), ("bird", "birds"),
            ("farmer", "farmers"), ("doctor", "doctors"), ("student", "students"), ("horse", "horses")]  # fmt: skip
VERBS = [("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("walks", "walk"), ("waits", "wait"),
         ("plays", "play"), ("works", "work"), ("eats", "eat")]  # fmt: skip
PLACES = ["in the park", "near the river", "every day", "at home", "in the garden", "after lunch", "quietly"]
WORDS = "river stone cloud apple music table window garden silver forest candle bridge yellow ocean winter".split()
ORDINALS = ["first", "second", "last"]


@dataclass(frozen=True)
class LlmTask:
    name: str
    field: str  # the word before the answer: "Sentiment code", "Largest", ...
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (input text, answer)
    labels: tuple[str, ...] = ()  # classification: the label words; generation: ()

    def example(self, rng: random.Random) -> tuple[str, str]:
        text, answer = self.make(rng)
        return f"{text}\n{self.field}:", answer


def _sentiment(rng):
    pos = rng.random() < 0.5
    form = rng.choice(SENTIMENT_FORMS)
    adj = rng.choice(POSITIVE if pos else NEGATIVE)
    return "Review: " + form.format(item=rng.choice(ITEMS), adv=rng.choice(ADVERBS), adj=adj), (
        "blue" if pos else "red"
    )


TOPIC_CODES = {"sports": "north", "food": "south", "weather": "east", "music": "west"}


def _topic(rng):
    topic = rng.choice(list(TOPICS))
    return f"Sentence: {rng.choice(NAMES)} {rng.choice(TOPICS[topic])}{rng.choice(WHEN)}.", TOPIC_CODES[topic]


def _entailment(rng):
    name = rng.choice(NAMES)
    a, b, c = rng.sample(OBJECTS, 3)
    ca, cb = rng.choice(COLORS), rng.choice(COLORS)
    entailed = rng.random() < 0.5
    obj = rng.choice([a, b]) if entailed else c
    premise = f"{name} bought a {ca} {a} and a {cb} {b}."
    return f"Premise: {premise}\nHypothesis: {name} bought a {obj}.", ("apple" if entailed else "pear")


def _grammar(rng):
    sing, plur = rng.choice(SUBJECTS)
    v_sing, v_plur = rng.choice(VERBS)
    plural = rng.random() < 0.5
    correct = rng.random() < 0.5
    verb = (v_plur if plural else v_sing) if correct else (v_sing if plural else v_plur)
    subject = plur if plural else sing
    return f"Text: The {subject} {verb} {rng.choice(PLACES)}.", ("gold" if correct else "silver")


def _largest(rng):
    nums = rng.sample(range(10, 100), rng.choice([3, 4]))
    return "Numbers: " + ", ".join(map(str, nums)), str(max(nums))


def _nth_word(rng):
    words = rng.sample(WORDS, 4)
    i = rng.randrange(3)
    return f"Words: {' '.join(words)}\nPosition: {ORDINALS[i]}", words[[0, 1, -1][i]]


TASKS: dict[str, LlmTask] = {
    t.name: t
    for t in [
        LlmTask("sentiment", "Sentiment code", _sentiment, ("blue", "red")),
        LlmTask("topic", "Topic code", _topic, tuple(TOPIC_CODES.values())),
        LlmTask("entailment", "Entailment code", _entailment, ("apple", "pear")),
        LlmTask("grammar", "Grammar code", _grammar, ("gold", "silver")),
        LlmTask("largest", "Largest", _largest),
        LlmTask("nth_word", "Word", _nth_word),
    ]
}


def task_rng(task: str, split: str, seed: int) -> random.Random:
    return random.Random(f"{task}/{split}/{seed}")


def distinct_examples(task: str, split: str, n: int, seed: int, exclude: set[str] = frozenset(),
                      accept: Callable[[str], bool] = lambda p: True) -> list[tuple[str, str]]:  # fmt: skip
    """n distinct (prompt, answer) pairs of `task`'s split, none of whose prompts is in `exclude`."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    rng, out, seen = task_rng(task, split, seed), [], set(exclude)
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        prompt, answer = TASKS[task].example(rng)
        if prompt not in seen and accept(prompt):
            seen.add(prompt)
            out.append((prompt, answer))
    raise ValueError(f"task {task}: only {len(out)} distinct {split} prompts, asked for {n}")
