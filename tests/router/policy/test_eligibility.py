"""Capability-aware eligibility: the reasons a backend cannot serve a request, and that the
tokenizer is asked only when characters alone cannot tell."""
from __future__ import annotations

from backends.base import Capabilities
from router.core.config import CapabilitiesConfig
from router.policy.eligibility import Needs, ineligible


class Model:
    def __init__(self, caps: Capabilities, chars_per_token: float = 4.0) -> None:
        self.caps, self.cpt, self.counted = caps, chars_per_token, 0

    def capabilities(self) -> Capabilities:
        return self.caps

    def count_tokens(self, messages) -> int:
        self.counted += 1
        return int(sum(len(c) for _, c in messages) / self.cpt) + 3 * len(messages)


LOCAL = Capabilities(context_window=100, params=frozenset({"user"}))
REMOTE = Capabilities(tools=True, json_mode=True, params=Capabilities.ALL_PARAMS)


def test_each_missing_capability_is_a_reason_and_a_capable_backend_has_none():
    backends = {"local": Model(LOCAL), "remote": Model(REMOTE)}
    needs = Needs(max_tokens=10, tools=True, json_mode=True, params=frozenset({"top_p", "user", "logprobs"}))
    got = ineligible(needs, backends, [("user", "hi")])
    assert set(got) == {"local"}
    assert got["local"] == ("no tool calling (the request has tools or tool messages); no JSON mode (the request "
                            "sets a JSON response_format); does not take logprobs, top_p")
    assert ineligible(Needs(max_tokens=10, params=frozenset({"user"})), backends, [("user", "hi")]) == {}


def test_the_context_window_counts_prompt_and_max_tokens_and_tokenizes_only_when_needed():
    local = Model(LOCAL)
    short = [("user", "x" * 40)]
    assert ineligible(Needs(max_tokens=20), {"local": local}, short) == {} and local.counted == 0
    # 40 characters are at most 40 tokens, plus the template's: with 60 more the window might overflow.
    assert ineligible(Needs(max_tokens=60), {"local": local}, short) == {} and local.counted == 1
    got = ineligible(Needs(max_tokens=95), {"local": local}, short)
    assert got == {"local": "context window 100 tokens < 13 prompt + 95 max_tokens"}
    long = [("user", "word " * 200)]
    assert "context window 100 tokens < 253 prompt + 1 max_tokens" in ineligible(Needs(max_tokens=1),
                                                                                 {"local": local}, long)["local"]
    undeclared = Model(REMOTE)
    assert ineligible(Needs(max_tokens=10_000), {"remote": undeclared}, long) == {} and undeclared.counted == 0


def test_max_output_tokens_and_config_overrides():
    capped = Capabilities(max_output_tokens=256).merged(CapabilitiesConfig(tools=True))
    assert capped == Capabilities(max_output_tokens=256, tools=True)
    assert ineligible(Needs(max_tokens=512), {"m": Model(capped)}, [("user", "hi")]) == {
        "m": "max_tokens 512 > its max output 256 tokens"}
    over = LOCAL.merged(CapabilitiesConfig(context_window=4096, params=["user", "top_p"]))
    assert over.context_window == 4096 and over.params == frozenset({"user", "top_p"}) and not over.tools
    assert LOCAL.merged(None) is LOCAL


def test_non_ascii_text_is_bounded_by_bytes_and_estimated_at_a_token_a_character():
    from backends.base import Backend

    cjk = [("user", "天气很好" * 500)]                      # 2,000 characters, 6,000 UTF-8 bytes
    assert Backend.count_tokens(None, cjk) == 2000 + 4        # type: ignore[arg-type]
    fits = Model(Capabilities(context_window=4000), chars_per_token=1.0)
    assert ineligible(Needs(max_tokens=16), {"m": fits}, cjk) == {}
    assert fits.counted == 1                                   # 2,000 characters but 6,000 bytes: counted
    wide = Model(Capabilities(context_window=4000), chars_per_token=0.4)      # 2.5 tokens a character
    assert ineligible(Needs(max_tokens=16), {"m": wide}, cjk) == {
        "m": "context window 4000 tokens < 5003 prompt + 16 max_tokens"}
