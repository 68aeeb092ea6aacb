"""The topic map in schemas/topics.py: true to the code, complete, printed by
``streamrec topics list``, and drawn in the README's architecture diagram."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import schemas.topics as topics
from schemas.topics import catalogue, format_topic_map, topic_map

ROOT = Path(__file__).resolve().parents[1]
APP_ID = "streamrec"
#: Topic name -> the name of its constant in schemas/topics.py.
CONSTANTS = {value: name for name, value in vars(topics).items()
             if name.isupper() and isinstance(value, str)}
CHANGELOG = re.compile(rf"^{APP_ID}-(\w+)-changelog$")


def module_path(entry: str) -> Path:
    """``"streams.ingest: ingest agent"`` -> streams/ingest.py."""
    return ROOT / (entry.split(":", 1)[0].replace(".", "/") + ".py")


def architecture_diagram(readme: str) -> str:
    """The first code block under the README's ``## Architecture`` heading."""
    section = readme.split("\n## Architecture", 1)[1]
    return section.split("```", 2)[1]


def missing_from_diagram(diagram: str, specs) -> list[str]:
    """Topics the diagram does not draw: ``[name]``, or ``<table> table`` for a changelog."""
    return [t.name for t in specs if drawn_as(t.name) not in diagram]


def drawn_as(name: str) -> str:
    table = CHANGELOG.match(name)
    return f"{table.group(1)} table" if table else f"[{name}]"


# --------------------------------------------------------------------------- the README

def test_readme_diagram_draws_every_topic_and_only_catalogue_topics():
    diagram = architecture_diagram((ROOT / "README.md").read_text())
    specs = catalogue(app_id=APP_ID)
    assert missing_from_diagram(diagram, specs) == []
    drawn = set(re.findall(r"\[([\w.]+)\]", diagram))
    assert drawn <= {t.name for t in specs}, drawn - {t.name for t in specs}


@pytest.mark.parametrize("gone", ["predictions", f"{APP_ID}-item_stats-changelog"])
def test_the_readme_check_finds_a_topic_the_diagram_lost(gone):
    diagram = architecture_diagram((ROOT / "README.md").read_text())
    cut = diagram.replace(drawn_as(gone), "")
    assert missing_from_diagram(cut, catalogue(app_id=APP_ID)) == [gone]


# --------------------------------------------------------------------------- the map and the code

def test_every_topic_has_a_writer():
    assert [t.name for t in catalogue() if not t.writers] == []


def test_every_topic_has_a_reader_unless_it_is_for_operators():
    """A topic nobody reads is either for operators, named so, or a mistake."""
    unread = [t.name for t in catalogue() if not t.readers]
    assert unread == list(topics.FOR_OPERATORS)


def mentions(text: str, spec) -> bool:
    """The module refers to the topic: its constant as a whole word (EVENTS, not
    EVENTS_DLQ), or for a changelog its table's name."""
    table = CHANGELOG.match(spec.name)
    word = table.group(1) if table else CONSTANTS[spec.name]
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


@pytest.mark.parametrize("spec", catalogue(app_id=APP_ID), ids=lambda t: t.name)
def test_each_named_writer_and_reader_exists_and_uses_the_topic(spec):
    for entry in spec.writers + spec.readers:
        path = module_path(entry)
        assert path.is_file(), entry
        assert ":" in entry and entry.split(":", 1)[1].strip(), f"no role in {entry!r}"
        assert mentions(path.read_text(), spec), f"{path.name} never uses {spec.name}"


def test_the_mention_check_tells_a_constant_from_a_longer_one():
    events = next(t for t in catalogue() if t.name == topics.EVENTS)
    assert not mentions("from schemas.topics import EVENTS_DLQ", events)
    assert mentions("from schemas.topics import EVENTS, EVENTS_DLQ", events)


def test_redrive_is_on_the_map_as_the_dead_letters_reader_and_their_sources_writer():
    """streamrec deadletters redrive reads events.dlq and sends each original back to
    the topic it came from: every topic an agent dead-letters from."""
    from streams.deadletters import SOURCE_TOPICS
    roles = {t.name: ([e for e in t.writers if e.startswith("streams.deadletters:")],
                      [e for e in t.readers if e.startswith("streams.deadletters:")])
             for t in catalogue()}
    assert "redrive" in roles[topics.EVENTS_DLQ][1][0]
    assert {name for name, (writes, _) in roles.items()
            if any("redrive" in e for e in writes)} == set(SOURCE_TOPICS)


def topic_users() -> dict[str, set[str]]:
    """Topic name -> modules in streams/, stores/ and bench/ importing its constant."""
    users: dict[str, set[str]] = {}
    for folder in ("streams", "stores", "bench"):
        for path in sorted((ROOT / folder).glob("*.py")):
            module = f"{folder}.{path.stem}"
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "schemas.topics":
                    for alias in node.names:
                        name = getattr(topics, alias.name, None)
                        if alias.name in CONSTANTS.values() and name in CONSTANTS:
                            users.setdefault(name, set()).add(module)
    return users


def test_every_module_that_uses_a_topic_is_on_its_map():
    mapped = {t.name: {e.split(":", 1)[0] for e in t.writers + t.readers} for t in catalogue()}
    users = topic_users()
    assert users, "found no module importing a topic"
    unmapped = {topic: sorted(mods - mapped[topic]) for topic, mods in users.items()
                if mods - mapped[topic]}
    assert unmapped == {}


# --------------------------------------------------------------------------- the command

def test_topics_list_prints_the_map(capsys):
    from streams.cli import main
    from streams.settings import settings
    specs = catalogue(settings.partitions, settings.app_id)
    assert main(["topics", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == topic_map(specs)
    assert main(["topics", "list"]) == 0
    text = capsys.readouterr().out
    assert text == format_topic_map(specs) + "\n"
    for t in specs:
        assert t.name in text
        for entry in t.writers + t.readers:
            assert entry.split(":", 1)[0] in text
