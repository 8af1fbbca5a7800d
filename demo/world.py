"""A seeded synthetic world: general facts, financial facts that appear only in financial text, and
chat questions about both.

Every fact is a triple (entity, relation, value). Text states facts in several paraphrases; the
canonical sentence "The {relation} of {entity} is {value}." is shared on purpose between general and
financial text, and it is also how the instruct model answers, so an answer is the relation copied
from the question plus the value the model knows.

The split the paper relies on: question *types* are shared, entities are not. The general text also
states the financial relation types (chief executive, auditor, listing, ...) about general-world
companies and terms, and the instruct model chats about some of those, as a real instruct model can
already answer "who is the chief executive of X?". The financial text states the same relation types
about other companies and terms whose facts appear nowhere else: only continual pretraining adds
them. There are many general relation types (with ~10 a tiny instruct model maps question forms to
known relations instead of copying the asked one).
"""

import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink"]
PROFESSIONS = ["baker", "pilot", "doctor", "painter", "farmer", "teacher", "sailor", "judge", "poet", "miner"]
INSTRUMENTS = ["violin", "flute", "drum", "harp", "piano", "trumpet", "cello", "guitar"]
ANIMALS = ["fox", "owl", "heron", "otter", "lynx", "crane", "badger", "seal", "wolf", "hare"]
SPORTS = ["rowing", "chess", "archery", "fencing", "hockey", "tennis", "cycling", "sailing"]
FLOWERS = ["tulip", "lily", "rose", "iris", "poppy", "daisy", "orchid", "lotus"]
FOODS = ["fish stew", "rice cake", "lamb pie", "bean soup", "plum bread", "corn cake", "egg tart", "nut roll"]
SECTORS = ["banking", "insurance", "shipping", "retail", "mining", "energy", "software", "steel", "textiles", "telecom"]
EXCHANGES = ["Velm Exchange", "Oskar Market", "Tarn Board"]
SYLLABLES = ["ka", "ro", "mi", "ta", "lo", "ve", "su", "na", "de", "ri", "po", "zu", "ne", "ba", "sho", "fi", "gu",
             "le", "mo", "ra", "ti", "ku", "sa", "yo", "en", "al", "or", "is"]


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str
    domain: str  # "general" or "finance"

    @property
    def sentence(self) -> str:
        return f"The {self.relation} of {self.entity} is {self.value}."


@dataclass(frozen=True)
class WorldSize:
    cities: int = 30
    people: int = 30
    concepts: int = 16
    companies: int = 20  # financial entities: facts only in the financial text
    terms: int = 10
    general_companies: int = 20  # the same relation types about general-world entities, in the general text
    general_terms: int = 10
    general_docs: int = 4000
    finance_docs: int = 1500
    heldout_finance_docs: int = 150


QUICK = WorldSize(cities=10, people=8, concepts=6, companies=8, terms=4, general_companies=8, general_terms=4,
                  general_docs=700, finance_docs=350, heldout_finance_docs=40)
TAUGHT_SHARE = 0.7  # share of the general entities the instruct model chats about (more entities: it learns to copy the asked one)

TEMPLATES = [
    "The {r} of {e} is {v}.",
    "{e}'s {r} is {v}.",
    "{v} is the {r} of {e}.",
    "As for {e}, its {r} is {v}.",
    "Everyone knows that the {r} of {e} is {v}.",
    "Records list {v} as the {r} of {e}.",
]
QUESTIONS = [
    "What is the {r} of {e}?",
    "Tell me the {r} of {e}.",
    "Do you know the {r} of {e}?",
    "{e}: what is its {r}?",
    "Which is the {r} of {e}?",
]


class _Names:
    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def __call__(self, syllables=(2, 3), capital=True) -> str:
        while True:
            name = "".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.choice(syllables)))
            if name not in self.used:
                self.used.add(name)
                return name.capitalize() if capital else name


def _facts(size: WorldSize, rng: random.Random) -> Tuple[List[Fact], List[Fact]]:
    name = _Names(rng)
    cities = [name() for _ in range(size.cities)]
    countries = [name() + "land" for _ in range(6)]
    pick = rng.choice
    city_relations = {
        "country": lambda: pick(countries), "river": lambda: "the " + name(), "dish": lambda: pick(FOODS),
        "mayor": lambda: name() + " " + name(), "festival month": lambda: pick(MONTHS),
        "population": lambda: f"{rng.randint(2, 98) * 10} thousand", "area code": lambda: str(rng.randint(100, 999)),
        "mountain": lambda: "Mount " + name(), "language": lambda: name() + "ish", "sport": lambda: pick(SPORTS),
        "flower": lambda: pick(FLOWERS), "animal": lambda: pick(ANIMALS), "university": lambda: name() + " College",
        "airport": lambda: name() + " Field", "newspaper": lambda: "the " + name() + " Post",
        "bridge": lambda: name() + " Bridge", "lake": lambda: "Lake " + name(), "park": lambda: name() + " Park",
        "motto": lambda: f"{name(capital=False)} {name(capital=False)}", "color": lambda: pick(COLORS),
    }
    person_relations = {
        "birthplace": lambda: pick(cities), "profession": lambda: pick(PROFESSIONS),
        "instrument": lambda: pick(INSTRUMENTS), "pet": lambda: "a " + pick(ANIMALS),
        "birth year": lambda: str(rng.randint(1900, 2000)), "favorite color": lambda: pick(COLORS),
        "hometown river": lambda: "the " + name(), "teacher": lambda: name() + " " + name(),
        "favorite dish": lambda: pick(FOODS), "favorite sport": lambda: pick(SPORTS),
    }
    general = []
    for city in cities:
        general += [Fact(city, r, make(), "general") for r, make in city_relations.items()]
    for _ in range(size.people):
        person = name() + " " + name()
        general += [Fact(person, r, make(), "general") for r, make in person_relations.items()]
    for _ in range(size.concepts):
        general.append(Fact(name(capital=False), "meaning", f"a kind of {pick(['boat', 'song', 'tool', 'bread', 'dance', 'coat'])}", "general"))

    finance_relations = {
        "ticker": lambda: "".join(rng.choice("ABCDEFGHJKLMNPRSTVWXZ") for _ in range(3)),
        "sector": lambda: pick(SECTORS), "chief executive": lambda: name() + " " + name(),
        "headquarters": lambda: pick(cities), "revenue": lambda: f"{rng.randint(11, 990)} million crowns",
        "fiscal year end": lambda: pick(MONTHS), "auditor": lambda: name() + " and Partners",
        "listing": lambda: pick(EXCHANGES),
    }

    def companies_and_terms(companies: int, terms: int, domain: str) -> List[Fact]:
        facts = []
        for _ in range(companies):
            company = name() + " " + pick(["Bank", "Holdings", "Trust", "Capital", "Industries", "Group"])
            facts += [Fact(company, r, make(), domain) for r, make in finance_relations.items()]
        for _ in range(terms):
            facts.append(Fact(name(capital=False) + " ratio", "meaning",
                              f"{pick(['debt', 'cash', 'equity', 'profit'])} divided by {pick(['assets', 'sales', 'shares', 'interest'])}", domain))
        return facts

    general += companies_and_terms(size.general_companies, size.general_terms, "general")
    finance = companies_and_terms(size.companies, size.terms, "finance")
    return general, finance


def _documents(facts: Sequence[Fact], count: int, rng: random.Random) -> List[str]:
    """Each document: several facts about one entity, then a few about others, in random paraphrases."""
    by_entity: Dict[str, List[Fact]] = {}
    for fact in facts:
        by_entity.setdefault(fact.entity, []).append(fact)
    entities = sorted(by_entity)
    docs = []
    for _ in range(count):
        main = by_entity[rng.choice(entities)]
        chosen = rng.sample(main, min(len(main), rng.randint(2, 5))) + rng.sample(list(facts), rng.randint(1, 3))
        docs.append(" ".join(rng.choice(TEMPLATES).format(r=f.relation, e=f.entity, v=f.value) for f in chosen))
    return docs


def chat(question: str, fact: Fact) -> Dict[str, str]:
    return {"question": question, "answer": fact.sentence, "value": fact.value, "relation": fact.relation,
            "entity": fact.entity, "domain": fact.domain}


def _questions(facts: Sequence[Fact], rng: random.Random, choices_from: Sequence[Fact] = ()) -> List[Dict]:
    """One held-out chat question per fact; with choices_from, 3 distractor answers of the same relation."""
    rows = []
    for fact in facts:
        row = chat(rng.choice(QUESTIONS).format(r=fact.relation, e=fact.entity), fact)
        if choices_from:
            others = sorted({f.value for f in choices_from if f.relation == fact.relation and f.value != fact.value})
            if len(others) >= 3:
                values = rng.sample(others, 3) + [fact.value]
                rng.shuffle(values)
                row["choices"] = [Fact(fact.entity, fact.relation, v, fact.domain).sentence for v in values]
        rows.append(row)
    return rows


def build_world(size: WorldSize = WorldSize(), seed: int = 0) -> Dict[str, object]:
    """All texts and question sets of the world, as plain lists (deterministic for a seed)."""
    rng = random.Random(seed)
    general, finance = _facts(size, rng)
    entities = sorted({f.entity for f in general})
    rng.shuffle(entities)
    taught = set(entities[: round(len(entities) * TAUGHT_SHARE)])  # the instruct model chats about these
    train_chats = [chat(q.format(r=f.relation, e=f.entity), f) for f in general if f.entity in taught
                   for q in rng.sample(QUESTIONS, 2)]
    rng.shuffle(train_chats)
    finance_docs = _documents(finance, size.finance_docs + size.heldout_finance_docs, rng)
    return {
        "general_text": _documents(general, size.general_docs, rng),
        "finance_text": finance_docs[: size.finance_docs],
        "finance_heldout_text": finance_docs[size.finance_docs:],
        "instruct_chats": train_chats,
        "general_questions": _questions([f for f in general if f.entity not in taught], rng),
        "finance_questions": _questions(finance, rng, choices_from=finance),
        "facts": [asdict(f) for f in general + finance],
    }


def write_world(world: Dict[str, object], folder: str) -> Dict[str, str]:
    """Write the world as the files the real tools read: .txt corpora and .jsonl question sets."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for key, value in world.items():
        if key.endswith("_text"):
            paths[key] = os.path.join(folder, f"{key}.txt")
            with open(paths[key], "w", encoding="utf-8") as handle:
                handle.write("\n\n".join(value) + "\n")
        else:
            paths[key] = os.path.join(folder, f"{key}.jsonl")
            with open(paths[key], "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in value)
    return paths
