"""Tier 1: SamplingParams → the planned llama.cpp sampler chain (no model)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from llmserve.engine.sampling import (
    ChainPlan,
    VocabFacts,
    compile_params,
    plan_chain,
    resolve_seed,
)
from llmserve.engine.types import SamplingParams
from llmserve.errors import InvalidRequest
from tests.conftest import requires_llama_cpp

VOCAB = VocabFacts(n_vocab=1000, n_ctx=512, eog_tokens=(2, 7))
SEED = 1234
BREAKERS = ("\n", ":", "\"", "*")


def plan(**fields: Any) -> ChainPlan:
    params = SamplingParams(**{"seed": SEED, **fields})
    return plan_chain(params, vocab=VOCAB)


def test_default_chain_is_llama_cpps() -> None:
    p = plan()
    assert p.names == ["top_k", "top_p", "min_p", "temp_ext", "dist"]
    assert p.step("top_k").args == (40,)
    assert p.step("top_p").args == (0.95, 0)
    assert p.step("min_p").args == (0.05, 0)
    assert p.step("temp_ext").args == (0.8, 0.0, 1.0)
    assert p.step("dist").args == (SEED,)
    assert p.grammar is None
    assert p.history_window == 0


# Each row: the fields set, then the step it must produce (name, args) — or None when those
# values switch the sampler off, which must leave it out of the chain.
CHANGES = [
    pytest.param({"temperature": 0.3}, ("temp_ext", (0.3, 0.0, 1.0)), id="temperature"),
    pytest.param({"temperature": 0.0}, ("greedy", ()), id="temperature-0-greedy"),
    pytest.param({"temperature": 0.0, "dynatemp_range": 0.5}, ("temp_ext", (0.0, 0.5, 1.0)),
                 id="temperature-0-with-dynatemp-is-not-greedy"),
    pytest.param({"dynatemp_range": 0.5}, ("temp_ext", (0.8, 0.5, 1.0)), id="dynatemp_range"),
    pytest.param({"dynatemp_exponent": 2.0}, ("temp_ext", (0.8, 0.0, 2.0)),
                 id="dynatemp_exponent"),
    pytest.param({"top_k": 7}, ("top_k", (7,)), id="top_k"),
    pytest.param({"top_k": 0}, ("top_k", None), id="top_k-0-off"),
    pytest.param({"top_p": 0.5}, ("top_p", (0.5, 0)), id="top_p"),
    pytest.param({"top_p": 1.0}, ("top_p", None), id="top_p-1-off"),
    pytest.param({"min_p": 0.2}, ("min_p", (0.2, 0)), id="min_p"),
    pytest.param({"min_p": 0.0}, ("min_p", None), id="min_p-0-off"),
    pytest.param({"typical_p": 0.7}, ("typical", (0.7, 0)), id="typical_p"),
    pytest.param({"top_n_sigma": 1.5}, ("top_n_sigma", (1.5,)), id="top_n_sigma"),
    pytest.param({"xtc_probability": 0.5}, ("xtc", (0.5, 0.1, 0, SEED)), id="xtc_probability"),
    pytest.param({"xtc_probability": 0.5, "xtc_threshold": 0.3}, ("xtc", (0.5, 0.3, 0, SEED)),
                 id="xtc_threshold"),
    pytest.param({"xtc_probability": 0.5, "xtc_threshold": 0.6}, ("xtc", None),
                 id="xtc_threshold-above-half-off"),
    pytest.param({"repeat_penalty": 1.1}, ("penalties", (64, 1.1, 0.0, 0.0)),
                 id="repeat_penalty"),
    pytest.param({"repeat_penalty": 1.1, "repeat_last_n": 16},
                 ("penalties", (16, 1.1, 0.0, 0.0)), id="repeat_last_n"),
    pytest.param({"repeat_penalty": 1.1, "repeat_last_n": -1},
                 ("penalties", (512, 1.1, 0.0, 0.0)), id="repeat_last_n-minus-1-context"),
    pytest.param({"repeat_penalty": 1.1, "repeat_last_n": 10**9},
                 ("penalties", (512, 1.1, 0.0, 0.0)), id="repeat_last_n-capped-at-context"),
    pytest.param({"top_k": 10**9}, ("top_k", (1000,)), id="top_k-capped-at-vocab"),
    pytest.param({"repeat_penalty": 1.1, "repeat_last_n": 0}, ("penalties", None),
                 id="repeat_last_n-0-off"),
    pytest.param({"presence_penalty": 0.5}, ("penalties", (64, 1.0, 0.0, 0.5)),
                 id="presence_penalty"),
    pytest.param({"frequency_penalty": -0.5}, ("penalties", (64, 1.0, -0.5, 0.0)),
                 id="frequency_penalty"),
    pytest.param({"dry_multiplier": 0.8}, ("dry", (0.8, 1.75, 2, 512, BREAKERS)),
                 id="dry_multiplier"),
    pytest.param({"dry_multiplier": 0.8, "dry_base": 2.0}, ("dry", (0.8, 2.0, 2, 512, BREAKERS)),
                 id="dry_base"),
    pytest.param({"dry_multiplier": 0.8, "dry_allowed_length": 4},
                 ("dry", (0.8, 1.75, 4, 512, BREAKERS)), id="dry_allowed_length"),
    pytest.param({"dry_multiplier": 0.8, "dry_penalty_last_n": 32},
                 ("dry", (0.8, 1.75, 2, 32, BREAKERS)), id="dry_penalty_last_n"),
    pytest.param({"dry_multiplier": 0.8, "dry_penalty_last_n": 0}, ("dry", None),
                 id="dry_penalty_last_n-0-off"),
    pytest.param({"dry_multiplier": 0.8, "dry_sequence_breakers": ("\n\n", "User:")},
                 ("dry", (0.8, 1.75, 2, 512, ("\n\n", "User:"))), id="dry_sequence_breakers"),
    pytest.param({"mirostat": 1}, ("mirostat", (1000, SEED, 5.0, 0.1, 100)), id="mirostat-1"),
    pytest.param({"mirostat": 2}, ("mirostat_v2", (SEED, 5.0, 0.1)), id="mirostat-2"),
    pytest.param({"mirostat": 2, "mirostat_tau": 3.0}, ("mirostat_v2", (SEED, 3.0, 0.1)),
                 id="mirostat_tau"),
    pytest.param({"mirostat": 2, "mirostat_eta": 0.2}, ("mirostat_v2", (SEED, 5.0, 0.2)),
                 id="mirostat_eta"),
    pytest.param({"min_keep": 3}, ("top_p", (0.95, 3)), id="min_keep"),
    pytest.param({"seed": 99}, ("dist", (99,)), id="seed"),
    pytest.param({"seed": 99, "xtc_probability": 0.5}, ("xtc", (0.5, 0.1, 0, 99)),
                 id="seed-reaches-xtc"),
    pytest.param({"logit_bias": ((5, -1.5), (6, -math.inf))},
                 ("logit_bias", (((5, -1.5), (6, -math.inf)),)), id="logit_bias"),
    pytest.param({"ignore_eos": True}, ("logit_bias", (((2, -math.inf), (7, -math.inf)),)),
                 id="ignore_eos"),
    pytest.param({"samplers": ("temperature", "top_k")}, ("temp_ext", (0.8, 0.0, 1.0)),
                 id="samplers"),
]


@pytest.mark.parametrize(("fields", "expected"), CHANGES)
def test_each_parameter_changes_the_chain(
    fields: dict[str, Any], expected: tuple[str, tuple[Any, ...] | None]
) -> None:
    name, args = expected
    p = plan(**fields)
    if args is None:
        assert name not in p.names
    else:
        assert p.step(name).args == args
        assert p != plan(), "the parameter left the chain as it was"


def test_every_sampling_field_is_covered() -> None:
    covered = {key for param in CHANGES for key in param.values[0]}
    covered |= {"grammar", "json_schema"}  # test_grammar_* below
    covered |= {"grammar_triggers"}  # the lazy tool-call grammar: tests/test_tool_calls*.py
    assert covered == {f.name for f in dataclasses.fields(SamplingParams)}


def test_greedy_keeps_only_what_can_change_the_pick() -> None:
    everything = {"repeat_penalty": 1.1, "dry_multiplier": 0.8, "top_n_sigma": 1.0,
                  "typical_p": 0.9, "xtc_probability": 0.5, "logit_bias": ((1, 1.0),)}
    assert plan(**everything, temperature=0).names == [
        "logit_bias", "penalties", "dry", "typical", "xtc", "greedy"]
    # samplers after temperature see a single candidate
    order = ("top_k", "temperature", "xtc", "penalties")
    assert plan(**everything, temperature=0, samplers=order).names == ["logit_bias", "greedy"]
    # without temperature in the order, llama.cpp samples the untempered distribution
    assert plan(temperature=0, samplers=("top_k",)).names == ["top_k", "dist"]


def test_mirostat_replaces_the_whole_list_like_llama_cpp() -> None:
    busy = {"repeat_penalty": 1.2, "dry_multiplier": 0.8, "top_k": 5, "xtc_probability": 0.5,
            "logit_bias": ((1, 2.0),), "temperature": 0.7}
    assert plan(**busy, mirostat=1).names == ["logit_bias", "temp", "mirostat"]
    assert plan(**busy, mirostat=2).names == ["logit_bias", "temp", "mirostat_v2"]
    assert plan(**busy, mirostat=2).step("temp").args == (0.7,)


def test_sampler_order_is_honoured() -> None:
    everything = {"repeat_penalty": 1.1, "dry_multiplier": 0.8, "top_n_sigma": 1.0,
                  "typical_p": 0.9, "xtc_probability": 0.5}
    assert plan(**everything).names == [
        "penalties", "dry", "top_n_sigma", "top_k", "typical", "top_p", "min_p", "xtc",
        "temp_ext", "dist",
    ]
    sillytavern = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                   "temperature")
    assert plan(**everything, samplers=sillytavern).names == plan(**everything).names
    reverse = tuple(reversed(sillytavern))
    assert plan(**everything, samplers=reverse).names == [
        "temp_ext", "xtc", "min_p", "top_p", "typical", "top_k", "top_n_sigma", "dry",
        "penalties", "dist",
    ]
    # a sampler left out of the order does not run, whatever its value
    assert plan(top_k=5, samplers=("temperature",)).names == ["temp_ext", "dist"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"samplers": ("top_k", "magic")}, "samplers", id="unknown-sampler"),
        pytest.param({"samplers": tuple("kq")}, "samplers", id="unknown-letter"),
        pytest.param({"logit_bias": ((1000, 1.0),)}, "logit_bias", id="token-past-vocab"),
        pytest.param({"logit_bias": ((-1, 1.0),)}, "logit_bias", id="negative-token"),
        pytest.param({"json_schema": {"type": "nonsense"}}, "json_schema", id="bad-schema",
                     marks=requires_llama_cpp),
        pytest.param({"json_schema": {"$ref": "#/definitions/missing"}}, "json_schema",
                     id="dangling-ref", marks=requires_llama_cpp),
        pytest.param({"mirostat": 3}, "mirostat", id="mirostat-3"),
    ],
)
def test_invalid_values_are_rejected(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        plan(**fields)
    assert exc.value.param == param


def test_grammar_is_kept_apart_from_the_chain() -> None:
    p = plan(grammar='root ::= "yes" | "no"')
    assert p.grammar == 'root ::= "yes" | "no"'
    assert p.names == plan().names


def test_empty_grammar_means_none() -> None:
    assert plan(grammar="").grammar is None


@requires_llama_cpp
def test_json_schema_compiles_to_a_grammar() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    p = plan(json_schema=schema)
    assert p.grammar is not None and "root ::=" in p.grammar and '\\"n\\"' in p.grammar
    compiled = compile_params(SamplingParams(json_schema=schema), VOCAB)
    assert compiled.grammar == p.grammar and compiled.json_schema is None


@requires_llama_cpp
def test_empty_json_schema_means_any_object() -> None:
    assert plan(json_schema={}).grammar == plan(json_schema={"type": "object"}).grammar


def test_history_window_covers_the_look_back_samplers() -> None:
    assert plan(repeat_penalty=1.1, repeat_last_n=16).history_window == 16
    assert plan(repeat_penalty=1.1, dry_multiplier=1.0, dry_penalty_last_n=100).history_window \
        == 100
    assert plan(dry_multiplier=1.0).history_window == VOCAB.n_ctx


def test_no_seed_means_a_random_one() -> None:
    seeds = {plan_chain(SamplingParams(seed=s), vocab=VOCAB).step("dist").args[0]
             for s in (None, -1, None, -1, None)}
    assert len(seeds) > 1


def test_resolve_seed() -> None:
    assert resolve_seed(42) == 42
    assert resolve_seed(2**40 + 5) == 5
    assert 0 <= resolve_seed(-1) < 2**32
    assert 0 <= resolve_seed(None) < 2**32
