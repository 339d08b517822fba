"""Token bytes to client text: whole UTF-8 characters only, stop strings cut out even across tokens."""

from __future__ import annotations

from sealbox.runtime.engine.text_stream import TextStream


def test_a_character_split_across_tokens_is_sent_whole() -> None:
    stream = TextStream()
    euro = "€".encode()
    assert stream.feed(b"price " + euro[:1]) == "price "
    assert stream.feed(euro[1:2]) == ""
    assert stream.feed(euro[2:] + b"5") == "€5"
    assert stream.finish() == ""


def test_an_invalid_byte_becomes_a_replacement_character_not_an_error() -> None:
    stream = TextStream()
    assert stream.feed(b"a\xffb") == "a\ufffdb"


def test_a_truncated_character_at_the_end_is_flushed_as_a_replacement() -> None:
    stream = TextStream()
    assert stream.feed("é".encode()[:1]) == ""
    assert stream.finish() == "\ufffd"


def test_a_stop_string_spanning_tokens_is_cut_with_everything_after_it() -> None:
    stream = TextStream(("</end>",))
    assert stream.feed(b"hello </") == "hello "
    assert not stream.stopped
    assert stream.feed(b"en") == ""
    assert stream.feed(b"d> and more") == ""
    assert stream.stopped
    assert stream.finish() == ""


def test_held_text_that_turns_out_not_to_be_a_stop_is_released() -> None:
    stream = TextStream(("STOP",))
    assert stream.feed(b"ST") == ""
    assert stream.feed(b"AR") == "STAR"
    assert stream.feed(b"S") == ""
    assert stream.finish() == "S"


def test_the_earliest_of_several_stop_strings_wins() -> None:
    stream = TextStream(("zz", "b"))
    assert stream.feed(b"aabzz") == "aa"
    assert stream.stopped
