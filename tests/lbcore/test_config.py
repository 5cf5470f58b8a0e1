"""Config parsing: every refusal names the file, the key and the reason."""
from __future__ import annotations

import pytest

from lbcore import config
from lbcore.config import ConfigError, load_config, parse_config

GOOD = """
[node]
id = "node-1"
workers = 2
control = "static"

[[service]]
name = "web"
listen = "127.0.0.1:8080"
algorithm = "wrr"

[[service.backend]]
id = "web-1"
address = "127.0.0.1:9001"
weight = 1
"""


def test_the_documented_shape_parses():
    config = parse_config(GOOD, "f.toml")
    assert config.node.id == "node-1" and config.node.workers == 2
    (service,) = config.services
    assert service.algorithm == "wrr"
    assert service.backends[0].address == "127.0.0.1:9001"


def test_defaults():
    config = parse_config('[node]\nid = "n"\n', "f.toml")
    assert config.node.workers >= 1
    assert config.node.retries == 3 and config.node.drain_timeout_ms == 10_000
    assert config.node.metrics == ""  # off
    assert parse_config('[node]\nid = "n"\nmetrics = "0.0.0.0:9100"\n').node.metrics == "0.0.0.0:9100"
    assert config.services == ()


def refusal(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.toml")
    assert str(info.value).startswith(f"f.toml: {info.value.key}: ")
    return info.value


@pytest.mark.parametrize("change, key, reason", [
    (("weight = 1", "weight = -1"), "service[0].backend[0].weight", "must be 0..256 (got -1)"),
    (("weight = 1", "weight = 1\ncolour = 2"), "service[0].backend[0].colour", "unknown key"),
    (('algorithm = "wrr"', 'algorithm = "random"'), "service[0].algorithm", "unknown algorithm 'random'"),
    (('address = "127.0.0.1:9001"', 'address = "localhost:9001"'), "service[0].backend[0].address",
     "not an IPv4 address"),
    (('address = "127.0.0.1:9001"', 'address = "127.0.0.1:99999"'), "service[0].backend[0].address",
     "is not 1..65535"),
    (('address = "127.0.0.1:9001"', 'address = "127.0.0.1:\u0669\u0660\u0660\u0661"'),
     "service[0].backend[0].address", "is not 1..65535"),  # digits, but not ASCII ones
    (('id = "web-1"', 'id = "web-1\\n"'), "service[0].backend[0].id", "is not a name"),
    (('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1"'), "service[0].listen", "is not HOST:PORT"),
    (("workers = 2", "workers = 0"), "node.workers", "must be 1..64"),
    (("workers = 2", 'workers = "two"'), "node.workers", "must be int, got str"),
    (("workers = 2", "workers = true"), "node.workers", "must be int, got bool"),
    (('control = "static"', 'control = "udp://x:1"'), "node.control", "one of"),
    (('control = "static"', 'control = "tcp://127.0.0.1:7700"'), "node.subscribe", "required"),
    (('control = "static"', 'address = "localhost"'), "node.address", "not an IPv4 address"),
    (('control = "static"', 'metrics = "localhost:9100"'), "node.metrics", "not an IPv4 address"),
    (('control = "static"', 'metrics = "127.0.0.1"'), "node.metrics", "is not HOST:PORT"),
    (('control = "static"', 'metrics = "127.0.0.1:0"'), "node.metrics", "is not 1..65535"),
    (('control = "static"', "metrics = 9100"), "node.metrics", "must be str, got int"),
    (('id = "node-1"', 'id = "bad id"'), "node.id", "is not a name"),
    (('name = "web"', 'name = ""'), "service[0].name", "is not a name"),
    (("weight = 1", "weight = 1\nmax_conns = -1"), "service[0].backend[0].max_conns",
     "must be 0..1000000 (got -1)"),
    # a drain's state is the control plane's word, carried by snapshots only
    (("weight = 1", 'weight = 1\nstate = "draining"'), "service[0].backend[0].state", "unknown key"),
    (('algorithm = "wrr"', 'algorithm = "wrr"\nmax_queue = -1'), "service[0].max_queue",
     "must be 0..1000000"),
    (('algorithm = "wrr"', 'algorithm = "wrr"\nqueue_timeout_ms = 0'), "service[0].queue_timeout_ms",
     "must be 1..2147483647 (got 0)"),
    (('algorithm = "wrr"', 'algorithm = "wrr"\ndrain_timeout_ms = 99999999999'),
     "service[0].drain_timeout_ms", "must be 0..2147483647"),
    (('algorithm = "wrr"', 'algorithm = "wrr"\non_drain_timeout = "wait"'), "service[0].on_drain_timeout",
     "'wait' is not one of: close, keep"),
    (('algorithm = "wrr"', 'algorithm = "wrr"\nslow_start_aggression = 0'),
     "service[0].slow_start_aggression", "must be more than 0 and at most 100 (got 0.0)"),
    (('algorithm = "wrr"', 'algorithm = "wrr"\nslow_start_aggression = nan'),
     "service[0].slow_start_aggression", "must be more than 0"),
    (('algorithm = "wrr"', 'algorithm = "wrr"\nslow_start_aggression = "fast"'),
     "service[0].slow_start_aggression", "must be a number, got str"),
    (('algorithm = "wrr"', 'algorithm = "wrr"\nslow_start_min_weight_percent = 101'),
     "service[0].slow_start_min_weight_percent", "must be 0..100"),
    (('algorithm = "wrr"', 'algorithm = "maglev"\nslow_start_ms = 1000'), "service[0].slow_start_ms",
     "maglev keeps each client on its backend"),
])
def test_bad_values_are_refused_with_key_and_reason(change, key, reason):
    error = refusal(GOOD.replace(*change))
    assert error.key == key
    assert reason in error.reason


def test_duplicate_service_name():
    error = refusal(GOOD + '[[service]]\nname = "web"\nlisten = "127.0.0.1:8081"\n')
    assert (error.key, error.reason) == ("service[1].name", "duplicate service name 'web'")


def test_duplicate_backend_id():
    text = GOOD + '[[service.backend]]\nid = "web-1"\naddress = "127.0.0.1:9002"\n'
    error = refusal(text)
    assert (error.key, error.reason) == ("service[0].backend[1].id", "duplicate backend id 'web-1'")


def test_duplicate_listener():
    error = refusal(GOOD + '[[service]]\nname = "api"\nlisten = "127.0.0.1:8080"\n')
    assert error.key == "service[1].listen"


def test_syntax_error_and_unknown_table_and_missing_key():
    assert refusal("[node\n").key == "(syntax)"
    assert refusal(GOOD + "[extra]\na = 1\n").key == "extra"
    assert refusal("[node]\nworkers = 1\n").key == "node.id"
    assert refusal('[node]\nid = "n"\n[[service]]\nname = "s"\n').key == "service[0].listen"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.key == "(file)"


def test_lifecycle_keys_sit_in_the_service_and_default_when_left_out():
    (service,) = parse_config(GOOD.replace('algorithm = "wrr"', 'algorithm = "least_conn"\n'
                                           "slow_start_ms = 10000\nslow_start_aggression = 2\nmax_queue = 8")
                              .replace("weight = 1", "weight = 1\nmax_conns = 5")).services
    assert (service.lifecycle.slow_start_ms, service.lifecycle.slow_start_aggression,
            service.lifecycle.max_queue, service.lifecycle.queue_timeout_ms) == (10000, 2.0, 8, 1000)
    assert service.lifecycle.drain_timeout_ms == 300_000 and service.lifecycle.on_drain_timeout == "close"
    assert service.backends[0].max_conns == 5 and service.backends[0].state == "active"


@pytest.mark.parametrize(("value", "settings"), [
    (config.DEFAULT_HEALTH, config.HEALTH_SETTINGS),
    (config.DEFAULT_OUTLIER, config.OUTLIER_SETTINGS),
    (config.DEFAULT_LIFECYCLE, config.LIFECYCLE_SETTINGS),
])
def test_a_tables_defaults_are_its_settings_defaults(value, settings):
    # the dataclass a table is read into states each default again: they must agree
    assert vars(value) == {s.name: s.default for s in settings}
