"""OpenAI request and answer conversion (no server): pass-through parameters and what they ask
of a backend, the (role, text) reading of tool-calling messages, and a whole answer assembled
from streamed tool-call fragments."""
from __future__ import annotations

import pytest

from backends.base import TextChunk
from router.adapters import openai_convert as oa
from router.core.errors import InvalidArgument

TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}


def test_pass_through_parameters_are_kept_verbatim_and_say_what_they_need():
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], "tool_choice": "required",
            "response_format": {"type": "json_object"}, "top_p": 0.5, "user": "u1", "logprobs": True,
            "seed": 3, "max_tokens": 7, "unknown_field": 1}
    p = oa.gen_params(body)
    assert p.extra == {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"},
                       "top_p": 0.5, "user": "u1", "logprobs": True}
    assert p.seed == 3 and p.max_tokens == 7 and p.raw_messages is None     # plain messages: no raw copy
    n = p.needs(7)
    assert (n.tools, n.json_mode, n.params, n.max_tokens) == (True, True, frozenset({"top_p", "user", "logprobs"}), 7)
    plain = oa.gen_params({"messages": body["messages"], "response_format": {"type": "text"}, "logprobs": False})
    assert plain.extra == {} and plain.needs(5).params == frozenset() and not plain.needs(5).json_mode


@pytest.mark.parametrize(("extra", "msg"), [({"tools": [{"type": "function"}]}, "tools must be a list"),
                                            ({"response_format": {"type": "xml"}}, "response_format must be"),
                                            ({"top_p": "high"}, "top_p must be a number"),
                                            ({"logprobs": "yes"}, "logprobs must be a boolean"),
                                            ({"user": 7}, "user must be a string")])
def test_malformed_pass_through_parameters_are_a_clear_400(extra, msg):
    with pytest.raises(InvalidArgument, match=msg):
        oa.gen_params({"messages": [{"role": "user", "content": "hi"}], **extra})


def test_tool_calling_messages_read_as_text_for_routing_and_go_raw_to_the_backend():
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                          "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]
    assert oa.chat_messages({"messages": msgs}) == (
        ("system", "Be brief."), ("user", "Weather in Paris?"),
        ("assistant", '[tool call] get_weather({"city": "Paris"})'), ("tool", "18 C"))
    p = oa.gen_params({"messages": msgs})
    assert p.raw_messages == msgs and p.needs(4).tools          # tool messages need tool calling
    with pytest.raises(InvalidArgument, match="tool_calls must be a list"):
        oa.chat_messages({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]})


def test_an_answer_merges_tool_call_fragments_by_index_and_concatenates_logprobs():
    a = oa.Answer()
    a.add(TextChunk("", tool_calls=({"index": 0, "id": "c1", "type": "function",
                                     "function": {"name": "get_", "arguments": ""}},)))
    a.add(TextChunk("", tool_calls=({"index": 1, "id": "c2", "function": {"name": "other", "arguments": "{}"}},
                                    {"index": 0, "function": {"name": "weather", "arguments": '{"city":'}})))
    a.add(TextChunk("", tool_calls=({"index": 0, "function": {"arguments": ' "Paris"}'}},)))
    msg = a.message()
    assert msg["content"] is None and [c["id"] for c in msg["tool_calls"]] == ["c1", "c2"]
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    b = oa.Answer()
    b.add(TextChunk("Hel", logprobs={"content": [{"token": "Hel", "logprob": -0.1}]}))
    b.add(TextChunk("lo", logprobs={"content": [{"token": "lo", "logprob": -0.2}]}))
    assert b.message() == {"role": "assistant", "content": "Hello"}
    assert [t["token"] for t in b.logprobs()["content"]] == ["Hel", "lo"]
    assert oa.delta(TextChunk("x")) == {"content": "x"}
    assert oa.delta(TextChunk("", tool_calls=({"index": 0},))) == {"tool_calls": [{"index": 0}]}


def test_neutral_values_ask_nothing_and_completions_take_an_integer_logprobs():
    body = {"messages": [{"role": "user", "content": "hi"}], "top_p": 1, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "parallel_tool_calls": True, "user": "u"}
    assert oa.gen_params(body).extra == {"user": "u"}
    assert oa.gen_params({"prompt": "hi", "logprobs": 0}, chat=False).extra == {}
    assert oa.gen_params({"prompt": "hi", "logprobs": 3}, chat=False).needs(4).params == frozenset({"logprobs"})
