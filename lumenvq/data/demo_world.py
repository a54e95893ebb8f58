"""The demo world: a fictional knowledge graph rendered as KILT knowledge-source pages.

Every name is invented from syllables, so no pretrained model knows a single
answer: a reader has to retrieve and read. Facts are short template sentences
(one or two facts, always opening with the subject's name rather than a
pronoun), so a tiny reader can learn them and a fact stays next to its
subject in a 24-32-word passage window. Distractors are built in: siblings
share a family name and are born in different cities, some families and
cities have near-identical names (Merik / Merin), and a person's page says
where the sibling was born. Rendering records where each fact is stated
(page, paragraph, character span), which is what tasks cite as provenance.

Only Python's `random.Random` seeded with strings drives it (stable across
Python versions and independent of hash randomisation), so a seed gives
byte-identical pages.
"""

from __future__ import annotations

import dataclasses
import random
import re
import urllib.parse
from typing import Iterator

PAGE_ID_BASE = (
    900_000_000  # far above real Wikipedia page ids, so demo ids never collide with KILT's
)
MIN_ENTITIES = 50
# Share of each kind among the entities; people carry most facts and most questions.
_KIND_SHARES = (("country", 0.01), ("city", 0.10), ("org", 0.13), ("work", 0.16))

OCCUPATIONS = (
    "painter",
    "farmer",
    "poet",
    "sailor",
    "doctor",
    "teacher",
    "judge",
    "merchant",
    "banker",
    "singer",
    "soldier",
    "potter",
    "weaver",
    "baker",
    "lawyer",
    "mason",
    "miller",
    "pilot",
    "tailor",
    "dancer",
    "sculptor",
    "carpenter",
    "printer",
    "brewer",
)
INDUSTRIES = (
    "shipping",
    "banking",
    "mining",
    "brewing",
    "publishing",
    "textile",
    "railway",
    "timber",
    "printing",
    "fishing",
    "steel",
    "glass",
    "salt",
    "silk",
    "wool",
    "pottery",
)
GENRES = (
    "novel",
    "poem",
    "play",
    "song",
    "ballad",
    "memoir",
    "comedy",
    "tragedy",
    "satire",
    "fable",
    "hymn",
    "sonnet",
)
_ORG_SUFFIXES = ("Group", "Company", "Guild", "Society", "Trust", "Works", "Union", "House")
_COUNTRY_SUFFIXES = ("ia", "a", "or", "en")
_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "st",
    "tr",
)
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("n", "r", "l", "s", "m")


@dataclasses.dataclass(frozen=True)
class Relation:
  """A fact type and every way the project words it.

  `target` is the object's entity kind, or "year" / "word" for literals;
  `label` is the Wikidata property label (zsRE's relation text);
  `questions` (NQ style) and `claim` (FEVER style) use {s} for the subject
  and {o} for the object. Symmetric relations are held out as one pair.
  """

  name: str
  label: str
  target: str
  questions: tuple[str, ...]
  claim: str
  words: tuple[str, ...] = ()
  symmetric: bool = False


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "occupation",
            "occupation",
            "word",
            ("what was the occupation of {s}?", "what did {s} work as?"),
            "{s} was a {o}.",
            OCCUPATIONS,
        ),
        Relation(
            "born_in",
            "place of birth",
            "city",
            ("where was {s} born?", "in which city was {s} born?"),
            "{s} was born in {o}.",
        ),
        Relation(
            "birth_year",
            "date of birth",
            "year",
            ("when was {s} born?", "in which year was {s} born?"),
            "{s} was born in {o}.",
        ),
        Relation(
            "sibling",
            "sibling",
            "person",
            ("who is the sibling of {s}?",),
            "{s} has a sibling named {o}.",
            symmetric=True,
        ),
        Relation(
            "spouse",
            "spouse",
            "person",
            ("who did {s} marry?", "who was the spouse of {s}?"),
            "{s} married {o}.",
            symmetric=True,
        ),
        Relation(
            "located_in",
            "country",
            "country",
            ("in which country is {s}?", "where is {s} located?"),
            "{s} is a city in {o}.",
        ),
        Relation(
            "capital",
            "capital",
            "city",
            ("what is the capital of {s}?",),
            "The capital of {s} is {o}.",
        ),
        Relation(
            "founded_year",
            "inception",
            "year",
            ("when was {s} founded?", "in which year was {s} founded?"),
            "{s} was founded in {o}.",
        ),
        Relation(
            "founded_by",
            "founded by",
            "person",
            ("who founded {s}?", "who was the founder of {s}?"),
            "{s} was founded by {o}.",
        ),
        Relation(
            "headquarters",
            "headquarters location",
            "city",
            ("where is {s} headquartered?", "in which city is {s} based?"),
            "{s} is headquartered in {o}.",
        ),
        Relation(
            "industry",
            "industry",
            "word",
            ("what industry is {s} in?",),
            "{s} is a {o} company.",
            INDUSTRIES,
        ),
        Relation(
            "author",
            "author",
            "person",
            ("who wrote {s}?", "who is the author of {s}?"),
            "{s} was written by {o}.",
        ),
        Relation(
            "publication_year",
            "publication date",
            "year",
            ("when was {s} published?", "in which year was {s} published?"),
            "{s} was first published in {o}.",
        ),
        Relation("genre", "genre", "word", ("what kind of work is {s}?",), "{s} is a {o}.", GENRES),
    )
}

# Page layout per kind: (section heading, None for the lead) -> paragraphs -> sentence templates.
# A placeholder is a relation path from the subject ({sibling.born_in}); every path a sentence
# uses is a fact it states. A sentence whose path is missing (no spouse) is left out.
_LAYOUTS = {
    "country": (
        (None, (("{s} is a country.", "The capital of {s} is {capital}."),)),
        ("History", (("{s} was founded in {founded_year}.",),)),
    ),
    "city": (
        (None, (("{s} is a city in {located_in}.",),)),
        ("History", (("{s} was founded in {founded_year}.",),)),
    ),
    "person": (
        (None, (("{s} was a {occupation}.",),)),
        (
            "Early life",
            (
                ("{s} was born in {born_in} in {birth_year}.",),
                ("{s} has a sibling, {sibling}, who was born in {sibling.born_in}.",),
            ),
        ),
        ("Personal life", (("{s} married {spouse}.",),)),
    ),
    "org": (
        (None, (("{s} is a {industry} company.",),)),
        ("History", (("{s} was founded by {founded_by} in {founded_year}.",),)),
        ("Operations", (("{s} is headquartered in {headquarters}.",),)),
    ),
    "work": (
        (None, (("{s} is a {genre} by {author}.",),)),
        ("Publication", (("{s} was first published in {publication_year}.",),)),
    ),
}
_CATEGORIES = {
    "country": ("Demo countries",),
    "city": ("Demo cities", "Cities in {located_in}"),
    "person": ("Demo people", "{birth_year} births", "People from {born_in}"),
    "org": ("Demo organisations", "Companies based in {headquarters}"),
    "work": ("Demo works", "Works published in {publication_year}"),
}
_DESCRIPTIONS = {
    "country": "fictional country",
    "city": "fictional city in {located_in}",
    "person": "fictional {occupation}",
    "org": "fictional {industry} company",
    "work": "fictional {genre} by {author}",
}
_PLACEHOLDER = re.compile(r"\{([a-z_.]+)\}")


@dataclasses.dataclass
class Entity:
  """One page's subject; `facts` maps a relation to an entity index, a year or a word."""

  index: int
  kind: str
  name: str
  facts: dict[str, int | str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Mention:
  """Where a fact is stated: page (entity index), paragraph id, sentence span, section heading."""

  page: int
  paragraph: int
  start: int
  end: int
  section: str


@dataclasses.dataclass
class World:
  """Entities, their rendered KILT pages, and where each (subject, relation) fact is stated.

  `similar[i]` lists plausible wrong substitutes for entity i (same family, near
  name, same country): FEVER's refuted claims draw from it through `substitutes`.
  """

  seed: int
  entities: list[Entity]
  similar: dict[int, list[int]]
  by_kind: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  pages: list[dict] = dataclasses.field(default_factory=list)
  mentions: dict[tuple[int, str], list[Mention]] = dataclasses.field(default_factory=dict)

  def page_id(self, index: int) -> str:
    return str(PAGE_ID_BASE + index)

  def value_text(self, relation: str, value: int | str) -> str:
    """The words that express a fact's object: an entity's name, a year or a word."""
    target = RELATIONS[relation].target
    if target in ("year", "word"):
      return str(value)
    return self.entities[value].name

  def substitutes(self, index: int, exclude: int) -> list[int]:
    """Entities similar to `index` other than `exclude`, or, when there are none (a lone city
    in its country, a unique name), any other entity of its kind."""
    similar = [i for i in self.similar.get(index, ()) if i != exclude]
    return similar or [
        i for i in self.by_kind[self.entities[index].kind] if i not in (index, exclude)
    ]

  def facts(self) -> Iterator[tuple[Entity, str, int | str]]:
    """(subject, relation, value) of every fact, in a fixed order."""
    for entity in self.entities:
      for relation, value in entity.facts.items():
        yield entity, relation, value


# ----------------------------------------------------------------------------
# Entities and facts.


class _Namer:
  """Invented words from syllables; no word is used twice unless a caller reuses it on purpose."""

  def __init__(self, rng: random.Random):
    self.rng, self.used = rng, set()

  def _syllable(self, onset: str | None = None) -> str:
    coda = self.rng.choice(_CODAS) if self.rng.random() < 0.4 else ""
    return (onset or self.rng.choice(_ONSETS)) + self.rng.choice(_VOWELS) + coda

  def _claim(self, word: str) -> bool:
    if word in self.used:
      return False
    self.used.add(word)
    return True

  def fresh(self, syllables: int, suffix: str = "") -> tuple[list[str], str]:
    while True:
      parts = [self._syllable() for _ in range(syllables)]
      stem = "".join(parts)
      if suffix[:1] in _VOWELS and stem[-1] in _VOWELS:  # Givi + ia -> Givia, not Giviia
        stem = stem[:-1]
      word = (stem + suffix).capitalize()
      if self._claim(word):
        return parts, word

  def near(self, parts: list[str]) -> tuple[list[str], str]:
    """A word that differs from `parts` only after the last onset (Merik -> Merin), else a fresh one."""
    onset = re.match(r"[^aeiou]*", parts[-1]).group()
    for _ in range(20):
      new = parts[:-1] + [self._syllable(onset)]
      if self._claim("".join(new).capitalize()):
        return new, "".join(new).capitalize()
    return self.fresh(len(parts))


def _counts(num_entities: int) -> dict[str, int]:
  if num_entities < MIN_ENTITIES:
    raise ValueError(f"--num_entities must be at least {MIN_ENTITIES}, got {num_entities}")
  counts = {kind: round(share * num_entities) for kind, share in _KIND_SHARES}
  counts["country"] = max(2, counts["country"])
  counts["city"] = max(2 * counts["country"], counts["city"])
  counts["person"] = num_entities - sum(counts.values())
  return counts


def _people(
    rng: random.Random, namer: _Namer, count: int, first: int
) -> tuple[list[Entity], dict[int, list[int]]]:
  """People in families of one or two siblings; some families carry a near-copy of another's name
  and reuse one of its given names, so "Tolan Merik" and "Tolan Merin" both exist."""
  givens = [namer.fresh(2)[1] for _ in range(max(8, count // 5))]
  people: list[Entity] = []
  families: list[tuple[list[str], list[int], int]] = (
      []
  )  # (family-name syllables, members, name group)
  groups: list[list[int]] = []
  while len(people) < count:
    size = min(2 if rng.random() < 0.35 else 1, count - len(people))
    if families and rng.random() < 0.3:
      base_parts, base_members, group = rng.choice(families)
      parts, family = namer.near(base_parts)
      names = [people[base_members[0] - first].name.split()[0]] + rng.sample(givens, 1)
    else:
      parts, family = namer.fresh(rng.choice((2, 2, 3)))
      group, names = len(groups), rng.sample(givens, 2)
      groups.append([])
    if size == 2 and names[0] == names[1]:
      names[1] = next(g for g in givens if g != names[0])
    members = [first + len(people) + i for i in range(size)]
    people.extend(Entity(m, "person", f"{names[i]} {family}") for i, m in enumerate(members))
    if size == 2:
      people[-2].facts["sibling"], people[-1].facts["sibling"] = members[1], members[0]
    families.append((parts, members, group))
    groups[group].extend(members)
  similar: dict[int, list[int]] = {}
  by_given: dict[str, list[int]] = {}
  for person in people:
    by_given.setdefault(person.name.split()[0], []).append(person.index)
  for members in groups:
    for m in members:
      given = people[m - first].name.split()[0]
      similar[m] = [o for o in dict.fromkeys(members + by_given[given]) if o != m]
  return people, similar


def _build_entities(seed: int, num_entities: int) -> tuple[list[Entity], dict[int, list[int]]]:
  rng = random.Random(f"lumenvq-demo-world-{seed}")
  namer = _Namer(rng)
  counts = _counts(num_entities)
  entities: list[Entity] = []
  similar: dict[int, list[int]] = {}

  def add(kind: str, name: str) -> Entity:
    entity = Entity(len(entities), kind, name)
    entities.append(entity)
    return entity

  countries = [
      add("country", namer.fresh(2, rng.choice(_COUNTRY_SUFFIXES))[1])
      for _ in range(counts["country"])
  ]
  city_parts: list[list[str]] = []
  cities: list[Entity] = []
  near_pairs: list[tuple[int, int]] = []
  for i in range(counts["city"]):
    if cities and rng.random() < 0.25:
      base = rng.randrange(len(cities))
      parts, name = namer.near(city_parts[base])
      near_pairs.append((cities[base].index, len(entities)))
    else:
      parts, name = namer.fresh(rng.choice((2, 2, 3)))
    city_parts.append(parts)
    cities.append(add("city", name))
    cities[-1].facts["located_in"] = countries[i % len(countries)].index
    cities[-1].facts["founded_year"] = rng.randrange(800, 1700)
  for country in countries:
    own = [c.index for c in cities if c.facts["located_in"] == country.index]
    country.facts["capital"] = rng.choice(own)
    country.facts["founded_year"] = rng.randrange(1400, 1900)
    for c in own:
      similar[c] = [o for o in own if o != c]
    similar[country.index] = [c.index for c in countries if c is not country]
  for a, b in near_pairs:  # near names are similar across countries too
    if b not in similar[a]:
      similar[a].append(b)
      similar[b].append(a)

  people, person_similar = _people(rng, namer, counts["person"], len(entities))
  entities.extend(people)
  similar.update(person_similar)
  _person_facts(rng, people, cities)

  for _ in range(counts["org"]):
    org = add("org", f"{namer.fresh(2)[1]} {rng.choice(_ORG_SUFFIXES)}")
    founder = rng.choice(people)
    org.facts.update(
        industry=rng.choice(INDUSTRIES),
        founded_by=founder.index,
        founded_year=founder.facts["birth_year"] + rng.randrange(20, 60),
        headquarters=rng.choice(cities).index,
    )
  for _ in range(counts["work"]):
    word = namer.fresh(rng.choice((2, 3)))[1]
    work = add("work", f"The {word}" if rng.random() < 0.5 else word)
    author = rng.choice(people)
    work.facts.update(
        genre=rng.choice(GENRES),
        author=author.index,
        publication_year=author.facts["birth_year"] + rng.randrange(18, 70),
    )
  return entities, similar


def _person_facts(rng: random.Random, people: list[Entity], cities: list[Entity]) -> None:
  """Occupation, birth (a second sibling near the first's year, never in the same city) and
  spouses (half of the people, never siblings)."""
  first = people[0].index
  for person in people:
    person.facts.update(
        occupation=rng.choice(OCCUPATIONS),
        born_in=rng.choice(cities).index,
        birth_year=rng.randrange(1700, 1960),
    )
    sibling = people[person.facts.get("sibling", person.index) - first]
    if sibling.index < person.index:
      person.facts["birth_year"] = sibling.facts["birth_year"] + rng.randrange(-8, 9)
      while person.facts["born_in"] == sibling.facts["born_in"]:
        person.facts["born_in"] = rng.choice(cities).index
  marrying = [p for p in people if rng.random() < 0.5]
  rng.shuffle(marrying)
  for a, b in zip(marrying[::2], marrying[1::2]):
    if a.facts.get("sibling") != b.index:
      a.facts["spouse"], b.facts["spouse"] = b.index, a.index


# ----------------------------------------------------------------------------
# Pages.


def _fill(
    world: World,
    subject: Entity,
    template: str,
    facts: list | None = None,
    links: list | None = None,
) -> str | None:
  """Render one template; append each stated (entity, relation) to `facts` and each linked
  (start, end, entity) to `links`; None when a placeholder's path does not exist."""
  out, position = [], 0
  for match in _PLACEHOLDER.finditer(template):
    out.append(template[position : match.start()])
    position = match.end()
    if match.group(1) == "s":
      out.append(subject.name)
      continue
    current, value, relation = subject, None, ""
    for relation in match.group(1).split("."):
      value = current.facts.get(relation)
      if value is None:
        return None
      if facts is not None and (current.index, relation) not in facts:
        facts.append((current.index, relation))
      if RELATIONS[relation].target not in ("year", "word"):
        current = world.entities[value]
    text = world.value_text(relation, value)
    if (
        links is not None
        and current is not subject
        and RELATIONS[relation].target not in ("year", "word")
    ):
      start = sum(len(piece) for piece in out)
      links.append((start, start + len(text), current))
    out.append(text)
  out.append(template[position:])
  return "".join(out)


def _render_page(world: World, entity: Entity) -> dict:
  """One KILT knowledge-source record; registers each stated fact in `world.mentions`."""
  text = [entity.name + "\n"]
  anchors: list[dict] = []
  for heading, paragraphs in _LAYOUTS[entity.kind]:
    section_paragraphs = []
    for sentences in paragraphs:
      paragraph, facts_at, links_at = "", [], []
      for template in sentences:
        facts, links = [], []
        sentence = _fill(world, entity, template, facts, links)
        if sentence is None:
          continue
        offset = len(paragraph) + (1 if paragraph else 0)
        paragraph = f"{paragraph} {sentence}" if paragraph else sentence
        facts_at += [(fact, offset, offset + len(sentence)) for fact in facts]
        links_at += [(offset + s, offset + e, target) for s, e, target in links]
      if paragraph:
        section_paragraphs.append((paragraph, facts_at, links_at))
    if not section_paragraphs:
      continue
    if heading:
      text.append(f"Section::::{heading}.\n")
    for paragraph, facts_at, links_at in section_paragraphs:
      pid = len(text)
      text.append(paragraph + "\n")
      for fact, start, end in facts_at:
        mention = Mention(entity.index, pid, start, end, f"Section::::{heading or 'Abstract'}.")
        world.mentions.setdefault(fact, []).append(mention)
      anchors += [
          {
              "text": target.name,
              "href": urllib.parse.quote(target.name),
              "paragraph_id": pid,
              "start": start,
              "end": end,
              "wikipedia_title": target.name,
              "wikipedia_id": world.page_id(target.index),
          }
          for start, end, target in links_at
      ]
  wid = world.page_id(entity.index)
  revid = 100_000_000 + entity.index
  categories = (_fill(world, entity, c) for c in _CATEGORIES[entity.kind])
  return {
      "_id": wid,
      "wikipedia_id": wid,
      "wikipedia_title": entity.name,
      "text": text,
      "anchors": anchors,
      "categories": ",".join(c for c in categories if c),
      "history": {
          "revid": revid,
          "timestamp": f"2019-07-{1 + entity.index % 28:02d}T12:00:00Z",
          "parentid": revid - 1,
          "pre_dump": True,
          "pageid": int(wid),
          "url": f"https://demo.lumenvq.invalid/w/index.php?title={urllib.parse.quote(entity.name)}"
          f"&oldid={revid}",
      },
      "wikidata_info": {
          "wikidata_id": f"Q{PAGE_ID_BASE + entity.index}",
          "wikidata_label": entity.name,
          "description": _fill(world, entity, _DESCRIPTIONS[entity.kind]) or "",
      },
  }


def build_world(seed: int, num_entities: int) -> World:
  """The world of `seed`: entities, facts, pages (one per entity, in index order) and mentions.

  Mentions of a fact list the subject's own page first (the sibling sentence
  also states the sibling's birthplace on another page)."""
  entities, similar = _build_entities(seed, num_entities)
  world = World(seed, entities, similar)
  for entity in entities:
    world.by_kind.setdefault(entity.kind, []).append(entity.index)
  world.pages = [_render_page(world, entity) for entity in entities]
  for (subject, _), mentions in world.mentions.items():
    mentions.sort(key=lambda m: (m.page != subject, m.page, m.paragraph))
  return world
