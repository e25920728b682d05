"""Tier 1: params.py, the one normaliser — precedence, bounds, and the shared rules (stop, seed,
n_predict, sampler names, logit_bias, grammar vs schema, unsupported OpenAI fields)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llmserve.engine.types import SamplingParams
from llmserve.errors import InvalidRequest, UnsupportedParameter
from llmserve.params import (
    BOUNDS,
    DEFAULT_ORDER,
    Family,
    Params,
    Wire,
    kobold_sampler_order,
    normalise,
    sampler_order,
)
from llmserve.protocol import kobold as kb
from llmserve.protocol import llamacpp as lc
from llmserve.protocol import native as nv
from llmserve.protocol import openai as oa

BUILTIN = SamplingParams()


def params(values: dict[str, Any], family: Family = "llamacpp", **kw: Any) -> Params:
    return normalise(Wire(family, values, **kw))


# -- precedence ---------------------------------------------------------------------------------

MODEL = {"temperature": 0.1, "top_k": 5}


@pytest.mark.parametrize(
    ("family", "client", "model", "expected"),
    [
        pytest.param("llamacpp", {"temperature": 0.9, "top_k": 40}, MODEL, (0.9, 40, 0.95),
                     id="client-over-model"),
        pytest.param("llamacpp", {}, MODEL, (0.1, 5, 0.95), id="model-over-builtin"),
        pytest.param("llamacpp", {}, {}, (BUILTIN.temperature, BUILTIN.top_k, BUILTIN.top_p),
                     id="builtin"),
        pytest.param("native", {}, {}, (0.7, 80, 0.9), id="family-over-builtin"),
        pytest.param("native", {}, MODEL, (0.1, 5, 0.9), id="model-over-family"),
        pytest.param("native", {"temperature": 0.9, "top_k": 40}, MODEL, (0.9, 40, 0.9),
                     id="native-client-over-model"),
        pytest.param("kobold", {"top_k": 40}, MODEL, (0.1, 40, 0.95), id="kobold-mixed"),
    ],
)
def test_precedence(family: Family, client: dict[str, Any], model: dict[str, Any],
                    expected: tuple[float, int, float]) -> None:
    s = params(client, family).sampling(model)
    assert (s.temperature, s.top_k, s.top_p) == expected


def test_native_family_defaults_turn_min_p_off_and_penalise_repeats() -> None:
    s = params({}, "native").sampling({})
    assert (s.min_p, s.repeat_penalty) == (0.0, 1.15)


def test_do_sample_false_is_greedy_whatever_else_says() -> None:
    s = params({"do_sample": False, "temperature": 0.9}, "native").sampling({"temperature": 1})
    assert s.temperature == 0.0


def test_a_clients_grammar_replaces_a_default_schema_and_vice_versa() -> None:
    s = params({"grammar": 'root ::= "a"'}).sampling({"json_schema": {"type": "object"}})
    assert (s.grammar, s.json_schema) == ('root ::= "a"', None)
    s = params({"json_schema": {}}).sampling({"grammar": 'root ::= "a"'})
    assert (s.grammar, s.json_schema) == (None, {})


def test_kobold_max_length_defaults_to_100() -> None:
    assert params({}, "kobold").max_tokens == 100
    assert params({"n_predict": 0}, "kobold").max_tokens is None


# -- bounds ------------------------------------------------------------------------------------

# (field, a value just outside, a value on the edge that must pass)
EDGES = [
    ("temperature", -0.01, 0.0), ("dynatemp_range", -1, 0), ("dynatemp_exponent", -1, 0),
    ("top_k", -2, -1), ("top_p", 1.01, 1.0), ("min_p", -0.1, 0.0), ("typical_p", 1.5, 1.0),
    ("xtc_probability", 1.1, 1.0), ("xtc_threshold", -0.1, 0.0), ("repeat_penalty", 0, 0.01),
    ("repeat_last_n", -2, -1), ("presence_penalty", 2.5, 2.0), ("frequency_penalty", -2.5, -2),
    ("dry_multiplier", -0.1, 0), ("dry_base", 0.5, 1.0), ("dry_allowed_length", -1, 0),
    ("dry_penalty_last_n", -2, -1), ("mirostat", 3, 2), ("mirostat_tau", -1, 0),
    ("mirostat_eta", -1, 0), ("min_keep", -1, 0), ("n_predict", -2, -1), ("n_probs", 101, 100),
    ("dry_allowed_length", 2**31, 2**31 - 1),
]


@pytest.mark.parametrize(("name", "bad", "good"), EDGES, ids=[f"{e[0]}={e[1]}" for e in EDGES])
def test_bounds(name: str, bad: float, good: float) -> None:
    with pytest.raises(InvalidRequest) as err:
        params({name: bad})
    assert err.value.param == name and name in err.value.message
    params({name: good})


@pytest.mark.parametrize("name", sorted(BOUNDS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_for_every_field(name: str, value: float) -> None:
    with pytest.raises(InvalidRequest, match="finite"):
        params({name: value})


def test_errors_name_the_field_as_the_client_spelled_it() -> None:
    with pytest.raises(InvalidRequest) as err:
        params({"repeat_penalty": -1}, "kobold", names={"repeat_penalty": "rep_pen"})
    assert err.value.param == "rep_pen" and "'rep_pen'" in err.value.message


@pytest.mark.parametrize(
    ("values", "param"),
    [
        pytest.param({"seed": 1.5}, "seed", id="seed-fraction"),
        pytest.param({"top_k": True}, "top_k", id="bool-is-not-a-number"),
        pytest.param({"ignore_eos": "yes"}, "ignore_eos", id="ignore_eos-text"),
        pytest.param({"grammar": 5}, "grammar", id="grammar-number"),
        pytest.param({"json_schema": "{}"}, "json_schema", id="json_schema-text"),
        pytest.param({"grammar": "root ::= x", "json_schema": {}}, "grammar",
                     id="grammar-and-schema"),
        pytest.param({"dry_sequence_breakers": [1]}, "dry_sequence_breakers", id="breakers"),
    ],
)
def test_bad_forms(values: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        params(values)
    assert err.value.param == param


# -- the shared rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (-1, None), (-7, None), (0, 0), (42, 42)],
)
def test_seed_rule(value: int | None, expected: int | None) -> None:
    values = {} if value is None else {"seed": value}
    assert params(values).sampling({}).seed == expected


@pytest.mark.parametrize(("value", "expected"), [(-1, None), (0, None), (1, 1), (500, 500)])
def test_n_predict_rule(value: int, expected: int | None) -> None:
    assert params({"n_predict": value}).max_tokens == expected


def test_stop_rule() -> None:
    p = params({}, stops=[("stop", ["A", "", "B"]), ("stopping_strings", "A"),
                          ("stopping_strings", ["C"])])
    assert p.stop == ("A", "B", "C")
    with pytest.raises(InvalidRequest) as err:
        params({}, stops=[("stop", "x"), ("stop_sequence", [1])])
    assert err.value.param == "stop_sequence"


def test_top_k_below_one_is_off() -> None:
    assert params({"top_k": -1}).sampling({}).top_k == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("top_k", ("top_k",), id="one-name-is-not-letters"),
        pytest.param("temperature", ("temperature",), id="temperature"),
        pytest.param("kpt", ("top_k", "top_p", "temperature"), id="letters"),
        pytest.param("edskypmxt", DEFAULT_ORDER, id="all-letters"),
        pytest.param(["typ_p", "typical_p", "typical", "typ"], ("typ_p",) * 4, id="typical"),
        pytest.param(["top-k", "topk", "TOP_K"], ("top_k",) * 3, id="top_k-spellings"),
        pytest.param(["nucleus", "temp", "min-p"], ("top_p", "temperature", "min_p"),
                     id="aliases"),
    ],
)
def test_sampler_names(value: Any, expected: tuple[str, ...]) -> None:
    assert sampler_order(value) == expected


@pytest.mark.parametrize("value", [["top_k", "bogus"], "kq", [1], 5])
def test_unknown_sampler_names_are_refused(value: Any) -> None:
    with pytest.raises(InvalidRequest) as err:
        sampler_order(value)
    assert err.value.param == "samplers"


def test_kobold_sampler_ids_reorder_within_llama_cpps_order() -> None:
    assert kobold_sampler_order([6, 0, 1, 3, 4, 2, 5]) == DEFAULT_ORDER
    assert kobold_sampler_order([5, 6, 0, 1, 3, 4, 2]) == (
        "temperature", "dry", "top_n_sigma", "penalties", "top_k", "typ_p", "min_p", "xtc",
        "top_p")
    with pytest.raises(InvalidRequest):
        kobold_sampler_order(["top_k"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], ()),
        ({}, ()),
        ([[15, -1], [16, False]], ((15, -1.0), (16, -math.inf))),
        ({"15": 2.5}, ((15, 2.5),)),
    ],
)
def test_logit_bias_forms(value: Any, expected: tuple[tuple[int, float], ...]) -> None:
    assert params({"logit_bias": value}).sampling({}).logit_bias == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [('["\\n", ":"]', ("\n", ":")), ("User:", ("User:",)), (["a", "b"], ("a", "b"))],
)
def test_sequence_breakers(value: Any, expected: tuple[str, ...]) -> None:
    assert params({"dry_sequence_breakers": value}).sampling({}).dry_sequence_breakers == expected


# -- unsupported OpenAI fields -------------------------------------------------------------------

ASKS = [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}),
    ("parallel_tool_calls", True), ("best_of", 3),
    ("chat_template_kwargs", {"enable_thinking": False}),
    ("modalities", ["text", "audio"]),
]
OFF = [
    ("tools", []), ("tool_choice", "none"), ("tool_choice", "auto"), ("functions", []),
    ("function_call", "none"), ("parallel_tool_calls", False), ("best_of", 1),
    ("chat_template_kwargs", {}), ("modalities", ["text"]),
]


@pytest.mark.parametrize(("name", "value"), ASKS, ids=[a[0] for a in ASKS])
def test_unsupported_fields_are_refused(name: str, value: Any) -> None:
    with pytest.raises(UnsupportedParameter) as err:
        params({}, "openai", unsupported={name: value})
    assert err.value.param == name and err.value.code == "unsupported_parameter"


@pytest.mark.parametrize(("name", "value"), OFF, ids=[f"{o[0]}={o[1]!r}" for o in OFF])
def test_values_that_mean_off_pass(name: str, value: Any) -> None:
    params({}, "openai", unsupported={name: value})


def test_tool_choice_auto_with_tools_asks_for_tools() -> None:
    with pytest.raises(UnsupportedParameter):
        params({}, "openai", unsupported={"tools": [{"type": "function"}], "tool_choice": "auto"})


# -- the wire models only rename -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "body", "names"),
    [
        pytest.param(oa.CompletionRequest, {"prompt": "x", "rep_pen": 1.1, "typical": 0.9,
                                            "max_tokens": 7},
                     {"repeat_penalty": "rep_pen", "typical_p": "typical",
                      "n_predict": "max_tokens"}, id="openai"),
        pytest.param(lc.CompletionRequest, {"prompt": "x", "num_predict": 7,
                                            "repeat_penalty": 1.1},
                     {"n_predict": "num_predict", "repeat_penalty": "repeat_penalty"},
                     id="llamacpp"),
        pytest.param(kb.GenerateRequest, {"prompt": "x", "max_length": 7, "rep_pen": 1.1,
                                          "sampler_seed": 3, "seed": 4},
                     {"n_predict": "max_length", "repeat_penalty": "rep_pen",
                      "seed": "sampler_seed"}, id="kobold"),
        pytest.param(nv.GenerateRequest, {"prompt": "x", "max_length": 7,
                                          "repetition_penalty": 1.1},
                     {"n_predict": "max_length", "repeat_penalty": "repetition_penalty"},
                     id="native"),
    ],
)
def test_wire_models_rename_and_report_what_was_set(
    model: Any, body: dict[str, Any], names: dict[str, str]
) -> None:
    wire = model.model_validate(body).wire()
    for key, spelled in names.items():
        assert wire.names[key] == spelled
        assert wire.values[key] == body[spelled]
    assert "temperature" not in wire.values  # unset stays unset


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    req = oa.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 9,
         "max_completion_tokens": 5})
    assert normalise(req.wire()).max_tokens == 5


def test_response_format_is_the_json_schema_and_named_so() -> None:
    req = oa.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "grammar": "root ::= x",
         "response_format": {"type": "json_object"}})
    with pytest.raises(InvalidRequest) as err:
        normalise(req.wire())
    assert err.value.param == "grammar"
    p = normalise(req.model_copy(update={"grammar": None}).wire())
    assert p.client["json_schema"] == {} and p.wire_name("json_schema") == "response_format"
