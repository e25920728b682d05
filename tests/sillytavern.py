"""Request bodies as SillyTavern 1.15 sends them (shapes from ../shared/CLIENTS.md, read from its
src/endpoints/backends/text-completions.js and public/scripts/textgen-settings.js): the whole
settings object, junk keys included, for each connection type."""

from __future__ import annotations

from typing import Any

SAMPLERS = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
            "temperature"]
STOPS = ["\nUser:", "\n### Instruction:", "</s>", "<|im_end|>", "\nAssistant:"]


def _common(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """Keys every textgen type gets (SillyTavern forwards them all; most are junk to us)."""
    return {
        "prompt": prompt,
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "max_new_tokens": max_tokens,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "top_p": 0.9,
        "typical_p": 1,
        "typical": 1,
        "sampler_seed": -1,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "top_k": 40,
        "skew": 0,
        "min_tokens": 0,
        "length_penalty": 1,
        "early_stopping": False,
        "add_bos_token": True,
        "smoothing_factor": 0,
        "smoothing_curve": 1,
        "dry_allowed_length": 2,
        "dry_multiplier": 0,
        "dry_base": 1.75,
        "dry_sequence_breakers": "[\"\\n\", \":\", \"\\\"\", \"*\"]",
        "dry_penalty_last_n": 0,
        "max_tokens_second": 0,
        "stopping_strings": STOPS,
        "stop": STOPS,
        "truncation_length": 2048,
        "ban_eos_token": False,
        "skip_special_tokens": True,
        "include_reasoning": True,
        "top_a": 0,
        "tfs": 1,
        "epsilon_cutoff": 0,
        "eta_cutoff": 0,
        "mirostat_mode": 0,
        "mirostat_tau": 5,
        "mirostat_eta": 0.1,
        "custom_token_bans": "",
        "banned_strings": [],
        "api_type": "llamacpp",
        "api_server": "http://127.0.0.1:8080",
        "legacy_api": False,
        "sampler_order": [6, 0, 1, 3, 4, 2, 5],
        "xtc_threshold": 0.1,
        "xtc_probability": 0,
        "nsigma": 0,
        "stream": stream,
    }


def llamacpp_body(prompt: str, *, max_tokens: int = 16, stream: bool = False,
                  **overrides: Any) -> dict[str, Any]:
    """The llama.cpp type: POST /completion."""
    body = {
        **_common(prompt, max_tokens, stream),
        "n_predict": max_tokens,
        "num_predict": max_tokens,
        "num_ctx": 2048,
        "repeat_penalty": 1.1,
        "repeat_last_n": 64,
        "tfs_z": 1,
        "mirostat": 0,
        "ignore_eos": False,
        "n_probs": 0,
        "min_keep": 0,
        "top_n_sigma": -1,
        "samplers": SAMPLERS,
        "dry_sequence_breakers": ["\n", ":", "\"", "*"],
        "grammar": "",
        "logit_bias": [],
        "cache_prompt": True,
        "n": 1,
        "dynatemp_range": 0,
        "dynatemp_exponent": 1,
    }
    body.update(overrides)
    return body


def koboldcpp_body(prompt: str, *, max_tokens: int = 16, stream: bool = False,
                   **overrides: Any) -> dict[str, Any]:
    """The KoboldCpp type: POST /v1/completions with KoboldCpp's keys mixed in."""
    body = {
        **_common(prompt, max_tokens, stream),
        "api_type": "koboldcpp",
        "api_server": "http://127.0.0.1:5001",
        "max_length": max_tokens,
        "rep_pen": 1.1,
        "rep_pen_range": 320,
        "trim_stop": True,
        "grammar": "",
        "logit_bias": {},
        "n": 1,
    }
    body.update(overrides)
    return body


OPENAI_KEYS = ("model", "prompt", "stream", "temperature", "top_p", "frequency_penalty",
               "presence_penalty", "stop", "seed", "logit_bias", "logprobs", "max_tokens", "n",
               "best_of")


def generic_body(prompt: str, *, max_tokens: int = 16, stream: bool = False,
                 **overrides: Any) -> dict[str, Any]:
    """The Generic (OpenAI-compatible) type: only OpenAI keys survive, stop cut to 4."""
    full = {**_common(prompt, max_tokens, stream), "logit_bias": {}, "seed": -1, "n": 1}
    body = {k: v for k, v in full.items() if k in OPENAI_KEYS}
    body["stop"] = body["stop"][:4]
    body.update(overrides)
    return body


def kobold_generate_body(prompt: str, *, max_length: int = 16, **overrides: Any
                         ) -> dict[str, Any]:
    """The KoboldAI type: POST /api/v1/generate."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_context_length": 2048,
        "max_length": max_length,
        "rep_pen": 1.1,
        "rep_pen_range": 320,
        "rep_pen_slope": 0.7,
        "temperature": 0.7,
        "tfs": 1,
        "top_a": 0,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.05,
        "typical": 1,
        "sampler_order": [6, 0, 1, 3, 4, 2, 5],
        "stop_sequence": STOPS,
        "trim_stop": True,
        "use_default_badwordsids": False,
        "sampler_seed": -1,
        "dynatemp_range": 0,
        "dynatemp_exponent": 1,
        "smoothing_factor": 0,
        "dry_multiplier": 0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_sequence_breakers": ["\n", ":", "\"", "*"],
        "xtc_threshold": 0.1,
        "xtc_probability": 0,
        "nsigma": 0,
        "grammar": "",
        "quiet": True,
        "genkey": None,
        "can_abort": True,
        "api_server": "http://127.0.0.1:5001/api",
    }
    body.update(overrides)
    return body
