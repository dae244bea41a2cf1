"""What part of a request stands for it when it is embedded (router.core.messages)."""
from router.core.messages import prompt_text


def test_prompt_text_uses_last_user_turn_then_context():
    msgs = [("system", "You are terse."), ("user", "Tell me about Paris."), ("assistant", "Paris is the capital of France."),
            ("user", "And its population?")]
    t = prompt_text(None, msgs)
    assert t.startswith("And its population?")
    assert "Paris is the capital" in t and "You are terse" not in t
    assert prompt_text("hello", None) == "hello"
