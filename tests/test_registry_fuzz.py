"""Fuzzing the manifest loader: whatever the bytes, it returns a Manifest or raises
ManifestError, never anything else. Also: the fast TOML-subset reader agrees with
tomllib on every document it accepts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import registry
from registry._toml import parse_toml_subset, tomllib


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder) / "fuzz.toml"


def load_or_manifest_error(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        manifest = registry.load_manifest(path)
    except registry.ManifestError as exc:
        assert exc.problems and all(line.startswith(str(path)) for line in exc.problems)
        assert registry.validate_manifest(path) == exc.problems
    else:
        assert manifest.plugin and registry.validate_manifest(path) == []


# --- random TOML documents, biased towards manifest-shaped ones --------------

KEYS = st.sampled_from(["schema-version", "package", "plugin", "group", "name", "value",
                        "enabled", "description", "path", "requires-engine", "version", "x"])
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
SCALARS = st.one_of(
    st.integers(-3, 3), st.booleans(), TEXT,
    st.sampled_from(["general", "platform", "engine.stat_logger_plugins", "gpu", "m:f", "a b",
                     "mod.sub:attr.x", ">=0.1", "0.1+", "."]),
    st.floats(allow_nan=False, allow_infinity=False),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)), max_leaves=6)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_table(table: dict) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in table.items())


DOCUMENTS = st.builds(
    lambda top, package, plugins: (
        toml_table(top)
        + (f"[package]\n{toml_table(package)}" if package is not None else "")
        + "".join(f"[[plugin]]\n{toml_table(p)}" for p in plugins)
    ),
    st.dictionaries(st.sampled_from(["schema-version", "x"]), st.one_of(st.just(1), SCALARS),
                    max_size=2),
    st.none() | st.dictionaries(KEYS, SCALARS, max_size=4),
    st.lists(st.dictionaries(KEYS, VALUES, max_size=6), max_size=3),
)


@fuzz(80)
@given(DOCUMENTS)
def test_random_toml_documents_raise_only_manifest_error(scratch, document):
    load_or_manifest_error(scratch, document.encode("utf-8"))


@fuzz(150)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_manifest_error(scratch, data):
    load_or_manifest_error(scratch, data)


@fuzz(60)
@given(DOCUMENTS, st.data())
def test_corrupted_documents_raise_only_manifest_error(scratch, document, data):
    raw = bytearray(document.encode("utf-8"))
    for _ in range(data.draw(st.integers(1, 3))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    load_or_manifest_error(scratch, bytes(raw))


# --- the fast subset reader never disagrees with tomllib ---------------------

LINE_PARTS = st.sampled_from([
    "schema-version = 1", "[package]", "[[plugin]]", "[ plugin ]", "[[package]]", "[[plugin]",
    'group = "general"', "name = 'a'", 'value = "m:f"  # note', "enabled = true",
    "enabled = false", "n = 01", "n = -0", "n = +7", "n = 1_0", 'x = "a\\"b"', "x = 'it''s'",
    "# comment", "", "   ", "\t", 'a.b = 1', 'k = "tab\there"', "k = 1 2", '"q" = 1',
    "k = \"unterminated", "k = true # ok", "k=false", "[a]", "[[a]]", "a = 1", "k = \"#\"",
    "k = 'x' y", "k = \"\u00e9\"", "k = \"\r\"", "k = 1\r",
])


@settings(max_examples=200, deadline=None)
@given(st.lists(LINE_PARTS, max_size=12), st.sampled_from(["\n", "\r\n"]))
def test_fast_reader_agrees_with_tomllib(lines, newline):
    text = newline.join(lines)
    fast = parse_toml_subset(text)
    try:
        expected = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assert fast is None
    else:
        assert fast is None or fast == expected


def test_fast_reader_takes_typical_manifests():
    text = (Path(__file__).resolve().parent.parent / "manifests" / "builtin.toml").read_text()
    assert parse_toml_subset(text) == tomllib.loads(text)


# --- the fast requires-engine check agrees with packaging --------------------

RELEASES = st.lists(st.integers(0, 3), min_size=1, max_size=4).map(
    lambda parts: ".".join(map(str, parts)))
CLAUSES = st.builds(lambda op, v, pad: f"{pad}{op}{pad}{v}",
                    st.sampled_from([">=", "<=", ">", "<", "==", "!="]), RELEASES,
                    st.sampled_from(["", " "]))


@settings(max_examples=150, deadline=None)
@given(st.lists(CLAUSES, min_size=1, max_size=3).map(",".join), RELEASES)
def test_fast_version_check_agrees_with_packaging(spec, version):
    from packaging.specifiers import SpecifierSet

    from registry._versions import admits, check_specifier

    assert check_specifier(spec) == spec
    assert admits(spec, version) == SpecifierSet(spec).contains(version, prereleases=True)


@pytest.mark.parametrize("spec", ["~=0.1", "==0.1.*", ">=0.1rc1", ">=0.1,<0.3", ""])
def test_version_check_falls_back_to_packaging(spec):
    from packaging.specifiers import SpecifierSet

    from registry._versions import admits

    for version in ("0.1.0", "0.2", "0.1.0rc1", "1.0"):
        assert admits(spec, version) == SpecifierSet(spec).contains(version, prereleases=True)
