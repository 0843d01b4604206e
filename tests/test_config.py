"""Configuration: precise errors (key path, value, expectation, YAML line), secrets that
resolve without ever being echoed, the shipped example, and fuzzing: any input gives
either an AgentConfig or a ConfigError, never another exception."""
from __future__ import annotations

import copy
import math
import random
import re
from pathlib import Path
from typing import get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import msgspec

from agent.config import AgentConfig, ConfigError, load_config, parse_config
from agent.config_base import keys_set
from agent.mqtt_client import MqttConfig, resolve_password

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "agent" / "examples" / "agent.yaml"

# Line numbers below refer to this text; tests append their own lines after it.
BASE = """\
node: press-1
model:
  path: /models/m.onnx
streams:
  - id: a
    source:
      type: serial
      port: /dev/ttyUSB0
"""
BASE_LINES = BASE.count("\n")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert str(e.value) == "\n".join(e.value.problems)
    return e.value.problems


def only(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------- the happy path
def test_minimal_config_gets_defaults():
    cfg = parse_config(BASE)
    assert cfg.node == "press-1" and cfg.model.providers == ["cpu"]
    assert cfg.streams[0].source.type == "serial" and cfg.streams[0].source.baud == 115200
    assert cfg.alerts.open_k == 4 and cfg.mqtt.port == 1883
    assert cfg.topic_prefix == "tsad/press-1/"


def test_example_config_is_valid_and_complete():
    cfg = load_config(EXAMPLE)
    assert {s.source.type for s in cfg.streams} >= {"serial", "mqtt"}
    assert cfg.mqtt.password_credential == "mqtt-password"
    text = EXAMPLE.read_text()
    missing = sorted(name for name in _all_keys(AgentConfig)
                     if not re.search(rf"^\s*#?\s*(- )?{name}:", text, re.M))
    assert missing == [], f"keys not documented in {EXAMPLE.name}: {missing}"
    # The example is installed as the live config (README, Install), so a value it sets
    # that is not the agent's default changes every such deployment: only the broker login
    # is the example's own.
    assert _not_default(cfg) == {"mqtt.username", "mqtt.password_credential"}


def _not_default(obj: msgspec.Struct, prefix: str = "") -> set[str]:
    out = set()
    for f in msgspec.structs.fields(type(obj)):
        value = getattr(obj, f.name)
        if isinstance(value, msgspec.Struct):
            out |= _not_default(value, f"{prefix}{f.name}.")
        elif f.default is not msgspec.NODEFAULT and value != f.default:
            out.add(prefix + f.name)
        elif f.default_factory is not msgspec.NODEFAULT and value != f.default_factory():
            out.add(prefix + f.name)
    return out


def _all_keys(model: type[msgspec.Struct]) -> set[str]:
    keys = set()
    for field in msgspec.structs.fields(model):
        keys.add(field.name)
        stack = [field.type]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, msgspec.Struct):
                keys |= _all_keys(t)
                tag = t.__struct_config__.tag_field
                keys |= {tag} if tag else set()
            elif get_origin(t) is not None:
                stack.extend(get_args(t))
    return keys


def test_configs_are_frozen_and_know_the_keys_their_file_set():
    """The keys a file sets win over a model's policy (agent/policy.py), even when set to
    the agent's default; a null section is all defaults and sets none."""
    cfg = parse_config(BASE + "alerts:\n  open_k: 4\n  close_m: 12\nbuffer:\n")
    assert keys_set(cfg.alerts) == {"open_k", "close_m"} and cfg.alerts.close_m == 12
    assert keys_set(cfg.buffer) == frozenset() and keys_set(cfg.scoring) == frozenset()
    assert cfg.buffer == parse_config(BASE).buffer
    with pytest.raises(AttributeError):
        cfg.alerts.open_k = 1


def test_quoted_numbers_are_read_as_numbers_but_never_as_inf():
    assert parse_config(BASE + "mqtt:\n  port: '1883'\n").mqtt.port == 1883
    p = only(BASE + "alerts:\n  cooldown_s: 'inf'\n")
    assert p == (f"<config>:{BASE_LINES + 2}: alerts.cooldown_s: value 'inf' is invalid: "
                 f"expected a finite number")


def test_example_optional_blocks_are_valid_when_uncommented():
    """The commented-out tls block is the documented shape: switching it on must work."""
    text = EXAMPLE.read_text().replace("  tls: null                         # or the mapping below",
                                       "  tls:")
    text = re.sub(r"^  #  (\w+:)", r"    \1", text, flags=re.M)
    cfg = parse_config(text)
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == "/etc/tsad-agent/ca.pem"
    assert cfg.mqtt.tls.verify_hostname is True


# ---------------------------------------------------------------- errors
def test_unknown_key_typo():
    p = only(BASE + "alerts:\n  open_kk: 4\n")
    assert p == (f"<config>:{BASE_LINES + 2}: alerts.open_kk: unknown key (value 4); "
                 f"check the spelling")


def test_wrong_type():
    p = only(BASE.replace("  path: /models/m.onnx\n", "  path: /models/m.onnx\n  threads: many\n"))
    assert p == "<config>:4: model.threads: value 'many' is invalid: expected an integer >= 0"


def test_out_of_range_number():
    p = only(BASE + "mqtt:\n  host: broker\n  port: 70000\n")
    assert p == (f"<config>:{BASE_LINES + 3}: mqtt.port: value 70000 is invalid: "
                 f"expected an integer >= 1 and <= 65535")


def test_non_finite_numbers_rejected():
    for bad in (".inf", ".nan", "-.inf"):
        p = only(BASE + f"alerts:\n  cooldown_s: {bad}\n")
        assert p.startswith(f"<config>:{BASE_LINES + 2}: alerts.cooldown_s: value ")
        assert "finite number" in p


def test_bad_enum():
    p = only(BASE + "log_level: verbose\n")
    assert p == (f"<config>:{BASE_LINES + 1}: log_level: value 'verbose' is invalid: "
                 f"expected 'debug', 'info', 'warning' or 'error'")


def test_missing_required_keys_point_at_their_parent():
    p = only(BASE.replace("  path: /models/m.onnx\n", "  threads: 2\n"))
    assert p == "<config>:2: model.path: required key is missing"
    found = problems("log_level: info\n")
    assert set(found) == {f"<config>:1: {k}: required key is missing"
                          for k in ("node", "model", "streams")}


def test_bad_source_type_in_a_list_item():
    text = BASE + "  - id: b\n    source:\n      type: modbus\n      port: /dev/ttyS0\n"
    p = only(text)
    assert p == (f"<config>:{BASE_LINES + 3}: streams[1].source.type: value 'modbus' is "
                 f"invalid: expected one of 'mqtt', 'replay', 'serial'")
    p = only(BASE + "  - id: b\n    source:\n      port: /dev/ttyS0\n")
    assert p.startswith(f"<config>:{BASE_LINES + 2}: streams[1].source.type: required key")


def test_missing_key_inside_a_source_names_the_full_path():
    found = problems(BASE + "  - id: b\n    source:\n      type: mqtt\n      qos: 3\n")
    assert len(found) == 2, found
    assert found[0] == f"<config>:{BASE_LINES + 2}: streams[1].source.topic: required key is missing"
    assert found[1].startswith(f"<config>:{BASE_LINES + 4}: streams[1].source.qos: value 3 ")


@pytest.mark.parametrize("topic, why", [
    ("plant/#/x", "'#' must be a whole level, the last one"),
    ("plant/x#", "'#' must be a whole level, the last one"),
    ("plant/+x/y", "'+' must be a whole level"),
    ("p" * 70000, "longer than MQTT's 65,535 bytes"),
    ("a\\u0000b", "holds a NUL character")])
def test_an_mqtt_topic_that_is_no_topic_filter_is_refused(topic, why):
    # paho refuses it only on its network thread, which then dies without a word
    p = only(BASE + f'  - id: b\n    source: {{type: mqtt, topic: "{topic}"}}\n')
    assert p.startswith(f"<config>:{BASE_LINES + 2}: streams[1].source.topic: value ")
    assert p.endswith(f"is invalid: {why}")


def test_mqtt_topic_filters_with_wildcards_are_accepted():
    for topic in ("#", "a/#", "+", "plant/+/sensors", "+/+/#", "a//b"):
        cfg = parse_config(BASE + f'  - id: b\n    source: {{type: mqtt, topic: "{topic}"}}\n')
        assert cfg.streams[1].source.topic == topic


def test_a_trailing_newline_is_no_part_of_an_id():
    # "$" matches before a final newline: "a\n" would be a second stream beside "a"
    p = only(BASE.replace("node: press-1", 'node: "press-1\\n"'))
    assert p.startswith("<config>:1: node: value 'press-1\\n' is invalid")
    p = only(BASE.replace("id: a", 'id: "a\\n"'))
    assert p.startswith("<config>:5: streams[0].id: value 'a\\n' is invalid")


def test_duplicate_stream_ids():
    p = only(BASE + "  - id: a\n    source: {type: replay, path: /x.csv}\n")
    assert p.startswith("<config>:4: streams: value [")
    assert p.endswith("is invalid: duplicate stream id(s): a")


def test_open_k_greater_than_open_n():
    p = only(BASE + "alerts:\n  open_k: 6\n  open_n: 5\n")
    assert p.startswith(f"<config>:{BASE_LINES + 1}: alerts: value ")
    assert p.endswith("open_k (6) must be <= open_n (5)")


def test_two_password_sources():
    p = only(BASE + "mqtt:\n  password_file: /etc/pw\n  password_env: MQTT_PW\n")
    assert p.startswith(f"<config>:{BASE_LINES + 1}: mqtt: value ")
    assert p.endswith("give at most one of password_file, password_env, password_credential "
                      "(got password_file, password_env)")


def test_every_problem_is_reported_at_once():
    text = BASE + "log_level: loud\nmqtt:\n  port: 0\nbuffer:\n  strid: 2\n"
    found = problems(text)
    assert sorted(f.split(": ")[1] for f in found) == ["buffer.strid", "log_level", "mqtt.port"]


def test_odd_keys_stay_visible_in_the_path():
    found = problems(BASE + "\"\": 1\n\"a b\": 2\nmodel2: {null: 3}\n")
    assert [f.split(": ")[1] for f in found] == ["['']", "['a b']", "model2"]


def test_duplicate_yaml_key():
    p = only(BASE + "node: press-2\n")
    assert p == (f"<config>:{BASE_LINES + 1}: node: duplicate key (first on line 1); "
                 f"remove one")


def test_yaml_syntax_error_has_its_line():
    p = only(BASE + "mqtt:\n  host: [broker\n  port: 1883\n")
    assert re.match(rf"<config>:{BASE_LINES + 3}: not valid YAML: ", p), p
    p = only("node: a\n  model: x\n")
    assert p == "<config>:2: not valid YAML: mapping values are not allowed here"


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "list"), ("just text\n", "str"),
                                       ("42\n", "int"), ("", "an empty file"),
                                       ("# only a comment\n", "an empty file")])
def test_non_mapping_top_level(text, got):
    assert only(text) == f"<config>: expected a mapping at the top level, got {got}"


def test_pathological_yaml_gives_config_errors():
    assert only("streams: &s [*s]\n" + BASE.split("streams:")[0]).startswith(
        "<config>:1: streams[0]: value [[[[...]]]] is invalid")
    assert only("[" * 3000 + "]" * 3000) == "<config>: nested too deeply to be a configuration"
    # an alias bomb: 10^9 leaves if expanded; the error value shown stays short
    bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
    found = problems(bomb + BASE.replace("node: press-1", "node: *a8"))
    assert all(len(f) < 400 for f in found), found
    assert any(f.startswith(f"<config>:10: node: value [[[") for f in found), found


def test_load_config_reports_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read: .*No such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r": cannot read: .*Is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"node: pr\xe9sse\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: cannot read: .*utf-8"):
        load_config(bad)
    good = tmp_path / "ok.yaml"
    good.write_text(BASE + "log_level: loud\n")
    with pytest.raises(ConfigError) as e:
        load_config(good)
    assert str(e.value).startswith(f"{good}:{BASE_LINES + 1}: log_level: ")


# ---------------------------------------------------------------- secrets
SECRET = "s3cr3t-Pa55w0rd"


def mqtt_cfg(**kw) -> MqttConfig:
    return parse_config(BASE + "mqtt:\n" + "".join(f"  {k}: {v}\n" for k, v in kw.items())).mqtt


def test_password_file(tmp_path):
    f = tmp_path / "pw"
    f.write_text(SECRET + "\n")
    cfg = parse_config(BASE + f"mqtt:\n  username: u\n  password_file: {f}\n")
    assert resolve_password(cfg.mqtt) == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(msgspec.to_builtins(cfg))
    with pytest.raises(ConfigError) as e:
        resolve_password(mqtt_cfg(password_file=tmp_path / "missing"))
    assert str(e.value).startswith("mqtt.password_file: cannot read ")
    assert "missing" in str(e.value) and "No such file" in str(e.value)
    f.write_bytes(b"hunter2\xff\xfeSECRET")   # not text: the error quotes none of it
    with pytest.raises(ConfigError) as e:
        resolve_password(cfg.mqtt)
    assert str(e.value) == f"mqtt.password_file: cannot read {str(f)!r}: not UTF-8 text"


def test_password_env(monkeypatch):
    monkeypatch.setenv("TSAD_TEST_PW", SECRET)
    cfg = mqtt_cfg(password_env="TSAD_TEST_PW")
    assert resolve_password(cfg) == SECRET
    assert SECRET not in repr(cfg)
    monkeypatch.delenv("TSAD_TEST_PW")
    with pytest.raises(ConfigError, match=r"^mqtt\.password_env: environment variable "
                                          r"'TSAD_TEST_PW' is not set$"):
        resolve_password(cfg)


def test_password_credential(tmp_path, monkeypatch):
    (tmp_path / "mqtt-password").write_text(SECRET)
    cfg = mqtt_cfg(password_credential="mqtt-password")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match=r"CREDENTIALS_DIRECTORY is not set.*LoadCredential="):
        resolve_password(cfg)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_password(cfg) == SECRET
    with pytest.raises(ConfigError) as e:
        resolve_password(mqtt_cfg(password_credential="other"))
    assert str(e.value).startswith("mqtt.password_credential: cannot read credential 'other'")
    assert SECRET not in str(e.value)


def test_no_password_configured():
    assert resolve_password(mqtt_cfg(username="u")) is None


def test_a_password_typed_into_the_config_is_not_echoed():
    found = problems(BASE + f"mqtt:\n  password: {SECRET}\n"
                     f"  auth:\n    user: u\n    token: {SECRET}\n")
    assert not any(SECRET in f for f in found), found
    assert found[0] == (f"<config>:{BASE_LINES + 2}: mqtt.password: unknown key (value <hidden>); "
                        f"a secret never goes in the config: use password_file, password_env "
                        f"or password_credential")
    assert found[1] == (f"<config>:{BASE_LINES + 3}: mqtt.auth: unknown key (its value is not "
                        f"shown in the broker's section); check the spelling")
    # under names no pattern foresees, in the broker's section
    found = problems(BASE + f"mqtt:\n  pwd: {SECRET}\n  pasword: {SECRET}\n"
                     f"  credentials: {{user: u, pw: {SECRET}}}\n")
    assert len(found) == 3 and not any(SECRET in f for f in found), found
    # a source mapping that fails as a whole is shown with the secret hidden too
    found = problems(BASE + f"  - id: b\n    source: {{type: modbus, passwd: {SECRET}}}\n")
    assert not any(SECRET in f for f in found), found


# ---------------------------------------------------------------- fuzzing
# Property: parse_config returns an AgentConfig or raises ConfigError, whose problems
# all carry "<config>:" and, for schema errors, a line number.  Counts: 20 000 inputs.
PROBLEM = re.compile(r"^<config>(:\d+)?: \S")
# libyaml's emitter only for speed; what is parsed goes through agent.config's loader
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump(data) -> str:
    return yaml.dump(data, Dumper=DUMPER, allow_unicode=True, sort_keys=False)


def check(text: str) -> AgentConfig | ConfigError:
    try:
        return parse_config(text)
    except ConfigError as e:
        assert e.problems and all(PROBLEM.match(p) for p in e.problems), e.problems
        return e


SCHEMA_WORDS = sorted(_all_keys(AgentConfig) | {"serial", "mqtt", "replay", "csv", "json", "cpu",
                                                 "cuda", "model", "info", "auto"})


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@fuzz(10000)
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text(text):
    check(text)


YAML_TOKENS = st.sampled_from(
    [":", ": ", "- ", "-", "[", "]", "{", "}", ",", " ", "  ", "\n", "\n  ", "\n    ", "#", "'",
     '"', "&a ", "*a", "!!str ", "!!int ", "!!binary ", "!foo ", "<<: ", "? ", "|", ">", "~",
     "null", "true", "1", "-1", "0.5", "1e9", ".inf", ".nan", "0x1f", "2020-01-01", "%YAML 1.1\n",
     "---\n", "...\n", "\t", "\\", "\x00", "é"] + SCHEMA_WORDS)


@fuzz(6000)
@given(st.lists(YAML_TOKENS, max_size=60).map("".join))
def test_fuzz_yaml_like_text(text):
    check(text)


# Nested values come from a seeded generator rather than st.recursive: hypothesis'
# recursive strategies cost ~10 ms an example here, which would cap the count far
# below what the time budget allows.  A failure still reports its (replayable) seed.
ODD_TEXT = "\x00\t\r\n :#-[]{}&*!|>'\"%@`,?éß中\u2028\U0001f600"


def random_scalar(rng: random.Random):
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, -1, 2**31, 2**63, -2**70, rng.randint(-10**6, 10**6)])
    if kind == 2:
        return rng.choice([0.0, -0.0, 0.5, 1e-300, 1e300, math.inf, -math.inf, math.nan,
                           rng.uniform(-1e3, 1e3)])
    if kind in (3, 4):
        return rng.choice(SCHEMA_WORDS)
    return "".join(rng.choice(ODD_TEXT) if rng.random() < 0.3 else chr(rng.randrange(32, 0x250))
                   for _ in range(rng.randrange(12)))


def random_key(rng: random.Random):
    return rng.choice(SCHEMA_WORDS) if rng.random() < 0.6 else random_scalar(rng)


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 4 and r < 0.2:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 4 and r < 0.45:
        return {random_key(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}
    return random_scalar(rng)


SCHEMA_SECTIONS = ["node", "model", "streams", "buffer", "scoring", "calibration", "alerts",
                   "mqtt", "sinks", "log_level", "state_dir"]


@fuzz(3000)
@given(st.integers(0, 2**32 - 1))
def test_fuzz_random_nested_mappings(seed):
    rng = random.Random(seed)
    data = {(rng.choice(SCHEMA_SECTIONS) if rng.random() < 0.7 else random_key(rng)):
            random_value(rng) for _ in range(rng.randrange(9))}
    check(dump(data))


EXAMPLE_DATA = yaml.safe_load(EXAMPLE.read_text())


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


EXAMPLE_PATHS = [p for p in _paths(EXAMPLE_DATA) if p]


@fuzz(1500)
@given(st.sampled_from(EXAMPLE_PATHS), st.sampled_from(["replace", "delete", "add"]),
       st.integers(0, 2**32 - 1))
def test_fuzz_mutated_example(path, op, seed):
    """One change to a valid config: the error, if any, names the part that changed."""
    rng = random.Random(seed)
    value, key = random_value(rng, depth=2), random_key(rng)
    data = copy.deepcopy(EXAMPLE_DATA)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    if op == "replace":
        parent[path[-1]] = value
    elif op == "delete":
        del parent[path[-1]]
    elif isinstance(parent[path[-1]], dict):
        parent[path[-1]][key] = value
    else:
        parent[path[-1]] = {key: value}
    result = check(dump(data))
    if isinstance(result, ConfigError):
        top = re.escape(str(path[0]))
        assert any(re.match(rf"<config>:\d+: {top}\b", p) for p in result.problems), \
            (path, op, result.problems)
